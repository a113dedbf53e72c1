"""What a ``QueueFlowLoader`` worker does with one batch of indices: DataLoader's fetch, seeded as DataLoader seeds.

The loader's fetch step is round robin (job ``k`` of an epoch goes to worker ``k % num_workers``,
each worker takes its jobs in order), as DataLoader hands out index batches, so a worker's random
draws (augmentations) follow the same sequence as the same DataLoader worker's, and the batches
are the same.

Random state per worker, as in DataLoader: a new ``base_seed`` (every epoch without persistent
workers, once with them) reseeds ``random``, torch and numpy from ``base_seed + worker_id`` and
calls ``worker_init_fn(worker_id)``; with persistent workers the state runs on from epoch to epoch.

A worker reports its random state with every output (``_rngstate``: only what changed since its
last report, all of it at an epoch's first job), so the loader knows each worker's state after
its last batch that was yielded. Where a worker's state must be set (an epoch resumed from a
checkpoint; persistent workers after a cancelled guess or an epoch left early, see ``_epochs``)
the worker's first job of the epoch carries it in ``start``. A job without indices only sets the
state (it aligns the round robin), and a job with ``keep=False`` is fetched for its random draws
(DataLoader's workers fetched it) but sends no batch back.

A fetch that raises sends a ``FailedBatch`` in the batch's place, naming the dataset call that
raised (``__getitem__(13)``), and the worker goes on with its next job; the loader's iterator
(``Batches``) raises it from ``next()`` and yields the following batches on the next calls, as
DataLoader's iterator does.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
import torch.utils.data._utils.worker as torch_worker
from torch.utils.data import Dataset, default_collate
from torch.utils.data._utils.collate import collate, collate_tensor_fn, default_collate_fn_map

from torchqueue import _rngstate
from torchqueue._messages import Failure
from torchqueue._rngstate import RandomState
from torchqueue._seeding import seed_as_dataloader
from torchqueue.errors import capture_at, rebuild
from torchqueue.worker_info import get_worker_info, set_worker_info


class Start(enum.Enum):
    INITIAL = "initial"  # the worker's state right after seeding and worker_init_fn


class Job(NamedTuple):
    base_seed: int
    epoch: int  # the loader's count of epochs handed to the workers (guessed ones included)
    indices: Any  # None: nothing to fetch (the job only sets the state)
    start: RandomState | Start | None = None  # set this random state first
    keep: bool = True  # False: fetch (its random draws count) but send no batch back
    position: int = -1  # the batch's place in its epoch (out of order, a checkpoint lists what was yielded)


Fetched = tuple[Any, int, "RandomState | None", bool, int]
"""A job's output: ``(batch, worker, state, kept, position)``: the batch (``None`` unless kept), the
worker's id, what changed in its random state (``None``: nothing, or not in a worker) and the job's
``position``. A plain tuple: a NamedTuple costs microseconds more to pickle, per batch."""


class _PrivateCollate:
    """torch's ``default_collate`` as a DataLoader worker runs it, stacking the batch in this process's
    own memory.

    In a DataLoader worker ``default_collate`` stacks straight into a new shared-memory file,
    whose pages the kernel must allocate (about 1.5 GB/s here). A torchqueue worker's transport
    copies the batch into a segment it reuses (``_segments``: 6-10 GB/s), so stacking into the
    heap and copying is faster. The batch is the same, laid out the same: stacked with ``out=`` as in
    DataLoader's workers (always contiguous, where a plain ``torch.stack`` keeps the samples' memory
    format), only into memory of this process. The functions of ``default_collate_fn_map`` see the worker
    in ``get_worker_info()``, as in DataLoader's (torch's own for tensors is the one replaced).
    """

    def __call__(self, batch: Any) -> Any:
        if torch_worker._worker_info is None:  # no worker (num_workers=0): as DataLoader's own process collates
            return default_collate(batch)
        collate_map = default_collate_fn_map
        if collate_map.get(torch.Tensor) is collate_tensor_fn:  # not replaced by the user: stack as a worker
            collate_map = {**collate_map, torch.Tensor: _stack_as_in_a_worker}
        return collate(batch, collate_fn_map=collate_map)  # the map's functions see the worker, as in DataLoader


def _stack_as_in_a_worker(batch: list[Any], *, collate_fn_map: Any = None) -> Any:
    """torch's ``collate_tensor_fn`` in a DataLoader worker, with the batch's storage in this process's
    memory rather than a new shared-memory file."""
    elem = batch[0]
    if elem.is_nested or elem.layout != torch.strided:  # torch's errors for nested and sparse tensors
        return collate_tensor_fn(batch, collate_fn_map=collate_fn_map)
    numel = sum(x.numel() for x in batch)
    storage = elem._typed_storage()._new_wrapped_storage(
        torch.UntypedStorage(numel * elem.element_size(), device=elem.device)
    )
    out = elem.new(storage).resize_(len(batch), *list(elem.size()))
    return torch.stack(batch, 0, out=out)


class Fetch:
    """A worker's fetch: ``collate([dataset[i] for i in indices])``, seeding the worker as DataLoader does."""

    travels_as = "the loader's dataset, collate_fn and worker_init_fn"  # what a pickling error names

    def __init__(
        self,
        dataset: Dataset,
        auto_collation: bool,
        collate_fn: Callable,
        drop_last: bool,
        init_fn: Any,
        report: bool = True,
    ) -> None:
        """``report``: send the random state with each output (useless where jobs go to any worker)."""
        self.dataset = dataset
        self.report = report
        self.auto_collation = auto_collation
        self.collate_fn = collate_fn
        self.drop_last = drop_last
        self.init_fn = init_fn
        self._seeded: int | None = None
        self._fetcher: _Fetcher | None = None
        self._worker: int | None = None  # None: in the loader's own process (num_workers=0)
        self._initial: RandomState | None = None
        self._epoch: int | None = None
        self._tracker = _rngstate.Tracker()

    def __call__(self, job: Job) -> Fetched:
        if job.base_seed != self._seeded:
            failed = self._start(job.base_seed)
            if failed is not None:  # in this batch's place, as DataLoader's worker answers its first index
                return failed, self._worker, None, True, job.position
        assert self._fetcher is not None
        if self._worker is None:
            return self._fetch(job), -1, None, True, job.position
        if job.epoch != self._epoch:  # the loader may not have this epoch's earlier reports
            self._epoch = job.epoch
            self._tracker.forget()
        if job.start is not None:
            _rngstate.restore(self._initial if job.start == Start.INITIAL else job.start)  # type: ignore[arg-type]
            self._tracker.forget()
        kept = job.indices is not None and job.keep
        batch = self._fetch(job) if job.indices is not None else None
        state = self._tracker.report() if self.report else None
        return batch if kept else None, self._worker, state, kept, job.position

    def _fetch(self, job: Job) -> Any:
        """The batch of ``job``, or a ``FailedBatch`` in its place if the dataset or collate_fn raised."""
        assert self._fetcher is not None
        try:
            return self._fetcher.fetch(job.indices)
        except Exception as exc:
            where = f"{self._fetcher.calling()} of batch {job.position}"
            if self._worker is None:  # raised as it is in the consumer's process, as DataLoader does
                _add_note(exc, f"raised in {where}")
                return FailedBatch(exc)
            where += f" (loader worker {self._worker}, pid {os.getpid()})"
            return FailedBatch(capture_at("fetch", exc, where))

    def _start(self, base_seed: int) -> FailedBatch | None:
        """Seed this worker for ``base_seed`` and call ``worker_init_fn``: what it raised, if it did."""
        collate = _PrivateCollate() if self.collate_fn is default_collate else self.collate_fn
        self._fetcher = _Fetcher(self.dataset, self.auto_collation, collate)
        self._seeded = base_seed
        info = get_worker_info()
        if info is None:  # num_workers=0: fetched in the consumer's process, which DataLoader leaves alone
            return None
        worker_id, num_workers = info.id, info.num_workers
        seed = seed_as_dataloader(base_seed, worker_id)
        set_worker_info(dataclasses.replace(info, seed=seed))
        torch_worker._worker_info = torch_worker.WorkerInfo(
            id=worker_id, num_workers=num_workers, seed=seed, dataset=self.dataset
        )
        self._worker = worker_id
        self._epoch = None
        failed = None
        if self.init_fn is not None:
            try:
                self.init_fn(worker_id)
            except Exception as exc:
                where = f"worker_init_fn({worker_id}) (loader worker {worker_id}, pid {os.getpid()})"
                failed = FailedBatch(capture_at("fetch", exc, where))
        self._initial = _rngstate.capture()
        return failed


