"""Epoch chunk plans over HDF5 files: ``H5Chunks`` and ``read_h5_chunk``.

The planner never holds a file open: it opens each file once, briefly, for
the length of ``length_key``, and remembers it in a small JSON cache (next to
the data, or in ``cache_dir``) keyed by path, size and modification time, so
a changed file is read again. Per epoch it hands out ``(file, start, stop)``
chunks; the worker that reads a chunk opens the file itself
(``read_h5_chunk``), so no h5py handle ever crosses a process boundary::

    chunks = H5Chunks("data/*.h5", length_key="energy", chunk_size=1000, seed=0)
    for epoch in range(10):
        for batch in seq(chunks(epoch)):   # the pipeline's first step calls read_h5_chunk
            ...
"""

from __future__ import annotations

import glob
import json
import logging
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from torchqueue._sharding import per_rank, shard, share

__all__ = ["H5Chunks", "collate_graphs", "read_h5_chunk", "read_h5_events"]

logger = logging.getLogger("torchqueue")

Chunk = tuple[str, int, int]
_CACHE_NAME = ".torchqueue-lengths.json"


def _h5py() -> Any:
    try:
        import h5py
    except ImportError as exc:  # an optional dependency
        raise ImportError("torchqueue.sources needs h5py: pip install 'torchqueue[hdf5]'") from exc
    return h5py


def _expand(files: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    if isinstance(files, (str, os.PathLike)):
        pattern = os.fspath(files)
        if glob.has_magic(pattern):
            paths = sorted(glob.glob(pattern))
            if not paths:
                raise ValueError(f"no file matches {pattern!r}")
            return [os.path.abspath(p) for p in paths]
        files = [pattern]
    paths = [os.path.abspath(os.fspath(f)) for f in files]
    if not paths:
        raise ValueError("H5Chunks needs at least one file")
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"HDF5 file not found: {path}")
    return paths


def _check_int(value: object, what: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")


class _LengthCache:
    """``{path: {size, mtime_ns, key, length}}`` in one JSON file per directory (or in ``cache_dir``)."""

    def __init__(self, cache_dir: str | None) -> None:
        self._cache_dir = cache_dir

    def _file_for(self, path: str) -> Path:
        return Path(self._cache_dir or os.path.dirname(path)) / _CACHE_NAME

    def lengths(self, paths: list[str], key: str) -> list[int]:
        h5py = _h5py()
        loaded: dict[Path, dict[str, Any]] = {}
        out = []
        for path in paths:
            cache_file = self._file_for(path)
            if cache_file not in loaded:
                loaded[cache_file] = _read_json(cache_file)
            entries = loaded[cache_file]
            stat = os.stat(path)
            entry = entries.get(path)
            fresh = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "key": key}
            if entry and all(entry.get(k) == v for k, v in fresh.items()):
                out.append(entry["length"])
                continue
            with _open_h5(h5py, path) as f:
                if key not in f:
                    raise KeyError(f"key {key!r} not found in {path}")
                length = len(f[key])
            entries[path] = {**fresh, "length": length}
            out.append(length)
            _write_json(cache_file, entries)
        return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, entries: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries))
        tmp.replace(path)
    except OSError as exc:  # a read-only data directory: no cache, no harm
        logger.debug("cannot write the length cache %s: %s", path, exc)


class H5Chunks:
    """Per-epoch ``(file, start, stop)`` chunks over HDF5 files, shuffled and sharded.

    Args:
        files: A path, a glob pattern, or a list of paths.
        length_key: The dataset whose length is the number of events of a file.
        chunk_size: Events per chunk; the last chunk of a file may be shorter.
        shuffle: Shuffle the chunk order, differently per epoch, the same for every rank.
        seed: Seed of the shuffle.
        rank, world_size: This process's share; default: ``torch.distributed`` when it is
            initialized, else the whole plan.
        drop_last: Trim the plan to a multiple of ``world_size`` instead of padding it by
            repeating chunks from its start (as ``DistributedSampler`` pads).
        cache_dir: Where to keep the length cache (default: next to each file).
        keys: Datasets that must exist in every file with the same per-event shape.

    Raises:
        ValueError: No files, ``chunk_size < 1``, a bad rank, or shapes that differ between files.
        FileNotFoundError: A file is missing (named).
        KeyError: ``length_key`` or one of ``keys`` is missing in a file (named).
    """

    def __init__(
        self,
        files: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        length_key: str,
        chunk_size: int = 1000,
        shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
        keys: Sequence[str] | None = None,
    ) -> None:
        _check_int(chunk_size, "chunk_size", 1)
        _check_int(seed, "seed", 0)
        self.files = _expand(files)
        self.length_key = length_key
        self.chunk_size = chunk_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank, self.world_size = shard(rank, world_size) or (0, 1)
        self._cache = _LengthCache(os.fspath(cache_dir) if cache_dir is not None else None)
        self._plan_files()
        if keys:
            _check_keys(self.files, _key_list(keys))

    def _plan_files(self) -> None:
        """Each file's length (from the cache where the file is unchanged) and the chunks that cover them."""
        self._stamps = _stamps(self.files)
        self.lengths = self._cache.lengths(self.files, self.length_key)
        self._plan = [
            (path, start, min(start + self.chunk_size, length))
            for path, length in zip(self.files, self.lengths)
            for start in range(0, length, self.chunk_size)
        ]

    def _replan_if_changed(self) -> None:
        """A file written since the plan was made (another size or mtime) has its length read again: a
        shorter one would otherwise be read as far as it goes, its missing events dropped without a word."""
        stamps = _stamps(self.files)
        if stamps != self._stamps:
            changed = [path for path, old, new in zip(self.files, self._stamps, stamps) if old != new]
            logger.info("H5Chunks: %d file(s) changed since planned, lengths read again: %s", len(changed), changed[:3])
            self._plan_files()

    @property
    def events(self) -> int:
        """Events in all files (each counted once)."""
        self._replan_if_changed()
        return sum(self.lengths)

    def __len__(self) -> int:
        """Chunks per epoch for this rank."""
        self._replan_if_changed()
        return per_rank(len(self._plan), self.world_size, self.drop_last)

    def __call__(self, epoch: int = 0) -> list[Chunk]:
        """This rank's chunks for ``epoch``, over the files as they are now (a file written since is
        planned again)."""
        self._replan_if_changed()
        plan = list(self._plan)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(plan))
            plan = [plan[i] for i in order]
        return share(plan, self.rank, self.world_size, self.drop_last)

    def __repr__(self) -> str:
        return (
            f"H5Chunks({len(self.files)} files, {self.events} events, chunk_size={self.chunk_size}, "
            f"rank {self.rank} of {self.world_size}, {len(self)} chunks per epoch)"
        )


