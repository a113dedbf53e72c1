"""What the fork server imports for its next workers: the installed modules its workers imported.

A worker forked from the fork server (``_forkserver``) imports what its step needs as it unpickles
it: the module of your dataset's class, and everything that module imports. DataLoader's forked
workers have all of it from your process; without this, every epoch's new workers imported it again
(about 3 s a worker for a module that imports ``lightning``, where DataLoader's start in milliseconds).
So each worker, once its step is loaded, reports the modules it imported; the server imports them
before its next fork::

    worker: load the step (imports)  ──report: names, environ, cwd, argv──►  server: imports them
    consumer: next request  ───────────────────────────────────────────────►  server: forks (has them)

- Only modules installed in the interpreter's library directories (the standard library,
  site-packages) are reported: yours (your script's directory, a project installed in editable mode)
  are imported by each worker from its file as it is then, so an edit between epochs shows.
- A worker whose step's loading started a thread (any: ``threading``'s, ``_thread``'s, a library's in C)
  reports nothing: imported in the server, that module would start its thread there too, and a worker
  forked while it holds a lock would hang.
- The server keeps its own handlers of SIGINT (ignored: Ctrl-C is your process's), SIGCHLD and SIGTERM,
  whatever an imported module sets.
- The server imports with the reporting worker's environment (your process's, with the server's
  thread-pool limits over it), working directory and ``sys.argv``, as soon as a report comes (while
  the workers run: importing at the next request instead delayed a loader's second epoch by the
  imports, 1.8 s for ``lightning``), and again before each fork, for reports still unread.
- A report is one message on a ``SOCK_SEQPACKET`` socket (whole or not at all); one that does not
  fit, or finds the socket full, is dropped: the next worker reports again.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import signal
import site
import socket
import sys
import sysconfig
import threading
from collections.abc import Iterator
from typing import Any

_INSTALLED_KEYS = ("stdlib", "platstdlib", "purelib", "platlib")

_inherited: frozenset[str] = frozenset()  # in a worker: the modules it had from the server
_report_to: socket.socket | None = None  # in a worker, until it reported: where the server reads reports


class Imports:
    """In the server: the reports of its workers, imported before its next fork."""

    def __init__(self, limits: dict[str, str]) -> None:
        """``limits``: environment variables the server keeps over a report's (its thread pools)."""
        self.reports, self.report_to = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.reports.setblocking(False)
        self._limits = limits
        self._pending: list[dict[str, Any]] = []
        self._warned = False

    def _read(self) -> None:
        """Keep the reports that came."""
        with contextlib.suppress(BlockingIOError):
            while message := self.reports.recv(1 << 20):
                with contextlib.suppress(Exception):
                    self._pending.append(pickle.loads(message))

    def import_pending(self) -> None:
        """Import what the reports name, each with its worker's environment, directory and arguments."""
        self._read()
        pending, self._pending = self._pending, []
        threads = _threads()
        for report in pending:
            names = [name for name in sorted(report["names"]) if name not in sys.modules]  # a package first
            if names:
                with _as_in(report, self._limits):
                    for name in names:
                        try:
                            importlib.import_module(name)
                        except BaseException:  # noqa: BLE001 (SystemExit too): the workers import it themselves
                            pass
        if _threads() - threads and not self._warned:  # its workers saw none start: one started here
            self._warned = True
            sys.stderr.write(
                "torchqueue: a module the fork server imported for your workers started a thread there; "
                "workers forked while it runs may hang if it holds a lock: use multiprocessing_context='spawn'\n"
            )


_KEPT_SIGNALS = (signal.SIGINT, signal.SIGCHLD, signal.SIGTERM)
"""The server's handlers, which an imported module may set (``signal.signal(SIGINT, ...)``): Ctrl-C would
then kill the server, and a default SIGCHLD stop it hearing of its workers' exits."""


@contextlib.contextmanager
def _as_in(report: dict[str, Any], limits: dict[str, str]) -> Iterator[None]:
    """The server's environment, directory and ``sys.argv`` as the reporting worker had them; its own
    signal handlers kept."""
    environ, cwd, argv = dict(os.environ), os.getcwd(), sys.argv
    handlers = {number: signal.getsignal(number) for number in _KEPT_SIGNALS}
    try:
        os.environ.clear()
        os.environ.update({**report["environ"], **limits})
        with contextlib.suppress(OSError):
            os.chdir(report["cwd"])
        sys.argv = list(report["argv"])
        yield
    finally:
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(cwd)
        sys.argv = argv
        for number, handler in handlers.items():
            if handler is not None:
                signal.signal(number, handler)


def start_worker(report_to: socket.socket) -> None:
    """In a new worker of the server: what it has now was the server's; ``report_to``: for its report."""
    global _inherited, _report_to
    _inherited, _report_to = frozenset(sys.modules), report_to


@contextlib.contextmanager
def reporting() -> Iterator[None]:
    """Around a worker's loading of its step: after it, report the installed modules it imported (in a
    worker of the fork server; elsewhere nothing)."""
    global _report_to
    threads = _threads()
    yield
    report_to, _report_to = _report_to, None
    if report_to is None:
        return
    with report_to:
        if _threads() - threads:
            return  # its imports started a thread (see the module docstring)
        dirs = _installed_dirs()
        names = [
            name
            for name, module in list(sys.modules.items())
            if name not in _inherited and not name.startswith(("__main__", "__mp_main__")) and installed(module, dirs)
        ]
        if not names:
            return
        report = {"names": names, "environ": dict(os.environ), "cwd": os.getcwd(), "argv": sys.argv}
        with contextlib.suppress(OSError):  # too large, or the socket is full: the next worker reports
            report_to.setblocking(False)
            report_to.send(pickle.dumps(report))


def _threads() -> set[int]:
    """The ids of this process's threads: every one, started by ``threading``, ``_thread`` or a library
    in C (``/proc/self/task``; where there is none, those ``threading`` knows)."""
    try:
        return {int(tid) for tid in os.listdir("/proc/self/task")}
    except OSError:
        return {thread.ident or 0 for thread in threading.enumerate()}


def installed(module: Any, dirs: tuple[str, ...]) -> bool:
    """Whether ``module`` was loaded from a file under ``dirs`` (the interpreter's library directories)."""
    file = getattr(module, "__file__", None)
    return isinstance(file, str) and os.path.realpath(file).startswith(dirs)


def _installed_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths[key] for key in _INSTALLED_KEYS if key in paths}
    dirs.update(site.getsitepackages())
    dirs.add(site.getusersitepackages())
    return tuple(os.path.join(os.path.realpath(path), "") for path in dirs)


def inherited() -> frozenset[str]:
    """In a worker of the fork server: the modules it had from the server as it started."""
    return _inherited
