"""Shared-memory segments: the files under /dev/shm that carry a message's tensors and arrays.

A pipeline has one directory of segments (``make_segment_dir``). A sender writes a message's
bytes into a segment file (``write``); the receiver maps it (``map_segment``) and renames it
``<name>.r``: received. Its tensors are views of that mapping.

Recycling. A fresh tmpfs file costs a page allocation per 4 KiB written: writing into one runs at
about 1.5 GB/s here, while writing into pages a file has already runs at 6-10 GB/s. So a sender
reuses the segments it sent once nobody uses them any more: the receiver renamed it (it got
it), and the kernel grants a write lease on it, which it does only when no process has the
file open or mapped (``fcntl(F_SETLEASE)``). That covers every way a segment stays in use:
the receiver's tensors, a tensor passed on by torch's file-descriptor sharing, a forked child.
The lease is released at once; nobody opens a received segment again, so it is hardly ever broken.
Hardly: a segment passed on (below) is opened again by the next receiver, which the sender skips, but
a receiver may make that second name just before the sender leases. Then the next receiver's open
waits until the lease is released (microseconds), and the kernel tells the sender by ``SIGIO``, whose
default action kills a process: so every process that leases ignores ``SIGIO`` where nothing handles
it (``survive_lease_breaks``).

    sender: write <name> ──► receiver: open, map, rename to <name>.r ... frees its tensors
    sender, for a later message: <name>.r unused (lease granted)? rename it to a new name, write

Bounds: only segments of ``REUSE_MIN_BYTES`` or more are reused. As it writes, a sender reuses
the oldest of its segments that nobody uses, keeps ``SPARE`` more unused ones, and removes the
others it finds unused: a segment its receiver freed waits only until its sender's next message.
A sender going idle (a worker waiting for input, the feeder waiting for an epoch) calls ``trim``,
which removes them the same way, so nothing waits after the data stopped flowing. It tracks at
most ``TRACKED`` segments and ``TRACKED_BYTES`` bytes besides those in flight (which the credits
bound): the oldest received one beyond them is forgotten and its name removed (its memory goes
when its last user unmaps it). A segment in flight is never touched. Where leases are not
available, segments are never reused, and the bounds only say when their names are removed.

Passing on. A receiver that sends a large tensor or array of a segment on to the next step does
not copy it: it gives the segment a second name in the pipeline's directory (``link``) while it
still maps it, and the next receiver maps it by that name and removes it (``map_passed``). A
sender never reuses a segment with two names, so the bytes stay as they were passed on even
while nobody maps them (between the two steps), and no file descriptor crosses processes.

    A: write <name> ──► B: map, <name>.r ... link <name>.r as <link>, send ──► C: map <link>, remove <link>
"""

from __future__ import annotations

import collections
import errno
import fcntl
import itertools
import mmap
import os
import shutil
import signal
import tempfile
import threading
import time
from typing import Any

import torch

REUSE_MIN_BYTES = 256 << 10
"""Segments at least this large are reused; smaller ones (a page allocation costs about a
microsecond) get a fresh file each, whose name the receiver removes as it maps it."""

TRACKED = 8
"""Segments one sending process keeps track of, for reuse, per pipeline."""

TRACKED_BYTES = 1 << 30
"""Bytes of segments one sending process keeps track of, per pipeline (at least one segment). Tracking
a segment costs no memory (it is in use, or one of the ``SPARE`` unused ones): the bound only says
when to give up on one that stays in use. It must cover what is in use at once, or large messages
never find a free segment (64 MiB tensors through ``Queue(4)`` ran 2.4x slower with 64 MiB here)."""

SPARE = 0
"""Unused segments a sender keeps beside the one it reuses; it removes further ones it finds. One per
sender raised the peak memory of a stream of 16 MiB batches by about 10% and sped up nothing measured."""

_F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)
_ALIGN = 64
_ZEROS = memoryview(bytes(_ALIGN))
_IOV_MAX = 1024
_RECEIVED = ".r"
_counter = itertools.count()
_new_shared_fd = getattr(torch.UntypedStorage, "_new_shared_fd_cpu")  # noqa: B009 (private torch API)


ABANDONED_AFTER_S = 10.0
"""A directory nobody holds the lock of is removed only once unchanged for this long (its creator takes
the lock a moment after creating it)."""

_owners: dict[str, int] = {}  # directory -> the descriptor holding its lock, in the creating process


