"""A started worker, whatever runs it: the one interface the runtime starts, watches and stops.

    WorkerHandle           ProcessHandle (here)             ThreadHandle (``_threads``)
      start()                Process.start()                  Thread.start()
      exitcode               None while it runs, then its     None while it runs, 0 when it left,
                             exit status (< 0: a signal)      1 when an exception escaped its loop
      join(timeout)          Process.join                     Thread.join
      force_stop()           SIGTERM, then SIGKILL            nothing can stop a thread: it leaves
                                                              when its step's call returns
      close()                Process.close                    -

The runtime never asks which kind it holds: a new kind of worker is a new handle (and the function
it runs, ``_runners.run_worker`` behind whatever set-up the kind needs).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from collections.abc import Callable
from contextlib import AbstractContextManager
from multiprocessing.context import BaseContext
from typing import Any, Protocol

logger = logging.getLogger("torchqueue")

FORCE_JOIN_S = 1.0
"""How long a forced stop waits for the worker after each signal."""


class WorkerHandle(Protocol):
    """A worker the runtime started (see the module docstring)."""

    pid: int | None
    in_own_process: bool  # a process of its own: it can be killed, and must be started before any thread

    def start(self) -> None: ...

    @property
    def exitcode(self) -> int | None: ...

    def join(self, timeout: float) -> None: ...

    def force_stop(self) -> None: ...

    def close(self) -> None: ...

    def describe_exit(self) -> str: ...


class ProcessHandle:
    """A worker in a process of its own, started from ``ctx``."""

    in_own_process = True

    def __init__(
        self,
        ctx: BaseContext,
        target: Callable[..., None],
        args: tuple[Any, ...],
        name: str,
        starting: Callable[[], AbstractContextManager[None]],
    ) -> None:
        """``starting()``: what must surround the start (the step's pickling for this worker, see
        ``_mainmodule.TravellingStep``, and a fork's warnings)."""
        self.process = ctx.Process(target=target, args=args, name=name, daemon=True)  # type: ignore[attr-defined]
        self._starting = starting
        self.pid: int | None = None
        self._own_child = ctx.get_start_method() in ("fork", "spawn")  # not a fork server's: this process reaps it
        self._reaped = False  # gone, its exit status reaped by the system (see ``exitcode``)

    def start(self) -> None:
        if multiprocessing.current_process().daemon:  # multiprocessing's own word is a bare AssertionError
            raise RuntimeError(
                "torchqueue cannot start a worker process here: this code runs in a worker process (of a "
                "pipeline, or a DataLoader), and such a process cannot have children of its own. Make what "
                "it would run steps of the outer pipeline, or give its steps backend='thread' (a "
                "QueueFlowLoader there: num_workers=0)"
            )
        with self._starting():
            self.process.start()
        self.pid = self.process.pid

    @property
    def exitcode(self) -> int | None:
        """Its exit status, ``None`` while it runs. Where this process ignores ``SIGCHLD`` (daemons and
        servers do), the kernel reaps its children as they exit and multiprocessing, whose ``waitpid``
        then fails, reports a dead child as running for ever: so a child whose status cannot be read is
        asked without reaping it (``WNOWAIT``), and one that is no longer this process's child is gone,
        with ``UNKNOWN_EXIT`` (given to multiprocessing too, so that nothing signals its pid again)."""
        code = self.process.exitcode
        if code is None and self._own_child and self.pid is not None and _reaped_by_system(self.pid):
            self._reaped = True
            self.process._popen.returncode = code = UNKNOWN_EXIT  # its Popen's status: join, close, kill see it
        return code

    def join(self, timeout: float) -> None:
        self.process.join(timeout=timeout)

    def force_stop(self) -> None:
        """Terminate (SIGTERM: inside a long user function, say), then kill what is still there (at once
        where it is stopped: a stopped process does not take SIGTERM until it goes on)."""
        if self.exitcode is None and not process_stopped(self.pid):
            logger.debug("%s did not leave when asked: terminating it", self.process.name)
            self.process.terminate()
            self.process.join(timeout=FORCE_JOIN_S)
        if self.exitcode is None:
            self.process.kill()
            self.process.join(timeout=FORCE_JOIN_S)
        if self.exitcode is None:
            logger.warning("worker pid %s did not exit after SIGKILL", self.process.pid)

    def close(self) -> None:
        if self.exitcode is not None:
            self.process.close()

    def describe_exit(self) -> str:
        code = self.exitcode
        if code is None:
            return "running"
        if self._reaped:
            return (
                "exited, with a status nobody can read: this process ignores SIGCHLD "
                "(signal.signal(signal.SIGCHLD, signal.SIG_IGN)), so the system reaped it at once "
                "(or something in this process reaps every child: os.waitpid(-1, ...))"
            )
        if code < 0:
            try:
                return f"killed by signal {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exited with code {code}"


UNKNOWN_EXIT = 255
"""The exit status given to a worker reaped by the system (``ProcessHandle.exitcode``)."""


def _reaped_by_system(pid: int) -> bool:
    """Whether ``pid``, a child this process started, is no longer its child: it exited and, ``SIGCHLD``
    being ignored here, the kernel reaped it (a running or unreaped child is left as it is: ``WNOWAIT``)."""
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return False


STOPPED = "stopped (SIGSTOP, Ctrl-Z or a debugger)"
"""How a stopped process (``process_stopped``) is told, in a timeout's report and in the stats' hint."""


def process_stopped(pid: int | None) -> bool:
    """Whether process ``pid`` is stopped by a signal or traced (state ``T`` or ``t`` in ``/proc``)."""
    if pid is None or pid == os.getpid():  # a thread worker: this process runs
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read()
    except OSError:  # gone, or no /proc
        return False
    state = fields[fields.rfind(b")") + 2 :][:1]  # the field after the command's name, which may hold spaces
    return state in (b"T", b"t")
