"""What runs inside a worker process: one loop per kind of stage.

Every loop has the same shape (torch's ``_worker_loop`` and ``pin_memory``'s
``do_one_step``): receive with a timeout and a stop check, do the work,
send with a timeout and a stop check, until the runtime sets the stop event
(``Stopped`` is raised out of the blocking call and the process exits 0).

- map (ProcessStep): one element in, ``fn(element)`` out, position kept;
- pool (PoolStep): one part (a list of items) in, ``[fn(item) ...]`` out;
- stream (Pack/Unpack/RepackStep, joins): a ``Collector`` restores the
  epoch's order, the step's generator re-chunks it, outputs get new positions.

A worker's exception becomes a ``Failure`` in the data stream at the
element's position, so the consumer raises it exactly where the element
would have come. A thread watches the parent: if it dies, the worker exits.
"""

from __future__ import annotations

import gc
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from torchqueue import _serialize
from torchqueue._channel import POLL_S, Channel, Stopped, StopSignal, wait_acquire
from torchqueue._collect import NOTHING, Collector
from torchqueue._mainmodule import TravellingStep
from torchqueue._messages import CONTROL, Bundle, EndOfEpoch, Envelope, Failure, SkipNotice, Skipped, StartupFailure
from torchqueue._meter import Meter
from torchqueue._seeding import EpochSeeds
from torchqueue._transport import Emitter, PartSizer, observe_bytes, read
from torchqueue.errors import capture
from torchqueue.stats import Field
from torchqueue.steps import StreamStep
from torchqueue.worker_info import WorkerInfo, set_worker_info

_PASSED_ON = frozenset({Failure, Skipped})
"""Items of a bundle that are not work: an element that failed or was skipped upstream."""


@dataclass(frozen=True)
class FusedStage:
    """A one-worker map stage that runs inside a stream stage's worker (``_plan``'s fusion)."""

    name: str
    index: int
    step: TravellingStep
    stats_row: int


@dataclass(frozen=True)
class WorkerContext:
    """Everything one worker needs; built by the runtime, pickled to spawned workers."""

    stage_name: str
    kind: str
    worker: int
    nworkers: int
    step: TravellingStep  # pickled for this worker as it starts
    inbox: Channel  # this worker's: shared by the stage's workers, or its own (round robin)
    outbox: list[Channel]  # the next stage's inboxes
    split: PartSizer | None  # the next stage is a pool: how many parts an element goes in
    split_step: str  # the name of that pool, for errors
    in_credits: Any  # stream stages: released per element taken out of order
    out_credits: Any  # stream stages: acquired per element emitted
    ordered: bool
    skip_errors: bool
    stop: StopSignal
    cancelled: Any  # RawValue: epochs up to this number were abandoned by the consumer
    stats: Any  # RawArray of NFIELDS doubles per worker
    stats_row: int
    events: Channel
    segment_dir: str | None  # shared memory for tensors and large arrays (see _serialize)
    in_bytes: Any  # stream stages: RawValue, mean bytes per element arriving (for the bundle policy)
    stage_index: int
    base_seed: int | None  # the pipeline's: this worker's random streams derive from it (None: not seeded)
    fused: FusedStage | None = None  # stream stages: the map stage run on each output, in this process
    routes: bool = False  # a stream stage that routes items without decoding them (``_routing``)
    sends_items: bool = False  # its reader routes items: list elements go item by item


