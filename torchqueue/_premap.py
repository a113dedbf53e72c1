"""A ProcessStep run in the workers of the PoolStep after it (``_plan``'s fusion into a pool).

A pool worker takes the ProcessStep's input, calls its function in one of the step's ``nworkers``
``Slots`` (at most that many calls at once, each slot one of the step's stats rows) with its items
listed inside the call (``listed``), and works on the items itself. Before each item, until it has
shared once, it looks for the pool's workers that wait for input (``waiting_workers``) and hands
them the last parts of the rest, through the pool's own channel (``PoolRunner.hand_off``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torchqueue._channel import Stopped, wait_acquire
from torchqueue._mainmodule import TravellingStep
from torchqueue.stats import NFIELDS, Field


class Slots:
    """``n`` numbered slots shared by processes: at most ``n`` holders at once, each with its own number."""

    def __init__(self, ctx: Any, n: int) -> None:
        self.n = n
        self._free = ctx.BoundedSemaphore(n)
        self._claim = ctx.Lock()
        self._taken = ctx.RawArray("b", n)
        self._holders = ctx.RawArray("q", n)  # the pid holding each slot, 0: free
        self._released = ctx.RawArray("d", n)  # when each slot was last released (``time.monotonic``)

    def acquire(self, alive: Callable[[], bool]) -> int:
        """Wait for a free slot (``Stopped`` when ``alive()`` turns False) and take it: its number."""
        wait_acquire(self._free, alive)
        try:
            wait_acquire(self._claim, alive)
        except Stopped:
            self._free.release()
            raise
        try:
            # one is free (holders of a slot hold a permit): the one free the longest, so that the slots take
            # turns as the processes of a step of their own would (each slot's idle time is then its wait)
            taken, released = self._taken[:], self._released[:]
            slot = min((index for index in range(self.n) if not taken[index]), key=released.__getitem__)
            self._taken[slot] = 1
            self._holders[slot] = os.getpid()
        finally:
            self._claim.release()
        return slot

    def release(self, slot: int) -> None:
        self._released[slot] = time.monotonic()  # one clock for every process
        self._holders[slot] = 0
        self._taken[slot] = 0
        self._free.release()

    def holder(self, slot: int) -> int | None:
        """The pid of the worker holding ``slot`` now (``None``: nobody)."""
        return self._holders[slot] or None


class SlotHolder:
    """Stands for the process of a premapped stage's slot (``Runtime``'s owner of its stats row): whichever
    pool worker holds it now."""

    def __init__(self, slots: Slots, slot: int) -> None:
        self._slots, self._slot = slots, slot

    @property
    def pid(self) -> int | None:
        return self._slots.holder(self._slot)


@dataclass(frozen=True)
class PremapStage:
    """The map stage a pool's workers run before their own step: its step, its first stats row (one per
    slot) and its slots."""

    name: str
    index: int
    step: TravellingStep
    first_row: int
    slots: Slots


def listed(fn: Callable[[Any], Any], element: Any) -> Any:
    """``fn(element)``, its items listed inside the step's call where it is iterable (a generator's error
    is then the step's, at its element, and its time the step's); a value that is not iterable comes as
    it is (the pool it goes to refuses it)."""
    result = fn(element)
    if type(result) is list:
        return result
    try:
        iterator = iter(result)
    except TypeError:
        return result
    return list(iterator)


def waiting_workers(stats: Any, first_row: int, nworkers: int, me: int) -> int:
    """How many of a pool's other workers wait for input now (their rows' ``IN_SINCE``)."""
    return sum(
        1 for worker in range(nworkers) if worker != me and stats[(first_row + worker) * NFIELDS + Field.IN_SINCE] > 0
    )
