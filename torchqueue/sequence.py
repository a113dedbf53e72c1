"""``Sequence``: the public face of a pipeline; epochs in, outputs out.

A ``Sequence`` holds the validated plan (``_plan``) and, once the first
iterable is queued, a ``Runtime`` (``_runtime``) that runs it. Each
``queue_iterable`` call queues one epoch; each ``iter(seq)`` yields the
outputs of the oldest epoch not yet iterated. An iterator abandoned before
its end is cancelled when the next one starts: its remaining input is not
read and its outputs are dropped.

Threads. A Sequence has one consumer at a time. Several threads may share one
iterator (each output goes to one of them; every one of them stops at the
epoch's end): its ``_EpochState.lock`` lets one thread at a time take outputs
from the runtime. A thread that starts an epoch while another thread's
iterator is still going gets a ``RuntimeError`` at once, and that iterator
goes on unharmed. ``queue_iterable`` is safe from any thread.
"""

from __future__ import annotations

import collections.abc
import contextlib
import multiprocessing
import re
import threading
import warnings
import weakref
from collections.abc import Iterable, Iterator
from multiprocessing.context import BaseContext
from typing import Any

from torchqueue._channel import Stopped
from torchqueue._forkserver import CONTEXT as FORK_SERVER
from torchqueue._local import LOCAL
from torchqueue._messages import EndOfEpoch, Failure, Skipped
from torchqueue._origins import UNTRACKED, ItemsRun, Origin, PositionsRun, Resumed, Run, Tracker
from torchqueue._plan import STREAM, Plan, make_plan
from torchqueue._runtime import ERROR_JOIN_S, Runtime, _user_stacklevel, travelling_steps
from torchqueue._seeding import draw_base_seed
from torchqueue._verdict import available_cpus
from torchqueue.errors import PipelineError, TooManyWorkersWarning, rebuild
from torchqueue.stats import Stats

__all__ = ["Sequence"]

_ERROR_LINE = 300
"""The most characters of an earlier error quoted when the Sequence is used again."""

_START_METHODS = ("fork", "spawn", "forkserver")


def resolve_context(context: str | BaseContext | None) -> BaseContext:
    """The start method asked for, as a context, from a start method name, a context, or ``None``
    (Python's default start method); ``_start_context`` picks the one workers start with."""
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
    return context


def _start_context(context: BaseContext) -> BaseContext:
    """The context a pipeline's workers start with, chosen as it starts. Under ``"fork"``: a fork of this
    process while no other Python thread runs, as DataLoader forks (34 ms to the first output); while
    one does (a feeder of another pipeline, a pin-memory thread, the user's, a notebook kernel's), which
    could hold a lock the child would wait on forever, torchqueue's fork server (see ``_forkserver``),
    which forks them from a clean single-threaded process (1.1-1.3 s when it has to start)."""
    if context.get_start_method() == "fork" and threading.active_count() > 1:
        return FORK_SERVER
    return context


def _check_cores(plan: Plan) -> None:
    """Warn (``TooManyWorkersWarning``) when the steps that take ``nworkers`` ask for more worker
    processes than this process has CPUs, as DataLoader warns for ``num_workers``. The one process of a
    Pack/Unpack/RepackStep is not counted (it mostly waits), nor a step that runs in another's process,
    nor a thread step's threads (they are no processes, and share this process's CPUs and GIL)."""
    steps = [
        (stage.name, stage.nworkers)
        for stage in plan.stages
        if stage.kind != STREAM and not plan.in_this_process(stage.index) and not plan.runs_elsewhere(stage.index)
    ]
    workers, cpus = sum(n for _, n in steps), available_cpus()
    if workers > cpus:
        listed = ", ".join(f"{name}: {n}" for name, n in steps)
        warnings.warn(
            f"this Sequence starts {workers} worker processes ({listed}) and this process may use {cpus} CPUs: "
            "workers beyond the cores only share them, and slow each other down; lower the steps' "
            "nworkers (print(seq.stats()) shows which steps need them)",
            TooManyWorkersWarning,
            stacklevel=_user_stacklevel(),
        )


