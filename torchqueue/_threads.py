"""Thread workers (``backend="thread"``): a step's workers as threads of the consumer's process.

A thread moves nothing: the array a thread step returns is the array the next thread step (or the
consumer) gets, through a ``LocalChannel`` that holds the envelopes themselves. Where a thread step
meets a process step the edge stays a ``Channel`` and the element crosses it through the transport
(``_transport``), as between two processes. Threads pay off where the work releases the GIL
(numpy, torch, PIL decoding, file and network reads) or where copies dominate; Python-bound work
runs one thread at a time and belongs in processes.

A thread worker runs the same loop as a process worker (``_runners.run_worker``), without what
only a process needs (``_worker``): it shares the consumer's random state (it reports its
stream's seed in ``get_worker_info()`` and seeds nothing), its torch threads, and its signals.
Threads start after every worker process of the pipeline has been forked (``Runtime``), and a
pipeline started while a thread runs forks from the fork server (``sequence._start_context``): no
fork ever happens while a thread step holds a lock.

A thread cannot be killed. It leaves when the pipeline closes: the stop wakes every wait on a
``LocalChannel`` (``wake``), and a wait elsewhere checks within ``POLL_S``; one inside a step's call
leaves when the call returns, and sends nothing after that.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from torchqueue._channel import POLL_S, Stopped, StopSignal
from torchqueue._loop import WorkerContext
from torchqueue._runners import run_worker

logger = logging.getLogger("torchqueue")


class LocalChannel:
    """A bounded channel between two parties in this process (thread steps, the feeder, the consumer):
    it holds the messages themselves, nothing is pickled or copied. The same interface as ``Channel``:
    every wait wakes every ``POLL_S`` for the caller's ``alive`` check.

    Invariant: at most ``capacity`` messages are put and not yet taken.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._messages: collections.deque[Any] = collections.deque()
        self._changed = threading.Condition()

    def fill(self) -> float:
        """Fraction of the capacity in use now (0 to 1)."""
        return len(self._messages) / self.capacity

    def put(self, message: Any, alive: Callable[[], bool]) -> None:
        """Put one message, waiting for room; raise ``Stopped`` when ``alive()`` turns False."""
        with self._changed:
            while len(self._messages) >= self.capacity:
                if not alive():
                    raise Stopped
                self._changed.wait(POLL_S)
            self._messages.append(message)
            self._changed.notify_all()

    def get(self, alive: Callable[[], bool], timeout: float | None = None, stop: StopSignal | None = None) -> Any:
        """Take one message, or return ``None`` when none came within ``timeout`` seconds (``None``:
        until one comes or ``alive()`` turns False, ``Stopped``; a set ``stop`` raises it too)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while not self._messages:
                if not alive() or (stop is not None and stop.is_set()):
                    raise Stopped
                wait = POLL_S if deadline is None else min(POLL_S, deadline - time.monotonic())
                if wait <= 0:
                    return None
                self._changed.wait(wait)
            message = self._messages.popleft()
            self._changed.notify_all()
            return message

    def wake(self) -> None:
        """Wake every party waiting here now, to check whether it should go on (the pipeline stops)."""
        with self._changed:
            self._changed.notify_all()

    def close(self) -> None:
        """Drop the messages still held (their segments go with them)."""
        with self._changed:
            self._messages.clear()
            self._changed.notify_all()


class ThreadHandle:
    """A worker that is a daemon thread of this process (see ``_handles.WorkerHandle``)."""

    in_own_process = False

    def __init__(self, ctx: WorkerContext, name: str) -> None:
        self.pid: int | None = os.getpid()
        self._stop = ctx.stop
        self._thread = threading.Thread(target=self._run, args=(ctx,), name=name, daemon=True)
        self._exitcode: int | None = None
        self._error = ""

    def _run(self, ctx: WorkerContext) -> None:
        code = 0
        try:
            run_worker(ctx, own_process=False)
        except SystemExit as exc:  # its step could not load (the notice is sent)
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            if not self._stop.is_set():  # else: the pipeline closed under it (its edges are gone)
                self._error = traceback.format_exc()
                code = 1
        self._exitcode = code

    def start(self) -> None:
        self._thread.start()

    @property
    def exitcode(self) -> int | None:
        return self._exitcode

    def join(self, timeout: float) -> None:
        if self._thread.ident is not None:  # not started: Ctrl-C while the processes before it started
            self._thread.join(timeout=timeout)

    def force_stop(self) -> None:
        """Nothing can stop a thread: one still in its step's call is left to finish it (it sends nothing)."""
        if self._thread.is_alive():
            logger.warning(
                "thread %s is still in its step's call as its pipeline closes: it leaves when the call returns",
                self._thread.name,
            )

    def close(self) -> None:
        pass

    def describe_exit(self) -> str:
        if self._exitcode is None:
            return "running"
        if self._error:
            return f"raised an exception out of torchqueue's loop:\n{self._error}"
        return f"exited with code {self._exitcode}"
