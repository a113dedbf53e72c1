"""Where an output came from: what a checkpoint needs to resume an epoch after it without running
any step on the epoch's consumed part again.

An element's origin says where the epoch's input restarts so that the steps go on right after that
element: ``(start, skips)``. ``start``: the feeder's positions to leave out (input elements, or the
lists of a first PackStep that the feeder runs). ``skips``: ``(stage, k)`` pairs, one per stream
stage that had used ``k`` items of the element it was on (an UnpackStep or RepackStep cuts
elements): after the restart it leaves out the first ``k`` items of its first element.

    input  c0 c1 c2 c3 ...       (chunks of 100 events)
    RepackStep(64)               batch 2 ends at event 92 of c1: origin (1, ((stage, 92),))
    resumed at (1, ((stage, 92),)): the feeder starts at c1, the RepackStep drops 92 of its events

An origin is made only where positions are assigned, and passed on where they are kept:

- the feeder sends ``None``: the element at position ``p`` of an epoch that starts at ``start``
  has the origin ``(start + p + 1, ())``, and nothing travels per element;
- map and pool stages keep positions, and pass their inputs' origins on untouched;
- an ordered stream stage gives each output an origin of its own (``Tracker``);
- a resumed epoch's first element carries ``Resumed``: where the epoch restarts, which each stream
  stage reads for its own skip and gives on with its first output.

Where the order is not kept (``ordered=False``) or a stream step does not say how far it went,
outputs carry ``UNTRACKED``, and a checkpoint goes back to computing the epoch's start again.
Resuming so calls the steps again only on the elements a stream step had used in part: at most
one per such step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Origin = tuple[int, tuple[tuple[int, int], ...]]

EPOCH_START: Origin = (0, ())
"""The origin before an epoch's first element: restart from the beginning."""

UNTRACKED: Origin = (-1, ())
"""The origin of an output nobody can tell: a resume has to compute the epoch's start again."""


@dataclass(frozen=True)
class Resumed:
    """The origin of a resumed epoch's first element: the epoch restarts at ``(start, skips)``, and the
    element's own origin is ``origin`` (``None``: its position says it)."""

    start: int
    skips: tuple[tuple[int, int], ...]
    origin: Origin | None = None


class Tracker:
    """The origins of the elements one ordered reader takes in one epoch, and of what it makes of them:
    a stream stage's, or the consumer's. ``stage``: the reader's stage (the consumer: past the last)."""

    def __init__(self, stage: int, ordered: bool = True) -> None:
        self.stage = stage
        self.ordered = ordered
        self.epoch_begins()

    def epoch_begins(self) -> None:
        self.start = 0  # the feeder positions this epoch left out
        self.before_first: Origin = EPOCH_START if self.ordered else UNTRACKED  # the restart before its first element
        self.skip = 0  # items of its first element this reader leaves out
        self.resumed: Resumed | None = None  # the restart of a resumed epoch, until given on
        self._origins: dict[int, Origin] = {}  # the last two elements' (position -> origin)

    def took(self, position: int, origin: Any) -> None:
        """The element at ``position`` came with ``origin`` (a ``Resumed`` at position 0 restarts the epoch)."""
        if isinstance(origin, Resumed):
            self.start, self.resumed = origin.start, origin
            earlier = tuple(pair for pair in origin.skips if pair[0] < self.stage)
            self.before_first = (origin.start, earlier) if self.ordered else UNTRACKED
            self.skip = dict(origin.skips).get(self.stage, 0)
            origin = origin.origin
        if not self.ordered:
            origin = UNTRACKED
        elif origin is None:
            origin = (self.start + position + 1, ())
        self._origins.pop(position - 2, None)
        self._origins[position] = origin

    def first_skip(self) -> int:
        """The items of the first element this reader leaves out (asked once that element came)."""
        return self.skip

    def after(self, position: int) -> Origin:
        """The origin of what ends with the whole element at ``position``."""
        return self._origins.get(position, UNTRACKED)

    def before(self, position: int) -> Origin:
        """The origin of what ends right before the element at ``position``."""
        return self.before_first if position == 0 else self._origins.get(position - 1, UNTRACKED)

    def within(self, position: int, used: int) -> Origin:
        """The origin of what ends with ``used`` items of the element at ``position``."""
        return _cut(self.before(position), self.stage, used)

    def given_on(self, origin: Origin) -> Any:
        """``origin`` as sent with an output: the first output of a resumed epoch also says where it restarted."""
        resumed, self.resumed = self.resumed, None
        if resumed is None:
            return origin
        return Resumed(resumed.start, resumed.skips, origin)


class PositionsRun:
    """Consecutive outputs of the consumer, one per input position (a message's values): the origin of
    each is told by its position, but the first's, which came with the message (``_origins``)."""

    __slots__ = ("first", "count", "_positions", "_first_position", "_first_origin", "_start")

    def __init__(
        self, first: int, positions: list[int], first_position: int, first_origin: Origin, start: int, ordered: bool
    ) -> None:
        """``positions``: the values'; ``first_position``: the message's first payload's (a value, or one
        skipped), which the message's origin is of."""
        self.first, self.count = first, len(positions)
        self._positions = positions
        self._first_position = first_position
        self._first_origin = first_origin if ordered else UNTRACKED
        self._start = start if ordered else -1

    def origin(self, offset: int) -> Origin:
        position = self._positions[offset]
        if position == self._first_position:
            return self._first_origin
        return UNTRACKED if self._start < 0 else (self._start + position + 1, ())


class ItemsRun:
    """The items of one element, as a last UnpackStep in the consumer's process hands them out: the
    origin of each is the items of the element used so far."""

    __slots__ = ("first", "count", "_before", "_after", "_stage", "_used", "_size")

    def __init__(
        self, first: int, count: int, before: Origin, after: Origin, stage: int, used: int, size: int | None
    ) -> None:
        self.first, self.count = first, count
        self._before, self._after, self._stage, self._used, self._size = before, after, stage, used, size

    def origin(self, offset: int) -> Origin:
        used = self._used + offset + 1
        return self._after if used == self._size else _cut(self._before, self._stage, used)


Run = PositionsRun | ItemsRun


def _cut(before: Origin, stage: int, used: int) -> Origin:
    """The origin of what ends with ``used`` items of the element of ``stage`` that follows ``before``."""
    if before[0] < 0:
        return UNTRACKED
    return before[0], (*before[1], (stage, used))