def uses_fork_server(context: str | BaseContext | None) -> bool:
    """Whether the workers of a pipeline made with ``context`` come from torchqueue's fork server."""
    return _start_context(resolve_context(context)) is FORK_SERVER


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
        timeout: Seconds to wait for the next output (``None``: no limit). Waiting longer raises
            ``TimeoutError`` naming the steps that hold elements and the oldest element's
            position, and closes the Sequence. Settable as ``seq.timeout``.

    Random streams: when the workers start (at the first ``queue_iterable``), one base seed is
    drawn from torch's default generator, as ``iter(DataLoader)`` draws one; every worker of every
    step seeds ``random``, numpy and torch from it, its step and its worker index, and anew each
    epoch (``_seeding``). So ``torch.manual_seed`` before makes the draws reproducible.

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
        timeout: float | None = None,
        _seed_workers: bool = True,
        _warn_workers: bool = True,
    ) -> None:
        if not isinstance(ordered, bool):
            raise TypeError(f"ordered must be True or False, got {ordered!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {type(name).__name__}")
        self._plan = make_plan(elements)
        if _warn_workers:  # internal: False for a loader's fetch workers (it warns as DataLoader does)
            _check_cores(self._plan)
        self._ctx = resolve_context(context)
        self._ordered = ordered
        self._skip = on_error == "skip"
        self.name = name or "sequence"
        # internal: False draws no base seed and leaves the workers' random state alone (the step seeds
        # its workers itself: QueueFlowLoader's fetch, as DataLoader seeds them)
        self._seed_workers = _seed_workers
        self.timeout = timeout
        self._runtime: Runtime | None = None
        # two threads that queue at once start one runtime, epochs in turn; and starting an epoch is one
        # thread at a time (the one-consumer check and the hand-over from the previous epoch)
        self._queuing = threading.Lock()
        self._finalizer: weakref.finalize | None = None
        self._queued = 0  # epochs queued so far
        self._next_epoch = 0  # the epoch the next iter() yields
        self._current: _EpochState | None = None  # the epoch iterated last (not its iterator: no cycle)
        self._closed = False
        self._error: BaseException | None = None
        self._interrupted = False  # Ctrl-C stopped the workers: the next call starts new ones

    @property
    def step_names(self) -> list[str]:
        """The names of the steps in order, as ``stats()`` uses them."""
        return [stage.name for stage in self._plan.stages if not stage.internal]

    @property
    def timeout(self) -> float | None:
        """Seconds the consumer waits for the next output before ``TimeoutError`` (``None``: no limit)."""
        return self._timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TypeError(f"timeout must be a number of seconds or None, got {type(value).__name__}")
        if value is not None and not value > 0:
            raise ValueError(f"timeout must be > 0 seconds (or None: wait without limit), got {value!r}")
        self._timeout = value

    def queue_iterable(self, iterable: Iterable[Any]) -> None:
        """Queue one epoch: start feeding ``iterable`` (lazily) and return at once."""
        self._check_open()
        iterator = _iterator(iterable)
        with self._queuing, self._interruptible():
            self._queue(iterator, isinstance(iterable, (range, collections.abc.Sequence)))

    def __call__(self, iterable: Iterable[Any]) -> _EpochIterator:
        """``queue_iterable(iterable)`` then ``iter(self)``; nothing is queued if another thread's
        iteration is going on (``RuntimeError``)."""
        return self._epoch(iterable)

    def _resumable(self, iterable: Iterable[Any], resume: Resumed | None = None) -> _EpochIterator:
        """``self(iterable)``, whose iterator also tells each output's origin (``_next_with_origin``), where
        a checkpoint restarts the epoch to go on after it; ``resume``: the epoch restarts there."""
        return self._epoch(iterable, resume, origins=True)

    def _epoch(self, iterable: Iterable[Any], resume: Resumed | None = None, origins: bool = False) -> _EpochIterator:
        self._check_open()
        iterator = _iterator(iterable)
        with self._queuing, self._interruptible():
            self._check_one_consumer()
            self._queue(iterator, isinstance(iterable, (range, collections.abc.Sequence)), resume)
            if origins:
                assert self._runtime is not None  # started by _queue
                self._runtime.track_origins = True
            epoch = self._next_iterator()
        if origins:
            epoch.state.tracker = Tracker(len(self._plan.stages), self._ordered)
        return epoch

    def __iter__(self) -> _EpochIterator:
        """The outputs of the next queued epoch."""
        with self._queuing, self._interruptible():
            return self._next_iterator()

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

    def _closed_error(self) -> Exception:
        """What a thread gets that was taking outputs when another thread closed this Sequence."""
        if self._error is not None:
            return PipelineError(f"this Sequence was stopped by an error in another thread ({self._error_line()})")
        return RuntimeError("this Sequence was closed while it was being iterated")

    def _error_line(self) -> str:
        """The error that stopped this Sequence, in one line: its type and its message without the
        worker's traceback (the whole of it was raised then), shortened."""
        error = self._error
        message = " ".join(re.split(r"\n\n(?:Worker|Input) traceback:", str(error))[0].split())
        if len(message) > _ERROR_LINE:
            message = message[: _ERROR_LINE - 3] + "..."
        return f"{type(error).__name__}: {message}" if message else type(error).__name__

    def _check_open(self) -> None:
        if self._error is not None:
            raise PipelineError(
                f"this Sequence was stopped by an earlier error ({self._error_line()}); create a new one"
            )
        if self._closed:
            raise RuntimeError("this Sequence is closed")
        if self._runtime is not None and self._runtime.forked_copy:
            raise RuntimeError(
                f"this Sequence runs in process {self._runtime.owner}, of which this process is a fork: its workers "
                "and their queues belong to that process. Create a new Sequence in this process"
            )

    def _queue(self, iterator: Iterator[Any], in_memory: bool, resume: Resumed | None = None) -> None:
        self._restart_if_interrupted()
        runtime = self._start()
        runtime.queue(self._queued, iterator, in_memory, resume)
        self._queued += 1

    def _check_one_consumer(self) -> None:
        """Raise if another thread iterates an epoch of this Sequence now (see the module docstring)."""
        current = self._current
        if current is not None and current.busy_elsewhere():
            raise RuntimeError(
                f"this Sequence is being iterated by thread {current.owner.name!r} (epoch {current.epoch} is not "
                "over): a Sequence has one consumer at a time. Iterate it from one thread, share that one "
                "iterator between threads, or give each thread its own Sequence"
            )

    def _next_iterator(self) -> _EpochIterator:
        """The next queued epoch's iterator; the previous epoch, if not over, is cancelled (``_queuing`` held)."""
        self._check_open()
        self._restart_if_interrupted()
        if self._next_epoch >= self._queued:
            raise RuntimeError("no iterable is queued: call seq.queue_iterable(chunks) first, or iterate seq(chunks)")
        self._check_one_consumer()
        previous = self._current
        if previous is not None and not previous.done:
            try:
                previous.abandon(self._runtime, self.timeout)
            except Stopped:  # closed meanwhile by another thread
                raise self._closed_error() from None
            except KeyboardInterrupt:  # Ctrl-C while cancelling: as while iterating (``_interruptible``)
                raise
            except BaseException as exc:  # a dead worker while cancelling
                self._fail(exc)
                raise
        iterator = _EpochIterator(self, self._next_epoch)
        self._current = iterator.state
        self._next_epoch += 1
        return iterator

    def _start(self) -> Runtime:
        if self._runtime is None:
            base_seed = draw_base_seed() if self._seed_workers else None
            ctx = LOCAL if self._plan.in_one_process else _start_context(self._ctx)
            steps = travelling_steps(self._plan, ctx)
            self._runtime = Runtime(
                self._plan, ctx, steps, self._ordered, self._skip, self.name, base_seed, first_epoch=self._queued
            )
            self._finalizer = weakref.finalize(self, self._runtime.close)
        return self._runtime

    def _interrupt(self) -> None:
        """Ctrl-C reached the consumer while it took outputs or cancelled an epoch: the workers stop, as
        after an error (a read cut short leaves the edges in no state to go on), but the Sequence stays
        usable, as interrupt-and-rerun in a notebook wants. The next call starts new workers
        (``_restart_if_interrupted``); the epochs queued meanwhile are dropped with the old ones."""
        self._interrupted = True
        if self._runtime is not None:  # a second Ctrl-C during close() still stops everything (``Runtime.close``)
            self._runtime.close(join_s=ERROR_JOIN_S)

    @contextlib.contextmanager
    def _interruptible(self) -> Iterator[None]:
        """Ctrl-C while an epoch is being queued, cancelled, or before its iterator is returned, is Ctrl-C
        while iterating (``_interrupt``): an epoch the runtime took, with no iterator of its own or no
        number counted, would hand its outputs to the next call's iterator (the epochs then shifted by one)."""
        try:
            yield
        except KeyboardInterrupt:
            self._interrupt()
            raise

    def _restart_if_interrupted(self) -> None:
        """After Ctrl-C (``_interrupt``), forget the stopped runtime and its epochs (``_queuing`` held)."""
        if not self._interrupted:
            return
        self._interrupted = False
        if self._finalizer is not None:
            self._finalizer()  # closed already: this only drops it
        self._runtime, self._finalizer, self._current = None, None, None
        self._next_epoch = self._queued

    def _fail(self, error: BaseException) -> None:
        self._error = error
        if self._runtime is not None:  # the error is raised once this returns: only a short grace for workers
            self._runtime.close(join_s=ERROR_JOIN_S)
        self.close()


