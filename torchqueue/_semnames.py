"""A pipeline's named semaphores: unlinked as soon as every worker has opened them, and, under
torchqueue's fork server, kept from Python's resource tracker.

Under spawn, forkserver and torchqueue's fork server, each lock and semaphore of a pipeline (its
channels, credits and stop event) is a POSIX named semaphore, a ``/dev/shm/sem.mp-*`` file. A
process that was not forked from the creator opens it by name while it unpickles its ``Process``;
after that, nobody needs the name. So the consumer unlinks every name once each worker has said
that it started (``WorkerStarted``), and at ``close()`` at the latest: handles still held stay
usable, as an unlinked file does. Otherwise a SIGKILL of the whole process group (the consumer,
its workers and the resource tracker at once) leaves the files for good, and so would anything
that keeps the objects alive after ``close()`` (a feeder thread stuck in the user's generator, an
exception's traceback), as multiprocessing unlinks a name only when its object is collected.

Python registers each name with its resource tracker, a helper process that unlinks what a dead
process left. Under ``"fork"`` nothing else needs that process (the fork server passes no tracker
to its workers), and it would outlive ``close()``: names made inside ``untracked(keeper)`` go to
``keeper`` instead (the fork server, which outlives a consumer killed while its workers start, and
then unlinks them), and their unlinking does not start a tracker either. Only a SIGKILL of the
process group while workers start (consumer and server at once) leaves the names.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing import resource_tracker, synchronize, util
from typing import Any, Protocol


class Keeper(Protocol):
    """Who unlinks the names of untracked semaphores that this process could not (it was killed)."""

    def keep(self, name: str) -> None:
        """``name`` was made: unlink it if this process dies first."""

    def drop(self, name: str) -> None:
        """``name`` is unlinked. Called from finalizers, at any point of any thread: it must not block."""


_local = threading.local()  # .keeper: this thread makes semaphores that it keeps from the tracker
_untracked: dict[str, Keeper] = {}  # names made so, still linked -> their keeper


@contextmanager
def untracked(keeper: Keeper) -> Iterator[None]:
    """Semaphores made in this thread meanwhile go to ``keeper``, not to the resource tracker."""
    _install()
    _local.keeper = keeper
    try:
        yield
    finally:
        _local.keeper = None


_tracked_register = resource_tracker.register
_tracked_unregister = resource_tracker.unregister


def _install() -> None:
    """Route ``resource_tracker.register``/``unregister`` (which ``SemLock`` looks up at each call) through
    ``_register``/``_unregister``; they pass every other name, from any thread, on unchanged."""
    resource_tracker.register = _register  # type: ignore[assignment]
    resource_tracker.unregister = _unregister  # type: ignore[assignment]


def _register(name: str, rtype: str) -> None:
    keeper = getattr(_local, "keeper", None)
    if rtype == "semaphore" and keeper is not None:
        _untracked[name] = keeper
        keeper.keep(name)
    else:
        _tracked_register(name, rtype)


def _unregister(name: str, rtype: str) -> None:
    keeper = _untracked.pop(name, None) if rtype == "semaphore" else None
    if keeper is not None:
        keeper.drop(name)
    else:
        _tracked_unregister(name, rtype)


def semaphore_names(*roots: Any) -> set[str]:
    """The names of the multiprocessing locks and semaphores held by ``roots``, followed through
    lists, tuples, dicts and the attributes of multiprocessing's and torchqueue's objects."""
    names: set[str] = set()
    seen: set[int] = set()
    pending = list(roots)
    while pending:
        item = pending.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, synchronize.SemLock):
            name = getattr(item._semlock, "name", None)  # None: unlinked at creation (the fork context)
            if name:
                names.add(name)
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
        elif type(item).__module__.startswith(("multiprocessing.", "torchqueue.")) and hasattr(item, "__dict__"):
            pending.extend(vars(item).values())
    return names


def unlink_now(names: set[str]) -> None:
    """Unlink these named semaphores now, through their finalizers (each runs once)."""
    for finalizer in list(util._finalizer_registry.values()):  # type: ignore[attr-defined]
        args = getattr(finalizer, "_args", None)
        if getattr(finalizer, "_callback", None) is synchronize.SemLock._cleanup and args and args[0] in names:
            finalizer()
