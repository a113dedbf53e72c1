"""Reassembling one edge's stream: joining pool parts, unbundling, restoring order, ending epochs.

Workers of a stage finish elements in any order, a PoolStep hands an
element out in parts, and the feeder may send consecutive elements as one
``Bundle``. Wherever a single reader needs whole elements of one epoch (a
stream step, the consumer), a ``Collector`` turns the envelopes it reads
into the epoch's elements: in position order when ordered, else as they
complete, and always ending with the epoch's ``EndOfEpoch`` after every other
element of that epoch.

Bound: the collector holds only what is in flight in its segment. Each
element the segment's assigner sent holds one credit (a bundle one per
item); ``take`` hands out the elements of one message at a time and gives
their credits back (calls ``release`` once per element), so the segment's
credit count caps what can pile up here, and the reader holds at most one
message's elements besides.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

from torchqueue._messages import Bundle, EndOfEpoch, Envelope, Failure


class _Nothing:
    def __repr__(self) -> str:
        return "NOTHING"


NOTHING: Any = _Nothing()
"""Returned by ``take`` when the epoch's next element has not arrived yet."""


def join_parts(parts: list[Any]) -> Any:
    """One element from its pool parts (lists of results, in part order)."""
    for part in parts:
        if isinstance(part, Failure):
            return part
    return [item for part in parts for item in part]


class Collector:
    """Whole elements of one epoch at a time, out of envelopes that arrive in any order."""

    def __init__(self, ordered: bool, release: Callable[[], Any]) -> None:
        self._ordered = ordered
        self._release = release
        self._parts: dict[tuple[int, int], list[Any]] = {}
        self._missing: dict[tuple[int, int], int] = {}
        # the elements of one message, as a list, and its origin; ordered: epoch -> {seq: ...}; unordered:
        # epoch -> deque
        self._by_seq: dict[int, dict[int, tuple[list[Any], Any]]] = defaultdict(dict)
        self._arrived: dict[int, deque[tuple[list[Any], Any]]] = defaultdict(deque)
        self._next: dict[int, int] = defaultdict(int)  # positions taken so far
        self._end: dict[int, EndOfEpoch] = {}
        self.origin: Any = None  # the origin of the message ``take`` returned last

    def add(self, envelope: Envelope) -> None:
        epoch, seq, part, nparts, payload, origin = envelope
        if nparts != 1:
            key = (epoch, seq)
            parts = self._parts.setdefault(key, [None] * nparts)
            parts[part] = payload
            self._missing[key] = self._missing.get(key, nparts) - 1
            if self._missing[key]:
                return
            del self._parts[key], self._missing[key]
            payload = join_parts(parts)  # every part carries the element's origin
        elements = payload.items if isinstance(payload, Bundle) else [payload]
        if self._ordered:
            self._by_seq[epoch][seq] = elements, origin
        elif isinstance(payload, EndOfEpoch):
            self._end[epoch] = payload
        else:
            self._arrived[epoch].append((elements, origin))

    def take(self, epoch: int) -> list[Any]:
        """The next elements of ``epoch`` that are ready, those of one message (the ``EndOfEpoch`` last,
        alone), or ``NOTHING``. Gives the message's credit back. ``origin`` is then the message's: its
        first element's (``_origins``; the others' positions say theirs)."""
        if self._ordered:
            waiting = self._by_seq.get(epoch)
            position = self._next[epoch]
            if not waiting or position not in waiting:
                return NOTHING
            elements, self.origin = waiting.pop(position)
        else:
            arrived = self._arrived.get(epoch)
            if arrived:
                elements, self.origin = arrived.popleft()
            else:
                end = self._end.get(epoch)
                if end is None or self._next[epoch] != end.count:
                    return NOTHING
                elements, self.origin = [self._end.pop(epoch)], None
        self._next[epoch] += len(elements)
        for _ in elements:  # one credit per element (a bundle holds one per item)
            self._release()
        if isinstance(elements[-1], EndOfEpoch):
            self._by_seq.pop(epoch, None)
            self._arrived.pop(epoch, None)
            self._next.pop(epoch, None)
        return elements
