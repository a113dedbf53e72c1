"""Batches off the consumer thread: pinning, and copies to the GPU on a dedicated stream.

    pipeline ─► [background thread: pin_memory / .to(device, non_blocking) on its own stream,
                 record an event] ─► bounded queue ─► consumer: current stream waits on the event

The consumer's stream waits for the copy's event before it uses the batch, and every tensor is
``record_stream``-ed on the consumer's stream so the caching allocator does not reuse its memory
while the consumer's kernels may still read it (the pattern of FFCV's EpochIterator and SPDL).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data._utils.pin_memory import pin_memory

from torchqueue._channel import POLL_S

_DONE = object()


def move(data: Any, device: torch.device) -> Any:
    """``data`` with every tensor inside moved to ``device`` (nested containers, Data/Batch, ...)."""
    if isinstance(data, torch.Tensor):
        return data.to(device, non_blocking=True)
    if hasattr(data, "to") and callable(data.to) and type(data).__module__.startswith("torch_geometric"):
        return data.to(device, non_blocking=True)
    if isinstance(data, dict):
        return type(data)({k: move(v, device) for k, v in data.items()})
    if isinstance(data, tuple) and hasattr(data, "_fields"):  # namedtuple
        return type(data)(*(move(v, device) for v in data))
    if isinstance(data, (list, tuple)):
        return type(data)(move(v, device) for v in data)
    if hasattr(data, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.replace(
            data, **{f.name: move(getattr(data, f.name), device) for f in dataclasses.fields(data)}
        )
    return data


def _tensors(data: Any) -> Iterator[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        yield data
    elif isinstance(data, dict):
        for v in data.values():
            yield from _tensors(v)
    elif isinstance(data, (list, tuple)):
        for v in data:
            yield from _tensors(v)
    elif hasattr(data, "__dataclass_fields__"):
        for name in data.__dataclass_fields__:
            yield from _tensors(getattr(data, name))
    elif type(data).__module__.startswith("torch_geometric") and hasattr(data, "to_dict"):
        yield from _tensors(data.to_dict())


def prepare(pin: bool, device: torch.device | None) -> Callable[[Any], Any]:
    """What the background thread does to each batch (runs on the copy stream for CUDA).

    Copies to CUDA always start from pinned memory (``pin`` or not): only those are asynchronous."""
    if device is not None and device.type == "cuda":
        stream = torch.cuda.Stream(device)

        def to_cuda(batch: Any) -> Any:
            pinned = pin_memory(batch, device)
            with torch.cuda.stream(stream):
                moved = move(pinned, device)
                event = torch.cuda.Event()
                event.record(stream)
            return _OnStream(moved, event, device)

        return to_cuda
    if device is not None:
        return lambda batch: move(pin_memory(batch) if pin else batch, device)
    return pin_memory if pin else (lambda batch: batch)


def ready(batch: Any) -> Any:
    """A batch ``prepare``'s work returned, safe to use on the consumer's current stream."""
    return batch.ready() if isinstance(batch, _OnStream) else batch


class _OnStream:
    def __init__(self, batch: Any, event: Any, device: torch.device) -> None:
        self.batch, self.event, self.device = batch, event, device

    def ready(self) -> Any:
        """The batch, safe to use on the consumer's current stream (of the batch's device)."""
        current = torch.cuda.current_stream(self.device)
        current.wait_event(self.event)
        for tensor in _tensors(self.batch):
            tensor.record_stream(current)
        return self.batch


def in_background(batches: Iterator[Any], work: Callable[[Any], Any], depth: int = 2) -> Iterator[Any]:
    """``work(batch)`` for every batch, done by a thread up to ``depth`` batches ahead."""
    handed: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        """Hand ``item`` to the consumer; False if the consumer stopped meanwhile."""
        while not stop.is_set():
            try:
                handed.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if not put(work(batch)):
                    return
            item: Any = _DONE
        except BaseException as exc:  # re-raised in the consumer
            item = exc
        put(item)

    thread = threading.Thread(target=produce, name="torchqueue-device", daemon=True)
    thread.start()
    try:
        while True:
            try:
                item = handed.get(timeout=POLL_S)
            except queue.Empty:
                if not thread.is_alive() and handed.empty():
                    raise RuntimeError("torchqueue's device thread ended without a result") from None
                continue
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield ready(item)
    finally:
        stop.set()
        thread.join(timeout=5)
