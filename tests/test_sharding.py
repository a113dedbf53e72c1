"""Ranks' shares: disjoint but for the padding, the same count on every rank, as DistributedSampler pads."""

from __future__ import annotations

import warnings

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, Dataset, DistributedSampler, RandomSampler, SequentialSampler

import torchqueue as tq
from torchqueue import QueueFlowLoader
from torchqueue._sharding import ShardedSampler, shard, shard_chunks
from torchqueue.sources import H5Chunks, read_h5_chunk

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_leaks")]


class Indices(Dataset):
    def __len__(self) -> int:
        return 11

    def __getitem__(self, i: int) -> int:
        return i


def _distributed_shares(n: int, world_size: int, drop_last: bool) -> list[list[int]]:
    """What DistributedSampler gives each rank over ``range(n)`` without shuffling."""
    return [
        list(DistributedSampler(range(n), world_size, rank, shuffle=False, drop_last=drop_last))
        for rank in range(world_size)
    ]


@pytest.mark.parametrize("n", [0, 1, 2, 5, 6, 7])
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("lazy", [False, True])
def test_chunks_are_shared_as_distributed_sampler_shares_indices(n, world_size, drop_last, lazy):
    expected = _distributed_shares(n, world_size, drop_last) if n else [[] for _ in range(world_size)]
    for rank in range(world_size):
        chunks = (i for i in range(n)) if lazy else list(range(n))  # a generator: read once, never measured
        assert list(shard_chunks(chunks, rank, world_size, drop_last)) == expected[rank]


def test_a_wrapped_sampler_is_shared_as_distributed_sampler_shares_indices():
    for world_size in (2, 3, 4):
        for drop_last in (False, True):
            shares = [ShardedSampler(SequentialSampler(range(11)), r, world_size, drop_last) for r in range(world_size)]
            assert [list(s) for s in shares] == _distributed_shares(11, world_size, drop_last)
            assert {len(s) for s in shares} == {len(list(shares[0]))}


def test_rank_and_world_size_are_checked():
    with pytest.raises(ValueError, match="both"):
        shard(0, None)
    with pytest.raises(ValueError, match="rank"):
        shard(2, 2)
    with pytest.raises(TypeError, match="int"):
        shard(0.0, 2)  # type: ignore[arg-type]
    assert shard(None, None) is None  # torch.distributed is not initialized here


def _shares(world_size: int, **kwargs) -> list[list[list[int]]]:
    """Each rank's batches, as lists of indices."""
    out = []
    for rank in range(world_size):
        arguments = {k: v() if callable(v) else v for k, v in kwargs.items()}
        loader = QueueFlowLoader(Indices(), rank=rank, world_size=world_size, **arguments)
        out.append([batch.tolist() for batch in loader])
        assert len(out[-1]) == len(loader)
        loader.close()
    return out


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_size": 2, "sampler": lambda: SequentialSampler(range(11))},
        {"batch_size": 2, "sampler": lambda: RandomSampler(range(11), generator=torch.Generator().manual_seed(1))},
        {"batch_size": 2, "num_workers": 2, "sampler": lambda: SequentialSampler(range(11))},
        {"batch_sampler": lambda: BatchSampler(SequentialSampler(range(11)), 3, False)},
    ],
)
def test_a_given_sampler_or_batch_sampler_is_shared_among_ranks(kwargs):
    batches = _shares(2, **kwargs)
    assert len(batches[0]) == len(batches[1])  # the same number of batches on every rank
    shares = [[i for batch in rank_batches for i in batch] for rank_batches in batches]
    assert set(shares[0]) | set(shares[1]) == set(range(11))
    overlap = set(shares[0]) & set(shares[1])
    assert len(overlap) <= (3 if "batch_sampler" in kwargs else 1)  # only the padding repeats


def test_a_given_sampler_with_drop_last_is_trimmed_to_equal_disjoint_shares():
    # 11 indices trimmed to 9, 3 per rank; then batches of 2, the last partial one dropped
    shares = _shares(3, batch_size=2, drop_last=True, sampler=lambda: SequentialSampler(range(11)))
    assert shares == [[[0, 3]], [[1, 4]], [[2, 5]]]


