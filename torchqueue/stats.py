"""Per-step figures of a running pipeline: ``Sequence.stats()`` returns a ``Stats``.

Every worker adds its figures to its own row of a shared array (no locks:
one writer per row); ``Stats`` sums the rows of each step when asked. While
outputs are consumed, the consumer also copies the array every so often
(``_runtime``'s ``SAMPLE_S``): ``Stats.history`` holds those snapshots, so
``Stats.plot`` can draw each step's throughput and busy fraction over time.

A worker's time is split five ways: starting (from the pipeline's start until its loop is ready:
under spawn or forkserver, importing torch and the step), busy (in the step's function), encoding
and decoding messages (pickling outputs, writing their segments; unpickling inputs), and waiting
for input or for room downstream. What limits the pipeline is decided once, from these figures,
in ``_verdict``: the table's hint and the plot's title both say it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, NamedTuple

from torchqueue._verdict import verdict

__all__ = ["Stats", "StepStats"]


class Field(IntEnum):
    """Columns of a worker's row in the shared stats array."""

    IN = 0
    OUT = 1
    BUSY = 2
    WAIT_IN = 3
    WAIT_OUT = 4
    FILL_SUM = 5
    FILL_N = 6
    SKIPPED = 7
    MESSAGES = 8
    IN_SINCE = 9  # perf_counter() when the worker began waiting for input, 0.0 when not waiting
    OUT_SINCE = 10  # the same for waiting for room downstream
    BUSY_SINCE = 11  # the same for a call of the step's function going on
    AT_EPOCH = 12  # the position of the element the worker took last (for a timeout's report)
    AT_SEQ = 13
    READY_AT = 14  # perf_counter() when the worker's loop began (0.0: still starting)
    ENCODE = 15  # seconds spent encoding messages sent (pickling, writing segments)
    DECODE = 16  # seconds spent decoding messages received (unpickling, mapping segments)
    CPU = 17  # CPU seconds the worker used since its loop began, as of its last input (see ``Loop.receive``)
    SENT = 18  # bytes of the messages sent (pickles and shared memory)


NFIELDS = len(Field)

_GOING_ON = ((Field.IN_SINCE, Field.WAIT_IN), (Field.OUT_SINCE, Field.WAIT_OUT), (Field.BUSY_SINCE, Field.BUSY))
"""Each ``*_SINCE`` column and the figure it adds to until it ends."""


