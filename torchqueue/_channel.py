"""A bounded, many-to-many message pipe between processes that never blocks for good.

Each message is a length-prefixed byte string on an OS pipe. A semaphore
counts free slots (``capacity`` messages at most are in the pipe), one lock
serialises writers and one serialises readers. Both pipe ends are
non-blocking and every wait is a ``poll`` or a lock/semaphore acquire with a
short timeout, after which the caller's ``alive`` check runs: a stop request or
a dead peer ends the wait instead of hanging it. A reader waiting for data
also watches the pipeline's ``StopSignal``, so that an idle worker leaves at
once when the pipeline closes, not at its next timeout.

    writers (any process)            readers (any process)
      slots.acquire()   ─┐          ┌─ rlock: poll + read one whole message
      wlock: write len+bytes ─► pipe ─► slots.release()

A writer killed in the middle of a message leaves the pipe unusable; its
death is what the liveness checks report, and the pipeline is shut down.
"""

from __future__ import annotations

import os
import select
import struct
from collections.abc import Callable
from multiprocessing.context import BaseContext
from typing import Any

POLL_S = 0.05
"""How often a blocked call wakes to run its ``alive`` check."""


def _ready(fds: list[int], events: int, timeout_s: float) -> list[int]:
    """The fds of ``fds`` ready for ``events`` (or hung up, or failed: a read or write then says so) within
    ``timeout_s``. ``poll``, not ``select``: a process may hold more than 1024 files (a dataset of tensors
    sent to a fork server's worker holds one each), and ``select`` refuses any fd from 1024 up."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, events)
    return [fd for fd, _ in poller.poll(timeout_s * 1000.0)]


_HEADER = struct.Struct("<Q")


class Stopped(Exception):
    """Raised by a blocking call whose ``alive`` check returned False."""


def wait_acquire(lock: Any, alive: Callable[[], bool]) -> None:
    """Acquire a multiprocessing lock or semaphore, checking ``alive`` while waiting."""
    while not lock.acquire(timeout=POLL_S):
        if not alive():
            raise Stopped


class StopSignal:
    """A multiprocessing event that a ``select`` can wait for: setting it also makes a pipe readable.

    Shared with workers by forking or pickling, like the channels. Nothing ever reads the pipe: once
    set, it stays readable for every process."""

    def __init__(self, ctx: BaseContext) -> None:
        self._event = ctx.Event()
        self._reader, self._writer = ctx.Pipe(duplex=False)

    def is_set(self) -> bool:
        return self._event.is_set()

    def set(self) -> None:
        self._event.set()
        try:
            os.write(self._writer.fileno(), b"!")
        except OSError:  # closed already
            pass

    def fileno(self) -> int:
        """The descriptor that turns readable when the signal is set."""
        return self._reader.fileno()

    def close(self) -> None:
        self._reader.close()
        self._writer.close()


class Channel:
    """A bounded pipe of byte messages, shared by forking or pickling it to workers.

    Invariant: at most ``capacity`` messages are written and not yet read.
    """

    def __init__(self, ctx: BaseContext, capacity: int) -> None:
        self.capacity = capacity
        self._reader, self._writer = ctx.Pipe(duplex=False)
        os.set_blocking(self._reader.fileno(), False)
        os.set_blocking(self._writer.fileno(), False)
        self._rlock = ctx.Lock()
        self._wlock = ctx.Lock()
        self._slots = ctx.BoundedSemaphore(capacity)

    def fill(self) -> float:
        """Fraction of the capacity in use now (0 to 1)."""
        try:
            free = self._slots.get_value()
        except NotImplementedError:  # macOS
            return 0.0
        return (self.capacity - free) / self.capacity

    def reserve(self) -> bool:
        """Take a free slot for a message if there is one now (``put(..., reserved=True)`` writes it)."""
        return self._slots.acquire(block=False)

    def unreserve(self) -> None:
        """Give back a slot taken by ``reserve`` and not written."""
        self._slots.release()

    def put(self, data: bytes, alive: Callable[[], bool], reserved: bool = False) -> None:
        """Write one message, waiting for a free slot (``reserved``: taken already); raise ``Stopped`` when
        ``alive()`` turns False."""
        if not reserved:
            wait_acquire(self._slots, alive)
        try:
            wait_acquire(self._wlock, alive)
        except Stopped:
            self._slots.release()
            raise
        try:
            _write_all(self._writer.fileno(), [_HEADER.pack(len(data)), data], alive)
        finally:
            self._wlock.release()

    def get(
        self, alive: Callable[[], bool], timeout: float | None = None, stop: StopSignal | None = None
    ) -> bytearray | None:
        """Read one message, or return ``None`` when none started within ``timeout`` seconds.

        With ``timeout=None`` it waits until a message comes or ``alive()`` turns False; a set ``stop``
        ends the wait at once (``Stopped``).
        """
        if not self._rlock.acquire(timeout=POLL_S if timeout is None else min(timeout, POLL_S)):
            if not alive():
                raise Stopped
            return None
        try:
            fd = self._reader.fileno()
            if not _wait_readable(fd, timeout, alive, stop):
                return None
            (size,) = _HEADER.unpack(_read_exact(fd, _HEADER.size, alive))
            data = _read_exact(fd, size, alive)
        finally:
            self._rlock.release()
        self._slots.release()
        return data

    def wake(self) -> None:
        """Nothing to do: a wait here ends by itself as the pipeline stops (its ``StopSignal``'s pipe)."""

    def close(self) -> None:
        """Close this process's ends of the pipe."""
        self._reader.close()
        self._writer.close()


def _wait_readable(fd: int, timeout: float | None, alive: Callable[[], bool], stop: StopSignal | None) -> bool:
    fds = [fd] if stop is None else [fd, stop.fileno()]
    waited = 0.0
    while True:
        step = POLL_S if timeout is None else min(POLL_S, max(timeout - waited, 0.0))
        readable = _ready(fds, select.POLLIN, step)
        if fd in readable:
            return True
        if readable and stop is not None and stop.is_set():
            raise Stopped
        waited += step
        if not alive():
            raise Stopped
        if timeout is not None and waited >= timeout:
            return False


def _write_all(fd: int, buffers: list[bytes], alive: Callable[[], bool]) -> None:
    """Write the buffers in order, in one system call when the pipe has room (a small message is
    then atomic: a reader never wakes to half of it)."""
    views = [memoryview(b).cast("B") for b in buffers]
    while views:
        try:
            written = os.writev(fd, views)
        except BlockingIOError:
            if not _ready([fd], select.POLLOUT, POLL_S) and not alive():
                raise Stopped from None
            continue
        while views and written >= views[0].nbytes:
            written -= views[0].nbytes
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def _read_exact(fd: int, size: int, alive: Callable[[], bool]) -> bytearray:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        try:
            n = os.readv(fd, [view[got:]])
        except BlockingIOError:
            if not _ready([fd], select.POLLIN, POLL_S) and not alive():
                raise Stopped from None
            continue
        if n == 0:
            raise EOFError("pipe closed in the middle of a message")
        got += n
    return buffer
