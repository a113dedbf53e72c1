"""Every rank's share of a loader's data: disjoint, and the same count on every rank.

With ``rank=`` and ``world_size=`` (or an initialized ``torch.distributed``) a ``QueueFlowLoader``
gives its rank one share, as Lightning's ``DistributedSampler`` / ``DistributedSamplerWrapper`` do:

- no sampler: a ``DistributedSampler`` over the dataset (shuffled when ``shuffle=True``, seeded
  as Lightning seeds its own, ``order_seed``);
- a ``DistributedSampler``: taken as it is (it is a share already);
- another sampler: ``ShardedSampler``, the rank's share of the sampler's indices;
- a batch sampler: ``ShardedBatchSampler``, the rank's share of its batches;
- a ``QueueFlowDataset``: ``shard_chunks``, the rank's share of the epoch's chunks, unless its source
  shares them out itself (``shared_out_by``: ``H5Chunks`` under ``torch.distributed``); and, where
  the dataset has a ``length=``, exactly ``length`` outputs on every rank (``equal_outputs``).

A share takes every ``world_size``-th item from position ``rank``, after padding the list by
repeating it from its start up to a multiple of ``world_size`` (or trimming it to one, with
``drop_last=True``), as ``DistributedSampler`` does. Every rank must see the same list: the same
sampler and generator seed, the same chunks. Other iterable datasets are the user's to split, as
with DataLoader.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import torch
from torch.utils.data import DistributedSampler, IterableDataset, Sampler

from torchqueue._runtime import _user_stacklevel


class Shard(NamedTuple):
    rank: int
    world_size: int


def shard(rank: int | None, world_size: int | None) -> Shard | None:
    """This process's shard: from the arguments, else from an initialized ``torch.distributed``, else none."""
    if rank is None and world_size is None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return None
        rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if rank is None or world_size is None:
        raise ValueError("give both rank= and world_size=, or neither")
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return Shard(rank, world_size)


def samplers(
    dataset: Any,
    sampler: Any,
    batch_sampler: Any,
    shuffle: bool | None,
    drop_last: bool,
    generator: torch.Generator | None,
    where: Shard | None,
) -> tuple[Any, Any, bool | None]:
    """``(sampler, batch_sampler, shuffle)`` for DataLoader, giving this rank its share."""
    if where is None or isinstance(dataset, IterableDataset):
        return sampler, batch_sampler, shuffle
    rank, world_size = where
    if batch_sampler is not None:
        return sampler, ShardedBatchSampler(batch_sampler, rank, world_size), shuffle
    if isinstance(sampler, DistributedSampler):
        return sampler, batch_sampler, shuffle
    if sampler is not None:
        return ShardedSampler(sampler, rank, world_size, drop_last), batch_sampler, shuffle
    distributed: DistributedSampler = DistributedSampler(
        dataset,
        num_replicas=world_size,
        rank=rank,
        shuffle=bool(shuffle),
        seed=order_seed(generator),
        drop_last=drop_last,
    )
    return distributed, batch_sampler, None  # the distributed sampler shuffles


def order_seed(generator: torch.Generator | None) -> int:
    """The seed of the ``DistributedSampler`` a loader makes for its rank: Lightning's where it set one
    (``seed_everything``: ``PL_GLOBAL_SEED``, which the ``DistributedSampler`` Lightning puts into a
    DataLoader takes), else the generator's initial seed, else 0 (``DistributedSampler``'s default)."""
    lightning = os.environ.get("PL_GLOBAL_SEED")
    if lightning is not None:
        with contextlib.suppress(ValueError):
            return int(lightning)
    return int(generator.initial_seed()) if generator is not None else 0


def shared_out_by(source: Any, where: Shard) -> bool:
    """Whether ``source`` (a ``QueueFlowDataset``'s) gives this rank its share itself, as ``H5Chunks`` does
    under ``torch.distributed`` or given ``rank=``: then the loader takes its chunks as they are (sharing
    them out again would leave each rank ``1 / world_size`` of its share). A source that shares out for
    another rank or world size raises."""
    rank, world_size = getattr(source, "rank", None), getattr(source, "world_size", None)
    if type(world_size) is not int or world_size <= 1:
        return False
    if (rank, world_size) != tuple(where):
        raise ValueError(
            f"the QueueFlowDataset's source gives rank {rank} of {world_size} its share, and this loader is rank "
            f"{where.rank} of {where.world_size}: give the two the same rank and world size (or neither, under "
            "torch.distributed)"
        )
    return True


def share(items: list[Any], rank: int, world_size: int, drop_last: bool) -> list[Any]:
    """Every ``world_size``-th item from ``rank``, after padding (or trimming) as the module docstring says."""
    total = per_rank(len(items), world_size, drop_last) * world_size
    if total > len(items):
        items = items + [items[i % len(items)] for i in range(total - len(items))]
    return items[rank:total:world_size]


def per_rank(count: int, world_size: int, drop_last: bool) -> int:
    """How many of ``count`` items each rank gets."""
    return count // world_size if drop_last else -(-count // world_size)


