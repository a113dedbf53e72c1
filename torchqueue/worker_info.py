"""``get_worker_info()``: which worker of which step this code runs in.

Like ``torch.utils.data.get_worker_info``: ``None`` in the consumer's process,
else a ``WorkerInfo`` set when the worker starts (its ``seed`` anew each epoch, see ``_seeding``). A
worker process sets it for the whole process; a thread worker (``backend="thread"``) for its thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

__all__ = ["WorkerInfo", "get_worker_info"]


@dataclass(frozen=True)
class WorkerInfo:
    """The worker a step function runs in.

    Attributes:
        step: The step's name.
        id: This worker's index among the step's workers (0 to ``num_workers - 1``).
        num_workers: How many workers the step has.
        seed: The seed of this worker's random stream in the current epoch: ``random`` and torch
            were seeded with it, numpy with a hash of it (as DataLoader's ``WorkerInfo.seed``).
            ``None`` before the worker seeds itself.
    """

    step: str
    id: int
    num_workers: int
    seed: int | None = None


_current: WorkerInfo | None = None
_thread = threading.local()  # a thread worker's


def get_worker_info() -> WorkerInfo | None:
    """The ``WorkerInfo`` of the worker this code runs in (a thread step's thread, or a worker
    process), or ``None`` outside torchqueue's workers."""
    return getattr(_thread, "info", None) or _current


def set_worker_info(info: WorkerInfo, own_process: bool = True) -> None:
    """Called by a worker when it starts, and when it seeds itself: for its whole process, or
    (``own_process=False``, a thread worker) for the calling thread only."""
    global _current
    if own_process:
        _current = info
    else:
        _thread.info = info
