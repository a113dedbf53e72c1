"""A worker process's watch on the process that started it (as torch's ``ManagerWatchdog``).

A worker must not outlive the consumer's process: when that process dies without closing its
pipelines (``kill -9``, a crash), nobody else would stop the workers or remove the shared memory
they write. ``ParentWatch`` is a daemon thread that waits for the parent's death and then removes
the pipeline's segments and exits the worker. ``clean_up_on_signal`` covers a signal that kills the
whole process group at once (the consumer gets no chance to clean up either).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import threading
from typing import Any

from torchqueue._channel import StopSignal

PARENT_POLL_S = 1.0
"""How often the parent watch also asks whether this process was orphaned (see ``parent_gone``)."""

TERM_GRACE_S = 0.5
"""How long a worker told to terminate (not by its closing pipeline) waits for its parent's death."""


def parent_gone(sentinel: Any, parent_pid: int, timeout: float | None) -> bool:
    """Whether the process that started this one died, waiting up to ``timeout`` for it.

    Its sentinel (the end of a pipe the parent holds) says so at once, unless a process that another
    thread of the parent forked at the same moment inherited that pipe too: then only the parent id
    tells, which the kernel changes when a process is orphaned."""
    ready = multiprocessing.connection.wait([sentinel], timeout=timeout)
    return bool(ready) or os.getppid() != parent_pid


class ParentWatch:
    """Exits this worker process as soon as its parent is gone, removing ``segment_dir`` first."""

    def __init__(self, segment_dir: str | None) -> None:
        self._segment_dir = segment_dir

    def start(self) -> None:
        """Start watching (nothing to watch in a process that multiprocessing did not start)."""
        parent = multiprocessing.parent_process()
        if parent is None:
            return
        # the process that started this one (a fork server's, under the fork server)
        threading.Thread(
            target=self._watch, args=(parent.sentinel, os.getppid()), name="torchqueue-parent-watch", daemon=True
        ).start()

    def _watch(self, sentinel: Any, parent_pid: int) -> None:
        while not parent_gone(sentinel, parent_pid, PARENT_POLL_S):
            pass
        if self._segment_dir is not None:
            shutil.rmtree(self._segment_dir, ignore_errors=True)
        os._exit(1)


def clean_up_on_signal(stop: StopSignal, segment_dir: str | None) -> None:
    """On SIGTERM or SIGHUP, remove the shared memory if the consumer's process dies too.

    A signal to the whole process group (``timeout``, ``kill -TERM -<pgid>``, SLURM's ``scancel``,
    a closed terminal) kills the consumer's process without its clean-up, and the workers with it:
    nobody would remove the pipeline's segments. So a worker waits briefly for its parent's death
    (immediate when the signal hit it too) and removes them, then dies of the signal as it would
    have. A pipeline that is closing terminates its workers after setting ``stop``: no wait then.
    Signals the consumer's process had ignored (``nohup``) stay ignored.
    """
    parent = multiprocessing.parent_process()
    if parent is None or segment_dir is None:
        return

    def on_signal(signum: int, _frame: Any) -> None:
        # only file descriptors here: the handler may interrupt the main thread holding any lock
        ready = multiprocessing.connection.wait([stop.fileno(), parent.sentinel], timeout=TERM_GRACE_S)
        if parent.sentinel in ready:
            shutil.rmtree(segment_dir, ignore_errors=True)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) == signal.SIG_DFL:
            signal.signal(signum, on_signal)
