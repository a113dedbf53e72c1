"""``Sequence``: the public face of a pipeline; epochs in, outputs out.

A ``Sequence`` holds the validated plan (``_plan``) and, once the first
iterable is queued, a ``Runtime`` (``_runtime``) that runs it. Each
``queue_iterable`` call queues one epoch; each ``iter(seq)`` yields the
outputs of the oldest epoch not yet iterated. An iterator abandoned before
its end is cancelled when the next one starts: its remaining input is not
read and its outputs are dropped.
"""

from __future__ import annotations

import collections.abc
import multiprocessing
import threading
import weakref
from collections.abc import Iterable, Iterator
from multiprocessing.context import BaseContext
from typing import Any

from torchqueue._channel import Stopped
from torchqueue._messages import EndOfEpoch, Failure, Skipped
from torchqueue._plan import make_plan
from torchqueue._forkserver import CONTEXT as FORK_SERVER
from torchqueue._runtime import ERROR_JOIN_S, Runtime, travelling_steps
from torchqueue.errors import PipelineError, rebuild
from torchqueue.stats import Stats

__all__ = ["Sequence"]

_START_METHODS = ("fork", "spawn", "forkserver")


def resolve_context(context: str | BaseContext | None) -> BaseContext:
    """The context a pipeline's workers start with, from a start method name, a context, or ``None``
    (Python's default start method). ``"fork"`` gives torchqueue's fork server (see ``_forkserver``):
    its workers are forked, but never from a process with other threads."""
    if context is None:
        context = multiprocessing.get_context()
    elif isinstance(context, str):
        if context not in _START_METHODS:
            raise ValueError(f"context must be one of {_START_METHODS} or a multiprocessing context, got {context!r}")
        context = multiprocessing.get_context(context)
    elif not isinstance(context, BaseContext):
        raise TypeError(
            f"context must be a start method name or a multiprocessing context, got {type(context).__name__}"
        )
    return FORK_SERVER if context.get_start_method() == "fork" else context


class Sequence:
    """A staged multi-process pipeline.

    Args:
        *elements: Steps (``ProcessStep``, ``PoolStep``, ``PackStep``, ``UnpackStep``,
            ``RepackStep``) and queues (``tq.Queue(n)`` or ``torch.multiprocessing.Queue(n)``)
            in order. Where two steps have no queue between them, and after the
            last step, a queue of capacity 1 is inserted.
        ordered: Yield exactly what running every step in order in one process
            would give (default), or outputs as they are ready (``False``).
        context: ``"fork"``, ``"spawn"``, ``"forkserver"`` or a multiprocessing context.
        on_error: ``"raise"`` (default) re-raises a step's exception in the consumer;
            ``"skip"`` drops the failing element, warns once per step and counts it.
        name: A name for logs and thread names.

    Example:
        >>> with tq.Sequence(tq.ProcessStep(read, 2), tq.PoolStep(transform, 4), tq.RepackStep(64)) as seq:
        ...     for batch in seq(chunks):
        ...         ...
    """

    def __init__(
        self,
        *elements: Any,
        ordered: bool = True,
        context: str | BaseContext | None = None,
        on_error: str = "raise",
        name: str | None = None,
    ) -> None:
        if not isinstance(ordered, bool):
            raise TypeError(f"ordered must be True or False, got {ordered!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {type(name).__name__}")
        self._plan = make_plan(elements)
        self._ctx = resolve_context(context)
        self._steps = travelling_steps(self._plan, self._ctx)
        self._ordered = ordered
        self._skip = on_error == "skip"
        self.name = name or "sequence"
        self._runtime: Runtime | None = None
        self._queuing = threading.Lock()  # two threads that queue at once start one runtime, epochs in turn
        self._finalizer: weakref.finalize | None = None
        self._queued = 0  # epochs queued so far
        self._next_epoch = 0  # the epoch the next iter() yields
        self._current: _EpochState | None = None  # the epoch iterated last (not its iterator: no cycle)
        self._closed = False
        self._error: BaseException | None = None

    @property
    def step_names(self) -> list[str]:
        """The names of the steps in order, as ``stats()`` uses them."""
        return [stage.name for stage in self._plan.stages if not stage.internal]

    def queue_iterable(self, iterable: Iterable[Any]) -> None:
        """Queue one epoch: start feeding ``iterable`` (lazily) and return at once."""
        self._check_open()
        try:
            iterator = iter(iterable)
        except TypeError:
            raise TypeError(f"queue_iterable needs an iterable, got {type(iterable).__name__}") from None
        with self._queuing:
            runtime = self._start()
            runtime.queue(self._queued, iterator, isinstance(iterable, (range, collections.abc.Sequence)))
            self._queued += 1

    def __call__(self, iterable: Iterable[Any]) -> _EpochIterator:
        """``queue_iterable(iterable)`` then ``iter(self)``."""
        self.queue_iterable(iterable)
        return iter(self)

    def __iter__(self) -> _EpochIterator:
        """The outputs of the next queued epoch."""
        self._check_open()
        if self._next_epoch >= self._queued:
            raise RuntimeError("no iterable is queued: call seq.queue_iterable(chunks) first, or iterate seq(chunks)")
        previous = self._current
        if previous is not None and not previous.done:
            try:
                previous.abandon(self._runtime)
            except BaseException as exc:  # a dead worker or Ctrl-C while cancelling
                self._fail(exc)
                raise
        iterator = _EpochIterator(self, self._next_epoch)
        self._current = iterator.state
        self._next_epoch += 1
        return iterator

    def stats(self) -> Stats:
        """Per-step figures since the workers started (zeros before)."""
        if self._runtime is None:
            return Stats.from_rows([stage.stats_entry() for stage in self._plan.stages], None, 0.0)
        return self._runtime.stats()

    def close(self) -> None:
        """Stop every worker and free every resource. Idempotent."""
        self._closed = True
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> Sequence:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self._runtime else "not started"
        return f"Sequence({', '.join(self.step_names)}; {state})"

    # -- internals -------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._error is not None:
            raise PipelineError(f"this Sequence was stopped by an earlier error ({self._error!r}); create a new one")
        if self._closed:
            raise RuntimeError("this Sequence is closed")
        if self._runtime is not None and self._runtime.forked_copy:
            raise RuntimeError(
                f"this Sequence runs in process {self._runtime.owner}, of which this process is a fork: its workers "
                "and their queues belong to that process. Create a new Sequence in this process"
            )

    def _start(self) -> Runtime:
        if self._runtime is None:
            self._runtime = Runtime(self._plan, self._ctx, self._steps, self._ordered, self._skip, self.name)
            self._finalizer = weakref.finalize(self, self._runtime.close)
        return self._runtime

    def _fail(self, error: BaseException) -> None:
        self._error = error
        if self._runtime is not None:  # the error is raised once this returns: only a short grace for workers
            self._runtime.close(join_s=ERROR_JOIN_S)
        self.close()


