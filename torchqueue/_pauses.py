"""When a pipeline has nothing to do: every epoch queued so far was delivered to the consumer, and no
next one is queued yet (your loop saves a checkpoint, evaluates, or you call ``stats()`` after the
last epoch). Its workers all wait for input then, and its figures must not say that the input was
slow: ``Stats`` leaves these pauses out of the elapsed time, of the workers' waits for input, of
your process's CPU time (an evaluation in your loop is not the pipeline's) and of the machine's
idle time.

    queue(epoch 0) ─ run ─ end of epoch 0 delivered ─ pause ─ queue(epoch 1) ─ run ─ ...
                                   │                    │
                                 ``ended``          ``queued``
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple


class Paused(NamedTuple):
    """What the pauses took so far: wall seconds, this process's CPU seconds, the machine's idle CPU
    seconds (``None`` where unknown)."""

    seconds: float = 0.0
    cpu_s: float = 0.0
    idle_s: float | None = 0.0


class Pauses:
    """Counts the epochs queued and delivered, and the pauses between (see the module docstring).
    ``idle``: the machine's idle CPU seconds now (``_idle.idle_seconds``), or ``None``."""

    def __init__(self, idle: Callable[[], float | None]) -> None:
        self._idle = idle
        self._queued = self._ended = 0
        self._since: tuple[float, float, float | None] | None = None  # the pause going on: when it began
        self._total = Paused()

    @property
    def paused(self) -> bool:
        return self._since is not None

    def queued(self) -> None:
        """An epoch was queued: a pause going on ends."""
        self._queued += 1
        if self._since is not None:
            self._total = self.taken()
            self._since = None

    def ended(self) -> None:
        """An epoch's end was delivered to the consumer: if it was the last one queued, a pause begins."""
        self._ended += 1
        if self._ended >= self._queued and self._since is None:
            self._since = (time.perf_counter(), time.process_time(), self._idle())

    def taken(self, at: tuple[float, float, float | None] | None = None) -> Paused:
        """The pauses' totals up to ``at`` (``(perf_counter, process_time, idle seconds)``; default: now),
        the one going on included."""
        if self._since is None:
            return self._total
        wall, cpu, idle = at or (time.perf_counter(), time.process_time(), self._idle())
        began_wall, began_cpu, began_idle = self._since
        total = self._total
        idle_s = None
        if idle is not None and began_idle is not None and total.idle_s is not None:
            idle_s = total.idle_s + idle - began_idle
        return Paused(total.seconds + wall - began_wall, total.cpu_s + cpu - began_cpu, idle_s)