def make_segment_dir() -> str | None:
    """A fresh directory for one pipeline's segments (``None`` where there is no /dev/shm).

    Its creator holds an ``flock`` on it, and so does every process forked from it while it keeps
    the descriptor: the lock is free only once all of them are gone. A
    pipeline whose processes were all killed at once (``SIGKILL`` to the process group, the OOM
    killer) leaves its directory behind, with the lock free; the next pipeline started on the
    machine removes it (``remove_abandoned``). Locks, unlike process ids, hold across PID namespaces
    (containers sharing /dev/shm).
    """
    if not os.path.isdir("/dev/shm"):
        return None
    remove_abandoned("/dev/shm")
    directory = tempfile.mkdtemp(prefix=f"torchqueue-{os.getpid()}-", dir="/dev/shm")
    fd = os.open(directory, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    _owners[directory] = fd
    return directory


def remove_abandoned(root: str) -> None:
    """Remove the pipelines' directories under ``root`` whose lock nobody holds."""
    try:
        names = [name for name in os.listdir(root) if name.startswith("torchqueue-")]
    except OSError:
        return
    for name in names:
        try:
            fd = os.open(os.path.join(root, name), os.O_RDONLY | os.O_DIRECTORY)
        except OSError:  # not a directory, or gone meanwhile
            continue
        try:
            if time.time() - os.fstat(fd).st_mtime < ABANDONED_AFTER_S:
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # OSError: a process of that pipeline lives
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        except OSError:
            continue
        finally:
            os.close(fd)


class _Sent:
    """The segments this process sent into one directory, oldest first (see the module docstring)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.names: collections.deque[tuple[str, int]] = collections.deque()  # (path, size)
        self.nbytes = 0

    def claim(self, take: bool = True, spare: int = 0) -> tuple[int, str] | None:
        """An open descriptor and a new path for the oldest segment nobody uses any more (else
        ``None``); of the other unused ones, ``SPARE`` (or ``spare``, if more) are kept and the rest
        removed. ``take=False``: claim none, only keep ``SPARE`` unused ones (the sender is going idle)."""
        claimed = None
        spares = 0
        kept: collections.deque[tuple[str, int]] = collections.deque()
        for path, size in self.names:  # at most TRACKED: a look costs a few system calls
            fd = _open_unused(path + _RECEIVED)
            if fd is None:  # not received yet, or still in use
                kept.append((path, size))
                continue
            if claimed is None and take:
                fresh = _new_path(os.path.dirname(path))
                try:
                    os.rename(path + _RECEIVED, fresh)
                    claimed = fd, fresh
                except OSError:  # the pipeline is closing
                    os.close(fd)
                self.nbytes -= size
                continue
            os.close(fd)
            if spares < max(SPARE, spare):
                spares += 1
                kept.append((path, size))
            else:
                _remove(path + _RECEIVED)
                self.nbytes -= size
        self.names = kept
        return claimed

    def track(self, path: str, size: int) -> None:
        self.names.append((path, size))
        self.nbytes += size
        if len(self.names) <= TRACKED and self.nbytes <= TRACKED_BYTES:
            return
        # Over the bounds: forget the oldest received segments (their name goes; their memory when
        # the last user unmaps them). One still in flight keeps its name and stays tracked: its
        # receiver opens it by that name (the credits bound how many are in flight).
        kept: collections.deque[tuple[str, int]] = collections.deque()
        while self.names and (len(self.names) + len(kept) > TRACKED or self.nbytes > TRACKED_BYTES):
            old, old_size = self.names.popleft()
            if _received(old):
                _remove(old + _RECEIVED)
                self.nbytes -= old_size
            else:
                kept.append((old, old_size))
        kept.extend(self.names)
        self.names = kept


def trim(directory: str) -> None:
    """Keep at most ``SPARE`` of the unused segments this process sent into ``directory``: a sender
    that goes idle calls it, so that the segments freed after the data stopped do not wait for its
    next message."""
    with _sent_lock:
        sent = _sent.get(directory)
    if sent is not None and _leases:
        with sent.lock:
            sent.claim(take=False)


def _received(path: str) -> bool:
    """Whether the receiver took the segment sent as ``path`` (or it is gone): its name may go."""
    return not os.path.exists(path)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


_sent: dict[str, _Sent] = {}
_sent_lock = threading.Lock()
_leases = True  # False once the kernel refused a lease for a reason other than "in use"


def remove_dir(directory: str) -> None:
    """Remove a pipeline's directory with every segment in it, and forget what this process sent there."""
    shutil.rmtree(directory, ignore_errors=True)
    owner = _owners.pop(directory, None)
    if owner is not None:
        os.close(owner)
    with _sent_lock:
        _sent.pop(directory, None)


def _sent_into(directory: str) -> _Sent:
    with _sent_lock:
        sent = _sent.get(directory)
        if sent is None:
            sent = _sent[directory] = _Sent()
        return sent


def survive_lease_breaks() -> None:
    """Ignore ``SIGIO`` in this process, unless something handles it (see "Recycling" above).

    Only the main thread may set a signal's handler: from another thread this does nothing."""
    sigio = getattr(signal, "SIGIO", None)
    if sigio is None or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(sigio) == signal.SIG_DFL:
        signal.signal(sigio, signal.SIG_IGN)


def _new_path(directory: str) -> str:
    return os.path.join(directory, f"{os.getpid()}-{next(_counter)}")


def _open_unused(path: str) -> int | None:
    """``path`` opened for writing if no process has it open or mapped and it has no other name (a
    routed item's link, see ``_routing``), else ``None``."""
    global _leases
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None  # not received yet (or the pipeline is closing)
    try:
        # a segment passed on has two names until its next receiver opens the second: never lease it
        # then (that open would break the lease), and check again under the lease, where nobody can
        # open it, so nobody can map it and make a link to it: the count holds
        linked = os.fstat(fd).st_nlink > 1
        if not linked:
            fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_WRLCK)
            linked = os.fstat(fd).st_nlink > 1
            fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_UNLCK)
        if linked:
            os.close(fd)
            return None
        return fd
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EAGAIN, errno.EBUSY):
            _leases = False  # no leases here (a filesystem or sandbox without them): never reuse
        return None


