"""Thread workers beside process workers: the same contract (order, epochs, errors, shutdown, stats),
mixed in one pipeline, with no copy between thread steps and no fork while a thread step runs."""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import random
import threading
import warnings

import numpy as np
import pytest
import torch
from conftest import assert_no_workers, fail_on_seven, random_sleep, shm_segments, square

import torchqueue as tq
from torchqueue._plan import make_plan
from torchqueue.sequence import uses_fork_server

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_leaks")]

BACKENDS = ["process", "thread"]


@pytest.fixture(autouse=True)
def _quiet_about_cores():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tq.TooManyWorkersWarning)
        yield


def torchqueue_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("torchqueue:")]


def chunks(n, size):
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


# -- the contract, on both backends ---------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ordered", [True, False])
def test_random_delays_keep_order_or_the_multiset(backend, ordered):
    with tq.Sequence(
        tq.ProcessStep(random_sleep, 2, backend=backend),
        tq.PoolStep(random_sleep, 3, backend=backend),
        tq.UnpackStep(),
        tq.ProcessStep(random_sleep, 2, backend=backend),
        ordered=ordered,
    ) as seq:
        out = list(seq(chunks(200, 7)))
    assert out == list(range(200)) if ordered else sorted(out) == list(range(200))


@pytest.mark.parametrize("backend", BACKENDS)
def test_epochs_stay_apart_and_batches_never_mix_them(backend):
    with tq.Sequence(tq.ProcessStep(square, 2, backend=backend), tq.PackStep(4), tq.ProcessStep(sum, 1)) as seq:
        seq.queue_iterable(range(6))
        seq.queue_iterable(range(6, 9))
        assert list(seq) == [0 + 1 + 4 + 9, 16 + 25]
        assert list(seq) == [36 + 49 + 64]
        assert list(seq(range(3))) == [0 + 1 + 4]


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_exception_is_raised_with_its_type_step_position_and_traceback(backend):
    got = []
    seq = tq.Sequence(tq.ProcessStep(fail_on_seven, 2, name="checker", backend=backend))
    with pytest.raises(ValueError) as info:
        for value in seq(range(20)):
            got.append(value)
    message = str(info.value)
    assert "element seven is bad" in message and "checker" in message
    assert "Traceback" in message and "fail_on_seven" in message
    assert got == list(range(7))  # everything before the failing element, nothing after
    seq.close()
    assert torchqueue_threads() == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_on_error_skip_drops_warns_once_and_counts(backend):
    with tq.Sequence(tq.PoolStep(fail_on_seven, 2, name="checker", backend=backend), on_error="skip") as seq:
        with pytest.warns(RuntimeWarning, match="checker"):
            out = list(seq([list(range(5)), list(range(5, 10))]))
        assert out == [list(range(5)), [5, 6, 8, 9]]
        assert seq.stats()["checker"].skipped == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_break_close_and_garbage_collection_leave_no_worker(backend):
    with tq.Sequence(tq.PoolStep(square, 2, backend=backend), tq.RepackStep(3)) as seq:
        for batch in seq(chunks(1000, 10)):
            assert batch == [0, 1, 4]
            break
    assert torchqueue_threads() == []
    seq = tq.Sequence(tq.ProcessStep(square, 2, backend=backend))
    assert next(iter(seq(range(1000)))) == 0
    del seq
    gc.collect()
    assert torchqueue_threads() == []
    assert_no_workers()


def test_close_wakes_idle_threads_at_once_rather_than_at_their_next_poll(monkeypatch, caplog):
    """Threads waiting on a local edge (for input, or for room) leave when close() wakes them. With a
    poll longer than close's wait for them, a thread woken by its poll alone would be left behind as
    stuck (the warning) until the edges close."""
    for module in ("_threads", "_loop"):
        monkeypatch.setattr(f"torchqueue.{module}.POLL_S", 600.0)
    with caplog.at_level(logging.WARNING, logger="torchqueue"):
        with tq.Sequence(
            tq.ProcessStep(square, 2, backend="thread"), tq.ProcessStep(square, 1, backend="thread")
        ) as seq:
            assert list(seq(range(5))) == [0, 1, 16, 81, 256]  # the threads now wait for input
        with tq.Sequence(
            tq.ProcessStep(square, 2, backend="thread"), tq.ProcessStep(square, 1, backend="thread")
        ) as seq:
            assert next(iter(seq(range(100)))) == 0  # the first step's threads wait for room
    assert "still in its step's call" not in caplog.text
    assert torchqueue_threads() == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_count_every_worker_busy_and_waiting(backend):
    with tq.Sequence(tq.ProcessStep(random_sleep, 2, name="sleep", backend=backend)) as seq:
        assert list(seq(range(50))) == list(range(50))
        row = seq.stats()["sleep"]
    assert (row.nworkers, row.elements_in, row.elements_out) == (2, 50, 50)
    assert row.busy_s > 0 and row.wait_in_s > 0