@dataclass(frozen=True)
class StepStats:
    """The figures of one step, summed over its workers.

    Attributes:
        name: The step's name.
        nworkers: Its number of worker processes.
        elements_in: Elements (for a PoolStep: items) its function was given.
        elements_out: Outputs it produced (failed or skipped calls do not count).
        busy_s: Seconds its workers spent in the step's function, summed over workers (for a
            Pack/Unpack/RepackStep, a join: in the step, between receiving and sending).
        wait_in_s: Seconds its workers waited for input.
        wait_out_s: Seconds its workers waited for room downstream.
        queue_fill: Mean fill (0 to 1) of its input queue, sampled whenever a worker was ready for
            its next input: near 1, an element was always waiting for it, so this step or one
            after it limits (a step after it that limits holds this step back, through
            ``wait_out_s``, and its queue fills). The first step's queue is near 1 whenever the
            input is faster than the pipeline, which is the usual case.
        skipped: Elements dropped under ``on_error="skip"``.
        utilization: ``busy_s`` over its workers' time once started (``nworkers * elapsed_s -
            startup_s``): 1.0 means always in the step's function.
        messages_in: Data messages its workers received (control messages such as the end of an
            epoch are not counted): fewer than ``elements_in`` where small
            elements travel bundled, or a PoolStep's items in parts.
        startup_s: Seconds its workers took to start (until their loop was ready), summed over
            workers: counted apart from the other figures.
        encode_s: Seconds its workers spent encoding the messages they sent (pickling, writing
            tensors into shared memory), summed over workers: not in ``busy_s``.
        decode_s: The same for decoding the messages they received.
        sent_bytes: Bytes of the messages its workers sent to the next step (pickles and the shared
            memory of their tensors and arrays); 0 where nothing was encoded (a thread step's outputs to a
            thread step or to your loop go as they are).
        stream: A Pack/Unpack/RepackStep (or a join): one process, no ``nworkers`` to raise.
        cpu_s: CPU seconds its workers used once started, summed over workers, as of each worker's
            last input (a call still going on is not in it yet): for a worker process, every thread
            of its process (torch's, numpy's and BLAS's threads too); for a thread worker, its own
            thread only (``Stats.consumer_cpu_s`` counts the threads its calls use). Unlike
            ``busy_s`` it does not count sleeping, waiting on files or for the GIL, or waiting for a
            core. A step run inside another's process (a one-worker ProcessStep after a
            Pack/Unpack/RepackStep) counts its own CPU (its calls, and sending their outputs),
            and that step's row does not.
        backend: ``"process"`` or ``"thread"``: what its workers are.
        host: The step whose worker processes run this step's calls (a ProcessStep of several workers
            right before a PoolStep runs in the pool's workers), else ``None``. Its ``nworkers`` are
            then the calls that may run at once (slots), each a row of its own: its waits are a
            slot's time between calls, waiting for input as long as the pool did.
    """

    name: str
    nworkers: int
    elements_in: int
    elements_out: int
    busy_s: float
    wait_in_s: float
    wait_out_s: float
    queue_fill: float
    skipped: int
    utilization: float
    messages_in: int = 0
    startup_s: float = 0.0
    encode_s: float = 0.0
    decode_s: float = 0.0
    stream: bool = False
    cpu_s: float = 0.0
    backend: str = "process"
    host: str | None = None
    sent_bytes: float = 0.0


class StageEntry(NamedTuple):
    """What ``Stats.from_rows`` needs of a stage: its name and its number of rows (workers); whether it
    is a stream stage (always receiving, sending or working); whether it is shown (a join is not);
    whether the step takes no ``nworkers`` (``None``: as ``is_stream``); what its workers are."""

    name: str
    nworkers: int
    is_stream: bool
    shown: bool = True
    stream: bool | None = None
    backend: str = "process"
    host: str | None = None  # the step whose workers run this one's calls


