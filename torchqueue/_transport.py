"""How an element crosses a process boundary: the one place the feeder, the workers and the consumer
go through to send and to receive.

    sender                                                       receiver
      Emitter.emit(epoch, seq, value)                              read(data, fail)
        ├─ a pool reads next: split into parts (PartSizer)           ├─ _serialize.loads: maps the segment
        ├─ _serialize.dumps: pickle; tensors into a segment          └─ does not unpickle: the step's error
        │   (cannot be sent: the step's error, in place)                in the element's place (_unreadable)
        └─ Channel.put (one channel, or seq % n: round robin)

Envelopes carry ``(epoch, seq, part, nparts, payload, origin)``; a receiver that reorders (a ``Collector``)
joins the parts and puts the epoch back in order. ``observe_bytes`` keeps the running mean of bytes
per element a stream stage receives (the feeder's bundle policy reads it).

Pool parts are sized by cost (``PartSizer``): an element goes to a pool in as many parts as keep
each part at ``PART_S`` seconds of the pool's work or more, up to ``2 * nworkers`` parts. A part
costs a message (a pickle, a segment, a wake-up of a worker) whatever its size, so parts of two
small items spend much of the pool's time on messages, while parts much larger than needed only
lose parallelism on the last element of an epoch. Before the pool has measured its items'
cost, elements go in ``2 * nworkers`` parts.
"""

from __future__ import annotations

import errno
import math
import time
from collections.abc import Callable
from typing import Any, TypeGuard

from torchqueue import _segments, _serialize
from torchqueue._channel import Channel
from torchqueue._messages import CONTROL, Bundle, Envelope, Failure, Skipped
from torchqueue._unreadable import in_place
from torchqueue.errors import INPUT, capture, capture_at
from torchqueue.stats import NFIELDS, Field

PART_S = 0.02
"""The pool work a part should carry at least (seconds): 20 ms is a few hundred times what the message
of a part costs, and short next to an epoch."""


class PartSizer:
    """How many parts an element of ``n`` items goes to a pool in, from the pool's own figures (its
    workers' rows of the stats array: seconds busy per item)."""

    def __init__(self, stats: Any, first_row: int, nworkers: int) -> None:
        self._stats = stats
        self._rows = range(first_row, first_row + nworkers)
        self.most = 2 * nworkers

    def item_seconds(self) -> float | None:
        """The pool's mean seconds per item so far (``None`` until each worker could have done one)."""
        busy = items = 0.0
        for row in self._rows:
            busy += self._stats[row * NFIELDS + Field.BUSY]
            items += self._stats[row * NFIELDS + Field.IN]
        return busy / items if items >= len(self._rows) else None

    def parts(self, n: int) -> int:
        cost = self.item_seconds()
        wanted = self.most if cost is None else math.ceil(n * cost / PART_S)
        return max(1, min(self.most, wanted, n))


