"""A ProcessStep fused into the PoolStep after it (``_plan``'s fusion into a pool, ``_premap``): the seed's
``ProcessStep(read_chunk, 2) -> PoolStep(event_to_graph)`` without a hop between them. The contract holds:
outputs and their order, epochs, errors named after the step and element, worker death, stats rows,
at most ``nworkers`` calls of the step at once, and no process or segment left behind."""

from __future__ import annotations

import os
import threading
import time

import pytest

import torchqueue as tq
from torchqueue._plan import make_plan

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_leaks")]


def spin(seconds):
    """``seconds`` on a CPU (this thread's clock: preemption does not shorten it)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def read(n):
    """A chunk's items, and the process that read it."""
    return [(n * 10 + i, os.getpid()) for i in range(10)]


def read_who(n):
    info = tq.get_worker_info()
    return [(info.step, info.id, info.num_workers)]


def who(item):
    info = tq.get_worker_info()
    return item, (info.step, info.num_workers)


def transform(item):
    value, reader = item
    return value * value, reader, os.getpid()


def read_slowly(n):
    """20 ms of reading; each item says when the read ran (``CLOCK_MONOTONIC`` is one clock for all processes)."""
    start = time.monotonic()
    spin(0.02)
    return [(n, start, time.monotonic())] * 3


def first(item):
    return item


def read_one_slow_chunk(n):
    return list(range(8))


def slow_square(x):
    spin(0.03)
    return x * x, os.getpid()


def read_fails_on_three(n):
    if n == 3:
        raise ValueError(f"cannot read chunk {n}")
    return [n]


def read_not_a_list(n):
    return 5


def read_dies_on_two(n):
    if n == 2:
        os._exit(7)
    return [n]


def read_stuck_on_one(n):
    if n == 1:
        threading.Event().wait(30)  # a stuck read (the consumer's timeout ends the wait)
    return [n]


def read_generator_fails_on_two(n):
    yield n
    if n == 2:
        raise ValueError(f"chunk {n} broke halfway")
    yield n + 1


def slow_first(item):
    spin(0.005)
    return item


def read_with_locks(n):
    """Items that do not pickle (a lock each): they never cross a process here."""
    return [(n * 10 + i, threading.Lock()) for i in range(8)]


def slow_value(item):
    spin(0.03)
    return item[0], os.getpid()


# -- the plan ------------------------------------------------------------------------------------


def test_a_process_step_right_before_a_pool_runs_in_the_pools_workers():
    plan = make_plan((tq.ProcessStep(read, 2), tq.PoolStep(transform, nworkers=3), tq.Queue(2)))
    assert plan.premapped == {0}
    assert plan.premap_of(1) is plan.stages[0] and plan.input_edge(1) == 0
    assert plan.has_edge(0) and not plan.has_edge(1)  # the pool reads the step's input; no edge between
    assert plan.message_capacity(0) == 6  # the pool's parts, shared through the same channel
    assert plan.credits(-1) == 1 + 3 + 2  # the input edge, the pool's workers, the consumer's queue


@pytest.mark.parametrize(
    "elements",
    [
        (tq.ProcessStep(read, 2), tq.Queue(2), tq.PoolStep(transform, nworkers=2)),  # a declared queue
        (tq.ProcessStep(read, 2, round_robin=True), tq.PoolStep(transform, nworkers=2)),  # takes them in turn
        (tq.ProcessStep(read, 2, backend="thread"), tq.PoolStep(transform, nworkers=2)),  # no hop to save
        (tq.ProcessStep(read, 1), tq.PoolStep(transform, nworkers=2)),  # one worker: its calls in order
        (tq.ProcessStep(read, 3), tq.PoolStep(transform, nworkers=2)),  # three reads at once need three processes
        (tq.RepackStep(2), tq.ProcessStep(read, 1), tq.PoolStep(transform, nworkers=2)),  # fused into the repack
    ],
)
def test_no_fusion_into_the_pool_where_the_steps_ask_otherwise(elements):
    assert make_plan(elements).premapped == frozenset()


# -- running -------------------------------------------------------------------------------------


def test_the_step_runs_in_the_pools_processes_and_the_outputs_are_those_in_order(start_method):
    with tq.Sequence(tq.ProcessStep(read, 2), tq.PoolStep(transform, nworkers=2), context=start_method) as seq:
        for _ in range(2):  # epochs
            out = list(seq(range(12)))
            assert [[value for value, _, _ in chunk] for chunk in out] == [
                [(n * 10 + i) ** 2 for i in range(10)] for n in range(12)
            ]
        pool = {handle.pid for name, _, handle in seq._runtime.workers if name == "transform"}
        assert len(seq._runtime.workers) == 2  # the pool's two processes, none for the reads
    assert {reader for chunk in out for _, reader, _ in chunk} <= pool


def test_the_step_and_the_pool_each_see_their_own_worker_info(start_method):
    with tq.Sequence(tq.ProcessStep(read_who, 2), tq.PoolStep(who, nworkers=3), context=start_method) as seq:
        out = [item for chunk in seq(range(12)) for item in chunk]
    assert {pool for _, pool in out} == {("who", 3)}
    assert {(step, n) for (step, _, n), _ in out} == {("read_who", 2)}
    assert {slot for (_, slot, _), _ in out} <= {0, 1}


