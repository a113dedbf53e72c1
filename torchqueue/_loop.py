"""The machinery every worker's loop shares, whatever the step and wherever the worker runs.

``WorkerContext`` is all a worker gets from the runtime (pickled to a spawned process, handed to a
thread as it is). ``Loop`` receives with a timeout and a stop check, reads the message, calls the
step's function with its error in the element's place, and sends on, counting each on the step's
stats row; the runners (``_runners``) build each step kind's loop on it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torchqueue import _serialize
from torchqueue._channel import POLL_S, Channel, Stopped, StopSignal, wait_acquire
from torchqueue._mainmodule import TravellingStep
from torchqueue._messages import CONTROL, Envelope, Failure, SkipNotice, Skipped
from torchqueue._meter import Meter
from torchqueue._plan import Kind
from torchqueue._premap import PremapStage
from torchqueue._seeding import EpochSeeds
from torchqueue._transport import Emitter, PartSizer, observe_bytes, read
from torchqueue.errors import NO_ITEM, capture
from torchqueue.stats import Field

IDLE_S = 1.0
"""A worker whose input stopped this long frees the unused segments it kept for its next outputs
(``_segments.trim``), and again each time as long again, for those its receivers freed since (the
consumer dropping the last outputs). A shorter wait (a slower step before it, an epoch's end) keeps
them: its next outputs reuse them rather than allocate and fill fresh shared memory."""


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
    kind: Kind
    worker: int
    nworkers: int
    step: TravellingStep  # pickled for this worker as it starts
    inbox: Any  # a Channel (between threads: a LocalChannel), the stage's or this worker's own (round robin)
    outbox: list[Any]  # the next stage's inboxes
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
    local_out: bool = False  # its output edge joins two parties of one process: messages go as they are
    premap: PremapStage | None = None  # pools: the map stage whose calls run here first (``_premap``)
    first_epoch: int = 0  # the number of the first epoch it gets (stream stages count epochs themselves)
    joined: tuple[str, int] | None = None  # a join: its pool's name and first stats row (whose items it sends)


class Loop:
    """What every runner does around its step: receive (with the stop check and the stats), read,
    call the step's function (its error in the element's place), send on (timed), and skip."""

    def __init__(self, ctx: WorkerContext, seeds: EpochSeeds) -> None:
        self.ctx = ctx
        self.seeds = seeds
        self.meter = Meter(ctx.stats, ctx.stats_row, ctx.stage_name)
        fused = ctx.fused
        self.fused_meter = None if fused is None else Meter(ctx.stats, fused.stats_row, fused.name)
        self.cpu_clock, self._cpu_since = time.process_time, 0.0  # until ``ready``
        self.fused_cpu = 0.0  # of it, the fused stage's: its calls and its sends (``StreamRunner.emit_fused``)
        self.input_wait = 0.0  # seconds the last message received was waited for
        writer = ctx.stage_name if fused is None else fused.name
        writer_meter = self.meter if self.fused_meter is None else self.fused_meter
        sends_parts = ctx.kind == Kind.POOL
        if fused is None and ctx.joined is not None:  # what it sends are the pool's items: theirs to fail or skip
            writer, row = ctx.joined
            writer_meter, sends_parts = Meter(ctx.stats, row, writer), True
        self.emitter = Emitter(
            ctx.outbox,
            self.alive,
            ctx.split,
            ctx.split_step,
            writer,
            ctx.segment_dir,
            ctx.sends_items,
            ctx.local_out,
            lambda error, epoch, seq: self.failed(error, epoch, seq, writer_meter),
            pool=sends_parts,
        )

    def run(self, step: Any, fused: Callable[[Any], Any] | None = None) -> None:
        """The loop, until ``Stopped``: ``step``'s work (``fused``: a fused map stage's function)."""
        raise NotImplementedError

    def alive(self) -> bool:
        return not self.ctx.stop.is_set()

    def ready(self, own_process: bool = True) -> None:
        """The loop begins: this worker's start-up (and a fused stage's) ends now (see ``stats``); its CPU
        time counts from now: its process's (``own_process``), else its thread's."""
        self.cpu_clock = time.process_time if own_process else time.thread_time
        self._cpu_since = self.cpu_clock()
        now = time.perf_counter()
        for meter in (self.meter, self.fused_meter):
            if meter is not None:
                meter.set(Field.READY_AT, now)

    def receive(self) -> Envelope:
        if self.ctx.stop.is_set():
            raise Stopped
        cpu = self.cpu_clock() - self._cpu_since - self.fused_cpu  # a syscall per message, not per call
        self.meter.set(Field.CPU, cpu)
        self.meter.add(Field.FILL_SUM, self.ctx.inbox.fill())
        self.meter.add(Field.FILL_N, 1)
        start = time.perf_counter()
        self.meter.set(Field.IN_SINCE, start)  # stats() counts a wait still going on
        trimmed = start
        while (data := self.ctx.inbox.get(self.alive, timeout=POLL_S, stop=self.ctx.stop)) is None:
            now = time.perf_counter()
            if now - trimmed >= IDLE_S:  # free what earlier outputs left, freed since
                trimmed = now
                self.emitter.idle()
        self.meter.set(Field.IN_SINCE, 0.0)
        received = time.perf_counter()
        self.input_wait = received - start
        self.meter.add(Field.WAIT_IN, self.input_wait)
        envelope = self.read(data)
        self.meter.add(Field.DECODE, time.perf_counter() - received)
        self.seeds.enter(envelope.epoch)  # a new epoch's stream, before the step sees its first element
        if not isinstance(envelope.payload, CONTROL):
            self.meter.took(envelope.epoch, envelope.seq)
        else:
            self.meter.holds_none()
        if self.ctx.in_bytes is not None:
            observe_bytes(self.ctx.in_bytes, data, envelope)
        return envelope

    def read(self, data: bytearray) -> Envelope:
        """The envelope of ``data``; one whose value does not unpickle here carries this step's error
        (see ``_unreadable``): the worker goes on."""
        return read(data, self.failed_input, "unpickling its input", self.ctx.routes)

    def failed_input(self, exc: Exception) -> Any:
        """What stands for an input that did not unpickle: its Failure, or dropped (Skipped)."""
        return self.failed(exc)

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
        encoded, sent = self.emitter.encode_s, self.emitter.sent_bytes
        if credits is not None:
            wait_acquire(credits, self.alive)
        send(*args)
        spent = time.perf_counter() - start
        encoding = self.emitter.encode_s - encoded
        meters[-1].add(Field.ENCODE, encoding)
        meters[-1].add(Field.SENT, self.emitter.sent_bytes - sent)
        for meter in meters:
            meter.set(Field.OUT_SINCE, 0.0)
            meter.add(Field.WAIT_OUT, spent - encoding if meter is meters[-1] else spent)

    def call(
        self, fn: Callable[[Any], Any], value: Any, epoch: int, seq: int, meter: Meter | None = None, item: bool = False
    ) -> Any:
        """``fn(value)``, or a Failure / Skipped in its place (the element at ``seq`` of ``epoch``, or
        ``item``: one item of it, which a Failure shows); counted on ``meter``'s step (default: this
        worker's)."""
        meter = meter or self.meter
        meter.add(Field.IN, 1)
        stats = self.ctx.stats
        stats[meter.busy_since] = start = time.perf_counter()  # stats() counts a call still going on as busy
        try:
            result = fn(value)
        except Exception as exc:
            result = self.failed(exc, epoch, seq, meter, value if item else NO_ITEM)
        else:
            meter.add(Field.OUT, 1)
        stats[meter.busy_since] = 0.0
        meter.add(Field.BUSY, time.perf_counter() - start)
        return result

    def failed(
        self,
        exc: Exception,
        epoch: int | None = None,
        seq: int | None = None,
        meter: Meter | None = None,
        item: object = NO_ITEM,
    ) -> Failure | Skipped:
        """``exc`` raised for the element at ``seq`` of ``epoch`` (where known; ``item``: on that item
        of it) by ``meter``'s step (default: this worker's): a Failure, or Skipped (``on_error="skip"``)."""
        meter = meter or self.meter
        if not self.ctx.skip_errors:
            return capture(meter.step, exc, epoch, seq, item)
        where = f" at element {seq} of epoch {epoch}" if seq is not None else ""
        return self.skipped(f"{type(exc).__name__}{where}: {exc}", meter)

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