class ShardedSampler(Sampler[int]):
    """One rank's share of another sampler's indices (Lightning's ``DistributedSamplerWrapper``)."""

    def __init__(self, sampler: Sampler, rank: int, world_size: int, drop_last: bool = False) -> None:
        self.sampler, self.rank, self.world_size, self.drop_last = sampler, rank, world_size, drop_last

    def __iter__(self) -> Iterator[int]:
        return iter(share(list(self.sampler), self.rank, self.world_size, self.drop_last))

    def __len__(self) -> int:
        return per_rank(len(self.sampler), self.world_size, self.drop_last)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        """Passed to the wrapped sampler, if it takes it."""
        if callable(getattr(self.sampler, "set_epoch", None)):
            self.sampler.set_epoch(epoch)  # type: ignore[attr-defined]


class ShardedBatchSampler(Sampler[list[int]]):
    """One rank's share of a batch sampler's batches (whole batches, padded by repeating the first)."""

    def __init__(self, batch_sampler: Any, rank: int, world_size: int) -> None:
        self.batch_sampler, self.rank, self.world_size = batch_sampler, rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        return iter(share(list(self.batch_sampler), self.rank, self.world_size, False))

    def __len__(self) -> int:
        return per_rank(len(self.batch_sampler), self.world_size, False)

    def set_epoch(self, epoch: int) -> None:
        """Passed to the wrapped batch sampler (and its sampler), if they take it."""
        for target in (self.batch_sampler, getattr(self.batch_sampler, "sampler", None)):
            set_target_epoch = getattr(target, "set_epoch", None)
            if callable(set_target_epoch):
                set_target_epoch(epoch)


def shard_chunks(chunks: Iterable[Any], rank: int, world_size: int, drop_last: bool) -> Iterator[Any]:
    """One rank's share of an epoch's chunks, read lazily (memory: ``2 * world_size`` chunks at most).

    Chunk ``p`` goes to rank ``p % world_size``. A last, incomplete round is completed with the
    epoch's first chunks, as ``DistributedSampler`` pads (or dropped, with ``drop_last``), so that
    every rank gets as many chunks. A rank's chunk is handed on once its round is complete.
    """
    head: list[Any] = []  # the first chunks, for padding
    mine: list[Any] = []  # this rank's chunk of the round being read
    count = 0
    for chunk in chunks:
        if count < world_size:
            head.append(chunk)
        if count % world_size == rank:
            mine.append(chunk)
        count += 1
        if count % world_size == 0:
            yield from mine
            mine = []
    last = count % world_size
    if last == 0 or drop_last:
        return
    if mine:
        yield from mine
    else:
        yield head[(rank - last) % count]


def equal_outputs(
    first: Iterator[Any], passes: Callable[[], Iterator[Any]], length: int | None, given: int = 0
) -> Iterator[Any]:
    """A rank's outputs of one epoch over a ``QueueFlowDataset``: exactly ``length`` (the dataset's
    ``length=``, this rank's outputs), so that every rank makes as many batches and no collective waits.

    ``first`` is a pass over the rank's chunks; ``passes()`` begins another. A pass that yields more is cut
    at ``length`` (the rest of it cancelled); one that yields fewer is followed by another pass over the
    same chunks, as ``DistributedSampler`` pads a share by repeating it, until ``length`` came. Either
    warns: the length is not what the pipeline yields. A pass that yields nothing short of ``length``
    raises ``RuntimeError``: nothing to pad with. Without a ``length`` the outputs go as they come.
    ``given``: the outputs the epoch gave before ``first`` (a resumed one's: its batches times the batch
    size, which counts a short last batch whole), and ``first`` the rest of its first pass."""
    if length is None:
        yield from first
        return
    outputs, resumed = first, given > 0
    while True:
        begun = given
        first_pass = outputs is first
        try:
            for output in outputs:
                if given >= length:  # more than it: a resumed epoch whose last batch was short
                    if first_pass:  # a pass that pads is cut at the length: as it should be
                        warnings.warn(
                            f"this rank's pipeline yields more than the {length} outputs its QueueFlowDataset's "
                            "length= says: the epoch is cut there, so that every rank makes as many batches; "
                            "give the dataset this rank's length",
                            stacklevel=_user_stacklevel(),
                        )
                    return
                yield output
                given += 1
        finally:
            close = getattr(outputs, "close", None)
            if close is not None:
                close()  # a pass cut short: its epoch is cancelled
        if given >= length:
            return
        if given == begun and not (first_pass and resumed):  # an empty pass: nothing to repeat, and a rank short
            # of its batches stalls the others (the rest of a resumed first pass may be empty)
            why = (
                "its chunks gave none"
                if begun == 0
                else "its chunks read again gave none (a source that is an iterator is used up: give a list or a "
                "source(epoch))"
            )
            raise RuntimeError(
                f"this rank's pipeline yielded {given} of the {length} outputs its QueueFlowDataset's length= "
                f"says, and {why}: nothing to pad with. Every rank must make as many batches, or the others wait "
                "for it in their collectives: see what this rank's share of the chunks yields"
            )
        if first_pass:
            warnings.warn(
                f"this rank's pipeline yielded {given} of the {length} outputs its QueueFlowDataset's length= "
                "says: its chunks are read again from the start for the rest, so that every rank makes as many "
                "batches; give the dataset this rank's length",
                stacklevel=_user_stacklevel(),
            )
        outputs = passes()
