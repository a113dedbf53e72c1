"""Shared-memory segments: the files under /dev/shm that carry a message's tensors and arrays.

A pipeline has one directory of segments (``make_segment_dir``). A sender writes a message's
bytes into a segment file (``write``); the receiver maps it (``map_segment``) and renames it
``<name>.r``: received. Its tensors are views of that mapping.

Recycling. A fresh tmpfs file costs a page allocation per 4 KiB written: writing into one runs at
about 1.5 GB/s here, while writing into pages a file has already runs at 6-10 GB/s. So a sender
reuses the segments it sent once nobody uses them any more: the receiver renamed it (it got
it), and the kernel grants a write lease on it, which it does only when nobody else has the
file open or mapped (``fcntl(F_SETLEASE)``). That covers every way a segment stays in use:
the receiver's tensors, a tensor passed on by torch's file-descriptor sharing, a receiver's forked child.
The lease is released at once; nobody opens a received segment again, so it is hardly ever broken.
The kernel grants the lease when the file has no open besides the one it is asked on (that open's own
mappings and duplicates included; any other open counts, this process's own receivers too): so the
sender keeps the descriptor it wrote a segment through
(``_Segment``) and, once it reuses the segment, a mapping of it, so that each later message is one
copy into pages already mapped. That runs 1.3-1.9x faster here than ``pwritev`` into the same pages
(which walks them in the kernel), and releases the GIL as well (numpy's copy). A forked child closes
its copies of them (``_forget_after_fork``): they are not its to reuse, and would hold the memory. A
reused file can be up to twice its message: /dev/shm holds up to that much more than the messages'
sizes say.
Hardly: a segment passed on (below) is opened again by the next receiver, which the sender skips, but
a receiver may make that second name just before the sender leases. Then the next receiver's open
waits until the lease is released (microseconds), and the kernel tells the sender by ``SIGIO``, whose
default action kills a process: so every process that leases ignores ``SIGIO`` where nothing handles
it (``survive_lease_breaks``).

    sender: write <name> (keeps it open) ──► receiver: open, map, rename to <name>.r ... frees its tensors
    sender, for a later message: <name>.r unused (lease granted)? rename it to a new name, copy into it

Bounds: only segments of ``REUSE_MIN_BYTES`` or more are reused. As it writes, a sender reuses
the smallest of its unused segments that the message fits (half of it to all of it), else one it
cuts or grows to the message, with ``1 / HEADROOM`` more room for the next, slightly larger one
(``_fitting``). It keeps ``SPARE`` more unused ones (or as many as it is told: the other parts of
an element for a pool, a pool worker's next parts), and removes the others it finds unused: a
segment its receiver freed waits only until its sender's next message. A sender going idle (a
worker that got no input for a second, the feeder waiting for an epoch) calls ``trim``, which
removes them the same way, so nothing waits long after the data stopped flowing. It tracks at
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
import contextlib
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

import numpy as np
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

HEADROOM = 8
"""A reused segment cut or grown to a message's size gets ``1 / HEADROOM`` of it more: of messages whose
size varies (batches of graphs, parts of a chunk), the next one a little larger fits it too."""

SPARE = 0
"""Unused segments a sender keeps beside the one it reuses; it removes further ones it finds. One per
sender raised the peak memory of a stream of 16 MiB batches by about 10% and sped up nothing measured."""

_F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)
_MAP_SHARED_POPULATE = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
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


class _Segment:
    """A segment this process sent: the name it was sent under, its size, and the descriptor it was
    written through, kept open while it is tracked (``None`` where there are no leases). Reused once,
    it is also kept mapped: each later message is one copy into pages already mapped, without a write
    system call walking them (1.3-1.9x faster here, see "Recycling")."""

    __slots__ = ("path", "size", "fd", "view")

    def __init__(self, path: str, size: int, fd: int | None) -> None:
        self.path, self.size, self.fd = path, size, fd
        self.view: np.ndarray | None = None

    def mapped(self) -> np.ndarray:
        """The whole file as bytes, mapped once with its page table filled (``MAP_POPULATE``)."""
        if self.view is None:
            assert self.fd is not None
            self.view = np.frombuffer(mmap.mmap(self.fd, self.size, flags=_MAP_SHARED_POPULATE), dtype=np.uint8)
        return self.view

    def release(self) -> None:
        """Close the descriptor and drop the mapping (the memory goes with the last name and mapping)."""
        self.view = None  # the mmap goes with its only view: unmapped
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _fits(size: int, segment: _Segment) -> bool:
    """Whether a message of ``size`` bytes is copied into ``segment`` as it is: it fills half of it to all."""
    return size <= segment.size <= 2 * size


def _fitting(unused: list[_Segment], size: int) -> _Segment | None:
    """The unused segment to reuse for a message of ``size`` bytes: the smallest it fits (it fills from half
    the segment to all of it: one copy into the kept mapping), else the smallest larger one, else the
    largest smaller one (either cut or grown to the message, see ``_write_reused``: a cut allocates no
    page, a growth only the pages it adds)."""
    fits = [segment for segment in unused if _fits(size, segment)]
    if fits:
        return min(fits, key=lambda segment: segment.size)
    larger = [segment for segment in unused if segment.size > size]
    if larger:
        return min(larger, key=lambda segment: segment.size)
    return max(unused, key=lambda segment: segment.size, default=None)


class _Sent:
    """The segments this process sent into one directory, oldest first (see the module docstring), and
    those it is writing (claimed or new, not yet sent). ``closed``: the directory was removed (a
    pipeline closing while a thread of this process still writes): a segment written now is let go."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.names: collections.deque[_Segment] = collections.deque()
        self.writing: set[_Segment] = set()
        self.nbytes = 0
        self.closed = False

    def claim(self, size: int = 0, take: bool = True, spare: int = 0) -> _Segment | None:
        """An unused segment for a message of ``size`` bytes (``_fitting``), under a new name, else ``None``;
        of the other unused ones, ``SPARE`` (or ``spare``, if more) are kept and the rest removed.
        ``take=False``: claim none, only keep ``SPARE`` unused ones (the sender is going idle)."""
        if self.closed:
            return None
        unused = [segment for segment in self.names if _unused(segment)]  # at most TRACKED: a few system calls each
        taken = claimed = _fitting(unused, size) if take else None
        if taken is not None:
            unused.remove(taken)
            self.nbytes -= taken.size
            fresh = _new_path(os.path.dirname(taken.path))
            try:
                os.rename(taken.path + _RECEIVED, fresh)
                taken.path = fresh
            except OSError:  # the pipeline is closing
                _remove(taken.path + _RECEIVED)
                taken.release()
                claimed = None
        removed = unused[max(SPARE, spare) if take else SPARE :]  # the oldest unused ones stay, as spares
        for segment in removed:
            _remove(segment.path + _RECEIVED)
            segment.release()
            self.nbytes -= segment.size
        gone = {taken, *removed}
        self.names = collections.deque(segment for segment in self.names if segment not in gone)
        return claimed

    def track(self, segment: _Segment) -> None:
        """Keep track of a segment just written (no longer ``writing``), for its reuse."""
        self.writing.discard(segment)
        if self.closed:  # nobody will reuse it: its descriptor and mapping go now (its name went with the directory)
            segment.release()
            return
        self.names.append(segment)
        self.nbytes += segment.size
        if len(self.names) <= TRACKED and self.nbytes <= TRACKED_BYTES:
            return
        # Over the bounds: forget the oldest received segments (their name goes; their memory when
        # the last user unmaps them). One still in flight keeps its name and stays tracked: its
        # receiver opens it by that name (the credits bound how many are in flight).
        kept: collections.deque[_Segment] = collections.deque()
        while self.names and (len(self.names) + len(kept) > TRACKED or self.nbytes > TRACKED_BYTES):
            old = self.names.popleft()
            if _received(old.path):
                _remove(old.path + _RECEIVED)
                old.release()
                self.nbytes -= old.size
            else:
                kept.append(old)
        kept.extend(self.names)
        self.names = kept

    def release(self, writing: bool = False) -> None:
        """Let go of the tracked segments (``writing``: and those being written, in a forked child)."""
        for segment in [*self.names, *(self.writing if writing else ())]:
            segment.release()
        self.names.clear()


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
        sent = _sent.pop(directory, None)
    if sent is not None:
        with sent.lock:
            sent.closed = True
            sent.release()


