"""Sequence end to end: ordering, epochs, lazy input, start methods, tensors."""

from __future__ import annotations

import dataclasses
import itertools
import random
import threading
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import double, identity, in_a_segment, random_sleep, segment_spans, square, worker_children
from torch_geometric.data import Batch, Data

import torchqueue as tq

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_leaks")]


def chunks(n, size):
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def sequential(chunked, batch_size):
    flat = [x * x for chunk in chunked for x in chunk]
    return [sum(flat[i : i + batch_size]) for i in range(0, len(flat), batch_size)]


def test_regression_7_the_seed_shape_matches_sequential_under_every_start_method(start_method):
    offset = 1  # a closure over a local, under spawn too
    data = chunks(103, 10)
    with tq.Sequence(
        tq.ProcessStep(lambda c: [x + offset - 1 for x in c], 2),
        tq.PoolStep(square, nworkers=2),
        tq.RepackStep(16),
        tq.ProcessStep(sum, 1),
        tq.Queue(2),
        context=start_method,
    ) as seq:
        assert list(seq(data)) == sequential(data, 16)
        assert list(seq(data[:3])) == sequential(data[:3], 16)  # the same workers, a second epoch


@pytest.mark.parametrize("ordered", [True, False])
def test_random_delays_keep_order_or_at_least_the_multiset(ordered):
    data = chunks(300, 7)
    with tq.Sequence(
        tq.ProcessStep(random_sleep, 2),
        tq.PoolStep(random_sleep, nworkers=3),
        tq.UnpackStep(),
        tq.ProcessStep(random_sleep, 2),
        ordered=ordered,
    ) as seq:
        out = list(seq(data))
    want = list(range(300))
    assert out == want if ordered else sorted(out) == want


def test_regression_3_epochs_queued_ahead_come_out_one_per_iteration_and_never_mix():
    with tq.Sequence(tq.UnpackStep(), tq.RepackStep(3)) as seq:
        for epoch in range(4):
            seq.queue_iterable([[epoch * 10 + i for i in range(4)]])
        got = [list(seq) for _ in range(4)]
    assert got == [[[e * 10, e * 10 + 1, e * 10 + 2], [e * 10 + 3]] for e in range(4)]


def test_regression_3_pack_leaves_no_partial_pack_for_the_next_epoch():
    with tq.Sequence(tq.PackStep(4)) as seq:
        seq.queue_iterable(range(6))
        seq.queue_iterable(range(100, 103))
        assert list(seq) == [[0, 1, 2, 3], [4, 5]]
        assert list(seq) == [[100, 101, 102]]


def test_empty_epochs_yield_nothing_and_do_not_disturb_the_next():
    with tq.Sequence(tq.PoolStep(double, nworkers=2), tq.RepackStep(2)) as seq:
        assert list(seq([])) == []
        assert list(seq([[], [1], []])) == [[2]]
        assert list(seq([])) == []


def test_regression_9_queue_iterable_returns_at_once_and_reads_the_input_lazily():
    released = threading.Event()
    consumed = []

    def gated_endless():
        released.wait()  # queue_iterable must return while the input has produced nothing
        for i in itertools.count():
            consumed.append(i)
            yield i

    with tq.Sequence(tq.ProcessStep(double), tq.Queue(2)) as seq:
        seq.queue_iterable(gated_endless())
        released.set()
        it = iter(seq)
        assert [next(it) for _ in range(50)] == [2 * i for i in range(50)]
        # bounded by the queues, credits and workers, not by the input's length
        # (a generator is never bundled: see test_bundle.py)
        assert len(consumed) < 50 + 10
        del it


def test_a_billion_element_input_streams_in_bounded_memory():
    with tq.Sequence(tq.ProcessStep(double, 2)) as seq:
        it = seq(range(10**9))
        assert list(itertools.islice(it, 1000)) == [2 * i for i in range(1000)]