def test_at_most_nworkers_calls_of_the_step_run_at_once():
    with tq.Sequence(tq.ProcessStep(read_slowly, 2), tq.PoolStep(first, nworkers=4)) as seq:
        spans = sorted({(start, end) for chunk in seq(range(12)) for _, start, end in chunk})
        stats = seq.stats()["read_slowly"]
    assert len(spans) == 12
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])  # an end first on a tie
    running = [sum(change for _, change in events[: i + 1]) for i in range(len(events))]
    assert max(running) <= 2  # never three reads at once (four workers would read four chunks at once)
    assert stats.nworkers == 2 and stats.elements_in == 12 and stats.busy_s >= 12 * 0.02 * 0.9
    assert stats.cpu_s >= 12 * 0.02 * 0.9  # the reads' CPU, counted on the step's row


def test_a_worker_with_a_large_element_shares_its_parts_with_the_pools_waiting_workers():
    with tq.Sequence(tq.ProcessStep(read_one_slow_chunk, 2), tq.PoolStep(slow_square, nworkers=2)) as seq:
        list(seq(range(4)))  # both workers started and waiting
        (out,) = list(seq(range(1)))
    assert [value for value, _ in out] == [x * x for x in range(8)]
    assert len({pid for _, pid in out}) == 2


def test_a_failing_call_of_the_step_names_it_and_the_element():
    with tq.Sequence(tq.ProcessStep(read_fails_on_three, 2), tq.PoolStep(first, nworkers=2)) as seq:
        out = []
        with pytest.raises(ValueError, match="cannot read chunk 3") as info:
            out.extend(seq(range(6)))
    assert out == [[0], [1], [2]]
    assert "read_fails_on_three" in str(info.value) and "element 3" in str(info.value)


def test_on_error_skip_drops_the_element_and_counts_it_on_the_steps_row():
    seq = tq.Sequence(tq.ProcessStep(read_fails_on_three, 2), tq.PoolStep(first, nworkers=2), on_error="skip")
    with seq, pytest.warns(RuntimeWarning, match="read_fails_on_three"):
        assert list(seq(range(6))) == [[0], [1], [2], [4], [5]]
        assert seq.stats()["read_fails_on_three"].skipped == 1


def test_a_step_output_that_is_not_iterable_is_the_pools_error():
    with tq.Sequence(tq.ProcessStep(read_not_a_list, 2), tq.PoolStep(first, nworkers=2)) as seq:
        with pytest.raises(TypeError, match="PoolStep needs iterable elements"):
            list(seq(range(3)))


def test_a_worker_that_dies_in_the_step_is_reported_with_the_element_it_held():
    with tq.Sequence(tq.ProcessStep(read_dies_on_two, 2), tq.PoolStep(first, nworkers=2), timeout=60) as seq:
        with pytest.raises(tq.WorkerDiedError, match="element 2 of epoch 0 in step 'read_dies_on_two'"):
            list(seq(range(5)))


def test_a_timeout_names_the_stuck_step_and_element():
    with tq.Sequence(tq.ProcessStep(read_stuck_on_one, 2), tq.PoolStep(first, nworkers=2), timeout=2) as seq:
        with pytest.raises(TimeoutError, match="read_stuck_on_one") as info:
            list(seq(range(3)))
    assert "element 1 of epoch 0" in str(info.value)


def test_an_epoch_left_early_leaves_the_next_one_whole(start_method):
    with tq.Sequence(tq.ProcessStep(read, 2), tq.PoolStep(transform, nworkers=2), context=start_method) as seq:
        for _ in seq(range(20)):
            break
        out = list(seq(range(5)))
    assert [[value for value, _, _ in chunk] for chunk in out] == [
        [(n * 10 + i) ** 2 for i in range(10)] for n in range(5)
    ]


@pytest.mark.parametrize("nworkers", [1, 2])  # a process of its own, or the pool's workers
@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_a_generator_step_that_fails_halfway_is_the_steps_error_at_its_element(on_error, nworkers):
    # before: the worker listing the generator died ("WorkerDiedError: worker 0 of step 'first' ... died")
    steps = tq.ProcessStep(read_generator_fails_on_two, nworkers), tq.PoolStep(first, nworkers=2)
    seq = tq.Sequence(*steps, on_error=on_error)
    with seq:
        if on_error == "raise":
            with pytest.raises(ValueError, match="step 'read_generator_fails_on_two'.* element 2 of epoch 0"):
                list(seq(range(5)))
        else:
            with pytest.warns(RuntimeWarning, match="chunk 2 broke halfway"):
                assert list(seq(range(5))) == [[0, 1], [1, 2], [3, 4], [4, 5]]


def test_the_start_up_counts_the_pools_processes_not_the_steps_slots():
    with tq.Sequence(tq.ProcessStep(read, 2), tq.PoolStep(transform, nworkers=2)) as seq:
        list(seq(range(4)))
        assert seq._runtime._ready()[1] == 2  # the pool's two processes; the slots are no processes


def test_a_step_held_back_by_a_busy_pool_waits_for_room_not_for_input():
    with tq.Sequence(tq.ProcessStep(read, 2), tq.PoolStep(slow_first, nworkers=2)) as seq:
        list(seq(range(20)))  # 200 items of 5 ms: the pool is the bottleneck, its input always queued
        stats = seq.stats()["read"]
    assert stats.wait_out_s > stats.wait_in_s
    assert stats.queue_fill > 0


def test_items_that_do_not_pickle_stay_with_the_worker_that_made_them():
    # before: handing a part of them to a waiting worker raised in the worker, which died
    with tq.Sequence(tq.ProcessStep(read_with_locks, 2), tq.PoolStep(slow_value, nworkers=2)) as seq:
        assert [[v for v, _ in out] for out in seq(range(4))] == [[n * 10 + i for i in range(8)] for n in range(4)]
        (out,) = list(seq(range(1)))  # one element: the other worker waits, and a hand-off is tried
    assert [value for value, _ in out] == list(range(8))
    assert len({pid for _, pid in out}) == 1
