"""Shared fakes and checks for the test suite.

Step functions live here (a module spawned workers can import) as well as in
the test modules; lambdas and closures are tested on purpose elsewhere.
"""

from __future__ import annotations

import gc
import os
import random
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch.utils.data

START_METHODS = ["fork", "spawn", "forkserver"]


def _is_python_helper(process: psutil.Process) -> bool:
    """Python's resource tracker and forkserver, and torchqueue's fork server: they live as long as the interpreter."""
    cmdline = " ".join(process.cmdline())
    helpers = ("multiprocessing.resource_tracker", "multiprocessing.forkserver", "torchqueue._forkserver")
    return any(name in cmdline for name in helpers)


def double(x):
    return 2 * x


def square(x):
    return x * x


def identity(x):
    return x


def random_sleep(x):
    """Sleeps 0-3 ms, differently per element, so workers finish out of order."""
    time.sleep(random.random() * 0.003)
    return x


def fail_on_seven(x):
    if x == 7:
        raise ValueError("element seven is bad")
    return x


class NeedsTwoArgs(Exception):
    """An exception that cannot be built from a message alone (but pickles)."""

    def __init__(self, a, b):
        super().__init__(a, b)
        self.b = b


def raise_two_args(x):
    raise NeedsTwoArgs("a", "b")


class Unpicklable(Exception):
    """An exception that does not survive pickling: its ``args`` miss an argument ``__init__`` wants."""

    def __init__(self, a, b):
        super().__init__(a)


def raise_unrebuildable(x):
    raise Unpicklable("a", "b")


def exit_hard(x):
    if x == 3:
        os._exit(7)
    return x


def kill_self(x):
    if x == 3:
        os.kill(os.getpid(), 9)
    return x


class Stuck(torch.utils.data.Dataset):
    """A map-style dataset whose item 2 does not come back for 30 s (a stuck fetch)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        if i == 2:
            threading.Event().wait(30)
        return i


def failing_source(n):
    """An input iterable that raises after ``n`` elements."""
    yield from range(n)
    raise OSError("the source broke")


def worker_children() -> list[psutil.Process]:
    """Live descendants of this process, Python's own helpers excepted (not their children)."""
    me = psutil.Process()
    helpers = set()
    for child in me.children():
        try:
            if _is_python_helper(child):
                helpers.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    out = []
    for child in me.children(recursive=True):
        try:
            if child.pid in helpers or child.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.NoSuchProcess:
            continue
        out.append(child)
    return out


def assert_no_workers(seconds: float = 10.0) -> None:
    """Every worker process is gone (waits up to ``seconds`` for them to finish exiting)."""
    deadline = time.monotonic() + seconds
    while (kids := worker_children()) and time.monotonic() < deadline:
        psutil.wait_procs(kids, timeout=0.1)
    assert not worker_children(), f"worker processes still alive: {[p.pid for p in worker_children()]}"


def shm_segments() -> set[str]:
    shm = Path("/dev/shm")
    return {p.name for p in shm.iterdir()} if shm.exists() else set()


def _mapped_inodes(pid: int) -> set[int]:
    """The inodes of the /dev/shm files ``pid`` maps. By inode, not by path: a named semaphore's creator
    maps it under glibc's temporary name (``/dev/shm/sem.XXXXXX (deleted)``), never under its own."""
    try:
        with open(f"/proc/{pid}/maps") as maps:
            return {int(line.split()[4]) for line in maps if "/dev/shm/" in line}
    except OSError:
        return set()


def _inode(name: str) -> int | None:
    try:
        return os.stat(f"/dev/shm/{name}").st_ino
    except OSError:  # gone meanwhile
        return None


def segment_spans() -> list[tuple[int, int]]:
    """The address ranges at which this process maps torchqueue segments now."""
    spans = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, *rest = line.split(maxsplit=5)
            if len(rest) == 5 and "/dev/shm/torchqueue-" in rest[4]:
                low, high = span.split("-")
                spans.append((int(low, 16), int(high, 16)))
    return spans


def in_a_segment(tensor: torch.Tensor, spans: list[tuple[int, int]] | None = None) -> bool:
    """Whether ``tensor``'s memory lies in a torchqueue segment this process maps (a view of a received
    message's shared memory, not a copy of it); ``spans``: ``segment_spans()``, taken once for many."""
    address = tensor.untyped_storage().data_ptr()
    return any(low <= address < high for low, high in (segment_spans() if spans is None else spans))


def leaked_segments(new: set[str]) -> set[str]:
    """Of ``new`` segments, those this process still maps or that no process maps any more.

    Segments that other, unrelated processes on the machine have open are theirs, not ours.
    """
    mine = _mapped_inodes(os.getpid())
    others: set[int] = set()
    for pid in psutil.pids():
        if pid != os.getpid():
            others |= _mapped_inodes(pid)
    ours = f"torchqueue-{os.getpid()}-"
    left = set()
    for name in new:
        inode = _inode(name)
        if inode is None:
            continue
        if name.startswith(ours) or (not name.startswith("torchqueue-") and (inode in mine or inode not in others)):
            left.add(name)
    return left


@pytest.fixture(autouse=True, scope="session")
def no_tqdm_monitor():
    """tqdm's monitor thread (started by the first bar, Lightning's included) outlives its bar: every later
    test's pipeline under fork would start from the fork server (a thread runs), not by a fork. Tests that
    need a thread start one (test_forking's ``user_thread``)."""
    import tqdm

    tqdm.tqdm.monitor_interval = 0
    yield


@pytest.fixture(autouse=True)
def no_resource_sharer_thread():
    """Stops, after a test, the server thread of torch's descriptor sharing (``multiprocessing.
    resource_sharer``), which a test that shares a tensor torch's way starts and nothing ends: like
    tqdm's monitor above, it would send every later test's pipeline under fork through the fork server
    (test_stats once saw a 1.3 s start-up instead of a fork's 30 ms, and the verdict said so)."""
    yield
    from multiprocessing import resource_sharer

    resource_sharer.stop(timeout=5)


@pytest.fixture
def no_leaks():
    """Asserts that a test leaves no worker process and no shared-memory segment behind."""
    before = shm_segments()
    yield
    assert_no_workers()
    gc.collect()
    left = leaked_segments(shm_segments() - before)
    assert not left, f"shared-memory segments left behind: {sorted(left)}"


@pytest.fixture(params=START_METHODS)
def start_method(request) -> str:
    return request.param


def stuck_on_five(x):
    """Does not come back from element 5 (for 30 s: a stuck step)."""
    if x == 5:
        threading.Event().wait(30)
    return x


def _cannot_rebuild():
    raise ValueError("cannot rebuild")


class Unrebuildable:
    """Pickles, but fails to unpickle (its rebuilding function raises ``ValueError``)."""

    def __reduce__(self):
        return _cannot_rebuild, ()


def unrebuildable_on_three(x):
    return Unrebuildable() if x == 3 else x
