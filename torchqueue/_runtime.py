"""The running pipeline of one Sequence: its processes, edges, feeder thread and shutdown.

    user iterables ─► feeder thread ─► edge 0 ─► stage 0 workers ─► edge 1 ─► ... ─► edge n ─► consumer
    (this process)    assigns (epoch, seq)        (processes)                                 Collector, in order

NOTE [Shutdown protocol]
------------------------
Every blocking call in this package (channel get/put, credit and lock
acquires) wakes at least every ``POLL_S`` seconds to check the stop event,
so no thread or worker can stay blocked once it is set. ``Runtime.close``:

1. sets the stop event; the feeder thread and the workers leave their loops
   by ``Stopped`` at their next wake-up (nothing is flushed: a stopped
   pipeline's data is dropped). Idle ones wake at once: workers waiting for
   input also watch the stop signal's pipe, threads waiting on a local edge
   are woken (``LocalChannel.wake``), and the feeder's queue of epochs gets
   ``None``;
2. joins the feeder thread (it is upstream and sends nothing after stop);
3. joins every worker for up to ``JOIN_S`` in all (``ERROR_JOIN_S`` when
   an error closes it), then ``terminate()``s
   (SIGTERM) the ones still running (for instance inside a long user
   function), then ``kill()``s (SIGKILL) what is still there;
4. closes this process's ends of the edges, once no thread reads the
   outputs (a consumer in another thread leaves at its next wake-up, by
   ``Stopped``, and gets the public error that the Sequence was closed).

Steps 1-2 and the wait of 3 are ``_ask_to_stop``; the rest, ``_make_stop``, runs in a
``finally``: Ctrl-C during the wait (a second Ctrl-C, while a worker finishes a long
step) goes straight to ``terminate()``, and the exception is raised once nothing is left.

``close`` is idempotent, runs from ``Sequence.close``, leaving a ``with``
block, an error reaching the consumer, and a ``weakref.finalize`` on the
Sequence (garbage collection or interpreter exit). It does nothing in a
process other than the one that started the pipeline (a forked copy).
Workers also exit on their own when this process dies (``_worker``'s
parent watch), and ignore SIGINT: Ctrl-C reaches the consumer only, which
then closes everything. No signal handler of the user is replaced.

Tensors and large arrays travel in shared-memory segments, files in one
directory per pipeline under /dev/shm (see ``_serialize``). A reader unlinks a
segment as it maps it; ``close`` removes the directory with whatever unread
messages left in it, and so do the workers if this process dies.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import multiprocessing.process
import multiprocessing.sharedctypes  # noqa: F401  (else imported by the first pipeline's start: ms of its first batch)
import multiprocessing.synchronize  # noqa: F401  (the same)
import os
import queue
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from multiprocessing.context import BaseContext
from typing import Any

from torchqueue import _forkserver, _generators, _segments, _semnames, _serialize
from torchqueue._channel import Channel, Stopped, StopSignal, wait_acquire
from torchqueue._collect import NOTHING, Collector
from torchqueue._feeder import Feeder
from torchqueue._forkserver import CONTEXT as FORK_SERVER
from torchqueue._handles import ProcessHandle, WorkerHandle, process_stopped
from torchqueue._idle import idle_seconds
from torchqueue._local import LOCAL, LocalContext
from torchqueue._loop import FusedStage, WorkerContext
from torchqueue._mainmodule import TravellingStep, main_reimported
from torchqueue._messages import CONTROL, EndOfEpoch, Envelope, SkipNotice, StartupFailure, WorkerFailure
from torchqueue._meter import Meter
from torchqueue._origins import ItemsRun, Resumed, Tracker
from torchqueue._pauses import Paused, Pauses
from torchqueue._plan import POOL, STREAM, THREAD, Plan, StagePlan
from torchqueue._premap import PremapStage, SlotHolder, Slots
from torchqueue._stuck import IN_FUNCTION, Died, Holder, died_with, holders, raised_text, stopped, timed_out
from torchqueue._threads import LocalChannel, ThreadHandle
from torchqueue._transport import Emitter, PartSizer, observe_bytes, read
from torchqueue._worker import worker_main
from torchqueue.errors import INPUT, PipelineError, WorkerDiedError, capture
from torchqueue.stats import NFIELDS, Field, Stats

logger = logging.getLogger("torchqueue")

_runtimes: weakref.WeakSet[Runtime] = weakref.WeakSet()  # the pipelines this process started


def _disown_workers() -> None:
    """In a process forked from the consumer's by user code (``os.fork``): the pipelines' workers are
    not its children, so multiprocessing's exit handler must not terminate them as its own (it would,
    as DataLoader's workers are, when the fork exits normally)."""
    children = multiprocessing.process._children  # type: ignore[attr-defined]
    for runtime in list(_runtimes):
        for _, _, handle in runtime.workers:
            if isinstance(handle, ProcessHandle):
                children.discard(handle.process)


os.register_at_fork(after_in_child=_disown_workers)