def _iterator(iterable: Iterable[Any]) -> Iterator[Any]:
    try:
        return iter(iterable)
    except TypeError:
        called = f": call it, seq({getattr(iterable, '__name__', 'fn')}(...))" if callable(iterable) else ""
        raise TypeError(f"queue_iterable needs an iterable, got {type(iterable).__name__}{called}") from None


class _EpochState:
    """One epoch as far as it was iterated: what its iterator and its Sequence share.

    The iterator holds its Sequence (to keep it alive while iterated) and the Sequence holds only
    this, so dropping both frees them at once, without waiting for the cyclic garbage collector,
    and the workers stop then.

    ``ready`` holds values only, so that threads sharing the iterator may pop them without a lock;
    the control message that follows them (the epoch's end, a failure) waits in ``control``, and
    is acted on, like every call into the runtime, under ``lock``.
    """

    def __init__(self, epoch: int, iterator: _EpochIterator) -> None:
        self.epoch = epoch
        self.ready: collections.deque[Any] = collections.deque()  # outputs taken from the runtime, not yet yielded
        self.tracker: Tracker | None = None  # asked for origins (``Sequence._resumable``): the outputs' positions
        self.runs: collections.deque[Run] = collections.deque()  # then the origins of the values taken, in runs
        self.values = 0  # and the number of values taken
        self.position = 0  # and the input position of the next payload
        self.control: EndOfEpoch | Failure | None = None  # what comes once ``ready`` is empty
        self.done = False
        self.abandoned = False
        self.lock = threading.Lock()
        self.owner = threading.current_thread()  # the thread that began the epoch
        self._iterator = weakref.ref(iterator)

    def busy_elsewhere(self) -> bool:
        """Whether another thread than the caller's iterates this epoch: it began it, lives, and its
        iterator is not over and not dropped."""
        return (
            not self.done
            and self.owner is not threading.current_thread()
            and self.owner.is_alive()
            and self._iterator() is not None
        )

    def take(self, payloads: list[Any], origin: Any = None, runs: list[ItemsRun] | None = None) -> None:
        """Keep the values of ``payloads`` (skipped elements dropped) up to the first control message;
        where asked, with their origins: the message's ``origin`` (``_origins``), or a last UnpackStep's
        ``runs``."""
        if self.tracker is not None:
            self._take_tracked(payloads, origin, runs)
            return
        for payload in payloads:
            if type(payload) not in _CONTROL:
                self.ready.append(payload)
            elif not isinstance(payload, Skipped):
                self.control = payload
                return

    def _take_tracked(self, payloads: list[Any], origin: Any, runs: list[ItemsRun] | None) -> None:
        """``take``, and a run of the values' origins (those of ``runs``, else one by their positions)."""
        tracker = self.tracker
        assert tracker is not None
        first, position, positions = self.position, self.position, []
        for payload in payloads:
            if type(payload) is EndOfEpoch:
                self.control = payload
                break
            if type(payload) not in _CONTROL:
                self.ready.append(payload)
                positions.append(position)
            position += 1
            if type(payload) is Failure:  # it takes a position, and ends what the epoch yields
                self.control = payload
                break
        if position > first:
            tracker.took(first, origin)  # a resumed epoch's first element: where it restarted
            if runs is None:
                self.runs.append(
                    PositionsRun(self.values, positions, first, tracker.after(first), tracker.start, tracker.ordered)
                )
            else:
                for run in runs:
                    run.first += self.values
                    self.runs.append(run)
        self.values += len(positions)
        self.position = position

    def origin_after(self, consumed: int) -> Origin:
        """The origin of the ``consumed``-th value (1 on): where the epoch restarts to go on after it. Runs
        before it are forgotten: a checkpoint asks only of the values consumed, which only grow."""
        if consumed <= 0:
            return self.tracker.before_first if self.tracker is not None else UNTRACKED
        runs = self.runs  # the producing thread may append meanwhile: only popleft and [0] here
        while runs and runs[0].first + runs[0].count < consumed:
            runs.popleft()
        if not runs or not runs[0].first < consumed <= runs[0].first + runs[0].count:
            return UNTRACKED
        return runs[0].origin(consumed - 1 - runs[0].first)

    def abandon(self, runtime: Runtime | None, timeout: float | None) -> None:
        """Cancel the rest of this epoch (its outputs are dropped); waits for a thread taking outputs of it,
        and up to ``timeout`` for each of the epoch's messages still coming."""
        with self.lock:
            ended = isinstance(self.control, EndOfEpoch)  # its end was taken already
            self.ready.clear()
            self.done = self.abandoned = True
            if not ended and runtime is not None and not runtime.closed:
                runtime.cancel(self.epoch, timeout)