# -- threads --------------------------------------------------------------------------------------

_made: dict[int, np.ndarray] = {}


def make_array(i):
    _made[i] = np.full(1000, i)
    return _made[i]


def same_array(a):
    return a


def test_between_thread_steps_and_to_the_consumer_an_element_is_not_copied():
    _made.clear()
    with tq.Sequence(
        tq.ProcessStep(make_array, 2, backend="thread"), tq.ProcessStep(same_array, 2, backend="thread")
    ) as seq:
        for i, array in enumerate(seq(range(20))):
            assert array is _made[i]


def test_thread_and_process_steps_mix_across_the_transport():
    def to_tensor(chunk):
        return [torch.full((3,), x) for x in chunk]

    with tq.Sequence(
        tq.ProcessStep(to_tensor, 2, backend="thread"),
        tq.PoolStep(lambda t: t * 2, 2),  # processes
        tq.RepackStep(4),  # a process, as the pool before it
        tq.ProcessStep(torch.stack, 2, backend="thread"),
        tq.UnpackStep(),
        tq.ProcessStep(lambda row: int(row.sum()), 1),
    ) as seq:
        out = list(seq(chunks(30, 7)))
    assert out == [6 * x for x in range(30)]


def report_worker(x):
    info = tq.get_worker_info()
    return x, info.step, info.id, info.num_workers, info.seed, threading.current_thread().name


def test_each_thread_has_its_worker_info_and_the_consumer_none():
    with tq.Sequence(tq.ProcessStep(report_worker, 3, name="where", backend="thread")) as seq:
        out = list(seq(range(60)))
    assert tq.get_worker_info() is None
    by_thread = {(step, worker, n, name) for _, step, worker, n, _, name in out}
    assert {worker for _, worker, _, _ in by_thread} <= {0, 1, 2}
    assert all(step == "where" and n == 3 and name.startswith("torchqueue:where#") for step, _, n, name in by_thread)
    assert len({(worker, name) for _, worker, _, name in by_thread}) == len({name for *_, name in by_thread})


def test_thread_steps_seed_nothing_and_report_a_seed_per_worker_and_epoch():
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    python_state, numpy_state = random.getstate(), np.random.get_state()[1].copy()
    with tq.Sequence(tq.ProcessStep(report_worker, 1, backend="thread")) as seq:
        first = {seed for *_, seed, _ in seq(range(5))}
        second = {seed for *_, seed, _ in seq(range(5))}
    torch_state = torch.get_rng_state()
    assert random.getstate() == python_state
    assert (np.random.get_state()[1] == numpy_state).all()
    torch.manual_seed(5)  # torch's only draw: the pipeline's base seed, as DataLoader's iterator draws one
    torch.empty((), dtype=torch.int64).random_()
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert len(first) == len(second) == 1 and first != second and None not in first


def test_no_fork_happens_while_a_thread_step_runs(start_method):
    forked_with: list[list[str]] = []
    recording = [True]

    def before_fork():
        if recording[0]:
            forked_with.append(torchqueue_threads())

    os.register_at_fork(before=before_fork)
    try:
        with tq.Sequence(
            tq.ProcessStep(square, 2, backend="thread"),
            tq.ProcessStep(square, 2),
            tq.ProcessStep(square, 2, backend="thread"),
            context=start_method,
        ) as seq:
            assert list(seq(range(10))) == [x**8 for x in range(10)]
            if start_method == "fork":  # a thread step runs: the next pipeline forks from the fork server
                assert uses_fork_server("fork")
    finally:
        recording[0] = False
    assert all(threads == [] for threads in forked_with)