def _forget_after_fork() -> None:
    """In a forked child: the parent's sent segments are not the child's to reuse. Close its copies of
    their descriptors and mappings (the parent's stay), so that they hold no memory while the child lives."""
    global _sent_lock
    for sent in _sent.values():
        sent.release(writing=True)
    _sent.clear()
    _sent_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


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


def _unused(segment: _Segment) -> bool:
    """Whether nobody uses a segment this process sent: its receiver took it (renamed it), it has no other
    name (a routed item's link, see ``_routing``), and no other process has it open or mapped. The last
    is the kernel's write lease on the descriptor this process kept: it counts every open of the file
    but that one (whose mapping made from it does not stand in the way), a receiver's in this process too."""
    global _leases
    fd = segment.fd
    if fd is None or not os.path.exists(segment.path + _RECEIVED):
        return False  # not received yet (or the pipeline is closing)
    try:
        # a segment passed on has two names until its next receiver opens the second: never lease it
        # then (that open would break the lease), and check again under the lease, where nobody can
        # open it, so nobody can map it and make a link to it: the count holds
        if os.fstat(fd).st_nlink > 1:
            return False
        fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_WRLCK)
        linked = os.fstat(fd).st_nlink > 1
        fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_UNLCK)
        return not linked
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EBUSY):
            _leases = False  # no leases here (a filesystem or sandbox without them): never reuse
        return False


