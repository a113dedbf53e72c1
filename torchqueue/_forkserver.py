"""The fork server: a clean, single-threaded process that forks the workers of the "fork" start method.

Why. A child made by ``fork`` has only the thread that forked; a lock another thread held at that
moment (a logging handler's, a buffered stream's, malloc's) stays held in the child forever, and
the child hangs at its first use. A consumer's process always has other threads: torchqueue's
feeder and pin-memory threads, the user's, even numpy's OpenBLAS pool (Python 3.12+ warns about
any of them). So under ``"fork"`` torchqueue never forks the consumer's process: it starts, once
per process and by fork+exec (no ``os.fork``), this server, with torch and torchqueue imported
and its thread pools held at one thread, and asks it for each worker::

    consumer ──fork+exec, once──► fork server (1 thread; torch, numpy and torchqueue imported)
        │ request: the new worker's pipes and fds           │ os.fork() per request
        │ (a SOCK_SEQPACKET socketpair, in order)           ▼
        ├── data pipe: preparation data + the Process ────► worker: bootstraps as a spawned process,
        ◄── status pipe: its pid, later its exit code ───── without re-importing ``__main__``

The worker receives what a spawned one does (its ``Process`` object pickled while it starts, so
tensors, semaphores and ``Value``s reach it through multiprocessing's own reductions), and keeps
what a forked one has: the consumer's environment, working directory, ``sys.path``, standard
output and error as they are at the request, and ``__main__`` left alone (no re-import, so a
script needs no ``if __name__ == "__main__"`` guard). What the step refers to in ``__main__`` goes
by value (see ``_mainmodule``).

The protocol is the standard forkserver's (``multiprocessing.forkserver``; this module borrows its
status encoding and the ``popen_forkserver.Popen`` that reads it), on a private socketpair rather
than the process-wide forkserver: that one re-imports ``__main__`` in every child, is shared with
the user's own processes, and imports its preloaded modules with all their threads.

Lifetime. The server runs while a pipeline or a loader of the consumer uses it (``hold`` and
``release``): when the last one closes, the consumer closes its end of the socket and the server
exits, so no process of torchqueue outlives ``close()``; the next pipeline starts a new one. It also
exits when the consumer exits or dies, and ignores SIGINT (Ctrl-C is the consumer's to handle).
Python's resource tracker is not started for it (see ``_semnames``): the server takes its part for
the names of the semaphores made for its workers (``keep``), which the consumer unlinks once they all
run; if the consumer dies before that, the server unlinks them as it exits. Workers watch the consumer, not
the server (the data pipe's write end stays open in the consumer: ``parent_process().sentinel``),
and also exit when orphaned (``_worker``'s parent watch): so when the server dies, its workers go
too and the consumer sees them die.
"""

from __future__ import annotations

import _multiprocessing
import io
import multiprocessing
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import weakref
from collections.abc import Iterator
from multiprocessing import connection, forkserver, popen_forkserver, process, spawn, util
from multiprocessing.context import BaseContext, reduction, set_spawning_popen
from typing import Any, NoReturn

from torchqueue import _preload
from torchqueue._semnames import untracked

