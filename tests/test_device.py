"""The device thread and the nested move, on the CPU; the CUDA stream path in the tests marked cuda
(here and in test_loader), which run only where CUDA is."""

from __future__ import annotations

import threading
from collections import namedtuple
from dataclasses import dataclass

import pytest
import torch
from torch_geometric.data import Batch, Data

import torchqueue as tq
from torchqueue import QueueFlowLoader
from torchqueue._device import _tensors, in_background, move, prepare

pytestmark = pytest.mark.timeout(60)

Pair = namedtuple("Pair", "a b")


@dataclass
class Sample:
    image: torch.Tensor
    label: int


def test_work_runs_on_a_background_thread_in_order():
    threads = set()

    def work(batch):
        threads.add(threading.current_thread().name)
        return batch * 2

    assert list(in_background(iter(range(20)), work)) == [2 * i for i in range(20)]
    assert threads == {"torchqueue-device"}


def test_an_exception_of_the_source_or_the_work_reaches_the_consumer():
    def source():
        yield 1
        raise ValueError("source broke")

    with pytest.raises(ValueError, match="source broke"):
        list(in_background(source(), lambda b: b))
    with pytest.raises(ZeroDivisionError):
        list(in_background(iter([1, 0]), lambda b: 1 / b))


def test_closing_early_stops_the_thread():
    gen = in_background(iter(range(10**6)), lambda b: b)
    assert next(gen) == 0
    gen.close()
    assert not any(t.name == "torchqueue-device" and t.is_alive() for t in threading.enumerate())


def test_move_reaches_every_tensor_of_nested_structures():
    batch = {
        "pair": Pair(torch.ones(2), [torch.zeros(1), (torch.arange(3),)]),
        "sample": Sample(torch.ones(2, 2), 3),
        "graph": Data(x=torch.ones(4, 2), edge_index=torch.zeros(2, 0, dtype=torch.long)),
        "other": "text",
    }
    moved = move(batch, torch.device("cpu"))
    assert isinstance(moved["pair"], Pair) and isinstance(moved["sample"], Sample)
    assert torch.equal(moved["pair"].b[1][0], torch.arange(3)) and moved["sample"].label == 3
    assert torch.equal(moved["graph"].x, batch["graph"].x) and moved["other"] == "text"


def test_prepare_without_pinning_or_device_is_the_identity():
    batch = {"x": torch.ones(2)}
    assert prepare(False, None)(batch) is batch


def _to(self, device, non_blocking=False):
    return type(self)(self.value.to(device, non_blocking=non_blocking), moved_to=(str(device), non_blocking))


def _pin_memory(self):
    return type(self)(self.value, pinned=True)


def _init(self, value, moved_to=None, pinned=False):
    self.value, self.moved_to, self.pinned = value, moved_to, pinned


# made at run time, in no torch_geometric module: as the class of ``Batch.from_data_list``'s batches
Carrier = type("Carrier", (), {"__init__": _init, "to": _to, "pin_memory": _pin_memory, "__module__": "abc"})


def graph(i: int) -> Data:
    """A small graph of ``i + 1`` nodes in a chain, its features all ``i``."""
    return Data(
        x=torch.full((i + 1, 3), float(i)),
        edge_index=torch.stack([torch.arange(i), torch.arange(1, i + 1)]),
        y=torch.tensor([i]),
    )


GRAPH_CHUNKS = [[0, 1, 2], [3, 4, 5, 6], [7, 8]]
GRAPH_STEPS = (tq.PoolStep(graph, 2), tq.RepackStep(4), tq.ProcessStep(Batch.from_data_list, 1))


def test_anything_with_a_to_method_is_moved_by_it_whatever_its_module():
    moved = move({"c": [Carrier(torch.ones(2))]}, torch.device("meta"))
    carrier = moved["c"][0]
    assert isinstance(carrier, Carrier) and carrier.moved_to == ("meta", True)
    assert carrier.value.device.type == "meta"


def test_an_object_with_a_to_method_shows_its_tensors_for_record_stream():
    carrier = Carrier({"a": [torch.ones(1), (torch.zeros(2),)]})
    assert sorted(t.numel() for t in _tensors([carrier, carrier])) == [1, 2]


def test_an_object_with_pin_memory_is_pinned_by_it():
    assert prepare(True, None)({"c": Carrier(torch.ones(2))})["c"].pinned


def test_a_torch_geometric_batch_made_at_run_time_is_moved_and_its_tensors_found():
    batch = Batch.from_data_list([graph(i) for i in range(3)])
    assert not type(batch).__module__.startswith("torch_geometric")  # why the module cannot tell
    moved = prepare(False, torch.device("meta"))(batch)
    assert {moved.x.device.type, moved.edge_index.device.type, moved.batch.device.type} == {"meta"}
    found = {id(t) for t in _tensors(moved)}
    assert {id(moved.x), id(moved.edge_index), id(moved.batch), id(moved.ptr), id(moved.y)} <= found


def test_the_pin_path_pins_a_torch_geometric_batch_through_its_pin_memory(monkeypatch):
    pinned = []
    monkeypatch.setattr(Batch, "pin_memory", lambda self: pinned.append(self) or self, raising=False)
    batch = Batch.from_data_list([graph(i) for i in range(3)])
    moved = prepare(True, torch.device("meta"))(batch)
    assert pinned == [batch] and moved.x.device.type == "meta"


@pytest.mark.timeout(120)
def test_a_loader_over_a_pipeline_of_graphs_delivers_batches_on_the_device():
    ds = tq.QueueFlowDataset(GRAPH_CHUNKS, list(GRAPH_STEPS))
    try:
        batches = list(QueueFlowLoader(ds, device="meta"))
    finally:
        ds.close()
    assert [b.num_graphs for b in batches] == [4, 4, 1]
    assert all(t.device.type == "meta" for b in batches for t in (b.x, b.edge_index, b.batch))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("pin_memory", [False, True])
def test_device_cuda_delivers_torch_geometric_batches_on_the_gpu_ready_on_the_current_stream(pin_memory, monkeypatch):
    recorded: list[int] = []
    record_stream = torch.Tensor.record_stream

    def recording(tensor: torch.Tensor, stream: torch.cuda.Stream) -> None:
        recorded.append(tensor.data_ptr())
        record_stream(tensor, stream)

    monkeypatch.setattr(torch.Tensor, "record_stream", recording)
    ds = tq.QueueFlowDataset(GRAPH_CHUNKS, list(GRAPH_STEPS))
    try:
        expected = list(QueueFlowLoader(ds))
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):  # the batches must be ready on the consumer's current stream
            loader = QueueFlowLoader(ds, device="cuda", pin_memory=pin_memory)
            batches = [(b, b.x * 2, b.edge_index + 1) for b in loader]
        side.synchronize()
    finally:
        ds.close()
    assert len(batches) == len(expected) == 3
    for (batch, doubled, shifted), cpu in zip(batches, expected):
        for name in ("x", "edge_index", "batch", "ptr", "y"):
            assert getattr(batch, name).is_cuda, name
            assert torch.equal(getattr(batch, name).cpu(), getattr(cpu, name)), name
            assert getattr(batch, name).data_ptr() in recorded, name
        assert torch.equal(doubled.cpu(), cpu.x * 2) and torch.equal(shifted.cpu(), cpu.edge_index + 1)