def test_abandoning_an_epoch_cancels_it_and_the_next_iteration_gets_the_next_epoch():
    with tq.Sequence(tq.ProcessStep(double, 2)) as seq:
        first = seq(range(10**9))
        assert next(first) == 0
        assert list(seq(range(5))) == [0, 2, 4, 6, 8]
        with pytest.raises(RuntimeError, match="superseded"):
            next(first)


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_abandoning_an_epoch_cancels_it_also_when_the_consumer_unpacks_its_elements(backend):
    # before: the cancelled epoch's pool parts arrived empty, the last UnpackStep (run where the consumer
    # takes outputs) made nothing of them, and cancelling failed with an IndexError that closed the Sequence
    with tq.Sequence(tq.PoolStep(double, 1, backend=backend), tq.UnpackStep()) as seq:
        for _ in range(3):
            first = seq([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
            assert next(first) == 2
            assert list(seq([[1, 2], [], [3]])) == [2, 4, 6]  # an empty element unpacks to nothing
            with pytest.raises(RuntimeError, match="superseded"):
                next(first)


def test_pool_workers_start_the_next_element_before_the_slowest_item_of_this_one_ends():
    # element 0 has one slow item; the fast items of elements 1.. must run meanwhile.
    start = time.monotonic()
    with tq.Sequence(tq.PoolStep(_sleep_item, nworkers=2), ordered=False) as seq:
        out = list(seq([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]))
    assert len(out) == 4
    # finished order: three fast elements before the one with the slow item
    assert out[-1] == [1.0, 0.0]
    assert time.monotonic() - start < 10


def _sleep_item(seconds):
    time.sleep(seconds)
    return seconds


def test_user_given_multiprocessing_queues_mean_their_capacity():
    with tq.Sequence(mp.Queue(2), tq.ProcessStep(double), mp.Queue(3), tq.ProcessStep(square)) as seq:
        assert list(seq(range(10))) == [4 * i * i for i in range(10)]


@dataclasses.dataclass
class Sample:
    image: torch.Tensor
    label: int


def make_structures(i):
    return {
        "tensor": torch.full((3, 4), float(i)),
        "nested": [torch.arange(i + 1), (torch.ones(2, dtype=torch.uint8) * i,)],
        "array": np.full((300, 300), i, dtype=np.float32),  # a large array
        "sample": Sample(torch.zeros(2, 2) + i, i),
        "graph": Data(
            x=torch.randn(5, 3, generator=torch.Generator().manual_seed(i)), edge_index=torch.tensor([[0, 1], [1, 2]])
        ),
    }


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_tensors_arrays_dataclasses_and_graphs_arrive_bit_identical(context):
    with tq.Sequence(tq.ProcessStep(make_structures, 2), tq.ProcessStep(identity), context=context) as seq:
        got = list(seq(range(4)))
    for i, value in enumerate(got):
        want = make_structures(i)
        assert torch.equal(value["tensor"], want["tensor"])
        assert torch.equal(value["nested"][0], want["nested"][0]) and torch.equal(
            value["nested"][1][0], want["nested"][1][0]
        )
        assert np.array_equal(value["array"], want["array"]) and value["array"].dtype == np.float32
        assert value["sample"].label == i and torch.equal(value["sample"].image, want["sample"].image)
        assert torch.equal(value["graph"].x, want["graph"].x) and torch.equal(
            value["graph"].edge_index, want["graph"].edge_index
        )


def test_torch_geometric_batches_are_collated_in_a_step():
    def graph(i):
        return Data(
            x=torch.full((i + 1, 2), float(i)), edge_index=torch.zeros(2, 0, dtype=torch.long), y=torch.tensor([i])
        )

    with tq.Sequence(tq.PoolStep(graph, nworkers=2), tq.RepackStep(4), tq.ProcessStep(Batch.from_data_list)) as seq:
        batches = list(seq([list(range(5)), list(range(5, 10))]))
    assert [b.num_graphs for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b.y for b in batches]), torch.arange(10))
    assert batches[0].x.shape == (1 + 2 + 3 + 4, 2)


def test_a_sequence_is_usable_from_a_non_main_thread():
    result = {}

    def run():
        with tq.Sequence(tq.ProcessStep(double, 2)) as seq:
            result["out"] = list(seq(range(20)))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    assert result["out"] == [2 * i for i in range(20)]


def test_iterating_without_a_queued_iterable_says_what_to_do():
    with tq.Sequence(tq.ProcessStep(double)) as seq:
        with pytest.raises(RuntimeError, match="queue_iterable"):
            iter(seq)


def _who(x):
    info = tq.get_worker_info()
    return (info.step, info.id, info.num_workers, x)


def test_get_worker_info_names_step_and_worker_inside_workers_and_is_none_outside():
    assert tq.get_worker_info() is None
    with tq.Sequence(tq.ProcessStep(_who, 2, name="who")) as seq:
        out = list(seq(range(40)))
    assert [x for *_, x in out] == list(range(40))
    assert {(step, n) for step, _, n, _ in out} == {("who", 2)}
    assert {worker for _, worker, _, _ in out} <= {0, 1}