class _EpochIterator(Iterator[Any]):
    """Yields one epoch's outputs; keeps its Sequence alive while it is iterated.

    It takes the outputs of one message at a time from the runtime (a bundle of small elements
    at once) and hands them out one by one: per element it only checks that it may go on.
    """

    def __init__(self, sequence: Sequence, epoch: int) -> None:
        self._sequence = sequence
        self.state = _EpochState(epoch, self)

    def __next__(self) -> Any:
        state = self.state
        if not (state.abandoned or self._sequence._closed):
            try:
                return state.ready.popleft()  # atomic: threads sharing this iterator each get their own
            except IndexError:
                pass
        return self._next_slowly()

    def _consumed(self) -> int:
        """The values this iterator has yielded (``Sequence._resumable``'s iterator: one consumer)."""
        return self.state.values - len(self.state.ready)

    def _origin_after(self, consumed: int) -> Origin:
        """The origin of the ``consumed``-th value it yielded (``_EpochState.origin_after``)."""
        return self.state.origin_after(consumed)

    def _next_with_origin(self) -> tuple[Any, Origin]:
        """The next output and its origin."""
        value = next(self)
        return value, self.state.origin_after(self._consumed())

    def _next_slowly(self) -> Any:
        state = self.state
        with state.lock:
            while True:
                if state.abandoned:
                    raise RuntimeError("this iterator was superseded by a later iter(seq); its epoch was cancelled")
                if state.done:
                    raise StopIteration
                if self._sequence._closed and self._sequence._error is None:  # also between two takes
                    raise self._sequence._closed_error()
                self._sequence._check_open()
                if state.ready:  # another thread sharing this iterator took them
                    return state.ready.popleft()
                if state.control is not None:
                    self._end(state.control)
                self._take()

    def _take(self) -> None:
        """Take the next outputs from the runtime (the state's lock held)."""
        state, sequence = self.state, self._sequence
        runtime = sequence._runtime
        assert runtime is not None  # started by queue_iterable
        try:
            state.take(runtime.next_outputs(state.epoch, sequence.timeout), runtime.origin, runtime.runs)
        except BaseException as exc:  # a dead worker, a timeout, Ctrl-C, ...: nothing can be trusted to go on
            state.done = True
            if isinstance(exc, Stopped) or runtime.closed:  # another thread closed the Sequence
                raise sequence._closed_error() from None
            if isinstance(exc, KeyboardInterrupt):  # the epoch is cancelled, the Sequence lives on
                sequence._interrupt()
            else:
                sequence._fail(exc)
            raise

    def _end(self, control: EndOfEpoch | Failure) -> None:
        """Act on the control message that follows the epoch's last value: stop, or raise the failure."""
        state, sequence = self.state, self._sequence
        state.done = True
        if isinstance(control, Failure):
            error = rebuild(control)
            sequence._fail(error)
            raise error
        runtime = sequence._runtime
        assert runtime is not None  # started by queue_iterable
        try:
            runtime.check_health()  # deliver the epoch's skip warnings before it ends
        except Stopped:
            raise sequence._closed_error() from None
        raise StopIteration


_CONTROL = frozenset({EndOfEpoch, Skipped, Failure})