def write(directory: str, chunks: list[tuple[int, Any]], size: int, spare: int = 0) -> str:
    """Write the chunks at their offsets into a segment of ``size`` bytes (a reused one when one is
    free) and return its path. A fresh segment is written with ``pwritev`` (not a mapping), so the
    kernel fills its pages without a page fault per page, and a full /dev/shm is an ``OSError``; a
    reused one of about the size (up to twice) is copied into through the mapping kept of it (the
    receiver maps the first ``size`` bytes). ``spare``: messages the sender writes right after this
    one (the other parts of an element for a pool): that many unused segments are kept for them,
    rather than removed now and allocated again a moment later."""
    sent = _sent_into(directory) if size >= REUSE_MIN_BYTES else None
    kept = sent is not None and _leases  # its descriptor kept open, for its reuse (see ``_unused``)
    with sent.lock if kept else contextlib.nullcontext():  # in ``writing`` until tracked: a fork lets go of it
        segment = sent.claim(size, spare=spare) if kept else None
        fresh = segment is None
        if segment is None:
            path = _new_path(directory)
            segment = _Segment(path, size, os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        if kept:
            sent.writing.add(segment)
    try:
        if fresh:
            _write_fd(segment.fd, chunks, size)  # type: ignore[arg-type]
        else:
            _write_reused(segment, chunks, size)
    except BaseException as exc:
        if kept:
            with sent.lock:
                sent.writing.discard(segment)
        _remove(segment.path)
        segment.release()
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:  # the file is gone: what is free is what others left
            raise no_room(directory, size) from exc
        raise
    if not kept:
        segment.release()
    if sent is not None:
        with sent.lock:
            sent.track(segment)
    return segment.path


def _write_reused(segment: _Segment, chunks: list[tuple[int, Any]], size: int) -> None:
    """Write a message into a segment claimed for reuse: a copy into its mapping when the message fits
    and fills at least half of it (every page of it was written once: no page is allocated now), else
    the file cut or grown to ``size`` and written as a fresh one is."""
    if _fits(size, segment):
        view = segment.mapped()
        for offset, data in chunks:
            source = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
            np.copyto(view[offset : offset + source.size], source)  # numpy's copy releases the GIL
        return
    resized = size + size // HEADROOM  # the next messages, a little larger again, fit it
    segment.view = None  # its mapping has the old size
    _write_fd(segment.fd, chunks, resized)  # type: ignore[arg-type]
    segment.size = resized


def _write_fd(fd: int, chunks: list[tuple[int, Any]], size: int) -> None:
    """Write the chunks into the file ``fd``, cut or grown to ``size``: every byte up to ``size`` (the gaps
    and the tail as zeros), so that all its pages exist and a copy into its mapping later allocates none."""
    os.ftruncate(fd, size)  # a reused segment drops what it had beyond ``size``
    iov: list[memoryview] = []
    position = start = 0
    for offset, data in chunks:
        if offset > position:
            iov.append(_zeros(offset - position))
        view = memoryview(data).cast("B")
        iov.append(view)
        position = offset + view.nbytes
        if len(iov) >= _IOV_MAX - 2:
            start += _pwritev_all(fd, iov, start)
            iov = []
    if size > position:
        iov.append(_zeros(size - position))
    if iov:
        _pwritev_all(fd, iov, start)


def _zeros(nbytes: int) -> memoryview:
    return _ZEROS[:nbytes] if nbytes <= _ALIGN else memoryview(bytes(nbytes))


def no_room(directory: str, size: int) -> OSError:
    """The error for a full /dev/shm (``ENOSPC``): what did not fit, what is free, and what to change."""
    try:
        fs = os.statvfs(directory)
        free = f"now {_mib(fs.f_bavail * fs.f_frsize)} free of {_mib(fs.f_blocks * fs.f_frsize)}"
    except OSError:
        free = "its free space unknown"
    return OSError(
        errno.ENOSPC,
        # the space is read after the failed write let its own pages go, and others' messages come and go
        f"No space left on device: a message of {_mib(size)} did not fit in /dev/shm as it was written ({free}). "
        "Give the machine or container more shared memory (Docker: docker run --shm-size=8g; Kubernetes: an emptyDir "
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

    The link keeps the segment out of its sender's reuse (``_unused`` skips a file with two
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