def write(directory: str, chunks: list[tuple[int, Any]], size: int, spare: int = 0) -> str:
    """Write the chunks at their offsets into a segment of ``size`` bytes (a reused one when one is
    free) and return its path. ``write`` (not a mapping), so the kernel fills pages without a page
    fault per page, and a full /dev/shm is an ``OSError``. ``spare``: messages the sender writes
    right after this one (the other parts of an element for a pool): that many unused segments are
    kept for them, rather than removed now and allocated again a moment later."""
    reused = size >= REUSE_MIN_BYTES
    sent = _sent_into(directory) if reused else None
    claimed = None
    if sent is not None and _leases:
        with sent.lock:
            claimed = sent.claim(spare=spare)
    if claimed is not None:
        fd, path = claimed
    else:
        path = _new_path(directory)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _write_file(fd, path, chunks, size)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:  # the file is gone: the free space reported is what others left
            raise no_room(directory, size) from exc
        raise
    if sent is not None:
        with sent.lock:
            sent.track(path, size)
    return path


def _write_file(fd: int, path: str, chunks: list[tuple[int, Any]], size: int) -> None:
    """Write the chunks into the file ``fd`` (at ``path``) and close it; remove it if that failed."""
    try:
        os.ftruncate(fd, size)  # a reused segment drops what it had beyond ``size``
        iov: list[memoryview] = []
        position = start = 0
        for offset, data in chunks:
            if offset > position:
                iov.append(_ZEROS[: offset - position])
            view = memoryview(data).cast("B")
            iov.append(view)
            position = offset + view.nbytes
            if len(iov) >= _IOV_MAX - 1:
                start += _pwritev_all(fd, iov, start)
                iov = []
        if iov:
            _pwritev_all(fd, iov, start)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)


def no_room(directory: str, size: int) -> OSError:
    """The error for a full /dev/shm (``ENOSPC``): what did not fit, what is free, and what to change."""
    try:
        fs = os.statvfs(directory)
        free = f"{_mib(fs.f_bavail * fs.f_frsize)} free of {_mib(fs.f_blocks * fs.f_frsize)}"
    except OSError:
        free = "its free space unknown"
    return OSError(
        errno.ENOSPC,
        f"No space left on device: a message of {_mib(size)} does not fit in /dev/shm ({free}). Give the "
        "machine or container more shared memory (Docker: docker run --shm-size=8g; Kubernetes: an emptyDir "
        "volume with medium Memory mounted at /dev/shm), or send smaller elements, or lower the queue "
        "capacities (tq.Queue(n)): every element in flight holds its tensors in /dev/shm",
    )