_THREAD_LIMITS = {name: "1" for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
"""The server's environment: thread pools that start at import (OpenBLAS) start none."""

_FDS_PER_MESSAGE = 200
"""File descriptors per request message (Linux passes at most 253 in one)."""

_MORE, _LAST = b"+", b"."
_KEEP, _DROP = b"k", b"d"
"""Messages that give the server names of semaphores to unlink when the consumer is gone, or that
take names back (the consumer unlinked them); the names follow, separated by NUL bytes."""

_MESSAGE_BYTES = 4096

_PRELOAD = ("torch", "numpy", "torchqueue", "torchqueue._worker")

START_POLL_S = 1.0
"""How often a start waiting for the server checks that the server is still alive."""

STOP_S = 5.0
"""How long the last ``release`` waits for the server to exit on its own before killing it."""


# -- in the consumer's process -------------------------------------------------------------------


class _Client:
    """This process's fork server: started at the first request, restarted if it died, stopped when
    its last user releases it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # one request (or start, or stop) at a time on the socket
        self._server: subprocess.Popen[bytes] | None = None
        self._socket: socket.socket | None = None
        self._users = 0
        self._linked: set[str] = set()  # the names the running server keeps
        self._to_keep: list[str] = []  # names made or unlinked since they were last sent (``_send_names``)
        self._to_drop: list[str] = []

    def keep(self, name: str) -> None:
        """A semaphore for the workers was made (``_semnames.Keeper``): the server unlinks its name if
        this process dies before it does. Told as the next worker starts (``announce``): nothing here
        may block, or start the server for a pipeline that fails before its workers."""
        self._to_keep.append(name)

    def drop(self, name: str) -> None:
        """The name is unlinked (``_semnames.Keeper``; from a finalizer: no lock, no I/O)."""
        self._to_drop.append(name)

    def hold(self) -> None:
        """One more pipeline or loader may ask for workers (the server starts at the first request)."""
        with self._lock:
            self._users += 1

    def release(self) -> None:
        """One user fewer; after the last one the server exits (the next request starts a new one)."""
        with self._lock:
            self._users -= 1
            if self._users == 0:
                self._stop()

    def announce(self) -> None:
        """Tell the server, started if need be, the names kept and dropped so far: a worker is about to
        start, and its ``Process`` may take long to pickle (a step that holds a model)."""
        with self._lock:
            self._send_names(self._running())

    def request(self, fds: list[int]) -> tuple[int, int]:
        """Ask for a worker that inherits ``fds``; return its (status pipe, data pipe) ends."""
        with self._lock:
            sock = self._running()
            self._send_names(sock)
            status_r, child_w = os.pipe()
            child_r, data_w = os.pipe()
            try:
                _send_fds(sock, [child_r, child_w, 1, 2, *fds])
            except BaseException:
                os.close(status_r)
                os.close(data_w)
                raise
            finally:
                os.close(child_r)
                os.close(child_w)
            return status_r, data_w

    def _send_names(self, sock: socket.socket) -> None:
        """Tell the server what was kept and dropped since the last time (at each worker's start and
        request: a server started anew in between is told every name still linked)."""
        keeps, self._to_keep = self._to_keep, []
        drops, self._to_drop = self._to_drop, []
        dropped = set(drops)
        new = {name for name in keeps if name not in dropped} - self._linked
        gone = dropped & self._linked
        self._linked = (self._linked | new) - gone
        for kind, names in ((_KEEP, sorted(new)), (_DROP, sorted(gone))):
            for message in _name_messages(kind, names):
                sock.send(message)

    def read_pid(self, status_r: int) -> int:
        """The new worker's pid, once the server forked it (it may still be importing at first)."""
        while not connection.wait([status_r], timeout=START_POLL_S):
            if self._server is None or self._server.poll() is not None:
                raise RuntimeError("torchqueue's fork server died before it started the worker")
        return forkserver.read_signed(status_r)

    @property
    def pid(self) -> int | None:
        """The server's process id, once started."""
        return None if self._server is None else self._server.pid

    def _running(self) -> socket.socket:
        if self._server is not None and self._server.poll() is None and self._socket is not None:
            return self._socket
        if self._socket is not None:
            self._socket.close()
        self._to_keep.extend(self._linked)  # a new server: it is told every name still linked
        self._linked = set()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            command = (  # Ctrl-C is the consumer's: ignored from the first line, not after torch's import
                "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                f"import sys; sys.path[:] = {_sys_path()!r}; "
                f"from torchqueue._forkserver import serve; serve({theirs.fileno()})"
            )
            self._server = subprocess.Popen(
                [spawn.get_executable(), *util._args_from_interpreter_flags(), "-c", command],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                env={**os.environ, **_THREAD_LIMITS},
            )
        self._socket = ours
        return ours

    def _stop(self) -> None:
        """Close the socket: the server leaves its loop and exits (its workers are gone already)."""
        server, self._server = self._server, None
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        if server is None:
            return
        try:
            server.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=STOP_S)

    def forget(self) -> None:
        """In a child forked from this process: the server is the parent's; the child starts its own."""
        self._lock = threading.Lock()
        if self._socket is not None:
            self._socket.close()
        self._server = self._socket = None
        self._users = 0
        self._linked, self._to_keep, self._to_drop = set(), [], []


_client = _Client()
os.register_at_fork(after_in_child=_client.forget)
hold = _client.hold
release = _client.release


def _release_in(pid: int) -> None:
    """``release``, in the process that held the server (not in a fork of it, where the server is not its)."""
    if os.getpid() == pid:
        release()


class Hold:
    """Keeps the server between the pipelines of ``owner`` (a loader's epochs, each with workers of
    its own), until ``close()`` or until ``owner`` is collected."""

    def __init__(self, owner: object) -> None:
        hold()
        self._finalizer = weakref.finalize(owner, _release_in, os.getpid())

    def close(self) -> None:
        self._finalizer()


def server_pid() -> int | None:
    """The process id of this process's fork server (``None`` while none runs)."""
    return _client.pid


def _sys_path() -> list[str]:
    return [process.ORIGINAL_DIR if entry == "" else entry for entry in sys.path]


