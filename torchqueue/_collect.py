"""Reassembling one edge's stream: joining pool parts, restoring order, ending epochs.

Workers of a stage finish elements in any order, and a PoolStep hands an
element out in parts. Wherever a single reader needs whole elements of one
epoch (a stream step, the consumer), a ``Collector`` turns the envelopes it
reads into the epoch's elements: in ``seq`` order when ordered, else as they
complete, and always ending with the epoch's ``EndOfEpoch`` after every other
element of that epoch.

Bound: the collector holds only elements that are in flight in its segment,
and the segment's credits (one per element, taken where ``seq`` is assigned
and given back when ``pop`` returns the element) cap those at the segment's
credit count.
"""

from __future__ import annotations

from collections import defaultdict, deque
from typing import Any

from torchqueue._messages import EndOfEpoch, Envelope, Failure


class _Nothing:
    def __repr__(self) -> str:
        return "NOTHING"


NOTHING: Any = _Nothing()
"""Returned by ``pop`` when the epoch's next element has not arrived yet."""


def join_parts(parts: list[Any]) -> Any:
    """One element from its pool parts (lists of results, in part order)."""
    for part in parts:
        if isinstance(part, Failure):
            return part
    return [item for part in parts for item in part]


class Collector:
    """Whole elements of one epoch at a time, out of envelopes that arrive in any order."""

    def __init__(self, ordered: bool) -> None:
        self._ordered = ordered
        self._parts: dict[tuple[int, int], list[Any]] = {}
        self._missing: dict[tuple[int, int], int] = {}
        # ordered: epoch -> {seq: payload}; unordered: epoch -> deque of payloads
        self._by_seq: dict[int, dict[int, Any]] = defaultdict(dict)
        self._arrived: dict[int, deque[Any]] = defaultdict(deque)
        self._next: dict[int, int] = defaultdict(int)
        self._end: dict[int, EndOfEpoch] = {}

    def add(self, envelope: Envelope) -> None:
        epoch, seq, part, nparts, payload = envelope
        if nparts != 1:
            key = (epoch, seq)
            parts = self._parts.setdefault(key, [None] * nparts)
            parts[part] = payload
            self._missing[key] = self._missing.get(key, nparts) - 1
            if self._missing[key]:
                return
            del self._parts[key], self._missing[key]
            payload = join_parts(parts)
        if self._ordered:
            self._by_seq[epoch][seq] = payload
        elif isinstance(payload, EndOfEpoch):
            self._end[epoch] = payload
        else:
            self._arrived[epoch].append(payload)

    def pop(self, epoch: int) -> Any:
        """The next element of ``epoch`` (its ``EndOfEpoch`` last), or ``NOTHING``."""
        if self._ordered:
            waiting = self._by_seq.get(epoch)
            if not waiting or self._next[epoch] not in waiting:
                return NOTHING
            payload = waiting.pop(self._next[epoch])
            self._next[epoch] += 1
        else:
            arrived = self._arrived.get(epoch)
            if arrived:
                self._next[epoch] += 1
                return arrived.popleft()
            end = self._end.get(epoch)
            if end is None or self._next[epoch] != end.count:
                return NOTHING
            payload = self._end.pop(epoch)
        if isinstance(payload, EndOfEpoch):
            self._by_seq.pop(epoch, None)
            self._arrived.pop(epoch, None)
            self._next.pop(epoch, None)
        return payload