def test_a_thread_stuck_in_its_step_does_not_hold_close_and_leaves_when_the_call_returns(caplog):
    release = threading.Event()

    def stuck(x):
        if x == 3:
            release.wait(30)
        return x

    seq = tq.Sequence(tq.ProcessStep(stuck, 1, name="stuck", backend="thread"), timeout=1.0)
    with pytest.raises(TimeoutError, match="stuck"), caplog.at_level(logging.WARNING, logger="torchqueue"):
        list(seq(range(10)))
    assert "still in its step's call" in caplog.text
    release.set()
    for thread in threading.enumerate():
        if thread.name.startswith("torchqueue:stuck"):
            thread.join(timeout=10)
    assert torchqueue_threads() == []


def test_queue_capacities_bound_what_a_thread_step_makes_ahead():
    made = [0]

    def count(x):
        made[0] += 1
        return x

    with tq.Sequence(tq.ProcessStep(count, 1, backend="thread"), tq.Queue(2)) as seq:
        for taken, _ in enumerate(seq(range(1000)), start=1):
            assert made[0] <= taken + 6  # the credits of the segment: edges, the worker, the consumer's hand
            if taken == 50:
                break


def test_a_pipeline_of_threads_starts_no_process_and_makes_no_shared_memory_name():
    """Every party in this process: threading's objects, not multiprocessing's named semaphores and arena
    (``_local``), no segment directory, and no thread left to unlink names. The contract still holds:
    skip notices travel, a failure stops the pipeline with its step's error."""
    before = shm_segments()
    seq = tq.Sequence(
        tq.ProcessStep(fail_on_seven, 2, backend="thread"), tq.RepackStep(3), on_error="skip", context="spawn"
    )
    try:
        outputs = seq(range(10))
        first = next(outputs)
        assert shm_segments() == before  # no sem.* name, no torchqueue-* segment directory
        assert multiprocessing.active_children() == []
        assert not any(t.name.startswith("torchqueue-semaphores") for t in threading.enumerate())
        with pytest.warns(RuntimeWarning, match="fail_on_seven"):
            rest = list(outputs)
    finally:
        seq.close()
    assert [x for batch in [first, *rest] for x in batch] == [0, 1, 2, 3, 4, 5, 6, 8, 9]
    assert seq.stats()["fail_on_seven"].skipped == 1
    assert torchqueue_threads() == []


# -- declaration and plan -------------------------------------------------------------------------


def test_an_unknown_backend_is_refused_at_the_call():
    with pytest.raises(ValueError, match="backend must be 'process' or 'thread'"):
        tq.ProcessStep(square, 2, backend="threads")
    with pytest.raises(ValueError, match="backend"):
        tq.PoolStep(square, 2, backend=None)


def test_a_stream_stage_runs_where_the_step_before_it_runs_and_edges_between_threads_are_local():
    plan = make_plan(
        (
            tq.ProcessStep(square, 2, backend="thread"),
            tq.RepackStep(4),
            tq.ProcessStep(sum, 1),
            tq.PoolStep(square, 2),
            tq.ProcessStep(sum, 1, backend="thread"),
        )
    )
    assert [s.backend for s in plan.stages] == ["thread", "thread", "process", "process", "process", "thread"]
    assert plan.fused == frozenset()  # the map after the thread repack is a process: not fused into a thread
    assert [plan.local_edge(e) for e in range(len(plan.stages) + 1)] == [True, True, False, False, False, False, True]
    assert not plan.in_one_process
    assert make_plan((tq.ProcessStep(square, 2, backend="thread"), tq.RepackStep(4))).in_one_process


def test_a_queueflow_dataset_mixes_thread_and_process_steps_under_the_loader():
    dataset = tq.QueueFlowDataset(
        chunks(40, 8),
        [tq.ProcessStep(same_array, 1, backend="thread"), tq.PoolStep(square, 2), tq.RepackStep(5)],
    )
    loader = tq.QueueFlowLoader(dataset, batch_size=None)
    try:
        for _ in range(2):  # two epochs, the same workers
            batches = list(loader)
            assert [x for batch in batches for x in batch] == [x * x for x in range(40)]
            assert all(len(batch) == 5 for batch in batches)
    finally:
        loader.close()
        dataset.close()  # the dataset owns its pipeline (it stays up across epochs)
    assert torchqueue_threads() == []
