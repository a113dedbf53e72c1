"""Synthetic calorimeter data and the per-event work of the seed example.

An event is a 51 x 51 x 25 float32 energy image in which a few percent of the
cells are hit (a particle shower), plus the particle's ``energy``. Turning an
event into a graph (nodes: hit cells; edges: neighbouring hit cells) is the
"heavy preprocessing" every sample needs.

All functions are at module level so that spawned workers can import them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from itertools import product
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info
from torch_geometric.data import Batch, Data

from torchqueue.sources import H5Chunks, read_h5_chunk

SHAPE = (51, 51, 25)
IMAGE_KEY, ENERGY_KEY = "ECAL", "energy"
_OFFSETS = np.array([d for d in product((-1, 0, 1), repeat=3) if d != (0, 0, 0)], dtype=np.int64)

Chunk = tuple[str, int, int]


def _shower(rng: np.random.Generator, energy: float) -> np.ndarray:
    """One event image: hits around a random axis, deposits falling off laterally and in depth."""
    image = np.zeros(SHAPE, dtype=np.float32)
    hits = int(rng.integers(900, 2200))
    centre = rng.normal((SHAPE[0] - 1) / 2, 3.0, size=2)
    depth = np.clip(rng.gamma(3.0, 2.5, size=hits), 0, SHAPE[2] - 1)
    spread = 1.0 + depth / 6.0
    i = np.clip(np.rint(rng.normal(centre[0], spread)), 0, SHAPE[0] - 1).astype(np.int64)
    j = np.clip(np.rint(rng.normal(centre[1], spread)), 0, SHAPE[1] - 1).astype(np.int64)
    k = np.rint(depth).astype(np.int64)
    deposits = rng.exponential(energy / hits, size=hits).astype(np.float32)
    np.add.at(image, (i, j, k), deposits)
    return image


def generate_dataset(
    directory: str | os.PathLike[str], n_files: int = 4, events_per_file: int = 500, seed: int = 0
) -> list[str]:
    """Write ``n_files`` HDF5 files of ``events_per_file`` events (skipped when they exist)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(n_files):
        path = directory / f"calo_{index:03d}.h5"
        paths.append(str(path))
        if path.exists():
            with h5py.File(path, "r") as existing:
                if IMAGE_KEY in existing and existing[IMAGE_KEY].shape == (events_per_file, *SHAPE):
                    continue
        rng = np.random.default_rng((seed, index))
        tmp = path.with_suffix(".tmp")
        with h5py.File(tmp, "w") as out:
            images = out.create_dataset(
                IMAGE_KEY, shape=(events_per_file, *SHAPE), dtype="float32", chunks=(1, *SHAPE), compression="lzf"
            )
            energies = rng.uniform(10.0, 100.0, size=events_per_file).astype(np.float32)
            for event in range(events_per_file):
                images[event] = _shower(rng, float(energies[event]))
            out.create_dataset(ENERGY_KEY, data=energies)
        tmp.replace(path)
    return paths


def read_chunk(chunk: Chunk) -> list[tuple[np.ndarray, float]]:
    """The events of one ``(file, start, stop)`` chunk as ``(image, energy)`` pairs."""
    arrays = read_h5_chunk(chunk, keys=[IMAGE_KEY, ENERGY_KEY])
    return list(zip(arrays[IMAGE_KEY], arrays[ENERGY_KEY].tolist()))


def event_to_graph(event: tuple[np.ndarray, float]) -> Data:
    """Nodes: hit cells (x = energy and normalised position); edges: hit cells that touch (26-neighbourhood)."""
    image, energy = event
    coords = np.argwhere(image > 0)
    n = len(coords)
    index = np.full(SHAPE, -1, dtype=np.int64)
    index[tuple(coords.T)] = np.arange(n)
    neighbours = coords[:, None, :] + _OFFSETS[None, :, :]
    inside = np.all((neighbours >= 0) & (neighbours < np.array(SHAPE)), axis=2)
    clipped = np.where(inside[..., None], neighbours, 0)
    target = np.where(inside, index[clipped[..., 0], clipped[..., 1], clipped[..., 2]], -1)
    source = np.broadcast_to(np.arange(n)[:, None], target.shape)
    hit = target >= 0
    edge_index = np.stack([source[hit], target[hit]])
    scale = np.array(SHAPE, dtype=np.float32) - 1
    pos = coords.astype(np.float32) / scale
    deposits = image[tuple(coords.T)][:, None]
    return Data(
        x=torch.from_numpy(np.concatenate([deposits, pos], axis=1)),
        pos=torch.from_numpy(pos),
        edge_index=torch.from_numpy(edge_index),
        y=torch.tensor([energy], dtype=torch.float32),
    )


def collate(graphs: list[Data]) -> Batch:
    return Batch.from_data_list(graphs)


def chunk_to_graphs(chunk: Chunk) -> list[Data]:
    """``read_chunk`` and ``event_to_graph`` in one step (the fused shape of the benchmarks)."""
    return [event_to_graph(event) for event in read_chunk(chunk)]


def chunk_to_batch(chunk: Chunk) -> Batch:
    """One chunk read, turned into graphs and collated: one map per chunk (its batch is the chunk)."""
    return collate(chunk_to_graphs(chunk))


class EventDataset(Dataset):
    """Map-style baseline: one event per ``__getitem__``, the file opened lazily in each worker."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        lengths = H5Chunks(paths, length_key=ENERGY_KEY).lengths
        self.index = [(path, i) for path, length in zip(paths, lengths) for i in range(length)]
        self._files: dict[str, h5py.File] = {}

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> Data:
        path, i = self.index[item]
        if path not in self._files:
            self._files[path] = h5py.File(path, "r")
        f = self._files[path]
        return event_to_graph((f[IMAGE_KEY][i], float(f[ENERGY_KEY][i])))


class ChunkBatches(Dataset):
    """Map-style baseline, DataLoader's fastest here (``batch_size=None``): one chunk per ``__getitem__``,
    read, turned into graphs and collated. Its batches are the chunks, not batches of a chosen size."""

    def __init__(self, chunks: list[Chunk]) -> None:
        self.chunks = chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, item: int) -> Batch:
        return chunk_to_batch(self.chunks[item])


class ChunkDataset(IterableDataset):
    """Iterable baseline: each DataLoader worker reads whole chunks of its share and batches them."""

    def __init__(self, chunks: list[Chunk], batch_size: int) -> None:
        self.chunks = chunks
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        mine = self.chunks if info is None else self.chunks[info.id :: info.num_workers]
        pending: list[Data] = []
        for chunk in mine:
            pending.extend(event_to_graph(event) for event in read_chunk(chunk))
            while len(pending) >= self.batch_size:
                yield collate(pending[: self.batch_size])
                pending = pending[self.batch_size :]
        if pending:
            yield collate(pending)