JOIN_S = 2.0
"""Seconds ``close`` waits for workers to leave on their own before terminating them."""

ERROR_JOIN_S = 0.25
"""The same when an error closes the pipeline: the error should reach the user at once, and a worker
still running after a few ``POLL_S`` wake-ups is stuck in a step (a fetch that timed out)."""

READER_LEAVES_S = 2.0
"""How long ``close`` waits for a thread reading the outputs to leave before it closes the edges (it
leaves within ``POLL_S`` of the stop event)."""

HEALTH_S = 0.1
"""How often the consumer checks worker liveness and notices while outputs flow."""

SAMPLE_S = 0.25
"""How often (at first) the consumer copies the stats array into ``Stats.history``."""

BUNDLE_SHARE = 2
"""A bundle holds at most 1/BUNDLE_SHARE of the elements its segment may have in flight, so that
several are in flight at once (one being computed, one being consumed)."""

MAX_SAMPLES = 400
"""History bound: when full, every other snapshot is dropped and snapshots are taken half as often."""


def travelling_steps(plan: Plan, ctx: BaseContext | LocalContext) -> list[TravellingStep]:
    """The step of each stage, to be pickled for each of its workers as the worker starts (``TravellingStep``)."""
    forked = ctx is FORK_SERVER
    method = "fork" if forked else ctx.get_start_method()
    return [TravellingStep(stage.step, stage.name, method, forked) for stage in plan.stages]


