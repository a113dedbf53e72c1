"""The device thread and the nested move, on the CPU (the CUDA stream path is marked cuda in test_loader)."""

from __future__ import annotations

import threading
from collections import namedtuple
from dataclasses import dataclass

import pytest
import torch
from torch_geometric.data import Data

from torchqueue._device import in_background, move, prepare

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
