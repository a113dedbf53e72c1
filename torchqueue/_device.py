"""Batches off the consumer thread: pinning, and copies to the GPU on a dedicated stream.

    pipeline ─► [background thread: pin_memory / .to(device, non_blocking) on its own stream,
                 record an event] ─► bounded queue ─► consumer: current stream waits on the event

The consumer's stream waits for the copy's event before it uses the batch, and every tensor the
copy made is ``record_stream``-ed on the consumer's stream so the caching allocator does not reuse
its memory while the consumer's kernels may still read it (the pattern of FFCV's EpochIterator and
SPDL). Objects are told apart by what they can do, not by their class's module: anything with a
``pin_memory()`` method is pinned by it (torch's ``pin_memory``), anything with a ``to`` method is
moved by it (``move``), and its tensors are found by walking its attributes (``_tensors``).
"""

from __future__ import annotations

import dataclasses
import inspect
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data._utils.pin_memory import pin_memory

from torchqueue._channel import POLL_S

_DONE = object()


def move(data: Any, device: torch.device) -> Any:
    """``data`` with every tensor inside moved to ``device``, as Lightning's ``move_data_to_device``.

    Anything with a ``to`` method moves itself: a tensor, a torch_geometric ``Data`` or ``Batch``
    (whatever module its class says: ``Batch.from_data_list`` makes its class at run time), any
    object with ``to(device, non_blocking=...)``. Mappings, namedtuples, tuples, lists and
    dataclasses are rebuilt with their insides moved; anything else is left as it is."""
    if isinstance(data, torch.Tensor):
        return data.to(device, non_blocking=True)
    if _movable(data):
        return _moved(data, device)
    if isinstance(data, dict):
        return type(data)({k: move(v, device) for k, v in data.items()})
    if isinstance(data, tuple) and hasattr(data, "_fields"):  # namedtuple
        return type(data)(*(move(v, device) for v in data))
    if isinstance(data, (list, tuple)):
        return type(data)(move(v, device) for v in data)
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        return dataclasses.replace(
            data, **{f.name: move(getattr(data, f.name), device) for f in dataclasses.fields(data)}
        )
    return data


def _movable(data: Any) -> bool:
    """Whether ``data`` is an object with a ``to`` method (a class with one is not)."""
    return not isinstance(data, type) and callable(getattr(data, "to", None))


def _moved(data: Any, device: torch.device) -> Any:
    """``data.to(device)``, asynchronous where ``to`` takes ``non_blocking``; ``data`` itself where ``to``
    moved it in place (returned ``None``)."""
    moved = data.to(device, non_blocking=True) if _takes_non_blocking(data.to) else data.to(device)
    return data if moved is None else moved


def _takes_non_blocking(method: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some built-in methods)
        return False
    return any(p.name == "non_blocking" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _tensors(data: Any) -> Iterator[torch.Tensor]:
    """Every tensor ``move`` may have made inside ``data``: in the containers and dataclasses it
    rebuilds, and in the attributes of objects with a ``to`` method, followed down through mappings,
    lists, tuples and further such objects (a torch_geometric ``Data``/``Batch`` keeps its tensors in
    stores, which are mappings). Each object is visited once (no endless walk on cycles)."""
    seen: set[int] = set()
    pending = [data]
    while pending:
        item = pending.pop()
        if isinstance(item, torch.Tensor):
            yield item
            continue
        if isinstance(item, (str, bytes, type)) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, Mapping):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
        elif dataclasses.is_dataclass(item):
            pending.extend(getattr(item, f.name) for f in dataclasses.fields(item))
        elif _movable(item) and hasattr(item, "__dict__"):
            pending.extend(vars(item).values())


def deliver(batches: Iterator[Any], pin: bool, device: torch.device | None, fetched: bool = False) -> Iterator[Any]:
    """``batches`` pinned (``pin``, where CUDA is available) and moved to ``device``: by a background
    thread for pinning and CUDA, as they are taken otherwise. ``fetched``: they are a loader's
    ``Fetched`` outputs, whose batch is moved and which the consumer makes ready (``ready``)."""
    pin = pin and torch.cuda.is_available()
    if pin or (device is not None and device.type == "cuda"):
        work = prepare(pin, device)
        if fetched:
            return in_background(batches, lambda out: (work(out[0]), *out[1:]) if out[3] else out)
        return in_background(batches, work)
    if device is None:
        return batches
    if fetched:
        return ((move(out[0], device), *out[1:]) for out in batches)
    return (move(batch, device) for batch in batches)


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
            return _OnStream(moved, event, device, [t for t in _tensors(moved) if t.is_cuda])

        return to_cuda
    if device is not None:
        return lambda batch: move(pin_memory(batch) if pin else batch, device)
    return pin_memory if pin else (lambda batch: batch)


def ready(batch: Any) -> Any:
    """A batch ``prepare``'s work returned, safe to use on the consumer's current stream."""
    return batch.ready() if isinstance(batch, _OnStream) else batch


class _OnStream:
    """A batch copied on the copy stream: ``tensors``, those of its tensors the copy made on the GPU."""

    def __init__(self, batch: Any, event: Any, device: torch.device, tensors: list[torch.Tensor]) -> None:
        self.batch, self.event, self.device, self.tensors = batch, event, device, tensors

    def ready(self) -> Any:
        """The batch, safe to use on the consumer's current stream (of the batch's device)."""
        current = torch.cuda.current_stream(self.device)
        current.wait_event(self.event)
        for tensor in self.tensors:
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