def _send_fds(sock: socket.socket, fds: list[int]) -> None:
    for start in range(0, len(fds), _FDS_PER_MESSAGE):
        chunk = fds[start : start + _FDS_PER_MESSAGE]
        last = start + _FDS_PER_MESSAGE >= len(fds)
        socket.send_fds(sock, [_LAST if last else _MORE], chunk)


def _name_messages(kind: bytes, names: list[str]) -> Iterator[bytes]:
    """``kind`` followed by ``names``, in messages of at most ``_MESSAGE_BYTES``."""
    message = kind
    for name in names:
        entry = name.encode() + b"\0"
        if len(message) + len(entry) > _MESSAGE_BYTES:
            yield message
            message = kind
        message += entry
    if len(message) > len(kind):
        yield message


def _preparation_data(name: str) -> dict[str, Any]:
    """What a forked child would have of the consumer, for ``spawn.prepare`` (never ``__main__``)."""
    data: dict[str, Any] = {
        "name": name,
        "authkey": bytes(process.current_process().authkey),
        "log_to_stderr": util._log_to_stderr,  # type: ignore[attr-defined]
        "sys_path": _sys_path(),
        "sys_argv": sys.argv,
        "orig_dir": process.ORIGINAL_DIR,
        "dir": os.getcwd(),
        "environ": dict(os.environ),
    }
    if util._logger is not None:  # type: ignore[attr-defined]
        data["log_level"] = util._logger.getEffectiveLevel()  # type: ignore[attr-defined]
    method = multiprocessing.get_start_method(allow_none=True)
    if method is not None:  # as the consumer's (without fixing it there, as get_start_method() would)
        data["start_method"] = method
    return data


class _InheritedFd:
    """A file descriptor sent with the request (multiprocessing's ``DupFd`` for this server)."""

    def __init__(self, index: int) -> None:
        self.index = index

    def detach(self) -> int:
        return _inherited_fds[self.index]


class _Popen(popen_forkserver.Popen):
    """Starts a worker through the fork server (the standard forkserver's ``Popen``, another server)."""

    DupFd = _InheritedFd

    def _launch(self, process_obj: Any) -> None:
        _client.announce()
        data = io.BytesIO()
        set_spawning_popen(self)  # what the Process holds pickles for this child alone (its fds in self._fds)
        try:
            reduction.dump(_preparation_data(process_obj._name), data)
            reduction.dump(process_obj, data)
        finally:
            set_spawning_popen(None)
        self.sentinel, data_w = _client.request(self._fds)
        parent_w = os.dup(data_w)  # kept open while this process lives: the worker's sentinel of it
        self.finalizer = util.Finalize(self, util.close_fds, (parent_w, self.sentinel))
        with open(data_w, "wb", closefd=True) as pipe:
            self.pid = _client.read_pid(self.sentinel)  # the worker is forked: it reads what follows
            pipe.write(data.getbuffer())


class ForkServerProcess(process.BaseProcess):
    """A worker process forked by the fork server."""

    _start_method = None  # the worker keeps the consumer's default start method (preparation data)

    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        return _Popen(process_obj)


class ForkServerContext(BaseContext):
    """What ``"fork"`` means to torchqueue: its objects are made for, and its workers come from, the fork server."""

    _name = "forkserver"  # not "fork": its semaphores must be named, to reach a process that was not forked
    Process = ForkServerProcess  # type: ignore[assignment]

    # Its semaphores are kept from the resource tracker: torchqueue unlinks their names (``_semnames``).

    def Lock(self) -> Any:  # noqa: N802 (multiprocessing's names)
        with untracked(_client):
            return super().Lock()

    def Semaphore(self, value: int = 1) -> Any:  # noqa: N802
        with untracked(_client):
            return super().Semaphore(value)

    def BoundedSemaphore(self, value: int = 1) -> Any:  # noqa: N802
        with untracked(_client):
            return super().BoundedSemaphore(value)

    def Event(self) -> Any:  # noqa: N802
        with untracked(_client):
            return super().Event()

    def __repr__(self) -> str:
        return "<torchqueue fork server context>"


CONTEXT = ForkServerContext()


# -- in the fork server --------------------------------------------------------------------------

_inherited_fds: list[int] = []  # in a worker: the fds its request carried