class Runtime:
    """Starts the workers at once; feeds queued iterables; hands outputs to the consumer."""

    def __init__(
        self,
        plan: Plan,
        ctx: BaseContext | LocalContext,
        steps: list[TravellingStep],
        ordered: bool,
        skip_errors: bool,
        name: str,
        base_seed: int | None = None,
        first_epoch: int = 0,
    ):
        """``base_seed``: the workers' random streams derive from it (``_seeding``); ``None``: not seeded.
        ``first_epoch``: the number of the first epoch it will be given (a Sequence restarted after
        Ctrl-C goes on numbering its epochs)."""
        self.plan = plan
        self._first_epoch = first_epoch
        self._base_seed = base_seed
        self._ctx = ctx
        self._name = name
        self._stop = StopSignal(ctx)
        self._cancelled = ctx.RawValue("q", -1)
        # edge i feeds stage i (the last one the consumer); a fused stage's input has none
        self._edges = [
            [
                _channel(ctx, plan.channel_capacity(i), plan.local_edge(i))
                for _ in range(stage.inboxes() if stage else 1)
            ]
            if plan.has_edge(i)
            else []
            for i, stage in enumerate([*plan.stages, None])
        ]
        self._events = _channel(ctx, 4 + 2 * sum(s.nworkers for s in plan.stages), ctx is LOCAL)
        # the segments' assigners: the feeder (-1; stage 0 when it runs a first PackStep) and the stream stages
        # (but a last UnpackStep the consumer runs: the consumer ends the segment before it)
        assigners = [-1] + [s.index for s in plan.stages if s.kind == STREAM]
        if plan.feeder_runs_first:
            assigners.remove(-1)
        if plan.consumer_runs_last:
            assigners.remove(len(plan.stages) - 1)
        self._feeder_stage = 0 if plan.feeder_runs_first else -1  # where the feeder's elements get positions
        self._credits = {a: ctx.BoundedSemaphore(plan.credits(a)) for a in assigners}
        self._last_assigner = assigners[-1]  # the consumer closes the last segment
        self._collector = Collector(ordered, self._credits[assigners[-1]].release)
        self._unpack: _ConsumerUnpack | None = None  # a last UnpackStep (made once the rows are laid out)
        self.track_origins = False  # whether ``next_outputs`` tells the runs of a last UnpackStep's items
        self.origin: Any = None  # the origin of the message ``next_outputs`` returned last (``_origins``)
        self.runs: list[ItemsRun] | None = None  # and, of a last UnpackStep's, the origins of its items
        self._stats = ctx.RawArray("d", NFIELDS * sum(s.nworkers for s in plan.stages))
        self._segment_dir: str | None = None  # a pipeline of threads passes objects as they are
        self._bytes_out = {a: ctx.RawValue("d", 0.0) for a in assigners}  # per segment, at its end
        self._rows: dict[int, int] = {}  # stage index -> its first row in the stats array
        self._epochs: queue.Queue[tuple[int, Iterator[Any], bool, Resumed | None] | None] = queue.Queue()  # None: stop
        self._warned: set[str] = set()
        self._feeder_error: BaseException | None = None
        self._failures: dict[tuple[str, int], str] = {}  # a worker's traceback, said as it failed (WorkerFailure)
        self._closed = False
        self._closed_at: float | None = None
        self._oldest_at_close: Holder | None = None  # the call going on as it closed (see close)
        self._owner = os.getpid()
        self._reading = threading.RLock()  # one thread at a time reads the outputs; close() waits for it
        _runtimes.add(self)
        self._started = time.perf_counter()
        self._cpu_started = time.process_time()  # this process's: your loop, the feeder, thread steps
        self._cpu_at_close: float | None = None
        self._idle_started, self._idle_at_close = idle_seconds(), None  # the machine's (see _idle)
        self._pauses, self._paused_at_close = Pauses(idle_seconds), Paused()  # nothing queued (see _pauses)
        self._feeder_body: Feeder | None = None  # its figures: the input's time, and its waits for room
        self._last_health = self._started
        self._samples: list[tuple[float, float, list[float]]] = []  # (seconds since start, of them paused, rows)
        self._sample_every = SAMPLE_S
        self._consumer_wait = self._consumer_work = 0.0  # seconds in and between next_outputs calls
        self._handed_at: float | None = None  # when next_outputs last returned
        self._asked_at: float | None = None  # when the next_outputs call going on began
        self.workers: list[tuple[str, int, Any]] = []  # (stage name, worker index, Process)
        self._row_owners: list[tuple[str, int, Any]] = []  # the same per stats row (a fused stage's: its host's)
        self._workers_up = ctx.Semaphore(0)  # released by each worker once it runs
        self._premaps: dict[int, PremapStage] = {}  # pool stage -> the map stage its workers run first
        # unlinked once every worker runs, or at close (see ``_semnames``)
        self._semaphores = _semnames.semaphore_names(
            self._edges, self._events, self._stop, self._credits, self._workers_up
        )
        self._holds_server = ctx is FORK_SERVER
        if self._holds_server:
            _forkserver.hold()
        self._feeder: threading.Thread | None = None
        self._unlinker: threading.Thread | None = None
        try:  # from here on an error (Ctrl-C too) closes what was made: the segments' directory, the workers
            if ctx is not LOCAL:
                self._segment_dir = _serialize.make_segment_dir()
                _segments.survive_lease_breaks()  # the feeder leases the segments it reuses
            self._start_workers(steps, ordered, skip_errors, assigners)
            if plan.consumer_runs_last:
                last = plan.stages[-1]
                meter = Meter(self._stats, self._rows[last.index], last.name)
                self._unpack = _ConsumerUnpack(last.step, meter, skip_errors, self._warn_skipped, last.index, ordered)
            self._feeder = self._start_feeder()  # Thread.start() waits for the thread: Ctrl-C may come there
            processes = sum(handle.in_own_process for _, _, handle in self.workers)
            if processes:  # else a pipeline of threads (``LOCAL``): it has no named semaphores
                self._unlinker = threading.Thread(
                    target=self._unlink_once_up,
                    args=(processes, self._workers_up),
                    name=f"torchqueue-semaphores-{name}",
                    daemon=True,
                )
                self._unlinker.start()
        except BaseException:
            self.close()
            raise

    # -- start ---------------------------------------------------------------------------------

    def _slots(self, stage: StagePlan) -> Slots:
        """The slots of a premapped stage (its calls at once); their names are unlinked with the others'."""
        slots = Slots(self._ctx, stage.nworkers)
        self._semaphores |= _semnames.semaphore_names(slots)
        return slots

    def _start_workers(
        self, steps: list[TravellingStep], ordered: bool, skip_errors: bool, assigners: list[int]
    ) -> None:
        row = 0
        threads: list[WorkerHandle] = []
        for stage, step in zip(self.plan.stages, steps):
            self._rows[stage.index] = row
            if stage.index in self.plan.premapped:  # in the next stage's workers: a row per slot
                slots = self._slots(stage)
                self._premaps[stage.index + 1] = PremapStage(stage.name, stage.index, step, row, slots)
                for slot in range(stage.nworkers):  # ready with the pool's first worker (``PoolRunner.ready``)
                    self._row_owners.append((stage.name, slot, SlotHolder(slots, slot)))
                    row += 1
                continue
            if self.plan.runs_elsewhere(stage.index):  # in the previous stage's process, or in this one
                host = self.workers[-1][2] if stage.index in self.plan.fused else _ThisProcess()
                if stage.index not in self.plan.fused:  # this process needs no start-up
                    self._stats[row * NFIELDS + Field.READY_AT] = self._started
                self._row_owners.append((stage.name, 0, host))
                row += 1
                continue
            upstream = max(a for a in assigners if a < stage.index)
            fused = self.plan.fused_into(stage.index)
            last = stage if fused is None else fused  # the stage whose outputs these workers send
            split = self.plan.splits_into(last.index)
            for worker in range(stage.nworkers):
                context = WorkerContext(
                    stage_name=stage.name,
                    kind=stage.kind,
                    worker=worker,
                    nworkers=stage.nworkers,
                    step=step,
                    inbox=self._edges[self.plan.input_edge(stage.index)][worker % stage.inboxes()],
                    outbox=self._edges[self.plan.output_edge(stage.index)],
                    split=self._sizer(last.index + 1) if split else None,
                    split_step=self.plan.stages[last.index + 1].name if split else "",
                    in_credits=self._credits[upstream],
                    out_credits=self._credits.get(stage.index),
                    ordered=ordered,
                    skip_errors=skip_errors,
                    stop=self._stop,
                    cancelled=self._cancelled,
                    stats=self._stats,
                    stats_row=row,
                    events=self._events,
                    segment_dir=self._segment_dir,
                    in_bytes=self._bytes_out[upstream] if stage.kind == STREAM else None,
                    stage_index=stage.index,
                    base_seed=self._base_seed,
                    fused=None if fused is None else FusedStage(fused.name, fused.index, steps[fused.index], row + 1),
                    routes=self.plan.routes_items(stage.index),
                    sends_items=self.plan.sends_items(stage.index),
                    local_out=self.plan.local_edge(self.plan.output_edge(stage.index)),
                    premap=self._premaps.get(stage.index),
                    first_epoch=self._first_epoch,
                    joined=self._joined(stage),
                )
                row += 1
                hosted = fused or self.plan.premap_of(stage.index)
                handle = self._handle(context, stage.backend, f"torchqueue:{stage.name}#{worker}", hosted, steps)
                if handle.in_own_process:
                    handle.start()
                else:  # once every process is forked (see ``_threads``)
                    threads.append(handle)
                self.workers.append((stage.name, worker, handle))
                self._row_owners.append((stage.name, worker, handle))
        for handle in threads:
            handle.start()
        logger.debug("started %d workers for %s", len(self.workers), self._name)

    def _handle(
        self, context: WorkerContext, backend: str, name: str, fused: Any, steps: list[TravellingStep]
    ) -> WorkerHandle:
        """The worker that runs ``context``: a thread of this process, or a process of its own."""
        if backend == THREAD:
            return ThreadHandle(context, name)
        step = steps[context.stage_index]

        @contextmanager
        def starting() -> Iterator[None]:
            with (
                step.starting(),
                nullcontext() if fused is None else steps[fused.index].starting(),
                _native_threads_only(self._ctx),
            ):
                yield

        return ProcessHandle(self._ctx, _run_worker, (context, self._workers_up), name, starting)

    def _unlink_once_up(self, workers: int, up: Any) -> None:
        """Thread: once every worker runs (each opened the semaphores as its ``Process`` unpickled),
        nobody needs their names: unlink them (see ``_semnames``)."""
        try:
            for _ in range(workers):
                wait_acquire(up, self._alive)
        except Stopped:  # closed first (it unlinks them), or a worker died before it ran
            return
        _semnames.unlink_now(self._semaphores)

    # -- feeding -------------------------------------------------------------------------------

    def queue(self, epoch: int, iterator: Iterator[Any], in_memory: bool, resume: Resumed | None = None) -> None:
        """Queue one epoch's input; ``in_memory``: reading it never blocks (it may be bundled); ``resume``:
        the epoch restarts there (``_origins``)."""
        self._pauses.queued()
        self._epochs.put((epoch, iterator, in_memory, resume))

    def _alive(self) -> bool:
        return not self._closed and not self._stop.is_set()

    def _writers_alive(self) -> bool:
        """The consumer's liveness check while it reads: a worker killed in the middle of writing a
        message never finishes it, so a reader waiting for the rest must see that death."""
        return self._alive() and all(handle.exitcode is None for _, _, handle in self.workers)

    def _start_feeder(self, left: tuple[int, int] | None = None) -> threading.Thread:
        """A feeder thread, started (``left``: see ``_feed``)."""
        thread = threading.Thread(target=self._feed, args=(left,), name=f"torchqueue-feeder-{self._name}", daemon=True)
        thread.start()
        return thread

    def _feed(self, left: tuple[int, int] | None = None) -> None:
        """Feeder thread: a failure of its own (not of the user's input) is reported by ``check_health``;
        ``left``: it takes over from a thread blocked in the input of that epoch (``Feeder.take_over``)."""
        try:
            if self._feeder_body is None:
                self._feeder_body = self._new_feeder()
            self._feeder_body.run(left)
        except Stopped:
            pass
        except BaseException as exc:
            self._feeder_error = exc

    def _new_feeder(self) -> Feeder:
        """The feeder's body: it sends into the stage after the feeder's (a first PackStep it runs itself)."""
        start = self._feeder_stage
        reader = self.plan.stages[start + 1] if start + 1 < len(self.plan.stages) else None
        split = self._sizer(start + 1) if self.plan.splits_into(start) else None
        packing = self.plan.stages[0] if start == 0 else None
        return Feeder(
            self._epochs,
            Emitter(
                self._edges[start + 1],
                self._alive,
                split,
                reader.name if reader else "",
                packing.name if packing else INPUT,
                self._segment_dir,
                self.plan.sends_items(start),
                self.plan.local_edge(start + 1),
            ),
            self._credits[start],
            self._alive,
            lambda epoch: self._cancelled.value >= epoch,
            self._first_segment_figures if self.plan.can_bundle(start) else None,
            self.plan.credits(start) // BUNDLE_SHARE,
            packing=None if packing is None else (packing.step, Meter(self._stats, self._rows[0], packing.name)),
        )

    def _joined(self, stage: StagePlan) -> tuple[str, int] | None:
        """A join's pool: its name and first stats row (``WorkerContext.joined``); ``None`` for any other stage."""
        pool = self.plan.stages[stage.index - 1] if stage.internal and stage.index > 0 else None
        return (pool.name, self._rows[pool.index]) if pool is not None and pool.kind == POOL else None

    def _sizer(self, pool: int) -> PartSizer:
        """How the writers into stage ``pool`` (a PoolStep) split elements, from its stats rows."""
        first_row = sum(stage.nworkers for stage in self.plan.stages[:pool])
        return PartSizer(self._stats, first_row, self.plan.stages[pool].nworkers)

    def _first_segment_figures(self) -> tuple[float, float]:
        """For the bundle policy: the slowest step's seconds per element, and bytes per element out."""
        step_s = 0.0
        for stage in self.plan.stages[self._feeder_stage + 1 : self.plan.segment_end(self._feeder_stage)]:
            busy = calls = 0.0
            for row in range(self._rows[stage.index], self._rows[stage.index] + stage.nworkers):
                busy += self._stats[row * NFIELDS + Field.BUSY]
                calls += self._stats[row * NFIELDS + Field.IN]
            if calls:
                step_s = max(step_s, busy / calls)
        return step_s, self._bytes_out[self._feeder_stage].value

    # -- consuming -------------------------------------------------------------------------------

    def next_outputs(self, epoch: int, timeout: float | None = None) -> list[Any]:
        """The next payloads of ``epoch`` for the consumer (values or control messages), in order:
        those of one message (a bundle's elements, or one; a last UnpackStep's items), never none.

        Raises ``WorkerDiedError`` / ``PipelineError`` when a worker died or could not start,
        ``TimeoutError`` when nothing came for ``timeout`` seconds, and ``Stopped`` when the
        pipeline was closed meanwhile.
        """
        with self._reading:
            if self._closed:
                raise Stopped
            asked = self._asked_at = time.perf_counter()
            if self._handed_at is not None:  # since the last outputs: the consumer's own work
                self._consumer_work += asked - self._handed_at
            try:
                outputs = self._next_outputs(epoch, timeout)
                if isinstance(outputs[-1], EndOfEpoch):
                    self._pauses.ended()
                return outputs
            finally:
                handed = time.perf_counter()
                self._consumer_wait += handed - asked
                self._asked_at = None
                self._handed_at = None if self._pauses.paused else handed  # a pause is not your loop's work

    def _next_outputs(self, epoch: int, timeout: float | None) -> list[Any]:
        deadline = None if timeout is None else time.perf_counter() + timeout
        while True:
            payloads = self._collector.take(epoch)
            now = time.perf_counter()
            if payloads is not NOTHING:
                if now - self._last_health > HEALTH_S:
                    self._last_health = now
                    self._check_health()
                    self._sample(now)
                self.origin = self._collector.origin
                if self._unpack is None:
                    return payloads
                self.runs = [] if self.track_origins else None
                outputs = self._unpack(payloads, epoch, self.origin, self.runs)
                if outputs:  # an empty list unpacked to nothing (a cancelled epoch's pool parts are empty)
                    return outputs
                continue
            if deadline is not None and now >= deadline:
                self._check_health()  # a dead worker explains the wait better
                assert timeout is not None
                halted = stopped(self._owners())
                raise timed_out(timeout, self._holders(now), self._ready(), halted)
            wait = HEALTH_S if deadline is None else min(HEALTH_S, deadline - now)
            try:
                data = self._edges[self.plan.consumer_edge][0].get(self._writers_alive, timeout=wait)
            except Stopped:
                self._check_health()  # a worker died: WorkerDiedError
                raise
            if data is None:
                self._check_health()
                self._sample(time.perf_counter())
                continue
            envelope = self._read(data)
            observe_bytes(self._bytes_out[self._last_assigner], data, envelope)
            self._collector.add(envelope)

    def _read(self, data: bytearray) -> Envelope:
        """The envelope of ``data``; one whose value does not unpickle here carries the last step's
        error in its place (see ``_unreadable``)."""
        step = self.plan.stages[-1].name
        return read(data, lambda error: capture(step, error), "unpickling its output in the consumer")

    def _holders(self, now: float) -> list[Holder]:
        """The workers that hold elements now (from their stats rows), longest first."""
        return holders(self._owners(), self._stats, now)

    def _oldest_call(self, now: float) -> Holder | None:
        """The call of a step's function going on that began first (``Stats.oldest_call``)."""
        calls = [holder for holder in self._holders(now) if holder.doing.endswith(IN_FUNCTION)]  # stopped ones too
        return calls[0] if calls else None

    def _owners(self) -> list[tuple[str, int, int | None]]:
        """``(step, worker, pid)`` of each stats row, in order."""
        return [(stage, worker, process.pid) for stage, worker, process in self._row_owners]

    def _ready(self) -> tuple[int, int]:
        """How many of the workers' stats rows say their loop began, of how many."""
        rows = [row for row, (_, _, owner) in enumerate(self._row_owners) if not isinstance(owner, SlotHolder)]
        return sum(self._stats[row * NFIELDS + Field.READY_AT] > 0 for row in rows), len(rows)

    def check_health(self) -> None:
        """Warn for skip notices; raise if a worker could not start or died."""
        with self._reading:
            if self._closed:
                raise Stopped
            self._check_health()

    def _check_health(self) -> None:
        while (data := self._read_event()) is not None:
            notice = _serialize.loads(data)
            if isinstance(notice, StartupFailure):
                raise PipelineError(
                    f"worker {notice.worker} of step {notice.step!r} could not start:\n{notice.traceback}"
                )
            if isinstance(notice, SkipNotice):
                self._warn_skipped(notice.step, notice.summary)
            if isinstance(notice, WorkerFailure):
                self._failures[(notice.step, notice.worker)] = notice.traceback
        if self._feeder_error is not None:
            raise PipelineError(f"torchqueue's feeder thread failed: {self._feeder_error!r}") from self._feeder_error
        for stage, worker, handle in self.workers:
            if handle.exitcode is not None and self._alive():
                held = [h for h in self._holders(time.perf_counter()) if h.pid == handle.pid]
                began, exit_text = self._began(handle), handle.describe_exit()
                when = "" if began else " before it started"
                raised = self._failures.get((stage, worker))
                error = WorkerDiedError(
                    f"worker {worker} of step {stage!r} (pid {handle.pid}) died{when}: {exit_text}"
                    + (died_with(held[0], stage) if held else "")
                    + ("" if began else self._reimport_hint())
                    + raised_text(raised)
                )
                if began:  # what it found, for a caller that says it in its own terms (a loader names batches)
                    died = Died((stage, worker, handle.pid), exit_text, held[0] if held else None, raised)
                    error.died = died  # type: ignore[attr-defined]
                raise error from None  # not "during handling of" the wait it ended

    def _began(self, handle: Any) -> bool:
        """Whether the worker's loop began (its stats row says so)."""
        rows = [row for row, (_, _, owner) in enumerate(self._row_owners) if owner is handle]
        return any(self._stats[row * NFIELDS + Field.READY_AT] > 0 for row in rows)

    def _reimport_hint(self) -> str:
        """Why a spawned worker may die before it starts: the script it re-imports starts a pipeline."""
        method = None if self._ctx in (LOCAL, FORK_SERVER) else self._ctx.get_start_method()
        if method not in ("spawn", "forkserver") or not main_reimported():
            return ""
        return (
            f". Under {method!r} each worker first runs your script's top level again, "
            'as multiprocessing does: start pipelines under `if __name__ == "__main__":` (the worker printed '
            "its own error above)"
        )

    def _warn_skipped(self, step: str, summary: str) -> None:
        """Warn, once per step, that ``on_error="skip"`` dropped an element that raised ``summary``."""
        if step in self._warned:
            return
        self._warned.add(step)
        warnings.warn(
            f"step {step!r} raised {summary}; on_error='skip' drops failing elements "
            "(warned once per step; see stats()[step].skipped)",
            RuntimeWarning,
            stacklevel=_user_stacklevel(),
        )

    def _read_event(self) -> bytearray | None:
        """The next notice from a worker, if one is waiting; ``None`` also when its writer died while
        writing it (the death is reported next)."""
        try:
            return self._events.get(self._writers_alive, timeout=0)
        except Stopped:
            if not self._alive():
                raise
            return None

    def cancel(self, epoch: int, timeout: float | None = None) -> None:
        """Abandon ``epoch`` (and earlier): stop feeding it, skip its work, drop its outputs (waiting up to
        ``timeout`` for each of its messages still coming)."""
        logger.debug("%s: epoch %d abandoned, its rest is dropped", self._name, epoch)
        self._cancelled.value = max(self._cancelled.value, epoch)
        left = None if self._feeder_body is None else self._feeder_body.take_over(epoch)
        if left is not None:  # the feeder is blocked in that epoch's input: a new thread goes on without it
            logger.debug("%s: the input of epoch %d blocks in next(); a new feeder thread goes on", self._name, left[0])
            self._feeder = self._start_feeder(left)
        while not isinstance(self.next_outputs(epoch, timeout)[-1], EndOfEpoch):
            pass

    def _sample(self, now: float) -> None:
        """Copy the stats array into the history, every ``_sample_every`` seconds (bounded, see MAX_SAMPLES)."""
        last = self._samples[-1][0] if self._samples else 0.0
        if now - self._started - last < self._sample_every:
            return
        self._samples.append((now - self._started, self._pauses.taken().seconds, self._stats[:]))
        if len(self._samples) > MAX_SAMPLES:
            self._samples = self._samples[1::2]
            self._sample_every *= 2

    def stats(self) -> Stats:
        """The figures now; those of a closed pipeline stay as they were when it closed (a worker
        stopped in the middle of a call or a wait never ends it)."""
        stages = [stage.stats_entry() for stage in self.plan.stages]
        for index in (0, len(stages) - 1):  # a stream step the feeder or the consumer runs: only its calls are busy
            if self.plan.runs_elsewhere(index) and not self.plan.hosted(index):
                stages[index] = stages[index]._replace(is_stream=False, stream=True)
        for index in self.plan.premapped:
            stages[index] = stages[index]._replace(host=self.plan.stages[index + 1].name)
        asked = self._asked_at  # a wait for outputs going on (stats() from another thread) counts
        if self._closed_at is None:
            now, cpu_now, idle_now = time.perf_counter(), time.process_time(), idle_seconds()
            paused = self._pauses.taken((now, cpu_now, idle_now))
        else:
            now, cpu_now, idle_now = self._closed_at, self._cpu_at_close, self._idle_at_close
            paused = self._paused_at_close
        elapsed = now - self._started
        running = max(elapsed - paused.seconds, 1e-9)  # the pauses are not the pipeline's (see _pauses)
        cpu = cpu_now - self._cpu_started - paused.cpu_s
        idle = None
        if idle_now is not None and self._idle_started is not None and paused.idle_s is not None:
            idle = (idle_now - self._idle_started - paused.idle_s) / running
        waited = self._consumer_wait + (max(0.0, now - asked) if asked is not None else 0.0)
        consumer = waited, self._consumer_work, cpu, idle
        feeder = self._feeder_body
        inputs = {"input_s": feeder.input_s, "input_held_s": feeder.held(now)} if feeder is not None else {}
        inputs["oldest_call"] = self._oldest_call(now) if self._closed_at is None else self._oldest_at_close
        return Stats.from_rows(
            stages, self._stats, elapsed, self._samples, self._started, consumer, paused.seconds, **inputs
        )

    # -- shutdown (see the NOTE at the top) ------------------------------------------------------

    @property
    def owner(self) -> int:
        """The process id of the process that started this pipeline."""
        return self._owner

    @property
    def forked_copy(self) -> bool:
        """Whether this is a copy of the pipeline in a process forked from its owner (it cannot be used)."""
        return os.getpid() != self._owner

    def close(self, join_s: float = JOIN_S) -> None:
        if self._closed:
            return
        self._closed = True
        self._closed_at = time.perf_counter()
        self._cpu_at_close, self._idle_at_close = time.process_time(), idle_seconds()
        self._paused_at_close = self._pauses.taken((self._closed_at, self._cpu_at_close, self._idle_at_close))
        if self.forked_copy:
            return
        # the figures after close are those of then: a call going on then (a timeout's) is its process's
        # last, which close ends; stats() names it without a pid
        oldest = self._oldest_call(self._closed_at)
        self._oldest_at_close = dataclasses.replace(oldest, pid=None) if oldest is not None else None
        try:
            self._ask_to_stop(join_s)
        finally:  # also after Ctrl-C during the wait: no worker and no segment outlives close()
            self._make_stop()

    def _ask_to_stop(self, join_s: float) -> None:
        """Tell the feeder and the workers to stop, and give them ``join_s`` to leave on their own."""
        self._stop.set()
        for channel in (c for edge in self._edges for c in edge):  # threads waiting on a local edge
            channel.wake()
        self._epochs.put(None)
        for thread in (getattr(self, "_feeder", None), getattr(self, "_unlinker", None)):  # a start may have failed
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout=join_s)
        deadline = time.monotonic() + join_s
        for _, _, handle in self.workers:
            if not process_stopped(handle.pid):  # a stopped one cannot leave: killed next, at once
                handle.join(timeout=max(0.0, deadline - time.monotonic()))

    def _make_stop(self) -> None:
        """Terminate, then kill, the workers still there; close the edges (once no thread reads them: a
        consumer in another thread leaves at its next wake-up); remove the segments."""
        for _, _, handle in self.workers:
            if handle.exitcode is None:
                handle.force_stop()
        reading = False
        try:
            reading = self._reading.acquire(timeout=READER_LEAVES_S)
            if not reading:
                logger.warning("a thread still reads %s's outputs as it closes", self._name)
        finally:  # also after Ctrl-C during that wait
            try:
                self._release()
            finally:
                if reading:
                    self._reading.release()

    def _release(self) -> None:
        """Close the processes' handles and the edges, remove the segments (no thread reads any more)."""
        workers_gone = all(handle.exitcode is not None for _, _, handle in self.workers if handle.in_own_process)
        for _, _, handle in self.workers:
            handle.close()
        for channel in [*(c for edge in self._edges for c in edge), self._events]:
            channel.close()
        self._stop.close()
        if workers_gone:  # nobody opens the semaphores' names any more
            _semnames.unlink_now(self._semaphores)
        if self._holds_server:  # the last pipeline or loader to close stops the fork server
            self._holds_server = False
            _forkserver.release()
        if self._segment_dir is not None:  # segments kept for reuse, and of messages nobody will read
            _segments.remove_dir(self._segment_dir)
        # Drop every lock, semaphore and process (their names are gone already, see _semnames).
        # The stats array stays for stats().
        self._edges, self._credits, self.workers, self._row_owners = [], {}, [], []
        del self._events, self._stop, self._collector
        logger.debug("closed %s", self._name)

    @property
    def closed(self) -> bool:
        return self._closed


