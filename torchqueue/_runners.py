"""One runner per kind of stage: the loop a worker runs, in a process of its own or in a thread.

Every loop has the same shape (torch's ``_worker_loop`` and ``pin_memory``'s ``do_one_step``):
receive with a timeout and a stop check, do the work, send with a timeout and a stop check, until
the runtime sets the stop event (``Stopped`` is raised out of the blocking call and the worker ends).

- ``MapRunner`` (ProcessStep): one element in, ``fn(element)`` out, position kept;
- ``PoolRunner`` (PoolStep): one part (a list of items) in, ``[fn(item) ...]`` out;
- ``StreamRunner`` (Pack/Unpack/RepackStep, joins): a ``Collector`` restores the epoch's order, the
  step's generator re-chunks it, outputs get new positions (and go through a fused map stage's function).

A step's exception becomes a ``Failure`` in the data stream at the element's position, so the
consumer raises it exactly where the element would have come. ``run_worker`` is what a worker runs,
whatever runs it: a process (``_worker``) or a thread (``_threads``).
"""

from __future__ import annotations

import functools
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from torchqueue import _serialize
from torchqueue._channel import Stopped
from torchqueue._collect import NOTHING, Collector
from torchqueue._loop import Loop, WorkerContext
from torchqueue._messages import (
    CONTROL,
    Bundle,
    EndOfEpoch,
    Envelope,
    Failure,
    Skipped,
    StartupFailure,
    WorkerFailure,
)
from torchqueue._meter import Meter
from torchqueue._origins import UNTRACKED, Tracker
from torchqueue._plan import Kind
from torchqueue._premap import listed, waiting_workers
from torchqueue._seeding import EpochSeeds
from torchqueue._transport import PartSizer, split
from torchqueue.errors import capture
from torchqueue.stats import Field
from torchqueue.steps import StreamStep
from torchqueue.worker_info import WorkerInfo, get_worker_info, set_worker_info

_PASSED_ON = frozenset({Failure, Skipped})
"""Items of a bundle that are not work: an element that failed or was skipped upstream."""


def run_worker(
    ctx: WorkerContext, own_process: bool, loading: Callable[[], AbstractContextManager[None]] = nullcontext
) -> None:
    """A worker's life once started: its worker info and random streams, its step (a failure to load it
    is the worker's start-up failure: a notice, then ``SystemExit(3)``; loaded inside ``loading()``), then
    its runner's loop until the pipeline stops. ``own_process``: the worker is a process of its own (its
    random state is its own)."""
    # A fused stage's function is the only user code in its host (stream steps draw no random numbers):
    # it sees its own step in get_worker_info() and its own random streams, as in a process of its own.
    name, index = (ctx.stage_name, ctx.stage_index) if ctx.fused is None else (ctx.fused.name, ctx.fused.index)
    seeds = EpochSeeds(ctx.base_seed, index, WorkerInfo(name, ctx.worker, ctx.nworkers), own_process)
    seeds.enter(0)  # before the step is unpickled: a fork's inherited random state never shows
    which = ctx.stage_name, ctx.worker  # the step being loaded
    fused = None
    try:
        with loading():
            step = ctx.step.load()
            if ctx.fused is not None:
                which = ctx.fused.name, 0
                fused = getattr(ctx.fused.step.load(), "fn")  # noqa: B009
            elif ctx.premap is not None:  # a pool's worker, running the map stage before it first
                which = ctx.premap.name, ctx.worker
                fused = getattr(ctx.premap.step.load(), "fn")  # noqa: B009
    except BaseException:
        notice = StartupFailure(*which, traceback.format_exc())
        ctx.events.put(_serialize.dumps(notice, None), lambda: not ctx.stop.is_set())
        raise SystemExit(3) from None
    runner = RUNNERS[ctx.kind](ctx, seeds)
    runner.ready(own_process)
    try:
        runner.run(step, fused)
    except Stopped:
        pass
    except Exception:  # not the step's (its errors go in its elements' places): said, then the worker dies
        notice = WorkerFailure(ctx.stage_name, ctx.worker, traceback.format_exc())
        ctx.events.put(_serialize.dumps(notice, None), lambda: not ctx.stop.is_set())
        raise


class _UpstreamFailure(Exception):
    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.step)
        self.failure = failure


class MapRunner(Loop):
    """A ProcessStep's worker: ``fn(element)`` for each element (or each element of a bundle)."""

    def run(self, step: Any, fused: Callable[[Any], Any] | None = None) -> None:
        fn = step.fn
        if self.ctx.split is not None:  # a pool reads next: a generator's items listed in the call, its error ours
            fn = functools.partial(listed, fn)
        while True:
            # nothing of one message stays referenced while the next is awaited: its segment is unmapped
            # as soon as it is sent on, so that its sender can write the next message into it
            self.handle(self.receive(), fn)

    def handle(self, envelope: Envelope, fn: Callable[[Any], Any]) -> None:
        """One message: its output sent on."""
        payload = envelope.payload
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
            payload = Skipped(self.ctx.stage_name)
        else:
            payload = self.call(fn, payload, envelope.epoch, envelope.seq)
        self.timed(self.emitter.emit, envelope.epoch, envelope.seq, payload, envelope.origin)

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


