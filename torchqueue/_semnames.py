"""Named semaphores removed as soon as a pipeline's workers are gone, not when collected.

Under spawn, forkserver and torchqueue's fork server, each lock and semaphore of a pipeline
(its channels, credits and stop event) is a POSIX named semaphore, a ``/dev/shm/sem.mp-*`` file
that multiprocessing unlinks when the object is garbage collected. Something may keep the objects
alive long after ``close()``: a feeder thread stuck in the user's input generator holds the first
edge, an exception's traceback holds the runtime. Once every worker has exited nobody opens the
names any more, so ``close()`` unlinks them at once; handles still held stay usable, as an unlinked
file does. Each name is unlinked by running multiprocessing's own finalizer for it, which then does
nothing when the object is collected.
"""

from __future__ import annotations

from multiprocessing import synchronize, util
from typing import Any


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