def _mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB"


def _pwritev_all(fd: int, iov: list[memoryview], offset: int) -> int:
    """Write every buffer of ``iov`` at ``offset``, retrying short writes; return the bytes written."""
    total = sum(view.nbytes for view in iov)
    done = 0
    while done < total:
        written = os.pwritev(fd, iov, offset + done)
        done += written
        while iov and written >= iov[0].nbytes:
            written -= iov[0].nbytes
            iov = iov[1:]
        if iov and written:
            iov[0] = iov[0][written:]
    return total


def map_segment(path: str, size: int, link: bool = False) -> torch.UntypedStorage:
    """Map a segment as a torch shared storage (the call torch's own fd-sharing uses), and mark it
    received: renamed, for its sender to reuse once nobody uses it (a small one, or a ``link`` made for
    this message by a stream step that routed items: its name removed)."""
    storage = _map(path, size)
    if size >= REUSE_MIN_BYTES and not link:
        os.rename(path, path + _RECEIVED)
    else:
        os.unlink(path)
    return storage


def link(address: int, size: int, directory: str) -> tuple[str, str] | None:
    """A new name in ``directory`` for the segment of ``size`` bytes this process maps at ``address``
    (a received one that it passes on), and the name it was made from; ``None`` where there is none:
    the memory is not a whole segment of a pipeline, or the segment's name went (its sender forgot
    it, its pipeline closed).

    The link keeps the segment out of its sender's reuse (``_open_unused`` skips a file with two
    names) from the moment this process, which still maps it, makes it, until the next receiver
    maps the segment and removes the link (``map_passed``): so that receiver always finds the bytes
    that were passed on, with no copy and no file descriptor passed. A link nobody received goes
    with the directory, as unread segments do."""
    name = _mapped_name(address, size)
    if name is not None and name.endswith(_DELETED):  # mapped by a link's name, removed since
        name = _origins.get(name[: -len(_DELETED)])
    if name is None or not os.path.basename(os.path.dirname(name)).startswith("torchqueue-"):
        return None
    fresh = _new_path(directory)
    try:
        os.link(name, fresh)
    except OSError:  # gone meanwhile, or the pipeline is closing
        return None
    return fresh, name


def map_passed(path: str, size: int, origin: str) -> torch.UntypedStorage:
    """Map a segment passed on by ``link`` and remove that link (``origin``, the name it was made from,
    stays: it is remembered, so that this process can pass the segment on again)."""
    storage = _map(path, size)
    os.unlink(path)
    with _origins_lock:  # the consumer's threads may each read messages
        _origins[path] = origin
        if len(_origins) > _ORIGINS:
            del _origins[next(iter(_origins))]
    return storage


_DELETED = " (deleted)"
_ORIGINS = 64
_origins: dict[str, str] = {}  # a link this process mapped (removed since) -> the name it was made from
_origins_lock = threading.Lock()


def _mapped_name(address: int, size: int) -> str | None:
    """The name of the file this process maps whole at ``address``; the kernel follows renames and
    marks a removed name `` (deleted)``. One ``readlink`` (``/proc/self/maps`` costs 100 times more)."""
    end = address + -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
    try:
        return os.readlink(f"/proc/self/map_files/{address:x}-{end:x}")
    except OSError:  # not one mapping of that size, or no /proc
        return None


def _map(path: str, size: int) -> torch.UntypedStorage:
    """The segment at ``path`` mapped as a torch shared storage (out of descriptors: a clear ``OSError``)."""
    try:
        fd = os.open(path, os.O_RDWR)
        try:
            storage = _new_shared_fd(fd, size)
        finally:
            os.close(fd)
    except (OSError, RuntimeError) as exc:  # torch's: "could not duplicate a shared memory file descriptor"
        if getattr(exc, "errno", None) != errno.EMFILE and "duplicate" not in str(exc):
            raise
        raise OSError(
            errno.EMFILE,
            f"cannot map a received message's shared memory ({exc}): this process is out of file descriptors. "
            "Each received message of 1 MiB or more holds one while any of its tensors lives (as DataLoader's "
            "tensors do): .clone() the outputs you keep, or raise the limit (ulimit -n)",
        ) from exc
    return storage
