"""Per-step figures of a running pipeline: ``Sequence.stats()`` returns a ``Stats``.

Every worker adds its figures to its own row of a shared array (no locks:
one writer per row); ``Stats`` sums the rows of each step when asked. While
outputs are consumed, the consumer also copies the array every so often
(``_runtime``'s ``SAMPLE_S``): ``Stats.history`` holds those snapshots, so
``Stats.plot`` can draw each step's throughput and busy fraction over time.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

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
        busy_s: Seconds its workers spent working, summed over workers.
        wait_in_s: Seconds its workers waited for input.
        wait_out_s: Seconds its workers waited for room downstream.
        queue_fill: Mean fill (0 to 1) of its input queue, sampled at every read.
        skipped: Elements dropped under ``on_error="skip"``.
        utilization: ``busy_s / (nworkers * elapsed_s)``: 1.0 means always busy.
        messages_in: Data messages its workers received (control messages such as the end of an
            epoch are not counted): fewer than ``elements_in`` where small
            elements travel bundled, or a PoolStep's items in parts.
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


class Stats(Mapping[str, StepStats]):
    """``stats[step_name]`` is a ``StepStats``; ``print(stats)`` shows a table.

    Attributes:
        elapsed_s: Seconds since the workers started.
        history: Earlier snapshots of the same figures, oldest first, taken about every
            quarter second while outputs were consumed (fewer, further apart, in a long run:
            at most a few hundred are kept). Each is a ``Stats`` with totals since the start;
            the difference of two is what happened between them.
    """

    def __init__(self, steps: list[StepStats], elapsed_s: float, history: tuple[Stats, ...] = ()) -> None:
        self._steps = {step.name: step for step in steps}
        self.elapsed_s = elapsed_s
        self.history = history

    @classmethod
    def from_rows(
        cls,
        stages: list[tuple[str, int, bool, bool]],
        rows: Any,
        elapsed_s: float,
        history: list[tuple[float, Any]] | None = None,
        started: float | None = None,
    ) -> Stats:
        """Sum the shared array's rows, stage by stage (``(name, nworkers, is_stream, shown)``; an
        internal stage that is not shown keeps its rows but gets no entry).

        ``history``: earlier ``(elapsed_s, rows)`` copies of the array, oldest first. ``started``:
        the ``perf_counter()`` the elapsed time counts from; given, a wait or a call still going on
        counts up to now (a worker adds it to its row only when it ends): a step stuck in its
        function is busy, and the bottleneck.
        """
        steps, row = [], 0
        now = None if started is None else started + elapsed_s
        for name, nworkers, is_stream, shown in stages:
            total = [0.0] * NFIELDS
            for worker in range(nworkers):
                base = (row + worker) * NFIELDS
                for field in Field:
                    total[field] += rows[base + field] if rows is not None else 0.0
                if rows is not None and now is not None:
                    for since, spent in _GOING_ON:
                        if rows[base + since] > 0:
                            total[spent] += max(0.0, now - rows[base + since])
            row += nworkers
            if not shown:
                continue
            busy = total[Field.BUSY]
            if is_stream and rows is not None:  # a stream worker is always receiving, sending or working
                busy = max(0.0, nworkers * elapsed_s - total[Field.WAIT_IN] - total[Field.WAIT_OUT])
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
                    utilization=busy / (nworkers * elapsed_s) if elapsed_s > 0 else 0.0,
                    messages_in=int(total[Field.MESSAGES]),
                )
            )
        past = tuple(cls.from_rows(stages, copy, seconds, None, started) for seconds, copy in history or ())
        return cls(steps, elapsed_s, past)

    def __getitem__(self, name: str) -> StepStats:
        return self._steps[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._steps)

    def __len__(self) -> int:
        return len(self._steps)

    @property
    def bottleneck(self) -> str | None:
        """The step whose workers are busiest: the one that limits throughput."""
        if not self._steps:
            return None
        return max(self._steps.values(), key=lambda s: s.utilization).name

    def hint(self) -> str:
        """One line of advice: which step to give more workers."""
        name = self.bottleneck
        if name is None:
            return "no steps ran yet"
        step = self._steps[name]
        if step.utilization < 0.5:
            return (
                f"no step is busy more than half the time ({name}: {step.utilization:.0%}): "
                "the input or the consumer limits"
            )
        return f"bottleneck: {name} ({step.utilization:.0%} busy): give it more workers (now {step.nworkers})"

    def __str__(self) -> str:
        header = ("step", "workers", "in", "out", "msgs", "busy_s", "wait_in_s", "wait_out_s", "queue_fill", "util")
        rows = [header] + [
            (
                s.name,
                str(s.nworkers),
                str(s.elements_in),
                str(s.elements_out),
                str(s.messages_in),
                f"{s.busy_s:.2f}",
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
        lines.append(f"elapsed {self.elapsed_s:.2f} s; {self.hint()}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Stats({list(self._steps)}, bottleneck={self.bottleneck!r})"

    def plot(self, ax: Any = None) -> Any:
        """Draw the figures with matplotlib (the ``plot`` extra) and return the figure.

        Left, per step: the fractions of worker time spent busy, waiting for input and
        waiting for room downstream, and the input queue's fill; the busiest step is the
        bottleneck. Right, when ``history`` has snapshots: each step's throughput
        (outputs per second) and busy fraction over time. Given ``ax``, only the bars are
        drawn, on it.
        """
        from torchqueue import _plot

        return _plot.plot(self, ax)