def serve(fd: int) -> None:
    """The server's main loop (``python -c``): fork a worker per request until the consumer closes its end."""
    for module in _PRELOAD:
        try:
            __import__(module)
        except ImportError:  # the worker imports what it needs
            pass
    imports = _preload.Imports(_THREAD_LIMITS)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a wake-up by set_wakeup_fd, handled in the loop
    sig_r, sig_w = os.pipe()
    os.set_blocking(sig_r, False)
    os.set_blocking(sig_w, False)
    signal.set_wakeup_fd(sig_w)
    status_of: dict[int, int] = {}  # child pid -> the write end of its status pipe
    received: list[int] = []
    kept: set[str] = set()  # names of the consumer's semaphores to unlink when it is gone
    with socket.socket(fileno=fd) as sock, selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ)
        selector.register(sig_r, selectors.EVENT_READ)
        selector.register(imports.reports, selectors.EVENT_READ)
        while True:
            for key, _ in selector.select():
                if key.fileobj == sig_r:
                    os.read(sig_r, 4096)
                    _report_exits(status_of)
                    continue
                if key.fileobj == imports.reports:
                    imports.import_pending()  # now, while the workers run: the next epoch's forks need not wait
                    continue
                message, fds, _, _ = socket.recv_fds(sock, _MESSAGE_BYTES, _FDS_PER_MESSAGE)
                if not message:  # the consumer closed its end (no pipeline uses the server) or is gone
                    _unlink(kept)
                    _exit()
                kind, names = message[:1], {name.decode() for name in message[1:].split(b"\0") if name}
                if kind == _KEEP:
                    kept |= names
                    continue
                if kind == _DROP:
                    kept -= names
                    continue
                received += fds
                if message == _LAST:
                    imports.import_pending()  # what earlier workers imported (``_preload``)
                    pid = os.fork()
                    if pid == 0:
                        selector.close()
                        imports.reports.close()
                        os._exit(_child(received, [fd, sig_r, sig_w, *status_of.values()], imports.report_to))
                    _started(pid, received, status_of)
                    received = []


def _unlink(names: set[str]) -> None:
    """Unlink what a consumer that closed its end left linked: it was killed while its workers
    started, or a worker of a pipeline it closed did not stop (a name unlinked already is skipped)."""
    for name in names:
        try:
            _multiprocessing.sem_unlink(name)
        except OSError:
            pass


def _exit() -> NoReturn:
    """Exit at once: the interpreter's teardown, about a second with torch imported, would delay the
    consumer's ``close()``, and the server holds nothing to clean up."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _started(pid: int, fds: list[int], status_of: dict[int, int]) -> None:
    """In the server: tell the consumer the new worker's pid; keep its status pipe for its exit code."""
    child_r, child_w, *rest = fds
    try:
        forkserver.write_signed(child_w, pid)
    except BrokenPipeError:  # the consumer is gone
        pass
    status_of[pid] = child_w
    for fd in [child_r, *rest]:
        os.close(fd)


def _report_exits(status_of: dict[int, int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        child_w = status_of.pop(pid, None)
        if child_w is not None:
            try:
                forkserver.write_signed(child_w, os.waitstatus_to_exitcode(status))
            except BrokenPipeError:
                pass
            os.close(child_w)


def _child(fds: list[int], server_fds: list[int], report_to: socket.socket) -> int:
    """In a new worker: drop the server's state, take the consumer's, and run the Process it sent
    (``report_to``: where it reports the installed modules it imported, ``_preload``)."""
    global _inherited_fds
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        child_r, child_w, stdout, stderr, *_inherited_fds = fds
        for fd in [child_w, *server_fds]:
            os.close(fd)
        os.dup2(stdout, 1)  # the consumer's output as it is now, as a forked child's would be
        os.dup2(stderr, 2)
        os.close(stdout)
        os.close(stderr)
        code = _bootstrap(child_r, report_to)
    except BaseException:
        sys.excepthook(*sys.exc_info())
    finally:
        sys.stderr.flush()
    return code


def _bootstrap(child_r: int, report_to: socket.socket) -> int:
    """``multiprocessing.spawn._main`` with the consumer's environment, and no ``__main__`` re-import."""
    parent_sentinel = os.dup(child_r)
    current = process.current_process()
    with os.fdopen(child_r, "rb", closefd=True) as from_parent:
        current._inheriting = True  # type: ignore[attr-defined]
        try:
            try:
                data = reduction.pickle.load(from_parent)
            except EOFError:  # the consumer stopped before it sent this worker's start (Ctrl-C while starting)
                os.close(parent_sentinel)
                return 1  # nothing to run, and nothing to report: the consumer knows why it stopped
            os.environ.clear()
            os.environ.update(data.pop("environ"))
            spawn.prepare(data)
            _preload.start_worker(report_to)
            process_obj = reduction.pickle.load(from_parent)
        finally:
            del current._inheriting  # type: ignore[attr-defined]
    return int(process_obj._bootstrap(parent_sentinel))