def chunks_of(epoch: int):
    yield from ([epoch * 100 + i, epoch * 100 + i + 50] for i in range(5))  # a generator: its length is unknown


def identity(x):
    return x


@pytest.mark.filterwarnings("ignore:a QueueFlowDataset shared out over ranks without length=")
@pytest.mark.parametrize("source", [chunks_of, [[0, 50], [1, 51], [2, 52], [3, 53], [4, 54]]])
def test_a_queueflow_datasets_chunks_are_shared_among_ranks(source):
    dataset = tq.QueueFlowDataset(source, [tq.ProcessStep(identity, 1), tq.UnpackStep()])
    try:
        shares = [list(QueueFlowLoader(dataset, rank=rank, world_size=2)) for rank in range(2)]
        trimmed = [
            [
                batch.tolist()
                for batch in QueueFlowLoader(dataset, batch_size=2, drop_last=True, rank=rank, world_size=2)
            ]
            for rank in range(2)
        ]
    finally:
        dataset.close()
    # chunks 0, 2, 4 to rank 0; 1, 3 and (padding) 0 again to rank 1
    assert shares == [[0, 50, 2, 52, 4, 54], [1, 51, 3, 53, 0, 50]]
    assert trimmed == [[[0, 50], [2, 52]], [[1, 51], [3, 53]]]  # 5 chunks trimmed to 4 (drop_last)


def _event_ids(chunk) -> list[float]:
    return read_h5_chunk(chunk, keys=["energy"])["energy"].tolist()


@pytest.mark.filterwarnings("ignore:a QueueFlowDataset shared out over ranks without length=")
def test_an_h5chunks_source_that_shares_out_for_its_rank_is_not_shared_out_again(tmp_path):
    # before: under torch.distributed H5Chunks took its rank's share, and the loader took every
    # world_size-th chunk of it again: each rank read a quarter of the data, half of it never read
    paths = []
    for index in range(2):
        paths.append(str(tmp_path / f"f{index}.h5"))
        with h5py.File(paths[-1], "w") as f:
            f["energy"] = np.arange(40, dtype=np.float32) + 100 * index
    seen = []
    for rank in range(2):
        chunks = H5Chunks(paths, length_key="energy", chunk_size=10, seed=0, rank=rank, world_size=2)
        dataset = tq.QueueFlowDataset(chunks, [tq.ProcessStep(_event_ids, 1)])
        try:
            loader = QueueFlowLoader(dataset, batch_size=None, rank=rank, world_size=2)
            seen.append(sorted(event for chunk in loader for event in chunk))
        finally:
            dataset.close()
    assert len(seen[0]) == len(seen[1]) == 40 and sorted(seen[0] + seen[1]) == sorted(range(40)) + sorted(
        range(100, 140)
    )
    chunks = H5Chunks(paths, length_key="energy", chunk_size=10, rank=0, world_size=2)
    with pytest.raises(ValueError, match="source gives rank 0 of 2 its share, and this loader is rank 1 of 2"):
        QueueFlowLoader(tq.QueueFlowDataset(chunks, [tq.ProcessStep(_event_ids, 1)]), rank=1, world_size=2)


def _read_events(chunk) -> list[float]:
    return read_h5_chunk(chunk, keys=["energy"])["energy"].tolist()


def _uneven_files(tmp_path) -> list[str]:
    paths = []
    for name, n in (("a.h5", 25), ("b.h5", 8)):  # chunks of 4: the last of each file shorter
        paths.append(str(tmp_path / name))
        with h5py.File(paths[-1], "w") as f:
            f["energy"] = np.arange(n, dtype=np.float32) + (100 if name == "b.h5" else 0)
    return paths