class Stats(Mapping[str, StepStats]):
    """``stats[step_name]`` is a ``StepStats``; ``print(stats)`` shows a table.

    Attributes:
        elapsed_s: Seconds since the workers started, but the pauses (``paused_s``).
        paused_s: Seconds the pipeline had nothing to do since its workers started: every epoch queued
            was delivered and no next one was queued yet (your loop evaluating between epochs, or
            ``stats()`` called after the last one). Its workers wait for input all along: that wait is
            left out of ``wait_in_s``, and the pause out of ``elapsed_s``, ``consumer_work_s``,
            ``consumer_cpu_s`` and ``idle_cores``, so that they say what limits the pipeline while it
            runs (in ``history`` too: each snapshot leaves out the pauses before it).
        input_s: Seconds the feeder thread (in your process) spent reading the iterable you pass.
        input_held_s: Seconds it waited to send the next element: as many were in flight as the queues
            allow, held by a step, by your loop, or behind a slower element (``ordered=True`` delivers
            them in order). Long while the steps wait for input: larger queues let them run ahead.
        oldest_call: Of the calls of the steps' functions going on when the figures were taken, the one
            that began first: its ``step``, ``worker``, ``pid``, ``seconds`` so far and the element's
            ``epoch`` and ``seq``; ``None`` if none was going on. For a closed pipeline, the one going on
            as it closed (after a timeout: the stuck call), its ``pid`` ``None`` (the process is gone).
        history: Earlier snapshots of the same figures, oldest first, taken about every
            quarter second while outputs were consumed (fewer, further apart, in a long run:
            at most a few hundred are kept). Each is a ``Stats`` with totals since the start;
            the difference of two is what happened between them.
        consumer_wait_s: Seconds your loop waited for the pipeline's next output.
        consumer_work_s: Seconds your loop spent between taking an output and asking for the next
            (its own work: a training step). More work than wait: your loop limits, not the pipeline.
        consumer_cpu_s: CPU seconds your process used since the workers started, every thread of it:
            your loop, torchqueue's threads, thread steps and the threads of torch, numpy or BLAS
            that they use. Over ``elapsed_s``, about one core while thread steps use most of it: the
            GIL limits them (Python runs one thread at a time).
        idle_cores: The cores this process may use that the machine left idle, on average over the run,
            whatever ran on them (Linux; ``None`` elsewhere): under half a core, no core was free for
            more workers, though other programs may be what keeps them busy.
    """

    def __init__(
        self,
        steps: list[StepStats],
        elapsed_s: float,
        history: tuple[Stats, ...] = (),
        consumer_wait_s: float = 0.0,
        consumer_work_s: float = 0.0,
        consumer_cpu_s: float = 0.0,
        idle_cores: float | None = None,
        paused_s: float = 0.0,
        input_s: float = 0.0,
        input_held_s: float = 0.0,
        oldest_call: Any = None,
    ) -> None:
        self._steps = {step.name: step for step in steps}
        self.elapsed_s = elapsed_s
        self.history = history
        self.consumer_wait_s = consumer_wait_s
        self.consumer_work_s = consumer_work_s
        self.consumer_cpu_s = consumer_cpu_s
        self.idle_cores = idle_cores
        self.paused_s = paused_s
        self.input_s = input_s
        self.input_held_s = input_held_s
        self.oldest_call = oldest_call

    @classmethod
    def from_rows(
        cls,
        stages: list[tuple[Any, ...]],
        rows: Any,
        elapsed_s: float,
        history: list[tuple[float, float, Any]] | None = None,
        started: float | None = None,
        consumer: tuple[float, ...] = (),
        paused_s: float = 0.0,
        **inputs: Any,
    ) -> Stats:
        """Sum the shared array's rows, stage by stage (each a ``StageEntry`` or a tuple of its fields:
        a stage that is not shown keeps its rows but gets no entry).

        ``history``: earlier ``(elapsed_s, paused_s, rows)`` copies of the array, oldest first. ``started``:
        the ``perf_counter()`` the elapsed time counts from; given, a wait or a call still going on
        counts up to now (a worker adds it to its row only when it ends): a step stuck in its
        function is busy, and the bottleneck; and a worker's start-up lasts until its loop was ready
        (or until now). ``consumer``: the consumer's ``(wait, work, cpu)`` seconds,
        and the idle cores. ``paused_s``: of ``elapsed_s``, the seconds the pipeline had nothing queued
        (``_pauses``): its workers waited for input all along, and neither that wait nor the time counts.
        ``inputs``: the feeder's ``input_s`` and ``input_held_s``; ``oldest_call``.
        """
        steps, row = [], 0
        now = None if started is None else started + elapsed_s
        for entry in stages:
            name, nworkers, is_stream, shown, fixed, backend, host = StageEntry(*entry)
            total = [0.0] * NFIELDS
            startup = 0.0
            for worker in range(nworkers):
                base = (row + worker) * NFIELDS
                if rows is None:
                    continue
                for column in Field:
                    total[column] += rows[base + column]
                if now is not None:
                    for since, spent in _GOING_ON:
                        if rows[base + since] > 0:
                            total[spent] += max(0.0, now - rows[base + since])
                    assert started is not None
                    ready = rows[base + Field.READY_AT]
                    startup += max(0.0, min(ready, now) - started) if ready > 0 else elapsed_s
            row += nworkers
            if not shown:
                continue
            running = nworkers * (elapsed_s - paused_s) - startup
            total[Field.WAIT_IN] = max(0.0, total[Field.WAIT_IN] - nworkers * paused_s)
            busy = total[Field.BUSY]
            if is_stream and rows is not None:  # a stream worker is always receiving, sending or working
                spent = total[Field.WAIT_IN] + total[Field.WAIT_OUT] + total[Field.ENCODE] + total[Field.DECODE]
                busy = max(0.0, running - spent)
            steps.append(
                StepStats(
                    name=name,
                    nworkers=nworkers,
                    elements_in=int(total[Field.IN]),
                    elements_out=int(total[Field.OUT]),
                    busy_s=busy,
                    wait_in_s=total[Field.WAIT_IN],
                    wait_out_s=total[Field.WAIT_OUT],
                    queue_fill=total[Field.FILL_SUM] / total[Field.FILL_N] if total[Field.FILL_N] else 0.0,
                    skipped=int(total[Field.SKIPPED]),
                    utilization=min(1.0, busy / running) if running > 0 else 0.0,
                    messages_in=int(total[Field.MESSAGES]),
                    startup_s=startup,
                    encode_s=total[Field.ENCODE],
                    decode_s=total[Field.DECODE],
                    stream=is_stream if fixed is None else fixed,
                    cpu_s=total[Field.CPU],
                    backend=backend,
                    host=host,
                    sent_bytes=total[Field.SENT],
                )
            )
        past = tuple(cls.from_rows(stages, copy, at, None, started, (), paused) for at, paused, copy in history or ())
        return cls(steps, elapsed_s - paused_s, past, *consumer, paused_s=paused_s, **inputs)

    def __getitem__(self, name: str) -> StepStats:
        return self._steps[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._steps)

    def __len__(self) -> int:
        return len(self._steps)

    @property
    def bottleneck(self) -> str | None:
        """The busiest step (in its function or on its messages, once started): the one that limits
        throughput if any does; ``hint()`` says whether it does and what to do."""
        return verdict(self).busiest

    def hint(self) -> str:
        """One line: what limits the pipeline, and what to do about it (see ``_verdict``)."""
        decided = verdict(self)
        return f"{decided.title}: {decided.advice}" if decided.advice else decided.title

    def __str__(self) -> str:
        header = (
            "step", "workers", "in", "out", "msgs", "startup_s", "busy_s", "cpu_s", "encode_s", "decode_s",
            "wait_in_s", "wait_out_s", "queue_fill", "util",
        )  # fmt: skip
        skipping = any(s.skipped for s in self._steps.values())  # on_error="skip" dropped some: say where
        if skipping:
            header = header[:4] + ("skipped",) + header[4:]
        rows = [header] + [
            (
                s.name,
                str(s.nworkers),
                str(s.elements_in),
                str(s.elements_out),
                *((str(s.skipped),) if skipping else ()),
                str(s.messages_in),
                f"{s.startup_s:.2f}",
                f"{s.busy_s:.2f}",
                f"{s.cpu_s:.2f}",
                f"{s.encode_s:.2f}",
                f"{s.decode_s:.2f}",
                f"{s.wait_in_s:.2f}",
                f"{s.wait_out_s:.2f}",
                f"{s.queue_fill:.2f}",
                f"{s.utilization:.0%}",
            )
            for s in self._steps.values()
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = [
            "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            for row in rows
        ]
        paused = f" (and {self.paused_s:.2f} s paused, nothing queued)" if self.paused_s >= 0.01 else ""
        lines.append(
            f"elapsed {self.elapsed_s:.2f} s{paused}; your loop waited {self.consumer_wait_s:.2f} s for outputs "
            f"and worked {self.consumer_work_s:.2f} s; {self.hint()}"
        )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Stats({list(self._steps)}, bottleneck={self.bottleneck!r})"

    def plot(self, ax: Any = None) -> Any:
        """Draw the figures with matplotlib (the ``plot`` extra) and return the figure.

        Left, per step: the fractions of worker time spent starting, busy, encoding and decoding
        messages, waiting for input and waiting for room downstream, and the input queue's fill;
        the title is the hint's verdict. Right, when ``history`` has snapshots: each step's
        throughput (outputs per second) and busy fraction over time. Given ``ax``, only the bars are
        drawn, on it.
        """
        from torchqueue import _plot

        return _plot.plot(self, ax)
