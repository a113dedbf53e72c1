"""Reassembling one edge's stream: joining pool parts, unbundling, restoring order, ending epochs.

Workers of a stage finish elements in any order, a PoolStep hands an
element out in parts, and the feeder may send consecutive elements as one
``Bundle``. Wherever a single reader needs whole elements of one epoch (a
stream step, the consumer), a ``Collector`` turns the envelopes it reads
into the epoch's elements: in position order when ordered, else as they
complete, and always ending with the epoch's ``EndOfEpoch`` after every other
element of that epoch.

Bound: the collector holds only what is in flight in its segment. Each
message the segment's assigner sent holds one credit; ``pop`` gives it back
(calls ``release``) with the last element of that message, so the segment's
credit count caps what can pile up here.
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
"""Returned by ``pop`` when the epoch's next element has not arrived yet."""


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
        # (payload, gives a credit back); ordered: epoch -> {seq: ...}; unordered: epoch -> deque
        self._by_seq: dict[int, dict[int, tuple[Any, bool]]] = defaultdict(dict)
        self._arrived: dict[int, deque[tuple[Any, bool]]] = defaultdict(deque)
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
        if isinstance(payload, Bundle):
            last = len(payload.items) - 1
            for offset, item in enumerate(payload.items):
                self._store(epoch, seq + offset, item, offset == last)
        else:
            self._store(epoch, seq, payload, True)

    def _store(self, epoch: int, seq: int, payload: Any, releases: bool) -> None:
        if self._ordered:
            self._by_seq[epoch][seq] = (payload, releases)
        elif isinstance(payload, EndOfEpoch):
            self._end[epoch] = payload
        else:
            self._arrived[epoch].append((payload, releases))

    def pop(self, epoch: int) -> Any:
        """The next element of ``epoch`` (its ``EndOfEpoch`` last), or ``NOTHING``."""
        if self._ordered:
            waiting = self._by_seq.get(epoch)
            if not waiting or self._next[epoch] not in waiting:
                return NOTHING
            payload, releases = waiting.pop(self._next[epoch])
            self._next[epoch] += 1
        else:
            arrived = self._arrived.get(epoch)
            if arrived:
                self._next[epoch] += 1
                payload, releases = arrived.popleft()
            else:
                end = self._end.get(epoch)
                if end is None or self._next[epoch] != end.count:
                    return NOTHING
                payload, releases = self._end.pop(epoch), True
        if releases:
            self._release()
        if isinstance(payload, EndOfEpoch):
            self._by_seq.pop(epoch, None)
            self._arrived.pop(epoch, None)
            self._next.pop(epoch, None)
        return payload