@pytest.mark.parametrize("length", [16, 17, 20])
def test_with_a_length_every_rank_yields_exactly_len_loader_batches_whatever_its_chunks_give(tmp_path, length):
    # before: 9 and 10 batches (17 and 20 events) on the two ranks: a DDP step that one rank never takes
    paths = _uneven_files(tmp_path)
    steps = [tq.ProcessStep(_read_events, 1), tq.UnpackStep()]
    counts, events = [], []
    for rank in range(2):
        dataset = tq.QueueFlowDataset(H5Chunks(paths, "energy", chunk_size=4, shuffle=False), steps, length=length)
        loader = QueueFlowLoader(dataset, batch_size=2, rank=rank, world_size=2)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                epochs = [[batch.tolist() for batch in loader] for _ in range(2)]
        finally:
            loader.close()
        assert epochs[0] == epochs[1]  # the next epoch whole: the pass cut short was cancelled
        counts.append(len(epochs[0]))
        events.append([event for batch in epochs[0] for event in batch])
        if len(events[-1]) != length:  # yielded more or fewer than the length says: said
            said = [w for w in caught if "outputs its QueueFlowDataset's length= says" in str(w.message)]
            assert said and all(w.filename == __file__ for w in said)  # your loop's line, not torchqueue's
    assert counts == [len(loader)] * 2 == [(length + 1) // 2] * 2
    # chunks 0, 2, 4, 6, 8 of 9 (+ chunk 0 again, padding) to rank 0: 17 events; 1, 3, 5, 7, 0 to rank 1: 20
    natural = [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 104, 105, 106, 107]
    assert events[0][: min(length, 17)] == natural[:length]
    if length == 20:  # rank 0's 17 events and 3 of its chunks' again, from their start, as DistributedSampler pads
        assert events[0][17:] == [0.0, 1.0, 2.0]


def _odd_chunks_give_nothing(chunk: int) -> list[int]:
    return [chunk * 10 + i for i in range(3)] if chunk % 2 == 0 else []


def test_a_rank_whose_chunks_give_nothing_raises_rather_than_yield_fewer_batches_than_the_others():
    # before: rank 1 yielded 0 of its 9 batches without a word; under DDP gloo aborted ("Received data size
    # doesn't match expected size") in the collective after the epoch, or the other rank waited forever
    steps = [tq.ProcessStep(_odd_chunks_give_nothing, 1), tq.UnpackStep()]
    dataset = tq.QueueFlowDataset(list(range(6)), steps, length=9)
    try:
        assert len(list(QueueFlowLoader(dataset, rank=0, world_size=2))) == 9
        with pytest.raises(RuntimeError, match="yielded 0 of the 9 outputs .* its chunks gave none: nothing to pad"):
            list(QueueFlowLoader(dataset, rank=1, world_size=2))
    finally:
        dataset.close()


def test_ranks_without_a_length_are_warned_that_their_batch_counts_may_differ():
    dataset = tq.QueueFlowDataset([[1, 2], [3]], [tq.ProcessStep(identity, 1), tq.UnpackStep()])
    try:
        with pytest.warns(UserWarning, match="without length=.*as many batches only if every chunk") as caught:
            assert list(QueueFlowLoader(dataset, rank=0, world_size=2)) == [1, 2]
        assert caught[0].filename == __file__
    finally:
        dataset.close()


def test_under_lightnings_seed_the_ranks_order_is_lightnings(monkeypatch):
    # Lightning's seed_everything(42) sets PL_GLOBAL_SEED, and the DistributedSampler Lightning puts into a
    # DataLoader takes it: before, the loader's own took 0 (or the generator's seed), another order
    monkeypatch.setenv("PL_GLOBAL_SEED", "42")
    loader = QueueFlowLoader(list(range(40)), batch_size=4, shuffle=True, rank=1, world_size=2)
    lightnings = DistributedSampler(list(range(40)), num_replicas=2, rank=1, shuffle=True, seed=42)
    assert [i for batch in loader for i in batch.tolist()] == list(lightnings)
    monkeypatch.delenv("PL_GLOBAL_SEED")
    plain = QueueFlowLoader(list(range(40)), batch_size=4, shuffle=True, rank=1, world_size=2)
    assert [i for batch in plain for i in batch.tolist()] == list(
        DistributedSampler(list(range(40)), num_replicas=2, rank=1, shuffle=True, seed=0)
    )