def worker_main(ctx: WorkerContext) -> None:
    """Entry point of every worker process."""
    # What the worker inherited by fork stays shared with the consumer's process only while nothing
    # writes to its pages, and a garbage collection writes to every object it walks. Freezing moves the
    # inherited objects out of the collector's reach (gc.freeze's documented use), so a worker's
    # collections copy none of the consumer's heap (about 40 MB per worker with torch imported);
    # objects the worker creates are collected as usual.
    gc.freeze()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the consumer's to handle
    _exit_with_parent(ctx.segment_dir)
    _clean_up_when_terminated_with_parent(ctx.stop, ctx.segment_dir)
    torch.set_num_threads(1)
    # A fused stage's function is the only user code here (stream steps draw no random numbers): it
    # sees its own step in get_worker_info() and its own random streams, as in a process of its own.
    name, index = (ctx.stage_name, ctx.stage_index) if ctx.fused is None else (ctx.fused.name, ctx.fused.index)
    info = WorkerInfo(name, ctx.worker, ctx.nworkers)
    set_worker_info(info)
    seeds = EpochSeeds(ctx.base_seed, index, info)
    seeds.enter(0)  # before the step is unpickled: a fork's inherited random state never shows
    loading = ctx.stage_name, ctx.worker
    try:
        step = ctx.step.load()
        if ctx.fused is not None:
            loading = ctx.fused.name, 0
            fused = getattr(ctx.fused.step.load(), "fn")  # noqa: B009
    except BaseException:
        notice = StartupFailure(*loading, traceback.format_exc())
        ctx.events.put(_serialize.dumps(notice, None), lambda: not ctx.stop.is_set())
        raise SystemExit(3) from None
    loop = _Loop(ctx, seeds)
    loop.ready()
    try:
        if ctx.kind == "stream":
            assert isinstance(step, StreamStep)
            loop.run_stream(step, fused if ctx.fused is not None else None)
        else:
            loop.run_function(getattr(step, "fn"), pool=ctx.kind == "pool")  # noqa: B009
    except Stopped:
        pass


PARENT_POLL_S = 1.0
"""How often the parent watch also asks whether this process was orphaned (see ``_parent_gone``)."""


def _parent_gone(sentinel: Any, parent_pid: int, timeout: float | None) -> bool:
    """Whether the process that started this one died, waiting up to ``timeout`` for it.

    Its sentinel (the end of a pipe the parent holds) says so at once, unless a process that another
    thread of the parent forked at the same moment inherited that pipe too: then only the parent id
    tells, which the kernel changes when a process is orphaned."""
    ready = multiprocessing.connection.wait([sentinel], timeout=timeout)
    return bool(ready) or os.getppid() != parent_pid


def _exit_with_parent(segment_dir: str | None) -> None:
    """Exit as soon as the consumer's process is gone, removing the shared memory it left."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    parent_pid = os.getppid()  # the process that started this one (a forkserver's, under forkserver)

    def watch() -> None:
        while not _parent_gone(parent.sentinel, parent_pid, PARENT_POLL_S):
            pass
        if segment_dir is not None:
            shutil.rmtree(segment_dir, ignore_errors=True)
        os._exit(1)

    threading.Thread(target=watch, name="torchqueue-parent-watch", daemon=True).start()


TERM_GRACE_S = 0.5
"""How long a worker told to terminate (not by its closing pipeline) waits for its parent's death."""


def _clean_up_when_terminated_with_parent(stop: StopSignal, segment_dir: str | None) -> None:
    """On SIGTERM or SIGHUP, remove the shared memory if the consumer's process dies too.

    A signal to the whole process group (``timeout``, ``kill -TERM -<pgid>``, SLURM's ``scancel``,
    a closed terminal) kills the consumer's process without its clean-up, and the workers with it:
    nobody would remove the pipeline's segments. So a worker waits briefly for its parent's death
    (immediate when the signal hit it too) and removes them, then dies of the signal as it would
    have. A pipeline that is closing terminates its workers after setting ``stop``: no wait then.
    Signals the consumer's process had ignored (``nohup``) stay ignored.
    """
    parent = multiprocessing.parent_process()
    if parent is None or segment_dir is None:
        return

    def on_signal(signum: int, _frame: Any) -> None:
        # only file descriptors here: the handler may interrupt the main thread holding any lock
        ready = multiprocessing.connection.wait([stop.fileno(), parent.sentinel], timeout=TERM_GRACE_S)
        if parent.sentinel in ready:
            shutil.rmtree(segment_dir, ignore_errors=True)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) == signal.SIG_DFL:
            signal.signal(signum, on_signal)


class _UpstreamFailure(Exception):
    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.step)
        self.failure = failure


