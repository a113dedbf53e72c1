"""How workers are seeded: as DataLoader seeds its workers, and one stream per step, worker and epoch.

DataLoader draws a base seed from the consumer's torch generator when an iterator starts its
workers, and seeds worker ``id``'s ``random`` and torch with ``base_seed + id``, numpy with a hash
of both (``seed_as_dataloader``). ``QueueFlowLoader``'s fetch workers are seeded exactly so (``_fetch``).

A pipeline (``Sequence``, ``QueueFlowDataset``) draws one base seed the same way when it starts
its workers (``draw_base_seed``: one draw from torch's default generator, which moves it on). Each
epoch of each worker is then a stream of its own: worker ``id`` of stage ``s`` in epoch ``e`` is
seeded as DataLoader seeds worker ``id`` from ``stream_base(base_seed, s, e)``, a hash of the
three made by numpy's ``SeedSequence`` (built to derive independent streams from one seed).
``EpochSeeds`` does it in the worker: for epoch 0 as the worker starts, then when the worker first
receives a message of a later epoch, so before its step function sees that epoch's first element.

    consumer: torch.manual_seed(0) ... Sequence starts ─► base_seed (one draw)
    worker (s, id): epoch 0 ─► seed_as_dataloader(stream_base(base_seed, s, 0), id)
                    first message of epoch 1 ─► seed_as_dataloader(stream_base(base_seed, s, 1), id) ...

Which elements a worker of a multi-worker step takes varies from run to run; what is reproducible
is each (step, worker, epoch) stream, as with DataLoader's workers. A worker that gets a late
element of an earlier epoch after one of a later epoch draws it from the later epoch's stream.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import numpy.random  # noqa: F401  (numpy imports it lazily: at a worker's first epoch, 10 ms under the import lock)
import torch
import torch.utils.data._utils.worker as torch_worker

from torchqueue.worker_info import WorkerInfo, set_worker_info

_SEED_BITS = 63
"""A base seed is a non-negative int64, as DataLoader's (``random_()`` on an int64 tensor)."""


def draw_base_seed(generator: torch.Generator | None = None) -> int:
    """A base seed drawn from ``generator`` (default: torch's), as DataLoader's iterator draws its ``_base_seed``."""
    return int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())


def seed_as_dataloader(base_seed: int, worker_id: int) -> int:
    """Seed ``random``, torch and numpy as DataLoader seeds worker ``worker_id`` from ``base_seed``;
    return the worker's seed (``base_seed + worker_id``, DataLoader's ``WorkerInfo.seed``)."""
    seed = base_seed + worker_id
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(torch_worker._generate_state(base_seed, worker_id))
    return seed


def stream_base(base_seed: int, stage: int, epoch: int) -> int:
    """The base seed of stage ``stage``'s workers in epoch ``epoch``: a hash of the three."""
    low, high = np.random.SeedSequence(base_seed, spawn_key=(stage, epoch)).generate_state(2)
    return (int(high) << 32 | int(low)) & ((1 << _SEED_BITS) - 1)


class EpochSeeds:
    """Seeds one pipeline worker for each epoch it enters, and reports the seed in ``get_worker_info()``.

    A thread worker shares ``random``, numpy's and torch's global random state with the consumer and
    with the other threads: it seeds nothing, and its stream's seed is only reported (its step makes
    its own generator from ``get_worker_info().seed``)."""

    def __init__(self, base_seed: int | None, stage: int, info: WorkerInfo, own_process: bool = True) -> None:
        """``base_seed``: ``None`` leaves the random state alone (a step that seeds itself);
        ``own_process``: the worker is a process of its own (else a thread of the consumer's process)."""
        self._base_seed = base_seed
        self._stage = stage
        self._info = info
        self._own_process = own_process
        self._epoch = -1
        set_worker_info(info, own_process)

    def enter(self, epoch: int) -> None:
        """Called with the epoch of every message received: reseed at the first one of a later epoch."""
        if epoch <= self._epoch or self._base_seed is None:
            return
        self._epoch = epoch
        base = stream_base(self._base_seed, self._stage, epoch)
        seed = seed_as_dataloader(base, self._info.id) if self._own_process else base + self._info.id
        set_worker_info(dataclasses.replace(self._info, seed=seed), self._own_process)