class _Fetcher:
    """torch's ``_MapDatasetFetcher`` (the same calls, in the same order), remembering the dataset call
    in progress, so that an error names the index that raised."""

    def __init__(self, dataset: Dataset, auto_collation: bool, collate_fn: Callable) -> None:
        self.dataset = dataset
        self.auto_collation = auto_collation
        self.collate_fn = collate_fn
        self._call: tuple[str, Any] = ("", None)

    def fetch(self, indices: Any) -> Any:
        dataset = self.dataset
        if not self.auto_collation:
            self._call = ("__getitem__", indices)
            data = dataset[indices]
        elif getattr(dataset, "__getitems__", None):
            self._call = ("__getitems__", indices)
            data = dataset.__getitems__(indices)  # type: ignore[attr-defined]
        else:
            data = []
            for index in indices:
                self._call = ("__getitem__", index)  # a tuple, not a formatted string: it costs nothing per item
                data.append(dataset[index])
        self._call = ("collate_fn", None)
        return self.collate_fn(data)

    def calling(self) -> str:
        """The call in progress (or the last made): ``"__getitem__(13)"``, ``"collate_fn"``."""
        name, argument = self._call
        if argument is None:
            return name
        text = repr(argument)
        return f"{name}({text if len(text) <= 200 else text[:200] + '...'})"


class FailedBatch:
    """A batch whose fetch raised, in its place: ``error`` is the exception (in the consumer's process)
    or the ``Failure`` a worker captured. A plain class: the device path passes it through as it is."""

    def __init__(self, error: BaseException | Failure) -> None:
        self.error = error

    def exception(self) -> BaseException:
        return rebuild(self.error) if isinstance(self.error, Failure) else self.error


class Batches(Iterator[Any]):
    """The loader's iterator over a map-style dataset's batches: a ``FailedBatch`` raises its error
    from ``next()``, and the next call yields the following batch, as DataLoader's iterator does."""

    def __init__(self, batches: Iterator[Any]) -> None:
        self._batches = batches

    def __next__(self) -> Any:
        batch = next(self._batches)
        if isinstance(batch, FailedBatch):
            raise batch.exception()
        return batch

    def close(self) -> None:
        """Leave the epoch where it stands (as closing the generator it wraps)."""
        close = getattr(self._batches, "close", None)
        if close is not None:
            close()


def _add_note(exc: BaseException, note: str) -> None:
    add_note = getattr(exc, "add_note", None)  # Python 3.11+
    if add_note is not None:
        add_note(note)
