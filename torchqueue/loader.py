"""``QueueFlowLoader``: the drop-in for ``torch.utils.data.DataLoader``.

    from torchqueue import QueueFlowLoader as DataLoader

Over a map-style dataset it yields the same batches in the same order as ``DataLoader`` with
the same arguments and generator: the arguments are checked, and the sampler, batch sampler and
collate function built, by a real ``DataLoader`` (so invalid combinations raise DataLoader's own
errors); each epoch draws from the generator exactly as DataLoader's iterator does (a base seed,
on every epoch unless workers persist, then the sampler's draws), and the epoch's index batches
are fetched by a ``tq.Sequence`` of ``num_workers`` processes. Workers are seeded as DataLoader
seeds them (``base_seed + worker_id`` for ``random`` and torch, DataLoader's numpy seed), call
``worker_init_fn(worker_id)`` and answer ``torch.utils.data.get_worker_info()``.

Over a ``QueueFlowDataset`` it runs that pipeline, batching and collating only when asked
(``batch_size`` defaults to ``None`` for it). Other iterable datasets are handed to a
``DataLoader`` as they are.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from torchqueue import _device
from torchqueue._fetch import Fetch, Job
from torchqueue._lookahead import EpochStep, Guess, predictable
from torchqueue.dataset import QueueFlowDataset
from torchqueue.sequence import Sequence, _EpochIterator
from torchqueue.steps import ProcessStep, Queue

__all__ = ["QueueFlowLoader"]

logger = logging.getLogger("torchqueue")

_DEFAULT: Any = object()


class QueueFlowLoader:
    """DataLoader's arguments with DataLoader's meaning, plus ``device=``, ``progress=``, ``rank=``, ``world_size=``.

    Args:
        device: Deliver batches on this device; for CUDA a background thread copies pinned
            batches on a dedicated stream. ``"cuda"`` without CUDA raises here.
        progress: Show a tqdm progress bar (batches and samples per second).
        rank, world_size: This process's share of a map-style dataset (default: from
            ``torch.distributed`` when it is initialized): disjoint shares, equal batch counts.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int | None = _DEFAULT,
        shuffle: bool | None = None,
        sampler: Any = None,
        batch_sampler: Any = None,
        num_workers: int = 0,
        collate_fn: Callable | None = None,
        pin_memory: bool = False,
        drop_last: bool = False,
        timeout: float = 0,
        worker_init_fn: Callable[[int], None] | None = None,
        multiprocessing_context: Any = None,
        generator: torch.Generator | None = None,
        *,
        prefetch_factor: int | None = None,
        persistent_workers: bool = False,
        pin_memory_device: str = "",
        in_order: bool = True,
        device: str | torch.device | None = None,
        progress: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if batch_size is _DEFAULT:
            batch_size = None if isinstance(dataset, QueueFlowDataset) else 1
        self.device = torch.device(device) if device is not None else None
        if self.device is not None and self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device={device!r} but CUDA is not available: use device=None or 'cpu'")
        sampler = self._distributed(dataset, sampler, batch_sampler, shuffle, drop_last, generator, rank, world_size)
        if sampler is not None and shuffle is not None and isinstance(sampler, DistributedSampler):
            shuffle = None  # the distributed sampler shuffles
        # A real DataLoader checks the arguments and builds the samplers and collate_fn.
        self._torch = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            batch_sampler=batch_sampler,
            num_workers=num_workers,
            collate_fn=collate_fn,
            pin_memory=pin_memory,
            drop_last=drop_last,
            timeout=timeout,
            worker_init_fn=worker_init_fn,
            multiprocessing_context=multiprocessing_context,
            generator=generator,
            prefetch_factor=prefetch_factor,
            persistent_workers=persistent_workers,
            pin_memory_device=pin_memory_device,
            in_order=in_order,
        )
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.generator = generator
        self.persistent_workers = persistent_workers
        self.progress = progress
        self.epoch = 0
        self._iterations = 0
        self._resume: dict[str, Any] | None = None
        self._yielded = 0
        self._epoch_batches: list[Any] = []
        self._generator_state: torch.Tensor | None = None
        self._base_seed: int | None = None
        self._sequence: Sequence | None = None
        self._warned_pin = False
        self._fetch = Fetch(
            dataset,
            self._torch._auto_collation,
            self._torch.collate_fn,
            self._torch.drop_last,
            self._torch.worker_init_fn,
        )
        self._epochs_sent = 0  # epochs handed to the workers, guesses included (``Job.epoch``)
        self._epoch_step = EpochStep(self._torch._index_sampler)
        self._ahead: Guess | None = None  # the guessed next epoch, queued behind the current one

    @staticmethod
    def _distributed(
        dataset: Any,
        sampler: Any,
        batch_sampler: Any,
        shuffle: bool | None,
        drop_last: bool,
        generator: Any,
        rank: int | None,
        world_size: int | None,
    ) -> Any:
        if rank is None and world_size is None:
            if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
                return sampler
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if rank is None or world_size is None:
            raise ValueError("give both rank= and world_size=, or neither")
        if isinstance(dataset, IterableDataset) or sampler is not None or batch_sampler is not None:
            return sampler
        seed = int(generator.initial_seed()) if generator is not None else 0
        return DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=bool(shuffle), seed=seed, drop_last=drop_last
        )

    # -- DataLoader's surface ------------------------------------------------------------------

    def __len__(self) -> int:
        """Batches per epoch, as ``len(DataLoader)``; ``TypeError`` over a ``QueueFlowDataset``."""
        if isinstance(self.dataset, QueueFlowDataset):
            raise TypeError("the length of a QueueFlowDataset's output is not known ahead")
        return len(self._torch)

    @property
    def sampler(self) -> Any:
        """The sampler, as ``DataLoader.sampler`` (a ``DistributedSampler`` under ranks)."""
        return self._torch.sampler

    @property
    def batch_sampler(self) -> Any:
        """The batch sampler, as ``DataLoader.batch_sampler`` (``None`` without batching)."""
        return self._torch.batch_sampler

    @property
    def collate_fn(self) -> Any:
        """The collate function, as ``DataLoader.collate_fn``."""
        return self._torch.collate_fn

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle deterministically for ``epoch`` (passed to the sampler and dataset that take it)."""
        self.epoch = epoch
        for target in (self._torch.sampler, self._torch.batch_sampler, self.dataset):
            set_target_epoch = getattr(target, "set_epoch", None)
            if callable(set_target_epoch):
                set_target_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        """The batches of one epoch (the rest of it after ``load_state_dict``)."""
        if isinstance(self.dataset, QueueFlowDataset):
            batches = self._iter_pipeline()
        elif isinstance(self.dataset, IterableDataset):
            batches = iter(self._torch)
        else:
            batches = self._iter_map_style()
        if self.pin_memory and not torch.cuda.is_available() and not self._warned_pin:
            self._warned_pin = True
            warnings.warn(
                "'pin_memory' argument is set as true but no accelerator is found, "
                "then device pinned memory won't be used.",
                stacklevel=2,
            )
        pin = self.pin_memory and torch.cuda.is_available()
        if pin or (self.device is not None and self.device.type == "cuda"):
            batches = _device.in_background(batches, _device.prepare(pin, self.device))
        elif self.device is not None:
            batches = (_device.move(batch, self.device) for batch in batches)
        if self.progress:
            batches = _with_progress(batches, self._length_or_none())
        return batches

    def _length_or_none(self) -> int | None:
        try:
            return len(self)
        except TypeError:
            return None

    def _iter_pipeline(self) -> Iterator[Any]:
        dataset: QueueFlowDataset = self.dataset
        outputs = iter(dataset)
        if self.batch_size is None:
            yield from outputs
            return
        batch: list[Any] = []
        for item in outputs:
            batch.append(item)
            if len(batch) == self.batch_size:
                yield self._torch.collate_fn(batch)
                batch = []
        if batch and not self._torch.drop_last:
            yield self._torch.collate_fn(batch)

    def _new_epoch(self, ahead: Guess | None) -> bool:
        """Draw from the generator as DataLoader's iterator does, and fix this epoch's index batches.

        Returns whether they are ``ahead``'s, the epoch guessed (and queued) when the last one began.
        """
        self._epoch_step.started()
        if self._resume is not None:
            state, self._resume = self._resume, None
            self._base_seed, self._epoch_batches, self._yielded = state["base_seed"], state["batches"], state["yielded"]
            if state["generator"] is not None and self.generator is not None:
                self.generator.set_state(state["generator"])
            return False
        if self._base_seed is None or not self.persistent_workers:
            self._base_seed = int(torch.empty((), dtype=torch.int64).random_(generator=self.generator).item())
        guessed = ahead is not None and ahead.take()
        if guessed:
            assert ahead is not None and ahead.batches is not None
            self._epoch_batches = ahead.batches
        else:
            self._epoch_batches = list(self._torch._index_sampler)
        self._yielded = 0
        self._generator_state = self.generator.get_state() if self.generator is not None else None
        return guessed

    def _iter_map_style(self) -> Iterator[Any]:
        if not self.persistent_workers:
            self._drop_workers()  # DataLoader starts new workers (with the dataset as it is now) every epoch
        ahead, self._ahead = self._ahead, None
        guessed = self._new_epoch(ahead)
        if self.num_workers == 0:
            outputs: Iterator[Any] = (self._fetch(job) for job in self._jobs(self._epoch_batches[self._yielded :]))
        else:
            outputs = self._epoch_outputs(ahead, guessed)
        try:
            for batch in outputs:
                self._yielded += 1
                yield batch
        except GeneratorExit:  # the epoch was left before its end (Lightning stops at len(loader) batches)
            if not self.persistent_workers:
                self._drop_workers()
            raise  # persistent workers stay: the next epoch cancels what is left of this one
        except BaseException as exc:
            self._drop_workers()  # a failed pipeline is closed: the next epoch starts a new one
            if isinstance(exc, TimeoutError):
                raise RuntimeError(f"DataLoader timed out after {self._torch.timeout} seconds") from exc
            raise
        if not self.persistent_workers:
            self._drop_workers()

    def _jobs(self, batches: list[Any], rewind: int | None = None) -> list[Job]:
        """One epoch's fetch jobs, under a new epoch number."""
        assert self._base_seed is not None
        self._epochs_sent += 1
        return [Job(self._base_seed, self._epochs_sent, rewind, indices) for indices in batches]

    def _epoch_outputs(self, ahead: Guess | None, guessed: bool) -> _EpochIterator:
        """This epoch's batches from the workers: the guessed epoch if it was right, else fetched now.

        With persistent workers the following epoch is guessed and queued behind this one (see
        ``_lookahead``), so the workers run from this epoch's last batch into the next one's first.
        """
        sequence = self._pipeline()
        if ahead is not None:
            epoch = iter(sequence)  # the guessed epoch's outputs, queued behind the previous epoch
        if not guessed:  # iterating the new epoch cancels a wrong guess
            if ahead is not None:
                logger.debug("the epoch guessed ahead is not the one drawn now: it is cancelled")
            rewind = ahead.number if ahead is not None else None
            sequence.queue_iterable(self._jobs(self._epoch_batches[self._yielded :], rewind))
            epoch = iter(sequence)
        if self.persistent_workers and predictable(self._torch._index_sampler):
            self._epochs_sent += 1
            base_seed, number = self._base_seed, self._epochs_sent
            assert base_seed is not None
            self._ahead = Guess(
                number,
                self._torch._index_sampler,
                self._epoch_step.step,
                lambda indices: Job(base_seed, number, None, indices),
            )
            sequence.queue_iterable(self._ahead.jobs())
        epoch.timeout = self._torch.timeout or None
        return epoch

    def _pipeline(self) -> Sequence:
        if self._sequence is None:
            prefetch = (self._torch.prefetch_factor or 2) * self.num_workers
            self._sequence = Sequence(
                # in order: batch k to worker k % num_workers, each worker in order, as DataLoader does
                ProcessStep(self._fetch, self.num_workers, name="fetch", round_robin=self._torch.in_order),
                Queue(max(prefetch, 1)),
                ordered=self._torch.in_order,
                context=self._torch.multiprocessing_context,
                name="QueueFlowLoader",
            )
        return self._sequence

    def _drop_workers(self) -> None:
        if self._sequence is not None:
            self._sequence.close()
        self._sequence, self._ahead = None, None

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Where this epoch stands: resuming yields exactly the batches not yet yielded."""
        return {
            "epoch": self.epoch,
            "base_seed": self._base_seed,
            "batches": list(self._epoch_batches),
            "yielded": self._yielded,
            "generator": self._generator_state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state_dict()``: the next iteration continues that epoch without refetching its start."""
        self.set_epoch(state["epoch"])
        if state["batches"] and state["yielded"] < len(state["batches"]):
            self._resume = dict(state)

    def close(self) -> None:
        """Stop the worker processes (they also stop when the loader is garbage collected)."""
        self._drop_workers()


def _with_progress(batches: Iterator[Any], total: int | None) -> Iterator[Any]:
    from tqdm.auto import tqdm

    with tqdm(batches, total=total, unit="batch") as bar:
        yield from bar