POOL_SPARE = 2
"""Unused segments a pool's worker keeps for its next parts. The step after a pool joins an element's
parts before it frees any, so a worker's parts come free in twos and threes: keeping none, it wrote
every other part into fresh shared memory (the seed's graphs, 2 cores: 68 of 124 parts fresh, 12-20
keeping two; fresh pages are written at 2.5-3 GB/s, kept ones at 8-10)."""


class PoolRunner(Loop):
    """A PoolStep's worker: ``[fn(item) ...]`` for each part of an element it receives. With a map stage
    fused before it (``_premap``), a whole element (``nparts == 1``) is that stage's input: its call
    first, in a slot, then its items here, but the parts given to the pool's waiting workers."""

    def __init__(self, ctx: WorkerContext, seeds: EpochSeeds) -> None:
        super().__init__(ctx, seeds)
        self.sizer = PartSizer(ctx.stats, ctx.stats_row - ctx.worker, ctx.nworkers)  # this pool's rows
        self.premap_meters: list[Meter] = []  # the rows of the map stage fused before it: one per slot
        if ctx.premap is not None:
            first, name = ctx.premap.first_row, ctx.premap.name
            self.premap_meters = [Meter(ctx.stats, first + slot, name) for slot in range(ctx.premap.slots.n)]

    def run(self, step: Any, fused: Callable[[Any], Any] | None = None) -> None:
        """``fused``: the function of the map stage fused before this pool (``None``: none)."""
        fn = step.fn
        premap = None if fused is None else functools.partial(listed, fused)  # its items listed in its call
        while True:
            envelope = self.receive()  # nothing of one message is held while the next is awaited
            if premap is not None and envelope.nparts == 1 and not isinstance(envelope.payload, CONTROL):
                self.premapped(envelope, premap, fn)
            else:
                self.handle(envelope, fn)

    def premapped(self, envelope: Envelope, premap: Callable[[Any], Any], fn: Callable[[Any], Any]) -> None:
        """The fused map stage's call on ``envelope``'s element, in one of its slots, then the pool's work on
        the items, parts handed to the pool's workers that wait for input (``hand_off``)."""
        epoch, seq = envelope.epoch, envelope.seq
        result = self.in_slot(premap, envelope.payload, epoch, seq)
        if not isinstance(result, (list, Failure, Skipped)):
            error = TypeError(f"PoolStep needs iterable elements (lists, tuples, ...), got {type(result).__name__}")
            result = self.failed(error, epoch, seq)
        if isinstance(result, (Failure, Skipped)):
            self.timed(self.emitter.send, envelope._replace(payload=result))
            return
        items = result
        del result
        nparts, results, index, kept = 1, [], 0, []
        while index < len(items):
            if nparts == 1 and index < len(items) - 1:  # until it shares, whenever another worker waits
                nparts, items, kept = self.hand_off(epoch, seq, items, index, envelope.origin)
            result = self.call(fn, items[index], epoch, seq, item=True)
            if isinstance(result, Failure):
                results = result
                break
            if not isinstance(result, Skipped):
                results.append(result)
            index += 1
        del items
        origin = envelope.origin
        self.timed(self.emitter.send, Envelope(epoch, seq, 0, nparts, results, origin), POOL_SPARE)
        for part, part_items in kept:  # parts it could not hand off
            self.handle(Envelope(epoch, seq, part, nparts, part_items, origin), fn)

    def in_slot(self, premap: Callable[[Any], Any], element: Any, epoch: int, seq: int) -> Any:
        """``premap(element)`` (the step's function in ``_premap.listed``: its items), called in a free slot
        of its step and counted on that slot's row; ``[]`` for an element of an epoch left (checked again once a slot is
        free: a wait for one can be long). The slot's idle time since its last call is its wait for input
        as long as this worker waited for the element (and for the slot), the rest its wait for room."""
        ctx = self.ctx.premap
        assert ctx is not None
        if self.cancelled(epoch):
            return []
        waited = time.perf_counter()
        slot = ctx.slots.acquire(self.alive)
        try:
            now = time.perf_counter()
            self.meter.add(Field.WAIT_IN, now - waited)  # the pool waits for its input, the step's call
            if self.cancelled(epoch):
                return []
            meter = self.premap_meters[slot]
            idle_since = meter.get(Field.IN_SINCE)
            idle = max(0.0, now - idle_since) if idle_since > 0 else 0.0
            for_input = min(idle, self.input_wait + now - waited)
            meter.add(Field.WAIT_IN, for_input)
            meter.add(Field.WAIT_OUT, idle - for_input)
            meter.set(Field.IN_SINCE, 0.0)
            meter.add(Field.FILL_SUM, self.ctx.inbox.fill())
            meter.add(Field.FILL_N, 1)
            meter.took(epoch, seq)
            pool_info = get_worker_info()  # the step sees itself in get_worker_info(): its slot among its nworkers
            set_worker_info(WorkerInfo(ctx.name, slot, ctx.slots.n, getattr(pool_info, "seed", None)))
            cpu = self.cpu_clock()
            try:
                return self.call(premap, element, epoch, seq, meter)
            finally:
                set_worker_info(pool_info)
                spent = self.cpu_clock() - cpu
                self.fused_cpu += spent
                meter.add(Field.CPU, spent)
                meter.set(Field.IN_SINCE, time.perf_counter())
        finally:
            ctx.slots.release(slot)

    def ready(self, own_process: bool = True) -> None:
        """Also the rows of the slots of a map stage fused before this pool: ready, and waiting for input,
        once the first of the pool's workers is."""
        super().ready(own_process)
        now = time.perf_counter()
        for meter in self.premap_meters:
            if meter.get(Field.READY_AT) == 0.0:
                meter.set(Field.READY_AT, now)
                meter.set(Field.IN_SINCE, now)

    def hand_off(
        self, epoch: int, seq: int, items: list[Any], done: int, origin: Any = None
    ) -> tuple[int, list[Any], list[tuple[int, list[Any]]]]:
        """Share the items after ``items[done]`` with the pool's workers waiting for input now, a part each
        (worth ``PART_S`` of work or more), through the pool's own channel: as many parts as it has room
        for now (never a wait on one's own input). Return the element's number of parts (1: none shared),
        the items this worker goes on with (part 0: up to ``done``, and the first part of the rest), and
        the parts it keeps to do after them, as ``(part, items)``: those that could not be sent (items
        that do not pickle travel no further than this worker: they are no error here)."""
        ctx = self.ctx
        waiting = self.waiting_others()
        if not waiting:
            return 1, items, []
        rest = items[done:]
        given = 0
        while given < min(waiting, self.sizer.parts(len(rest)) - 1) and ctx.inbox.reserve():
            given += 1
        if not given:
            return 1, items, []
        parts = split(rest, given + 1)
        kept = []
        for index, part in enumerate(parts[1:], 1):
            start = time.perf_counter()
            try:
                data = _serialize.dumps(Envelope(epoch, seq, index, len(parts), part, origin), ctx.segment_dir)
            except Exception:
                ctx.inbox.unreserve()
                kept.append((index, part))
                continue
            finally:
                self.meter.add(Field.ENCODE, time.perf_counter() - start)
            ctx.inbox.put(data, self.alive, reserved=True)
        return len(parts), items[:done] + parts[0], kept

    def waiting_others(self) -> int:
        """The pool's other workers waiting for input now that no message queued for them will reach."""
        ctx = self.ctx
        waiting = waiting_workers(ctx.stats, ctx.stats_row - ctx.worker, ctx.nworkers, ctx.worker)
        return waiting and max(0, waiting - round(ctx.inbox.fill() * ctx.inbox.capacity))

    def handle(self, envelope: Envelope, fn: Callable[[Any], Any]) -> None:
        """One part: its results sent on as a part."""
        payload = envelope.payload
        if self.ctx.skip_errors and isinstance(payload, Failure) and payload.step == self.ctx.stage_name:
            # the element could not be split into this pool's parts (not iterable): this step's failure
            where = f" at element {envelope.seq} of epoch {envelope.epoch}"
            skipped = self.skipped(f"{payload.exc_type}{where}: {payload.message}")
            self.timed(self.emitter.send, envelope._replace(payload=skipped))
            return
        if isinstance(payload, CONTROL):
            self.timed(self.emitter.send, envelope)
            return
        if self.cancelled(envelope.epoch):
            payload = []
        else:
            payload = self.call_items(fn, payload, envelope.epoch, envelope.seq)
        self.timed(self.emitter.send, envelope._replace(payload=payload), POOL_SPARE)

    def failed_input(self, exc: Exception) -> Any:
        """A part that did not unpickle: its Failure, or no items (skipped)."""
        result = self.failed(exc)
        return [] if isinstance(result, Skipped) else result

    def call_items(self, fn: Callable[[Any], Any], items: list[Any], epoch: int, seq: int) -> list[Any] | Failure:
        """A pool's part (items of the element at ``seq``): ``[fn(item) ...]`` without skipped items, or
        the first Failure."""
        results = []
        for item in items:
            result = self.call(fn, item, epoch, seq, item=True)
            if isinstance(result, Failure):
                return result
            if not isinstance(result, Skipped):
                results.append(result)
        return results


