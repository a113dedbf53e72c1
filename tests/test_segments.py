"""Shared-memory segments are reused only when nobody uses them: never under a live tensor."""

from __future__ import annotations

import multiprocessing
import os
import time

import numpy as np
import pytest
import torch

import torchqueue as tq
from torchqueue import _loop, _segments, _serialize

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_leaks")]

BIG = 1 << 20  # bytes: above REUSE_MIN_BYTES


@pytest.fixture
def segment_dir():
    directory = _serialize.make_segment_dir()
    yield directory
    _segments.remove_dir(directory)


def message(value: float, nbytes: int = BIG) -> torch.Tensor:
    return torch.full((nbytes // 4,), value)


def inode(tensor: torch.Tensor) -> int:
    """The inode of the shared-memory file a received tensor maps (from /proc/self/maps)."""
    address = tensor.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, _perms, _offset, _dev, number, *_ = line.split()
            low, high = (int(x, 16) for x in span.split("-"))
            if low <= address < high:
                return int(number)
    raise AssertionError("not mapped")


def send_and_receive(value: float, segment_dir: str, nbytes: int = BIG) -> torch.Tensor:
    return _serialize.loads(_serialize.dumps(message(value, nbytes), segment_dir))


def test_a_segment_is_reused_once_its_tensors_are_gone(segment_dir):
    first = send_and_receive(1.0, segment_dir)
    where = inode(first)
    del first
    second = send_and_receive(2.0, segment_dir)
    assert inode(second) == where  # the same file, its pages reused
    assert torch.equal(second, message(2.0))


def test_a_segment_is_never_reused_while_a_tensor_views_it(segment_dir):
    held = [send_and_receive(float(i), segment_dir) for i in range(3 * _segments.TRACKED)]
    assert len({inode(t) for t in held}) == len(held)
    for i, tensor in enumerate(held):  # every value intact: nothing was written over them
        assert torch.equal(tensor, message(float(i)))
    # the sender forgot the oldest (bounded): only the most recent names stay in the directory
    assert len(os.listdir(segment_dir)) <= _segments.TRACKED


def test_segments_in_flight_are_never_removed_however_many_are_sent(segment_dir, monkeypatch):
    # a sender far ahead of its receiver: more segments and bytes in flight than it keeps track of
    monkeypatch.setattr(_segments, "TRACKED_BYTES", 64 << 20)  # the bound, not its size, is what counts (was 25 s)
    count = _segments.TRACKED * 3
    nbytes = _segments.TRACKED_BYTES // 4
    sent = [_serialize.dumps(message(float(i), nbytes), segment_dir) for i in range(count)]
    for i, data in enumerate(sent):  # every one still arrives, intact
        assert torch.equal(_serialize.loads(data), message(float(i), nbytes))
    del sent
    send_and_receive(0.0, segment_dir)  # the next write forgets what is over the bounds
    assert len(os.listdir(segment_dir)) <= _segments.TRACKED + 1


def _hold_mapping(path: str, ready, release) -> None:
    mapped = np.memmap(path, dtype=np.uint8, mode="r")  # a mapping, no descriptor left open
    ready.set()
    release.wait(30)
    del mapped


def test_a_segment_another_process_maps_is_not_reused(segment_dir):
    received = send_and_receive(1.0, segment_dir)
    where = inode(received)
    (name,) = os.listdir(segment_dir)
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_hold_mapping, args=(os.path.join(segment_dir, name), ready, release))
    child.start()
    try:
        assert ready.wait(30)
        del received  # this process lets go, the child still maps it
        other = send_and_receive(2.0, segment_dir)
        assert inode(other) != where and torch.equal(other, message(2.0))
    finally:
        release.set()
        child.join(30)
    del other
    assert inode(send_and_receive(3.0, segment_dir)) == where  # unmapped everywhere now: the oldest is reused


def test_small_segments_are_not_kept(segment_dir):
    received = send_and_receive(1.0, segment_dir, nbytes=4096)
    assert os.listdir(segment_dir) == []  # its name went as it was mapped
    assert torch.equal(received, message(1.0, 4096))


def test_unused_segments_beyond_a_spare_are_removed_as_data_flows(segment_dir):
    held = [send_and_receive(float(i), segment_dir) for i in range(4)]
    del held  # four unused segments
    kept = send_and_receive(9.0, segment_dir)  # reuses one, keeps SPARE, removes the others
    assert len(os.listdir(segment_dir)) == 1 + _segments.SPARE
    assert torch.equal(kept, message(9.0))


def test_a_message_goes_into_the_unused_segment_it_fits(segment_dir):
    """Not the oldest unused segment: the one the message fits (no file cut or grown); the other is
    kept as a spare (a pool's worker keeps some), and a message it fits goes into it next."""
    small = send_and_receive(1.0, segment_dir, BIG)
    large = send_and_receive(2.0, segment_dir, 4 * BIG)
    where_small, where_large = inode(small), inode(large)
    del small, large
    again = _serialize.loads(_serialize.dumps(message(3.0, 3 * BIG), segment_dir, spare=1))
    assert inode(again) == where_large and torch.equal(again, message(3.0, 3 * BIG))
    other = send_and_receive(4.0, segment_dir, BIG)
    assert inode(other) == where_small and torch.equal(other, message(4.0, BIG))


def test_a_message_takes_the_smallest_segment_it_fits_else_cuts_a_larger_one(segment_dir):
    """Of two unused segments the message fits, the smaller (less held in /dev/shm); of one smaller and one
    larger that it fits neither, the larger, cut (no page allocated), not the smaller grown."""
    held = [send_and_receive(1.0, segment_dir, 4 * BIG), send_and_receive(2.0, segment_dir, 2 * BIG)]
    where = inode(held[1])
    del held
    assert inode(send_and_receive(3.0, segment_dir, 2 * BIG)) == where
    held = [send_and_receive(4.0, segment_dir, BIG // 2), send_and_receive(5.0, segment_dir, 8 * BIG)]
    where = inode(held[1])
    del held
    received = send_and_receive(6.0, segment_dir, 3 * BIG)
    assert inode(received) == where and torch.equal(received, message(6.0, 3 * BIG))


def test_a_segment_grown_for_a_message_has_room_for_a_slightly_larger_one(segment_dir, monkeypatch):
    """Messages whose size varies a little (batches of graphs): a segment grown for one is grown with
    some room, so that the next, a little larger still, is one copy into its kept mapping, with no
    file written afresh."""
    where = inode(send_and_receive(1.0, segment_dir, BIG))
    grown = send_and_receive(2.0, segment_dir, BIG + BIG // 16)  # grown, with room
    assert inode(grown) == where and torch.equal(grown, message(2.0, BIG + BIG // 16))
    del grown
    written = []
    write_fd = _segments._write_fd
    monkeypatch.setattr(_segments, "_write_fd", lambda *args: written.append(args) or write_fd(*args))
    larger = send_and_receive(3.0, segment_dir, BIG + BIG // 10)
    assert inode(larger) == where and torch.equal(larger, message(3.0, BIG + BIG // 10))
    assert written == []  # copied into the sender's kept mapping


def test_a_segment_cut_or_grown_has_every_page_and_is_copied_into_at_its_new_size(segment_dir):
    """Grown, then cut, the one segment keeps every page written (a later copy into it allocates none)
    and its kept mapping follows its size: each message arrives with its own bytes."""

    def only_file() -> os.stat_result:
        (name,) = os.listdir(segment_dir)
        return os.stat(os.path.join(segment_dir, name))

    where = inode(send_and_receive(1.0, segment_dir))
    assert inode(send_and_receive(2.0, segment_dir)) == where  # copied in: the sender maps it now
    for value, nbytes, file_size in [
        (3.0, 3 * BIG, 3 * BIG + 3 * BIG // 8),  # grown, with an eighth more room
        (4.0, 3 * BIG + 3 * BIG // 16, 3 * BIG + 3 * BIG // 8),  # fits: copied into the new mapping
        (5.0, BIG // 2, BIG // 2 + BIG // 16),  # a smaller one: cut
    ]:
        received = send_and_receive(value, segment_dir, nbytes)
        assert inode(received) == where and torch.equal(received, message(value, nbytes))
        stat = only_file()
        assert stat.st_size == file_size and stat.st_blocks * 512 >= stat.st_size
        del received


def _waited(seq: tq.Sequence) -> float:
    """The one worker's wait for input so far, the pipeline's pauses (nothing queued) included."""
    stats = seq.stats()
    return stats["_big_tensor"].wait_in_s + stats.paused_s


def test_a_worker_without_input_frees_what_its_receivers_freed_later(no_leaks, monkeypatch):
    """A worker waiting for input frees its unused segments each ``IDLE_S``, not only once: outputs
    the consumer kept past the first time and dropped later are freed too, before any new input."""
    monkeypatch.setattr(_loop, "IDLE_S", 0.05)  # the forked worker inherits it
    with tq.Sequence(tq.ProcessStep(_big_tensor, 1), tq.Queue(4), context="fork") as seq:
        kept = list(seq(range(6)))
        directory = seq._runtime._segment_dir
        waited = _waited(seq)
        deadline = time.monotonic() + 20
        while _waited(seq) < waited + 10 * _loop.IDLE_S and time.monotonic() < deadline:
            time.sleep(0.01)  # polling the worker's wait for input (stats count one going on): trims pass meanwhile
        assert _waited(seq) >= waited + 10 * _loop.IDLE_S
        assert len(os.listdir(directory)) >= len(kept) - 1  # in use: none freed
        del kept
        deadline = time.monotonic() + 20
        while len(os.listdir(directory)) > _segments.SPARE and time.monotonic() < deadline:
            time.sleep(0.01)  # polling the directory, which the idle worker trims on its own
        assert len(os.listdir(directory)) <= _segments.SPARE


def test_the_parts_of_one_element_reuse_as_many_freed_segments(segment_dir):
    """A sender writing a pool's parts, one after the other, keeps freed segments for the next parts
    rather than removing them and writing the next parts into fresh pages."""
    received = [_serialize.loads(_serialize.dumps(message(float(i)), segment_dir)) for i in range(4)]
    used = {inode(t) for t in received}
    del received
    parts = [_serialize.loads(_serialize.dumps(message(9.0 + i), segment_dir, spare=3 - i)) for i in range(4)]
    assert {inode(t) for t in parts} == used  # all four files reused, none fresh
    assert all(torch.equal(t, message(9.0 + i)) for i, t in enumerate(parts))


def test_a_sender_going_idle_keeps_no_more_than_spares_and_none_in_use_is_touched(segment_dir):
    held = [send_and_receive(float(i), segment_dir) for i in range(5)]
    still_used = held.pop()
    del held  # four unused segments, one in use
    _segments.trim(segment_dir)
    assert len(os.listdir(segment_dir)) == 1 + _segments.SPARE
    assert torch.equal(still_used, message(4.0))


def test_large_messages_in_use_at_once_still_find_a_free_segment(segment_dir):
    """The tracking bound covers several large messages in use at once (a queue of 64 MiB tensors)."""
    nbytes = 64 << 20
    held = [send_and_receive(float(i), segment_dir, nbytes) for i in range(4)]
    where = inode(held[0])
    del held[0]
    assert inode(send_and_receive(9.0, segment_dir, nbytes)) == where


def test_idle_workers_free_the_segments_their_outputs_left(no_leaks):
    """After the consumer dropped every output, an idle worker keeps at most ``SPARE`` unused segments."""
    with tq.Sequence(tq.ProcessStep(_big_tensor, 2), tq.Queue(4)) as seq:
        for value in seq(range(12)):
            assert float(value[0]) == value.numel() % 7
        del value
        directory = seq._runtime._segment_dir
        deadline = time.monotonic() + 20
        while len(os.listdir(directory)) > 2 * _segments.SPARE and time.monotonic() < deadline:
            time.sleep(0.01)  # polling the directory, which idle workers trim on their own
        assert len(os.listdir(directory)) <= 2 * _segments.SPARE


def _big_tensor(i: int) -> torch.Tensor:
    n = (BIG // 4) + i
    return torch.full((n,), float(n % 7))


def descriptors_into(directory: str) -> list[str]:
    """The files under ``directory`` this process has a descriptor open on."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the descriptor listdir itself used, closed meanwhile
            continue
        if target.startswith(directory + "/"):
            found.append(target)
    return found


def mapped_by_this_process(path_inode: int) -> bool:
    with open("/proc/self/maps") as maps:
        return any(line.split()[4] == str(path_inode) for line in maps if len(line.split()) > 4)


def test_a_reused_segment_is_written_through_a_mapping_the_sender_keeps(segment_dir):
    """Reused, a segment is copied into through the sender's own mapping of it (pages already mapped),
    which the lease does not count: it is reused again and again, and every message arrives intact,
    a smaller one in the larger segment as well as a larger one that grows it."""
    where = inode(send_and_receive(1.0, segment_dir))
    for value, nbytes in [(2.0, BIG), (3.0, BIG * 3 // 4), (4.0, BIG), (5.0, 3 * BIG), (6.0, 3 * BIG)]:
        received = send_and_receive(value, segment_dir, nbytes)
        assert inode(received) == where, nbytes  # the same file each time
        assert torch.equal(received, message(value, nbytes))
        del received
    assert mapped_by_this_process(where)  # the sender's mapping, kept since the first reuse
    assert len(set(descriptors_into(segment_dir))) == 1  # and its descriptor (and the mapping's own), kept


def test_a_received_message_reads_only_its_bytes_of_a_larger_segment(segment_dir):
    """A message written into a segment twice its size arrives with its own bytes, not the older ones."""
    send_and_receive(1.0, segment_dir, 2 * BIG)
    data = _serialize.dumps(np.arange(BIG // 8, dtype=np.int64), segment_dir)  # half the segment
    assert _serialize.message_nbytes(data) < 2 * BIG
    received = _serialize.loads(data)
    assert received.nbytes == BIG and np.array_equal(received, np.arange(BIG // 8, dtype=np.int64))


def _descriptors_in_child(directory: str, conn) -> None:
    conn.send(descriptors_into(directory))


def test_a_forked_child_keeps_none_of_the_senders_descriptors(segment_dir):
    """The sender's kept descriptors and mappings are its own: a forked child (a worker, a DataLoader's)
    closes its copies at once, so that it holds no segment's memory while it lives."""
    received = send_and_receive(1.0, segment_dir)
    del received
    send_and_receive(2.0, segment_dir)  # reused: now kept open and mapped
    assert descriptors_into(segment_dir)
    ctx = multiprocessing.get_context("fork")
    mine, theirs = ctx.Pipe()
    child = ctx.Process(target=_descriptors_in_child, args=(segment_dir, theirs))
    child.start()
    try:
        assert mine.poll(30)
        assert mine.recv() == []
    finally:
        child.join(30)
    assert child.exitcode == 0


def test_removing_the_directory_closes_the_senders_descriptors(segment_dir):
    first = send_and_receive(1.0, segment_dir)
    del first
    send_and_receive(2.0, segment_dir)
    assert descriptors_into(segment_dir)
    _segments.remove_dir(segment_dir)
    assert descriptors_into(segment_dir) == []


def test_a_segment_written_while_its_directory_is_removed_is_let_go(segment_dir, monkeypatch):
    """A pipeline closing (``remove_dir``) while a thread of this process writes a segment: the writer
    does not keep that segment's descriptor, which would hold its memory for the life of the process."""
    write_fd = _segments._write_fd

    def closing_meanwhile(fd, chunks, size):
        _segments.remove_dir(segment_dir)  # as close() in another thread would, mid-write
        write_fd(fd, chunks, size)

    monkeypatch.setattr(_segments, "_write_fd", closing_meanwhile)
    _segments.write(segment_dir, [(0, np.ones(BIG, np.uint8).data)], BIG)
    assert descriptors_into(segment_dir) == []


def test_a_child_forked_during_a_write_keeps_none_of_the_senders_descriptors(segment_dir, monkeypatch):
    """A fork from another thread (a DataLoader's workers in your process) while the feeder writes: the
    child lets go of the segment being written too."""
    ctx = multiprocessing.get_context("fork")
    mine, theirs = ctx.Pipe()
    write_fd = _segments._write_fd
    children = []

    def forking_meanwhile(fd, chunks, size):
        child = ctx.Process(target=_descriptors_in_child, args=(segment_dir, theirs))
        child.start()
        children.append(child)
        write_fd(fd, chunks, size)

    monkeypatch.setattr(_segments, "_write_fd", forking_meanwhile)
    _segments.write(segment_dir, [(0, np.ones(BIG, np.uint8).data)], BIG)
    try:
        assert mine.poll(30)
        assert mine.recv() == []
        assert descriptors_into(segment_dir)  # the sender's own stays, for reuse
    finally:
        children[0].join(30)
    assert children[0].exitcode == 0


def test_removing_the_directory_forgets_what_was_sent(segment_dir):
    send_and_receive(1.0, segment_dir)
    assert segment_dir in _segments._sent
    _segments.remove_dir(segment_dir)
    assert segment_dir not in _segments._sent and not os.path.exists(segment_dir)


LEASE_BREAK = """
import fcntl, os, signal, subprocess, sys, time
from torchqueue import _segments

signal.signal(signal.SIGIO, signal.SIG_DFL)  # as a fresh process has it (an ignored signal is inherited)
if sys.argv[1] == "survive":
    _segments.survive_lease_breaks()
fd = os.open(sys.argv[2], os.O_RDWR)
fcntl.fcntl(fd, _segments._F_SETLEASE, fcntl.F_WRLCK)
# another process opens the file: the kernel breaks the lease and sends SIGIO to this one
opener = subprocess.Popen([sys.executable, "-c", f"open({sys.argv[2]!r}).close()"])
deadline = time.monotonic() + 30
while fcntl.fcntl(fd, fcntl.F_GETLEASE) == fcntl.F_WRLCK and time.monotonic() < deadline:
    time.sleep(0.001)  # polling the lease, which the kernel changes as it breaks it
fcntl.fcntl(fd, _segments._F_SETLEASE, fcntl.F_UNLCK)
assert opener.wait(timeout=30) == 0
print("alive", flush=True)
"""


@pytest.mark.parametrize("survive", [False, True])
def test_a_lease_broken_by_another_process_kills_only_a_process_that_did_not_ignore_sigio(tmp_path, survive):
    """A sender leases a segment to learn that nobody uses it; a receiver opening the segment's second
    name (passed on) in that instant breaks the lease, and the kernel's SIGIO killed the worker
    ('killed by signal SIGIO'). The first case shows the test can tell."""
    import signal
    import subprocess
    import sys

    if not hasattr(signal, "SIGIO"):
        pytest.skip("no SIGIO here")
    target = tmp_path / "segment"
    target.write_bytes(b"x")
    script = tmp_path / "lease.py"
    script.write_text(LEASE_BREAK)
    mode = "survive" if survive else "default"
    done = subprocess.run([sys.executable, str(script), mode, str(target)], capture_output=True, text=True, timeout=60)
    if survive:
        assert (done.returncode, done.stdout) == (0, "alive\n"), done.stderr
    else:
        assert done.returncode == -signal.SIGIO, (done.returncode, done.stderr)


def _sigio_handler(_: object) -> str:
    import signal

    return str(signal.getsignal(signal.SIGIO))


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_workers_and_the_consumer_ignore_the_sigio_of_a_lease_break(method):
    import signal

    with tq.Sequence(tq.ProcessStep(_sigio_handler, 2), context=method) as seq:
        assert set(seq(range(4))) == {str(signal.SIG_IGN)}
    assert signal.getsignal(signal.SIGIO) == signal.SIG_IGN