class _EpochState:
    """One epoch as far as it was iterated: what its iterator and its Sequence share.

    The iterator holds its Sequence (to keep it alive while iterated) and the Sequence holds only
    this, so dropping both frees them at once, without waiting for the cyclic garbage collector,
    and the workers stop then."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.ready: collections.deque[Any] = collections.deque()  # outputs taken from the runtime, not yet yielded
        self.done = False
        self.abandoned = False

    def abandon(self, runtime: Runtime | None) -> None:
        """Cancel the rest of this epoch (its outputs are dropped)."""
        ended = bool(self.ready) and isinstance(self.ready[-1], EndOfEpoch)  # its end was taken already
        self.ready.clear()
        self.done = self.abandoned = True
        if not ended and runtime is not None and not runtime.closed:
            runtime.cancel(self.epoch)


class _EpochIterator(Iterator[Any]):
    """Yields one epoch's outputs; keeps its Sequence alive while it is iterated.

    It takes the outputs of one message at a time from the runtime (a bundle of small elements
    at once) and hands them out one by one: per element it only checks that it may go on.
    """

    def __init__(self, sequence: Sequence, epoch: int) -> None:
        self._sequence = sequence
        self.state = _EpochState(epoch)
        self.timeout: float | None = None  # seconds to wait for one output (QueueFlowLoader's timeout=)

    def __next__(self) -> Any:
        state = self.state
        if state.ready and not (state.abandoned or self._sequence._closed):
            payload = state.ready.popleft()
            if type(payload) not in _CONTROL:
                return payload
            state.ready.appendleft(payload)
        return self._next_slowly()

    def _next_slowly(self) -> Any:
        state = self.state
        if state.abandoned:
            raise RuntimeError("this iterator was superseded by a later iter(seq); its epoch was cancelled")
        if state.done:
            raise StopIteration
        sequence = self._sequence
        sequence._check_open()
        runtime = sequence._runtime
        assert runtime is not None  # started by queue_iterable
        while True:
            if not state.ready:
                try:
                    state.ready.extend(runtime.next_outputs(state.epoch, self.timeout))
                except Stopped:
                    state.done = True
                    raise RuntimeError("the Sequence was closed while it was being iterated") from None
                except BaseException as exc:  # a dead worker, Ctrl-C, ...: nothing can be trusted to go on
                    state.done = True
                    sequence._fail(exc)
                    raise
            payload = state.ready.popleft()
            if isinstance(payload, EndOfEpoch):
                state.done = True
                runtime.check_health()  # deliver the epoch's skip warnings before it ends
                raise StopIteration
            if isinstance(payload, Skipped):
                continue
            if isinstance(payload, Failure):
                state.done = True
                error = rebuild(payload)
                sequence._fail(error)
                raise error
            return payload


_CONTROL = frozenset({EndOfEpoch, Skipped, Failure})
