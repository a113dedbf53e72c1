"""The same map, ``[fn(x) for x in items]`` with ``WORKERS`` workers, written the idiomatic way for each library."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

import torchqueue as tq

WORKERS = int(os.environ.get("TORCHQUEUE_BENCH_WORKERS", "2"))
"""Workers per contender (``python -m benchmarks --workers N`` sets it); 2 by default, the CI machine's cores."""


class _Mapped(Dataset):
    def __init__(self, items: list[Any], fn: Callable[[Any], Any]) -> None:
        self.items, self.fn = items, fn

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.fn(self.items[index])


def _no_collate(x: Any) -> Any:
    return x


# Every contender is a generator: the harness consumes the outputs as a training loop would,
# folding them into a checksum without keeping them.


def serial(items: list[Any], fn: Callable[[Any], Any]) -> Iterator[Any]:
    return (fn(x) for x in items)


def torchqueue(
    items: list[Any], fn: Callable[[Any], Any], capacity: int = 4, backend: str = "process"
) -> Iterator[Any]:
    """``capacity``: elements the last queue holds (4: what DataLoader's default prefetch holds here);
    ``backend``: the step's workers, processes or threads."""
    with tq.Sequence(tq.ProcessStep(fn, WORKERS, backend=backend), tq.Queue(capacity)) as seq:
        yield from seq(items)


def dataloader(items: list[Any], fn: Callable[[Any], Any], prefetch_factor: int = 2) -> Iterator[Any]:
    dataset = _Mapped(items, fn)
    yield from DataLoader(
        dataset, batch_size=None, num_workers=WORKERS, collate_fn=_no_collate, prefetch_factor=prefetch_factor
    )


def torchqueue_loader(items: list[Any], fn: Callable[[Any], Any]) -> Iterator[Any]:
    """The drop-in over the same map-style dataset as DataLoader's: its workers index the items."""
    loader = tq.QueueFlowLoader(_Mapped(items, fn), batch_size=None, num_workers=WORKERS, collate_fn=_no_collate)
    yield from loader
    loader.close()


def file_system_sharing(contender: Callable[[], Any]) -> Callable[[], Any]:
    """``contender`` with torch's ``file_system`` sharing strategy: torch's own advice when the default
    (a file descriptor per tensor) runs out of descriptors. Set in the contender's own process."""

    def run() -> Any:
        torch.multiprocessing.set_sharing_strategy("file_system")
        return contender()

    return run


def torchdata(items: list[Any], fn: Callable[[Any], Any], method: str) -> Iterator[Any]:
    import torchdata.nodes as tn

    node = tn.ParallelMapper(tn.IterableWrapper(items), fn, num_workers=WORKERS, method=method, in_order=True)
    yield from tn.Loader(node)


def spdl(items: list[Any], fn: Callable[[Any], Any]) -> Iterator[Any]:
    from concurrent.futures import ProcessPoolExecutor

    from spdl.pipeline import PipelineBuilder

    with ProcessPoolExecutor(WORKERS) as executor:
        pipeline = (
            PipelineBuilder()
            .add_source(items)
            .pipe(fn, concurrency=WORKERS, executor=executor, output_order="input")
            .add_sink(3)
            .build(num_threads=WORKERS)
        )
        with pipeline.auto_stop():
            yield from pipeline.get_iterator(timeout=600)


def all_map_contenders(items: list[Any], fn: Callable[[Any], Any]) -> dict[str, Callable[[], Any]]:
    torch.set_num_threads(1)
    return {
        "serial": lambda: serial(items, fn),
        "DataLoader": lambda: dataloader(items, fn),
        "torchdata.nodes process": lambda: torchdata(items, fn, "process"),
        "torchdata.nodes thread": lambda: torchdata(items, fn, "thread"),
        "SPDL process pool": lambda: spdl(items, fn),
        "torchqueue": lambda: torchqueue(items, fn),
        "torchqueue thread": lambda: torchqueue(items, fn, backend="thread"),
    }