def _stamps(paths: list[str]) -> list[tuple[int, int]]:
    """``(size, mtime_ns)`` of each file; a missing one raises ``FileNotFoundError`` naming it."""
    stamps = []
    for path in paths:
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"HDF5 file not found: {path} (it was there when H5Chunks was made)") from None
        stamps.append((stat.st_size, stat.st_mtime_ns))
    return stamps


def _open_h5(h5py: Any, path: str) -> Any:
    """``h5py.File(path, "r")``, whose error names the file (h5py's says only "file signature not found")."""
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        reason = "it is not an HDF5 file" if "signature" in str(exc) else "it cannot be opened"
        raise _renamed(exc, f"{path}: {reason} ({exc})") from exc


def _renamed(exc: OSError, message: str) -> OSError:
    """``exc`` (h5py's, which names no file) again with ``message``, its errno kept (so its subclass)."""
    return OSError(exc.errno, message) if exc.errno else OSError(message)


def _check_keys(paths: list[str], keys: list[str]) -> None:
    h5py = _h5py()
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in paths:
        with _open_h5(h5py, path) as f:
            for key in keys:
                if key not in f:
                    raise KeyError(f"key {key!r} not found in {path}")
                shape = tuple(f[key].shape[1:])
                if key in shapes and shapes[key][0] != shape:
                    first_shape, first_path = shapes[key]
                    raise ValueError(
                        f"key {key!r} has per-event shape {shape} in {path} but {first_shape} in {first_path}"
                    )
                shapes.setdefault(key, (shape, path))


def read_h5_chunk(chunk: Chunk, keys: Sequence[str], permute_seed: int | None = None) -> dict[str, np.ndarray]:
    """The events ``start:stop`` of ``file`` for each key: one contiguous read per key.

    Opens the file in the calling process and closes it before returning. With
    ``permute_seed``, the events come in an order shuffled by that seed and the chunk (the same
    permutation for every key), for shuffling within chunks on top of ``H5Chunks``'s chunk order.
    """
    path, start, stop = chunk
    keys = _key_list(keys)
    h5py = _h5py()
    with _open_h5(h5py, path) as f:
        out = {}
        for key in keys:
            if key not in f:
                raise KeyError(f"key {key!r} not found in {path}")
            try:
                out[key] = f[key][start:stop]
            except OSError as exc:  # a damaged block: h5py's error names neither the file nor the events
                raise _renamed(exc, f"{path}: cannot read {key!r}[{start}:{stop}] ({exc})") from exc
    if (
        permute_seed is not None
    ):  # one order for all keys; a chunk reaching past the end is as short as slicing makes it
        seed = [permute_seed, start, stop, zlib.crc32(path.encode())]
        out = {key: value[np.random.default_rng(seed).permutation(len(value))] for key, value in out.items()}
    return out


def read_h5_events(chunk: Chunk, keys: Sequence[str], permute_seed: int | None = None) -> list[dict[str, Any]]:
    """The events of a chunk as one dict per event (``{key: value}``), read as ``read_h5_chunk`` reads
    (a chunk reaching past the end of its file has the events the file has)."""
    arrays = read_h5_chunk(chunk, keys, permute_seed)
    lengths = {key: len(value) for key, value in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"the keys have different numbers of events in {chunk[0]}[{chunk[1]}:{chunk[2]}]: {lengths}")
    return [{key: arrays[key][i] for key in arrays} for i in range(min(lengths.values(), default=0))]


def _key_list(keys: Sequence[str]) -> list[str]:
    """``keys`` as a list; a single string is refused (it would be read letter by letter)."""
    if isinstance(keys, (str, bytes)):
        raise TypeError(f"keys must be a list of dataset names, e.g. [{keys!r}], not the string {keys!r}")
    return list(keys)


def collate_graphs(graphs: list[Any]) -> Any:
    """``torch_geometric.data.Batch.from_data_list(graphs)``: a step function for graph batches."""
    from torch_geometric.data import Batch

    return Batch.from_data_list(graphs)