class StreamRunner(Loop):
    """A Pack/Unpack/RepackStep's (or a join's) worker: the epoch in order through the step's generator."""

    def run(self, step: Any, fused: Callable[[Any], Any] | None = None) -> None:
        """The stream step's loop; ``fused``: the function of the map stage fused into this one, run on
        each output before it is sent."""
        assert isinstance(step, StreamStep)
        collector = Collector(self.ctx.ordered, self.ctx.in_credits.release)
        origins = Tracker(self.ctx.stage_index, self.ctx.ordered)
        epoch = self.ctx.first_epoch
        self._fused_idle_since = time.perf_counter()
        while True:
            outputs = 0
            origins.epoch_begins()

            def emit(payload: Any, origin: Any = None) -> None:
                nonlocal outputs
                if fused is not None:
                    self.emit_fused(fused, epoch, outputs, payload, origin)  # noqa: B023
                else:
                    self.timed(self.emitter.emit, epoch, outputs, payload, origin, credits=self.ctx.out_credits)  # noqa: B023
                outputs += 1

            elements = self.epoch_elements(collector, epoch, origins)
            taken = [-1]  # the input position of the element the step took last
            failure: Failure | None = None
            try:
                tracked = step.tracked(self.checked(step, elements, epoch, taken), origins.first_skip)
                for output, cursor in tracked:
                    self.meter.add(Field.OUT, 1)
                    emit(output, origins.given_on(_origin_of(origins, cursor)))
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
                for _ in self.epoch_elements(collector, epoch, origins, drain=True):
                    pass
            self.meter.holds_none()
            if self.fused_meter is not None:
                self.fused_meter.holds_none()
            emit(EndOfEpoch(outputs))
            epoch += 1

    def emit_fused(self, fn: Callable[[Any], Any], epoch: int, seq: int, payload: Any, origin: Any = None) -> None:
        """Send ``fn(payload)`` for the output at ``seq``, counted as the fused stage would count it in a
        process of its own: its call busy, the time it waited for this output as its wait for input. To
        the stream step, the call and the send are both its wait for room downstream."""
        meter = self.fused_meter
        assert meter is not None
        cpu = self.cpu_clock()
        start = time.perf_counter()
        if not isinstance(payload, CONTROL):
            meter.add(Field.WAIT_IN, start - self._fused_idle_since)
            meter.took(epoch, seq)
            if self.cancelled(epoch):
                payload = Skipped(meter.step)
            else:
                payload = self.call(fn, payload, epoch, seq, meter)
        called = time.perf_counter()
        self.meter.add(Field.WAIT_OUT, called - start)
        self.timed(self.emitter.emit, epoch, seq, payload, origin, credits=self.ctx.out_credits, meters=(meter,))
        self._fused_idle_since = time.perf_counter()
        self.fused_cpu += self.cpu_clock() - cpu  # the fused stage's CPU, the call's and the send's, not the host's
        meter.set(Field.CPU, self.fused_cpu)

    def epoch_elements(
        self, collector: Collector, epoch: int, origins: Tracker, drain: bool = False
    ) -> Iterator[tuple[int, Any]]:
        """The elements of ``epoch`` in order, until its end, with their input positions (in arrival
        order when unordered), their origins told to ``origins``; an upstream Failure is raised."""
        position = -1
        while True:
            elements = collector.take(epoch)
            if elements is NOTHING:
                collector.add(self.receive())
                continue
            origin = collector.origin
            for payload in elements:
                position += 1
                if isinstance(payload, EndOfEpoch):
                    return
                origins.took(position, origin)
                origin = None  # a bundle's later elements: their positions say it
                if isinstance(payload, Skipped):
                    continue
                if isinstance(payload, Failure):
                    if drain:
                        continue
                    raise _UpstreamFailure(payload)
                yield position, payload

    def checked(
        self, step: StreamStep, elements: Iterator[tuple[int, Any]], epoch: int, taken: list[int]
    ) -> Iterator[tuple[int, Any]]:
        """The elements the step can take (``step.check``), with their positions; ``taken[0]``: the
        position of the last one."""
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
            yield position, element


def _origin_of(origins: Tracker, cursor: Any) -> Any:
    """The origin of a stream step's output that leaves its input at ``cursor`` (``_generators.Cursor``)."""
    if cursor is None:
        return UNTRACKED
    position, used = cursor
    return origins.after(position) if used is None else origins.within(position, used)


RUNNERS: dict[Kind, type[Loop]] = {Kind.MAP: MapRunner, Kind.POOL: PoolRunner, Kind.STREAM: StreamRunner}
"""The runner of each kind of stage."""