def _many_small_tensors(n):
    return [torch.full((64,), float(i)) for i in range(n)]


def test_received_tensors_live_in_shared_memory_one_segment_per_message():
    with tq.Sequence(tq.ProcessStep(_many_small_tensors, 2)) as seq:
        got = list(seq([10_000, 3]))
    assert [len(g) for g in got] == [10_000, 3]
    spans = segment_spans()
    assert all(in_a_segment(t, spans) for t in got[0])  # 2.5 MB: a view of its segment
    assert not any(in_a_segment(t, spans) for t in got[1])  # 768 bytes: copied out, the segment unmapped at once
    assert all(torch.equal(t, torch.full((64,), float(i))) for i, t in enumerate(got[0]))
    # 10,000 tensors came in one segment: they share one storage mapping
    assert len({t.untyped_storage().data_ptr() for t in got[0]}) == 1


def test_tensors_sent_from_the_consumer_process_arrive_intact():
    inputs = [torch.randn(100, 3, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    with tq.Sequence(tq.ProcessStep(identity), tq.ProcessStep(identity, 2)) as seq:
        got = list(seq(inputs))
    assert all(torch.equal(a, b) for a, b in zip(got, inputs))


def test_closing_with_unread_messages_removes_their_shared_memory():
    seq = tq.Sequence(tq.ProcessStep(_many_small_tensors, 2), tq.Queue(4))
    it = seq([100] * 50)
    next(it)
    seq.close()  # messages with segments are still in the edges: the no_leaks fixture checks /dev/shm


def test_a_feeder_failure_is_reported_instead_of_hanging(monkeypatch):
    import torchqueue._runtime as runtime

    class BrokenEmitter:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("feeder bug")

    monkeypatch.setattr(runtime, "Emitter", BrokenEmitter)
    with tq.Sequence(tq.ProcessStep(double)) as seq:
        with pytest.raises(tq.PipelineError, match="feeder bug"):
            list(seq(range(3)))


def worker_and_element(x):
    random_sleep(x)  # uneven times: any idle worker would take the next element
    return tq.get_worker_info().id, x


@pytest.mark.parametrize("before", [[], [tq.ProcessStep(identity, 2)], [tq.PackStep(1), tq.UnpackStep()]])
def test_round_robin_gives_element_k_to_worker_k_mod_n_in_order(start_method, before):
    with tq.Sequence(
        *before, tq.ProcessStep(worker_and_element, 3, round_robin=True), tq.Queue(4), context=start_method
    ) as seq:
        for _ in range(2):  # positions count from 0 again in every epoch
            assert list(seq(range(40))) == [(x % 3, x) for x in range(40)]


def test_two_threads_queuing_at_once_start_one_pipeline_and_both_epochs_arrive():
    before = {p.pid for p in worker_children()}
    seq = tq.Sequence(tq.ProcessStep(double, 2))
    barrier = threading.Barrier(2)

    def queue(value: int) -> None:
        barrier.wait(timeout=30)
        seq.queue_iterable([value] * 10)

    threads = [threading.Thread(target=queue, args=(value,)) for value in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    children = [p for p in worker_children() if p.pid not in before]  # workers: the fork server's children
    epochs = sorted([list(seq), list(seq)])
    seq.close()
    assert epochs == [[2] * 10, [4] * 10]
    assert len(children) == 2  # one pipeline's workers, not two


def test_close_from_another_thread_while_a_stream_step_runs_ends_the_loop_as_closed():
    rng = random.Random(0)
    tq._forkserver.hold()  # the closer thread runs as each pipeline starts: one fork server for all 20 (was 25 s)
    try:
        _close_from_another_thread_20_times(rng)
    finally:
        tq._forkserver.release()


def _close_from_another_thread_20_times(rng: random.Random) -> None:
    for _ in range(20):
        seq = tq.Sequence(tq.ProcessStep(random_sleep, 2), tq.RepackStep(4), tq.Queue(3))
        closer = threading.Timer(rng.uniform(0.05, 0.3), seq.close)  # at any moment of the stream
        closer.start()
        with pytest.raises(RuntimeError, match="closed") as info:
            for _batch in seq(range(10**6)):
                pass
        closer.join(timeout=30)
        assert not isinstance(info.value, tq.PipelineError), info.value  # not a failure of RepackStep
