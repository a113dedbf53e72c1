"""``get_worker_info()``: which worker of which step this code runs in.

Like ``torch.utils.data.get_worker_info``: ``None`` in the consumer's process,
else a ``WorkerInfo`` set when the worker process starts (its ``seed`` anew each epoch, see ``_seeding``).
"""

from __future__ import annotations

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


def get_worker_info() -> WorkerInfo | None:
    """The ``WorkerInfo`` of this worker process, or ``None`` outside torchqueue's workers."""
    return _current


def set_worker_info(info: WorkerInfo) -> None:
    """Called by a worker process when it starts, and when it seeds itself."""
    global _current
    _current = info