class Emitter:
    """Writes envelopes to an edge, splitting elements into parts when a pool reads it.

    The edge is one channel, or one per worker of a round robin reader: then the element at
    position ``seq`` goes to channel ``seq % len(channels)``. ``encode_s``: the seconds spent
    encoding so far (the sender's stats count them apart from its waits); ``sent_bytes``: the bytes.
    """

    def __init__(
        self,
        channels: list[Channel],
        alive: Callable[[], bool],
        sizer: PartSizer | None,
        split_step: str,
        writer: str,
        segment_dir: str | None,
        items: bool = False,
        local: bool = False,
        on_failure: Callable[[Exception, int, int], Failure | Skipped] | None = None,
        pool: bool = False,
    ):
        """``sizer``: the pool that reads this edge (``None``: no pool, elements go whole);
        ``split_step``: its name, for errors; ``writer``: the step whose outputs these are; ``items``: the
        reader routes items (``_routing``): list elements go item by item; ``local``: the reader runs in
        this process (a thread step, the consumer): envelopes go as they are, nothing is encoded;
        ``on_failure(error, epoch, seq)``: what goes in place of an element (or a pool's item) that
        cannot be encoded (a step's failure, or skipped); default: the writer's failure (the feeder's: the
        input's); ``pool``: the writer is a pool's worker, its payloads parts (lists of its items' results)."""
        self._items = items
        self._local = local
        self._channels = channels
        self._segment_dir = segment_dir
        self._alive = alive
        self._sizer = sizer
        self._split_step = split_step
        self._writer = writer
        self._on_failure = on_failure
        self._pool = pool
        self.encode_s = 0.0
        self.sent_bytes = 0

    def emit(self, epoch: int, seq: int, payload: Any, origin: Any = None) -> int:
        """Send one whole element (or control message) at position ``seq``; return the bytes sent.
        ``origin``: the element's (``_origins``)."""
        if self._sizer is None or isinstance(payload, CONTROL):
            return self.send(Envelope(epoch, seq, 0, 1, payload, origin))
        try:
            items = list(payload)
        except TypeError as exc:
            error = TypeError(f"PoolStep needs iterable elements (lists, tuples, ...), got {type(payload).__name__}")
            error.__cause__ = exc
            return self.send(Envelope(epoch, seq, 0, 1, capture(self._split_step, error, epoch, seq), origin))
        parts = split(items, self._sizer.parts(len(items)))
        return sum(
            self.send(Envelope(epoch, seq, index, len(parts), part, origin), len(parts) - 1 - index)
            for index, part in enumerate(parts)
        )

    def send(self, envelope: Envelope, more: int = 0) -> int:
        """Send one envelope as it is; return the bytes sent (shared memory included). ``more``: messages
        sent right after this one (an element's other parts), for the segments' reuse."""
        channel = self._channels[envelope.seq % len(self._channels)]
        if self._local:
            channel.put(envelope, self._alive)
            return 0
        start = time.perf_counter()
        try:
            data = _serialize.dumps(envelope, self._segment_dir, more, self._items)
        except Exception as exc:
            data = self._instead(envelope, exc, more)
        self.encode_s += time.perf_counter() - start
        channel.put(data, self._alive)
        nbytes = _serialize.message_nbytes(data)
        self.sent_bytes += nbytes
        return nbytes

    def _instead(self, envelope: Envelope, exc: Exception, more: int) -> bytes:
        """The message that goes in place of ``envelope``, which could not be encoded (``exc``): the
        culprits among its elements or items replaced (``_in_place_of``), else the whole payload's failure
        (skipped under ``on_error="skip"``)."""
        replaced = self._in_place_of(envelope, exc)
        if replaced is not None:
            try:
                return _serialize.dumps(envelope._replace(payload=replaced), self._segment_dir, more, self._items)
            except Exception:  # the rest fails as a whole too (/dev/shm full): the payload's failure
                pass
        failure = self._failed(_unsendable(self._writer, self._split_step, exc), envelope.epoch, envelope.seq)
        return _serialize.dumps(envelope._replace(payload=failure), None)

    def _in_place_of(self, envelope: Envelope, exc: Exception) -> Any:
        """A bundle's elements, or a pool part's items (a list of results), with each one that does not
        pickle alone replaced: in a bundle by its own failure (skipped under ``on_error="skip"``), so that
        every position is kept and the culprit named; in a pool's part the item is dropped when skipped (as
        an item whose call raised), else the part is its failure. ``None``: none is the
        culprit alone, or the payload is neither (the whole payload fails)."""
        payload = envelope.payload
        pool_part = self._pool and type(payload) is list
        if not (isinstance(payload, Bundle) or pool_part) or _no_room(exc):
            return None
        items, found = [], False
        for offset, item in enumerate(payload.items if isinstance(payload, Bundle) else payload):
            try:
                _serialize.dumps(item, None)
            except Exception as item_exc:
                found = True
                error = _unsendable(self._writer, self._split_step, item_exc)
                if not pool_part:
                    items.append(self._failed(error, envelope.epoch, envelope.seq + offset))
                    continue
                failed = self._failed(error, envelope.epoch, envelope.seq)
                if isinstance(failed, Failure):
                    return failed
                continue  # skipped: the item is left out of its part
            items.append(item)
        if not found:
            return None
        return Bundle(items) if not pool_part else items

    def _failed(self, error: Exception, epoch: int, seq: int) -> Failure | Skipped:
        if self._on_failure is not None:  # a step's worker: its Loop fails, or skips
            return self._on_failure(error, epoch, seq)
        if self._writer != INPUT:
            return capture(self._writer, error, epoch, seq)
        where = f"the input iterable (read in the consumer's own process) at element {seq} of epoch {epoch}"
        return capture_at(INPUT, error, where, in_consumer=True)

    def idle(self) -> None:
        """The sender has nothing to send for now: free the unused segments it kept for reuse."""
        if self._segment_dir is not None:
            _segments.trim(self._segment_dir)


def _no_room(exc: Exception) -> TypeGuard[OSError]:
    """Whether ``exc`` says /dev/shm is full (``ENOSPC``): what did not fit is no element's fault."""
    return isinstance(exc, OSError) and exc.errno == errno.ENOSPC


def _unsendable(writer: str, reader: str, exc: Exception) -> Exception:
    """The error for a value ``writer`` could not send to ``reader``: ``OSError`` (``ENOSPC``) for a full
    /dev/shm, else ``TypeError``."""
    if _no_room(exc):
        error: Exception = OSError(errno.ENOSPC, f"could not send an element: {exc.strerror}")
    elif writer == INPUT:
        error = TypeError(f"the element cannot be sent to step {reader!r} in another process: {exc}")
    else:
        error = TypeError(f"step {writer!r} produced a value that cannot be sent to another process: {exc}")
    error.__cause__ = exc
    return error


def split(items: list[Any], nparts: int) -> list[list[Any]]:
    """``items`` in at most ``nparts`` contiguous, nearly equal parts (one empty part for no items)."""
    nparts = max(1, min(nparts, len(items)))
    size, extra = divmod(len(items), nparts)
    parts, start = [], 0
    for index in range(nparts):
        stop = start + size + (index < extra)
        parts.append(items[start:stop])
        start = stop
    return parts


def read(
    data: bytearray | Envelope, fail: Callable[[Exception], Failure | Skipped], where: str, lazy: bool = False
) -> Envelope:
    """The envelope of a received message (one from this process's sender is that already); one whose
    value does not unpickle here carries ``fail(exc)`` in its place (see ``_unreadable``: the receiver
    goes on). ``where``: what the receiver was doing, for the error; ``lazy``: the receiver routes items
    without decoding them (``_routing``)."""
    if isinstance(data, Envelope):
        return data
    try:
        envelope: Envelope = _serialize.loads(data, lazy)
    except Exception as exc:
        unread = in_place(data, exc, fail, where)
        if unread is None:
            raise
        return unread
    return envelope


def observe_bytes(meter: Any, data: bytes | bytearray | Envelope, envelope: Envelope) -> None:
    """Fold one message's bytes per element into ``meter`` (a RawValue: a running mean); a message that
    stayed in this process has none."""
    if isinstance(data, Envelope):
        return
    payload = envelope.payload
    count = len(payload.items) if isinstance(payload, Bundle) else 1
    meter.value += 0.1 * (_serialize.message_nbytes(data) / max(count, 1) - meter.value)