def _channel(ctx: BaseContext | LocalContext, capacity: int, local: bool) -> Channel | LocalChannel:
    """An edge's channel: between two parties of this process, one that passes messages as they are."""
    return LocalChannel(capacity) if local else Channel(ctx, capacity)


def _run_worker(context: WorkerContext, up: Any) -> None:
    """A worker process: it says that it runs (it opened the pipeline's semaphores as its ``Process``
    unpickled: ``Runtime._unlink_once_up``), then runs its loop."""
    up.release()
    worker_main(context)


@contextmanager
def _native_threads_only(ctx: BaseContext) -> Iterator[None]:
    """Around a fork of this process (``ctx`` is the plain fork context: no other Python thread runs, see
    ``sequence._start_context``). CPython 3.12+ warns (``DeprecationWarning``) at a fork while any OS
    thread runs, and ``import numpy`` alone starts OpenBLAS's pool: native threads whose locks their
    libraries' fork handlers take care of, as every DataLoader fork relies on. The warning is silenced
    for that fork only (no other Python thread can see the filter change meanwhile)."""
    if ctx is FORK_SERVER or ctx.get_start_method() != "fork":
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*multi-threaded, use of fork\(\) may lead", category=DeprecationWarning
        )
        yield


def _user_stacklevel() -> int:
    """``warnings.warn``'s stacklevel, called from the caller of this, for the first frame outside
    torchqueue: the user's line that asked for the next output."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


class _ThisProcess:
    """Stands for the process of a stage that runs in this one (the feeder's or the consumer's thread)."""

    def __init__(self) -> None:
        self.pid = os.getpid()


class _ConsumerUnpack:
    """A last UnpackStep, run where the consumer takes outputs: each element's items become outputs.

    Errors are the step's, as in a process of its own: an element that is not iterable is a
    ``TypeError`` at its position (dropped and counted under ``on_error="skip"``)."""

    def __init__(self, step: Any, meter: Meter, skip_errors: bool, warn: Any, stage: int, ordered: bool) -> None:
        self._step = step
        self._meter = meter
        self._skip = skip_errors
        self._warn = warn
        self._positions: dict[int, int] = {}
        self._stage, self._ordered = stage, ordered
        self._origins: dict[int, tuple[int, Tracker]] = {}  # epoch -> (input positions so far, their origins)

    def __call__(self, payloads: list[Any], epoch: int, origin: Any, runs: list[ItemsRun] | None) -> list[Any]:
        """The outputs of ``payloads`` (of one message, whose origin is ``origin``); ``runs``: a list to add
        each element's ``ItemsRun`` to (``None``: not asked), its ``first`` counted among these values."""
        outputs: list[Any] = []
        values = 0  # the values among ``outputs`` (failures are not)
        for payload in payloads:
            if isinstance(payload, CONTROL):
                if isinstance(payload, EndOfEpoch):
                    self._positions.pop(epoch, None)
                    self._origins.pop(epoch, None)
                else:
                    self._took(epoch, origin)
                outputs.append(payload)
                origin = None
                continue
            position = self._positions.get(epoch, 0)
            self._positions[epoch] = position + 1
            tracker = self._took(epoch, origin)
            origin = None  # a bundle's later elements: their positions say it
            self._meter.add(Field.IN, 1)
            try:
                self._step.check(payload)
            except TypeError as exc:
                if not self._skip:
                    outputs.append(capture(self._meter.step, exc, epoch, position))
                    continue
                self._meter.add(Field.SKIPPED, 1)
                self._warn(self._meter.step, f"{type(exc).__name__}: {exc}")
                continue
            before = len(outputs)
            taken = self._origins[epoch][0] - 1  # the element's input position
            skip = tracker.skip if taken == 0 else 0
            outputs.extend(itertools.islice(payload, skip, None) if skip else payload)
            count = len(outputs) - before
            if runs is not None:
                size = _generators.length(payload)
                runs.append(
                    ItemsRun(values, count, tracker.before(taken), tracker.after(taken), self._stage, skip, size)
                )
            values += count
            self._meter.add(Field.OUT, count)
        return outputs

    def _took(self, epoch: int, origin: Any) -> Tracker:
        """Count one more input position of ``epoch`` (its origin told); return the epoch's tracker."""
        taken, tracker = self._origins.get(epoch) or (0, Tracker(self._stage, self._ordered))
        tracker.took(taken, origin)
        self._origins[epoch] = taken + 1, tracker
        return tracker