class _Loop:
    def __init__(self, ctx: WorkerContext, seeds: EpochSeeds) -> None:
        self.ctx = ctx
        self.seeds = seeds
        self.meter = Meter(ctx.stats, ctx.stats_row, ctx.stage_name)
        fused = ctx.fused
        self.fused_meter = None if fused is None else Meter(ctx.stats, fused.stats_row, fused.name)
        writer = ctx.stage_name if fused is None else fused.name
        self.emitter = Emitter(
            ctx.outbox, self.alive, ctx.split, ctx.split_step, writer, ctx.segment_dir, ctx.sends_items
        )

    def alive(self) -> bool:
        return not self.ctx.stop.is_set()

    def ready(self) -> None:
        """The loop begins: this worker's start-up (and a fused stage's) ends now (see ``stats``)."""
        now = time.perf_counter()
        for meter in (self.meter, self.fused_meter):
            if meter is not None:
                meter.set(Field.READY_AT, now)

    def receive(self) -> Envelope:
        if self.ctx.stop.is_set():
            raise Stopped
        self.meter.add(Field.FILL_SUM, self.ctx.inbox.fill())
        self.meter.add(Field.FILL_N, 1)
        start = time.perf_counter()
        self.meter.set(Field.IN_SINCE, start)  # stats() counts a wait still going on
        idle = False
        while (data := self.ctx.inbox.get(self.alive, timeout=POLL_S, stop=self.ctx.stop)) is None:
            if not idle:  # nothing came for a poll (``get`` waited that long): free what earlier outputs left
                idle = True
                self.emitter.idle()
        self.meter.set(Field.IN_SINCE, 0.0)
        received = time.perf_counter()
        self.meter.add(Field.WAIT_IN, received - start)
        envelope = self.read(data)
        self.meter.add(Field.DECODE, time.perf_counter() - received)
        self.seeds.enter(envelope.epoch)  # a new epoch's stream, before the step sees its first element
        if not isinstance(envelope.payload, CONTROL):
            self.meter.add(Field.MESSAGES, 1)
            self.meter.set(Field.AT_EPOCH, envelope.epoch)  # what a consumer's timeout reports
            self.meter.set(Field.AT_SEQ, envelope.seq)
        if self.ctx.in_bytes is not None:
            observe_bytes(self.ctx.in_bytes, data, envelope)
        return envelope

    def read(self, data: bytearray) -> Envelope:
        """The envelope of ``data``; one whose value does not unpickle here carries this step's error
        (see ``_unreadable``): the worker goes on."""
        return read(data, self.failed_input, "unpickling its input", self.ctx.routes)

    def failed_input(self, exc: Exception) -> Any:
        """What stands for an input that did not unpickle: its Failure, or dropped (a pool's part: no items)."""
        result = self.failed(exc)
        return [] if self.ctx.kind == "pool" and isinstance(result, Skipped) else result

    def timed(
        self, send: Callable[..., object], *args: Any, credits: Any = None, meters: tuple[Meter, ...] = ()
    ) -> None:
        """Take a credit of ``credits`` (if given), then ``send(*args)``, counting the time as waiting
        for room downstream (for this worker's step, and for ``meters``' steps), but the encoding: the
        writer's (the last of them), and to the others part of their wait."""
        meters = (self.meter, *meters)
        start = time.perf_counter()
        for meter in meters:
            meter.set(Field.OUT_SINCE, start)  # stats() counts a wait still going on
        encoded = self.emitter.encode_s
        if credits is not None:
            wait_acquire(credits, self.alive)
        send(*args)
        spent = time.perf_counter() - start
        encoding = self.emitter.encode_s - encoded
        meters[-1].add(Field.ENCODE, encoding)
        for meter in meters:
            meter.set(Field.OUT_SINCE, 0.0)
            meter.add(Field.WAIT_OUT, spent - encoding if meter is meters[-1] else spent)

    def call(self, fn: Callable[[Any], Any], value: Any, epoch: int, seq: int, meter: Meter | None = None) -> Any:
        """``fn(value)``, or a Failure / Skipped in its place (the element at ``seq`` of ``epoch``);
        counted on ``meter``'s step (default: this worker's)."""
        meter = meter or self.meter
        meter.add(Field.IN, 1)
        stats = self.ctx.stats
        stats[meter.busy_since] = start = time.perf_counter()  # stats() counts a call still going on as busy
        try:
            result = fn(value)
        except Exception as exc:
            result = self.failed(exc, epoch, seq, meter)
        else:
            meter.add(Field.OUT, 1)
        stats[meter.busy_since] = 0.0
        meter.add(Field.BUSY, time.perf_counter() - start)
        return result

    def failed(
        self, exc: Exception, epoch: int | None = None, seq: int | None = None, meter: Meter | None = None
    ) -> Failure | Skipped:
        """``exc`` raised for the element at ``seq`` of ``epoch`` (where known) by ``meter``'s step
        (default: this worker's): a Failure, or Skipped (``on_error="skip"``)."""
        meter = meter or self.meter
        if not self.ctx.skip_errors:
            return capture(meter.step, exc, epoch, seq)
        return self.skipped(f"{type(exc).__name__}: {exc}", meter)

    def skipped(self, summary: str, meter: Meter | None = None) -> Skipped:
        """A step's failure, dropped (``on_error="skip"``): counted, and noticed once per step."""
        meter = meter or self.meter
        meter.add(Field.SKIPPED, 1)
        if not meter.notified:
            meter.notified = True
            self.ctx.events.put(_serialize.dumps(SkipNotice(meter.step, summary), None), self.alive)
        return Skipped(meter.step)

    def cancelled(self, epoch: int) -> bool:
        return epoch <= self.ctx.cancelled.value

    def run_function(self, fn: Callable[[Any], Any], pool: bool) -> None:
        while True:
            # nothing of one message stays referenced while the next is awaited: its segment is unmapped
            # as soon as it is sent on, so that its sender can write the next message into it
            self.handle(self.receive(), fn, pool)

    def handle(self, envelope: Envelope, fn: Callable[[Any], Any], pool: bool) -> None:
        """One message of a map or pool stage: its outputs sent on."""
        payload = envelope.payload
        if pool and self.ctx.skip_errors and isinstance(payload, Failure) and payload.step == self.ctx.stage_name:
            # the element could not be split into this pool's parts (not iterable): this step's failure
            skipped = self.skipped(f"{payload.exc_type}: {payload.message}")
            self.timed(self.emitter.send, envelope._replace(payload=skipped))
            return
        if isinstance(payload, CONTROL):
            self.timed(self.emitter.send, envelope)
            return
        if isinstance(payload, Bundle):  # only between map stages: no pool in a bundling segment
            if self.cancelled(envelope.epoch):
                items = [Skipped(self.ctx.stage_name)] * len(payload.items)
            else:
                items = self.call_bundle(fn, payload.items, envelope.epoch, envelope.seq)
            self.timed(self.emitter.send, envelope._replace(payload=Bundle(items)))
            return
        if self.cancelled(envelope.epoch):
            payload = [] if pool else Skipped(self.ctx.stage_name)
        elif pool:
            payload = self.call_items(fn, payload, envelope.epoch, envelope.seq)
        else:
            payload = self.call(fn, payload, envelope.epoch, envelope.seq)
        if pool:
            self.timed(self.emitter.send, envelope._replace(payload=payload))
        else:
            self.timed(self.emitter.emit, envelope.epoch, envelope.seq, payload)

    def call_bundle(self, fn: Callable[[Any], Any], items: list[Any], epoch: int, seq: int) -> list[Any]:
        """``[fn(item) ...]`` with a Failure / Skipped in the place of each item that raised;
        an item that failed or was skipped upstream is passed on as it is. Metered once for the
        whole bundle (its items are small and cheap); its items are at ``seq``, ``seq + 1``, ..."""
        results = []
        calls = failed = 0
        start = time.perf_counter()
        self.meter.set(Field.BUSY_SINCE, start)
        for offset, item in enumerate(items):
            if type(item) in _PASSED_ON:
                results.append(item)
                continue
            calls += 1
            try:
                results.append(fn(item))
            except Exception as exc:
                results.append(self.failed(exc, epoch, seq + offset))
                failed += 1
        self.meter.set(Field.BUSY_SINCE, 0.0)
        self.meter.add(Field.BUSY, time.perf_counter() - start)
        self.meter.add(Field.IN, calls)
        self.meter.add(Field.OUT, calls - failed)
        return results

    def call_items(self, fn: Callable[[Any], Any], items: list[Any], epoch: int, seq: int) -> list[Any] | Failure:
        """A pool's part (items of the element at ``seq``): ``[fn(item) ...]`` without skipped items, or
        the first Failure."""
        results = []
        for item in items:
            result = self.call(fn, item, epoch, seq)
            if isinstance(result, Failure):
                return result
            if not isinstance(result, Skipped):
                results.append(result)
        return results

    def run_stream(self, step: StreamStep, fused: Callable[[Any], Any] | None = None) -> None:
        """The stream step's loop; ``fused``: the function of the map stage fused into this one, run on
        each output before it is sent."""
        collector = Collector(self.ctx.ordered, self.ctx.in_credits.release)
        epoch = 0
        self._fused_idle_since = time.perf_counter()
        while True:
            outputs = 0

            def emit(payload: Any) -> None:
                nonlocal outputs
                if fused is not None:
                    self.emit_fused(fused, epoch, outputs, payload)  # noqa: B023
                else:
                    self.timed(self.emitter.emit, epoch, outputs, payload, credits=self.ctx.out_credits)  # noqa: B023
                outputs += 1

            elements = self.epoch_elements(collector, epoch)
            taken = [-1]  # the input position of the element the step took last
            failure: Failure | None = None
            try:
                for output in step.stream(self.checked(step, elements, epoch, taken)):
                    self.meter.add(Field.OUT, 1)
                    emit(output)
                    del output  # held no longer than sent: what it refers to is freed, its segments given back
            except _UpstreamFailure as upstream:
                failure = upstream.failure
            except Stopped:  # the pipeline closes (raised by our reads under the step): not the step's failure
                raise
            except Exception as exc:
                # the step failed while working on the last element it took (if any)
                failure = capture(self.ctx.stage_name, exc, epoch, taken[0] if taken[0] >= 0 else None)
            if failure is not None:
                emit(failure)
                for _ in self.epoch_elements(collector, epoch, drain=True):
                    pass
            emit(EndOfEpoch(outputs))
            epoch += 1

    def emit_fused(self, fn: Callable[[Any], Any], epoch: int, seq: int, payload: Any) -> None:
        """Send ``fn(payload)`` for the output at ``seq``, counted as the fused stage would count it in a
        process of its own: its call busy, the time it waited for this output as its wait for input. To
        the stream step, the call and the send are both its wait for room downstream."""
        meter = self.fused_meter
        assert meter is not None
        start = time.perf_counter()
        if not isinstance(payload, CONTROL):
            meter.add(Field.WAIT_IN, start - self._fused_idle_since)
            meter.add(Field.MESSAGES, 1)
            meter.set(Field.AT_EPOCH, epoch)
            meter.set(Field.AT_SEQ, seq)
            if self.cancelled(epoch):
                payload = Skipped(meter.step)
            else:
                payload = self.call(fn, payload, epoch, seq, meter)
        called = time.perf_counter()
        self.meter.add(Field.WAIT_OUT, called - start)
        self.timed(self.emitter.emit, epoch, seq, payload, credits=self.ctx.out_credits, meters=(meter,))
        self._fused_idle_since = time.perf_counter()

    def epoch_elements(self, collector: Collector, epoch: int, drain: bool = False) -> Iterator[tuple[int, Any]]:
        """The elements of ``epoch`` in order, until its end, with their input positions (in arrival
        order when unordered); an upstream Failure is raised."""
        position = -1
        while True:
            elements = collector.take(epoch)
            if elements is NOTHING:
                collector.add(self.receive())
                continue
            for payload in elements:
                position += 1
                if isinstance(payload, EndOfEpoch):
                    return
                if isinstance(payload, Skipped):
                    continue
                if isinstance(payload, Failure):
                    if drain:
                        continue
                    raise _UpstreamFailure(payload)
                yield position, payload

    def checked(
        self, step: StreamStep, elements: Iterator[tuple[int, Any]], epoch: int, taken: list[int]
    ) -> Iterator[Any]:
        """The elements the step can take (``step.check``); ``taken[0]``: the position of the last one."""
        for position, element in elements:
            self.meter.add(Field.IN, 1)
            taken[0] = position
            try:
                step.check(element)
            except TypeError as exc:
                if not self.ctx.skip_errors:
                    raise
                self.failed(exc, epoch, position)
                continue
            yield element
