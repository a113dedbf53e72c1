"""The synchronisation objects of a pipeline whose parties all run in the consumer's process.

A pipeline of thread steps only (and the Pack/Unpack/RepackSteps that follow them) starts no process:
its feeder, workers and consumer are threads of this one. ``Runtime`` makes its stop event, credits,
counters and stats array through a context; for such a pipeline it is ``LOCAL``, whose objects are
``threading``'s and plain ``ctypes`` values in this process's memory, not multiprocessing's named
semaphores and shared-memory arena. They cost less to make (a first pipeline in a fresh process
started in 6.7 ms, 2 of it making those), hold no ``/dev/shm`` names to unlink, and need no thread to
unlink them (``_semnames``).

Only the part of ``multiprocessing.context.BaseContext`` that ``Runtime`` uses is here.
"""

from __future__ import annotations

import multiprocessing.connection
import threading
from multiprocessing.sharedctypes import typecode_to_type  # type: ignore[attr-defined]
from typing import Any


class LocalContext:
    """Makes, for threads of this process, what a multiprocessing context makes for processes."""

    Event = staticmethod(threading.Event)
    Semaphore = staticmethod(threading.Semaphore)
    BoundedSemaphore = staticmethod(threading.BoundedSemaphore)
    Pipe = staticmethod(multiprocessing.connection.Pipe)

    @staticmethod
    def RawValue(typecode: str, value: Any) -> Any:  # noqa: N802 (multiprocessing's name)
        """A ctypes value with ``.value``, as ``multiprocessing.RawValue`` gives, in ordinary memory."""
        return typecode_to_type[typecode](value)

    @staticmethod
    def RawArray(typecode: str, size: int) -> Any:  # noqa: N802 (multiprocessing's name)
        """A zeroed ctypes array, as ``multiprocessing.RawArray(typecode, size)`` gives, in ordinary memory."""
        return (typecode_to_type[typecode] * size)()

    def get_start_method(self) -> str:
        """No process starts: the name ``travelling_steps`` records (a thread needs no pickled step)."""
        return "thread"

    def __repr__(self) -> str:
        return "torchqueue._local.LOCAL"


LOCAL = LocalContext()
