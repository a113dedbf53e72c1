"""What a ``QueueFlowLoader`` worker does with one batch of indices: DataLoader's fetch, seeded as DataLoader seeds.

A job is ``Job(base_seed, epoch, rewind, indices)``. The loader's fetch step is round robin (batch
``k`` of an epoch goes to worker ``k % num_workers``, each worker takes its batches in order), as
DataLoader hands out index batches, so a worker's random draws (augmentations) follow the same
sequence as the same DataLoader worker's, and the batches are the same.

Random state per worker, as in DataLoader:

- a new ``base_seed`` (every epoch without persistent workers, once with them) reseeds ``random``,
  torch and numpy from ``base_seed + worker_id`` and calls ``worker_init_fn(worker_id)``;
- with persistent workers the state runs on from epoch to epoch.

With persistent workers the loader may start the next epoch's batches before ``iter()`` asks for
them (``loader``'s look-ahead). When that guess proves wrong the loader cancels it, and the next
epoch's jobs carry ``rewind``: the guessed epoch's number. A worker that drew random numbers for
the cancelled epoch then goes back to its state before that epoch, so the draws of the real epoch
are the ones DataLoader's worker would make.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.utils.data._utils.worker as torch_worker
from torch.utils.data import Dataset
from torch.utils.data._utils.fetch import _MapDatasetFetcher

from torchqueue.worker_info import get_worker_info


class Job(NamedTuple):
    base_seed: int
    epoch: int  # the loader's count of epochs handed to the workers (guessed ones included)
    rewind: int | None  # undo the random draws made for this (cancelled) epoch first
    indices: Any


def random_state() -> tuple[Any, Any, torch.Tensor]:
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def set_random_state(state: tuple[Any, Any, torch.Tensor]) -> None:
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])


class Fetch:
    """A worker's fetch: ``collate([dataset[i] for i in indices])``, seeding the worker as DataLoader does."""

    def __init__(self, dataset: Dataset, auto_collation: bool, collate_fn: Callable, drop_last: bool, init_fn: Any):
        self.dataset = dataset
        self.auto_collation = auto_collation
        self.collate_fn = collate_fn
        self.drop_last = drop_last
        self.init_fn = init_fn
        self._seeded: int | None = None
        self._fetcher: _MapDatasetFetcher | None = None
        self._epoch: int | None = None
        self._before: Any = None  # the random state before this worker's first job of ``_epoch``

    def __call__(self, job: Job) -> Any:
        if job.base_seed != self._seeded:
            self._start(job.base_seed)
        if job.epoch != self._epoch:
            if job.rewind is not None and job.rewind == self._epoch:
                set_random_state(self._before)
            self._epoch, self._before = job.epoch, random_state()
        assert self._fetcher is not None
        return self._fetcher.fetch(job.indices)

    def _start(self, base_seed: int) -> None:
        self._fetcher = _MapDatasetFetcher(self.dataset, self.auto_collation, self.collate_fn, self.drop_last)
        self._seeded = base_seed
        info = get_worker_info()
        if info is None:  # num_workers=0: fetched in the consumer's process, which DataLoader leaves alone
            return
        worker_id, num_workers = info.id, info.num_workers
        seed = base_seed + worker_id
        random.seed(seed)
        torch.manual_seed(seed)
        np.random.seed(torch_worker._generate_state(base_seed, worker_id))
        torch_worker._worker_info = torch_worker.WorkerInfo(
            id=worker_id, num_workers=num_workers, seed=seed, dataset=self.dataset
        )
        if self.init_fn is not None:
            self.init_fn(worker_id)
