"""Step declarations: what each stage of a pipeline does, not how it runs.

Steps are small frozen dataclasses. They validate their arguments when they
are built, so a mistake raises in the caller at the call; the runtime
(``_runtime.py``) wires and runs them. ``Queue`` declares the capacity of the
edge between two steps.
"""

from __future__ import annotations

import functools
import multiprocessing.queues
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torchqueue import _generators

__all__ = [
    "PackStep",
    "PoolStep",
    "ProcessStep",
    "Queue",
    "RepackStep",
    "Step",
    "UnpackStep",
]


def _check_count(step: object, field_name: str, what: str, example: str) -> None:
    """``step.<field_name>`` must be an integer >= 1 (a numpy integer too); it is stored as an ``int``."""
    value = getattr(step, field_name)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an int >= 1, got {type(value).__name__} {value!r}: e.g. {example}")
    if value < 1:
        raise ValueError(f"{what} must be >= 1, got {value}: e.g. {example}")
    object.__setattr__(step, field_name, int(value))  # frozen dataclasses


def _check_name(name: object) -> None:
    if name is not None and (not isinstance(name, str) or not name):
        raise TypeError(f"name must be a non-empty str or None, got {name!r}")


def _function_name(fn: Callable[..., Any]) -> str:
    """The name a step of ``fn`` gets by default: a ``functools.partial``'s is its function's."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return "lambda" if name == "<lambda>" else name


class Step(ABC):
    """Base of all steps. ``default_name`` names a step the user did not name."""

    name: str | None

    @abstractmethod
    def default_name(self) -> str:
        """The name shown in errors and stats when ``name=`` was not given."""


BACKENDS = ("process", "thread")
"""What a function step's workers are: processes of their own, or threads of the consumer's process."""


@dataclass(frozen=True)
class _FunctionStep(Step):
    fn: Callable[[Any], Any]
    nworkers: int = 1
    name: str | None = field(default=None, kw_only=True)
    backend: str = field(default="process", kw_only=True)

    def __post_init__(self) -> None:
        kind = type(self).__name__
        if self.backend not in BACKENDS:
            raise ValueError(
                f"{kind} backend must be 'process' or 'thread', got {self.backend!r}: "
                f"e.g. {kind}(my_function, 4, backend='thread') for work that releases the GIL"
            )
        if not callable(self.fn):
            raise TypeError(
                f"{kind} needs a callable as its function, got {type(self.fn).__name__} {self.fn!r}: "
                f"pass a function, e.g. {kind}(my_function, 2)"
            )
        _check_count(self, "nworkers", f"{kind} nworkers", f"{kind}(my_function, nworkers=2)")
        _check_name(self.name)

    def default_name(self) -> str:
        return _function_name(self.fn)


@dataclass(frozen=True)
class ProcessStep(_FunctionStep):
    """Apply ``fn`` to every element in ``nworkers`` processes: one output per element.

    Args:
        fn: Called as ``fn(element)``; any picklable return value.
        nworkers: Number of worker processes (threads with ``backend="thread"``).
        name: Name in errors and stats; default ``fn.__name__``.
        backend: ``"process"`` (default): each worker is a process of its own, and elements cross to
            it pickled (tensors through shared memory). ``"thread"``: each worker is a thread of the
            consumer's process; an element passes to and from another thread step, or the consumer,
            as it is (no copy), and to a process step through the same transport. Threads pay off
            where ``fn`` releases the GIL (numpy, torch, PIL decoding, file reads); Python-bound work
            belongs in processes. A thread worker shares the process's random state: it seeds
            nothing (draw from a generator made from ``get_worker_info().seed``).
        round_robin: Element ``k`` of an epoch goes to worker ``k % nworkers``, and each
            worker takes its elements in order, as DataLoader hands out batches. Random
            draws inside ``fn`` (seeded per worker) then give the same results on every
            run. Default: any idle worker takes the next element (better balance when
            elements take uneven time).
    """

    round_robin: bool = field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.round_robin, bool):
            raise TypeError(f"ProcessStep round_robin must be True or False, got {self.round_robin!r}")


@dataclass(frozen=True)
class PoolStep(_FunctionStep):
    """Apply ``fn`` to every item of every element, items spread over ``nworkers`` processes.

    The output for an element is ``[fn(item) for item in element]``. Items of
    consecutive elements are handed out as they come, so workers never wait
    for the slowest item of one element before starting the next element.

    Args:
        fn: Called as ``fn(item)`` for each item of an element; any picklable return value.
        nworkers: Number of worker processes (threads with ``backend="thread"``).
        name: Name in errors and stats; default ``fn.__name__``.
        backend: ``"process"`` (default) or ``"thread"``, as for ``ProcessStep``.
    """

    nworkers: int = field()  # no default: a pool's size is yours to choose (API.md: ``PoolStep(fn, nworkers)``)


class StreamStep(Step):
    """A step that re-chunks the stream; it runs in one worker and sees its input in order. Its worker
    is a thread where the step before it runs in threads (``backend="thread"``), else a process."""

    @abstractmethod
    def stream(self, elements: Iterator[Any]) -> Iterator[Any]:
        """Turn the elements of one epoch into the outputs of that epoch."""

    def check(self, element: Any) -> None:
        """Raise ``TypeError`` for an element this step cannot take (default: any is fine)."""

    def tracked(self, elements: Iterator[tuple[int, Any]], skip: Callable[[], int]) -> Iterator[tuple[Any, Any]]:
        """``stream`` over ``(position, element)`` pairs, each output with the cursor it leaves in the
        input (``_generators.Cursor``; ``None``: not known, a checkpoint then computes the epoch's start
        again); ``skip()``: items of the element at position 0 to leave out (a resumed epoch's), asked once
        that element is there."""
        return ((output, None) for output in self.stream(element for _, element in elements))


def _require_iterable(step: StreamStep, element: Any) -> None:
    try:
        iter(element)
    except TypeError:
        raise TypeError(
            f"{step.default_name()} needs iterable elements (lists, tuples, ...), got {type(element).__name__}"
        ) from None


@dataclass(frozen=True)
class PackStep(StreamStep):
    """Group ``n`` consecutive elements into a list; the last of an epoch may be shorter.

    Args:
        n: Elements per list.
        name: Name in errors and stats; default ``"PackStep(n)"``.
    """

    n: int
    name: str | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        _check_count(self, "n", "PackStep n", "PackStep(32)")
        _check_name(self.name)

    def default_name(self) -> str:
        return f"PackStep({self.n})"

    def stream(self, elements: Iterator[Any]) -> Iterator[list[Any]]:
        return _generators.pack(elements, self.n)

    def tracked(self, elements: Iterator[tuple[int, Any]], skip: Callable[[], int]) -> Iterator[tuple[Any, Any]]:
        if type(self).stream is not PackStep.stream:  # a subclass's own stream: where it leaves the input is unknown
            return super().tracked(elements, skip)
        return _generators.pack_tracked(elements, self.n)


@dataclass(frozen=True)
class UnpackStep(StreamStep):
    """Emit every item of every (iterable) element as an element of its own.

    Args:
        name: Name in errors and stats; default ``"UnpackStep()"``.
    """

    name: str | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        _check_name(self.name)

    def default_name(self) -> str:
        return "UnpackStep()"

    def stream(self, elements: Iterator[Iterable[Any]]) -> Iterator[Any]:
        return _generators.unpack(elements)

    def tracked(self, elements: Iterator[tuple[int, Any]], skip: Callable[[], int]) -> Iterator[tuple[Any, Any]]:
        if type(self).stream is not UnpackStep.stream:  # a subclass's own stream: where it leaves the input is unknown
            return super().tracked(elements, skip)
        return _generators.unpack_tracked(elements, skip)

    def check(self, element: Any) -> None:
        _require_iterable(self, element)


@dataclass(frozen=True)
class RepackStep(StreamStep):
    """Re-chunk the items of the elements into lists of exactly ``batch_size`` items, in order.

    An element contributes its items (a list, a tuple, another iterable); an
    element that is not iterable, a string, a mapping or a torch_geometric
    ``Data`` counts as one item. The rest of an epoch comes as a shorter list,
    or is dropped with ``drop_last``. A batch never mixes items of two epochs.

    A bare tensor or numpy array is refused with a ``TypeError`` (skipped under
    ``on_error="skip"``): its items would be its slices, so images would be
    batched channel by channel. To batch whole tensors use ``PackStep(n)``; to
    re-chunk the rows of tensors, make each element a list of rows
    (``list(t.unbind(0))``).

    Example:
        >>> tq.Sequence(tq.ProcessStep(read_chunk), tq.RepackStep(64))   # chunks: lists of events
        >>> tq.Sequence(tq.ProcessStep(load_image), tq.PackStep(64))     # elements: image tensors

    Args:
        batch_size: Items per list.
        drop_last: Drop the shorter list at the end of an epoch.
        name: Name in errors and stats; default ``"RepackStep(batch_size)"``.
    """

    batch_size: int
    drop_last: bool = field(default=False, kw_only=True)
    name: str | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        _check_count(self, "batch_size", "RepackStep batch_size", "RepackStep(64)")
        if not isinstance(self.drop_last, bool):
            raise TypeError(f"RepackStep drop_last must be a bool, got {self.drop_last!r}")
        _check_name(self.name)

    def default_name(self) -> str:
        return f"RepackStep({self.batch_size})"

    def stream(self, elements: Iterator[Any]) -> Iterator[list[Any]]:
        return _generators.repack(elements, self.batch_size, self.drop_last)

    def tracked(self, elements: Iterator[tuple[int, Any]], skip: Callable[[], int]) -> Iterator[tuple[Any, Any]]:
        if type(self).stream is not RepackStep.stream:  # a subclass's own stream: where it leaves the input is unknown
            return super().tracked(elements, skip)
        return _generators.repack_tracked(elements, self.batch_size, self.drop_last, skip)

    def check(self, element: Any) -> None:
        if _generators.is_array(element):
            shape = "x".join(str(size) for size in element.shape) or "0-d"
            raise TypeError(
                f"{self.default_name()} got a bare {type(element).__name__} ({shape}): it re-chunks the items of "
                f"each element, and a tensor's items are its slices, so it would batch slices of different "
                f"elements. To batch whole tensors or arrays use PackStep({self.batch_size}) instead; to "
                "re-chunk rows, make each element a list of rows (list(t.unbind(0)))"
            )


@dataclass(frozen=True)
class Queue:
    """A bounded edge between two steps, holding at most ``capacity`` elements.

    ``torch.multiprocessing.Queue(n)`` in a ``Sequence`` means the same as ``Queue(n)``.

    Args:
        capacity: Elements the edge holds at most (an element may be a list).
    """

    capacity: int = 1

    def __post_init__(self) -> None:
        _check_count(self, "capacity", "Queue capacity", "tq.Queue(4)")

    @classmethod
    def from_multiprocessing(cls, queue: multiprocessing.queues.Queue[Any]) -> Queue:
        """The capacity a user-given ``multiprocessing`` queue stands for."""
        maxsize = getattr(queue, "_maxsize", 0)
        if not isinstance(maxsize, int) or maxsize <= 0 or maxsize >= 2**31 - 1:
            raise ValueError(
                "an unbounded multiprocessing Queue cannot bound a pipeline edge: "
                "give it a size, e.g. torch.multiprocessing.Queue(4), or use tq.Queue(4)"
            )
        return cls(maxsize)
