"""H5Chunks plans and read_h5_chunk reads, on real HDF5 files."""

from __future__ import annotations

import os
import pickle
from collections import Counter

import h5py
import numpy as np
import pytest

from torchqueue.sources import H5Chunks, collate_graphs, read_h5_chunk, read_h5_events


def write(path, n, width=3, extra=True):
    with h5py.File(path, "w") as f:
        f["energy"] = np.arange(n, dtype=np.float32) + 1000 * int(os.path.basename(path)[1])
        if extra:
            f["image"] = np.ones((n, width), dtype=np.float32)
    return str(path)


@pytest.fixture
def files(tmp_path):
    return [write(tmp_path / f"f{i}.h5", n) for i, n in enumerate([25, 10, 7])]


def events(chunks):
    return Counter((path, i) for path, start, stop in chunks for i in range(start, stop))


def test_every_event_once_in_chunks_that_never_cross_a_file(files):
    plan = H5Chunks(files, length_key="energy", chunk_size=4, shuffle=False)
    chunks = plan(0)
    assert events(chunks) == Counter({(p, i): 1 for p, n in zip(files, [25, 10, 7]) for i in range(n)})
    assert all(0 < stop - start <= 4 for _, start, stop in chunks)
    assert chunks[:7] == [(files[0], s, min(s + 4, 25)) for s in range(0, 25, 4)]
    assert len(plan) == len(chunks) == 7 + 3 + 2 and plan.events == 42


def test_shuffle_is_deterministic_per_seed_and_epoch_and_differs_between_epochs(files):
    a = H5Chunks(files, "energy", chunk_size=2, seed=3)
    b = H5Chunks(files, "energy", chunk_size=2, seed=3)
    assert a(0) == b(0) and a(1) == b(1)
    assert a(0) != a(1)
    assert sorted(a(0)) == sorted(a(1)) == sorted(H5Chunks(files, "energy", chunk_size=2, shuffle=False)(0))


@pytest.mark.parametrize("world_size", [2, 3, 5])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_get_disjoint_equal_shares(files, world_size, drop_last):
    plans = [
        H5Chunks(files, "energy", chunk_size=4, rank=r, world_size=world_size, drop_last=drop_last)
        for r in range(world_size)
    ]
    shares = [p(1) for p in plans]
    assert len({len(s) for s in shares}) == 1 and all(len(s) == len(p) for s, p in zip(shares, plans))
    every = [c for s in shares for c in s]
    total = len(H5Chunks(files, "energy", chunk_size=4)(0))
    if drop_last:
        assert len(set(every)) == len(every) == total - total % world_size
    else:  # padded by repeating chunks, every chunk at least once
        assert set(every) == set(H5Chunks(files, "energy", chunk_size=4)(0))
        assert len(every) == world_size * -(-total // world_size)


def test_lengths_are_cached_and_a_changed_file_is_read_again(files, tmp_path, monkeypatch):
    H5Chunks(files, "energy", chunk_size=4, cache_dir=tmp_path / "cache")
    opened = []
    real = h5py.File

    def counting(path, *args, **kwargs):
        opened.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(h5py, "File", counting)
    H5Chunks(files, "energy", chunk_size=4, cache_dir=tmp_path / "cache")
    assert opened == []
    write(files[1], 13)
    opened.clear()
    assert H5Chunks(files, "energy", chunk_size=4, cache_dir=tmp_path / "cache").lengths == [25, 13, 7]
    assert opened == [files[1]]


def test_a_file_written_after_the_plan_was_made_is_planned_again_at_the_next_epoch(files, tmp_path):
    # before: a plan made once (in a datamodule) kept a file's old length: a shorter file was read as far
    # as it goes, and its missing events were dropped without a word
    chunks = H5Chunks(files, "energy", chunk_size=4, shuffle=False, cache_dir=tmp_path / "cache")
    assert sum(stop - start for _, start, stop in chunks(0)) == 42
    write(files[0], 9)
    os.utime(files[0], ns=(0, 0))  # whatever its mtime, its size changed
    epoch = chunks(1)
    assert events(epoch) == events([(files[0], 0, 9), (files[1], 0, 10), (files[2], 0, 7)])
    assert chunks.lengths == [9, 10, 7] and chunks.events == 26 and len(chunks) == len(epoch) == 8
    assert sum(len(read_h5_chunk(chunk, ["energy"])["energy"]) for chunk in epoch) == 26
    os.remove(files[2])
    with pytest.raises(FileNotFoundError, match="f2.h5 .it was there when H5Chunks was made"):
        chunks(2)


def test_a_glob_pickling_and_no_open_file(files, tmp_path):
    plan = H5Chunks(str(tmp_path / "f*.h5"), "energy", chunk_size=5, shuffle=False)
    assert plan.files == files
    again = pickle.loads(pickle.dumps(plan))
    assert again(2) == plan(2)
    fds = {
        os.readlink(f"/proc/self/fd/{fd}")
        for fd in os.listdir("/proc/self/fd")
        if os.path.exists(f"/proc/self/fd/{fd}")
    }
    assert not any(f in fds for f in files)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"files": []}, ValueError, "at least one file"),
        ({"files": "/nonexistent/*.h5"}, ValueError, "no file matches"),
        ({"files": ["/nonexistent/x.h5"]}, FileNotFoundError, "/nonexistent/x.h5"),
        ({"length_key": "nope"}, KeyError, "nope"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"chunk_size": 2.5}, TypeError, "chunk_size"),
        ({"rank": 2, "world_size": 2}, ValueError, "rank"),
        ({"rank": 0}, ValueError, "world_size"),
        ({"keys": ["missing"]}, KeyError, "missing"),
    ],
)
def test_bad_input_raises_at_construction_naming_what(files, kwargs, error, words):
    arguments = {"files": files, "length_key": "energy", **kwargs}
    with pytest.raises(error, match=words):
        H5Chunks(**arguments)


def test_different_shapes_for_a_key_are_refused_naming_the_files(tmp_path):
    a = write(tmp_path / "a1.h5", 5, width=3)
    b = write(tmp_path / "b2.h5", 5, width=4)
    with pytest.raises(ValueError, match="image") as info:
        H5Chunks([a, b], "energy", keys=["image"])
    assert a in str(info.value) and b in str(info.value)


def test_read_h5_chunk_reads_slices_and_names_missing_keys(files):
    got = read_h5_chunk((files[0], 3, 9), keys=["energy", "image"])
    with h5py.File(files[0]) as f:
        assert np.array_equal(got["energy"], f["energy"][3:9]) and got["image"].shape == (6, 3)
    with pytest.raises(KeyError, match=f"'nope' not found in {files[0]}"):
        read_h5_chunk((files[0], 0, 2), keys=["nope"])


def test_events_can_be_read_as_dicts_and_shuffled_within_a_chunk(files):
    events = read_h5_events((files[0], 2, 8), keys=["energy", "image"])
    assert [e["energy"] for e in events] == list(np.arange(2, 8, dtype=np.float32))
    assert events[0]["image"].shape == (3,)
    shuffled = read_h5_chunk((files[0], 2, 8), keys=["energy", "image"], permute_seed=5)
    again = read_h5_chunk((files[0], 2, 8), keys=["energy"], permute_seed=5)
    assert sorted(shuffled["energy"].tolist()) == list(range(2, 8))
    assert shuffled["energy"].tolist() != list(range(2, 8))
    assert np.array_equal(shuffled["energy"], again["energy"])
    past_the_end = read_h5_chunk((files[0], 20, 40), keys=["energy", "image"], permute_seed=5)  # 25 events
    assert sorted(past_the_end["energy"].tolist()) == list(range(20, 25)) and past_the_end["image"].shape == (5, 3)


def test_events_of_a_chunk_past_the_end_of_its_file_are_those_the_file_has(files):
    # before: IndexError (it counted stop - start events), while read_h5_chunk returned the 5 there are
    events = read_h5_events((files[0], 20, 40), keys=["energy", "image"])
    assert [e["energy"] for e in events] == list(np.arange(20, 25, dtype=np.float32))


@pytest.mark.parametrize("read", [read_h5_chunk, read_h5_events])
def test_keys_given_as_one_string_are_refused_by_name(files, read):
    # before: KeyError "key 'e' not found", the string read letter by letter
    with pytest.raises(TypeError, match=r"keys must be a list of dataset names, e.g. \['energy'\]"):
        read((files[0], 0, 5), keys="energy")
    with pytest.raises(TypeError, match="keys must be a list"):
        H5Chunks(files, "energy", keys="image")


def test_collate_graphs_makes_a_torch_geometric_batch():
    import torch
    from torch_geometric.data import Data

    batch = collate_graphs([Data(x=torch.zeros(2, 1)), Data(x=torch.ones(3, 1))])
    assert batch.num_graphs == 2 and batch.x.shape == (5, 1)


def test_a_file_that_is_not_hdf5_is_named_in_the_error(tmp_path):
    path = tmp_path / "notes.h5"
    path.write_text("not HDF5")
    with pytest.raises(OSError, match=f"{path}: it is not an HDF5 file"):
        H5Chunks([str(path)], length_key="energy")
    with pytest.raises(OSError, match=f"{path}: it is not an HDF5 file"):
        read_h5_chunk((str(path), 0, 1), ["energy"])
    with pytest.raises(FileNotFoundError, match="missing.h5: it cannot be opened"):
        read_h5_chunk((str(tmp_path / "missing.h5"), 0, 1), ["energy"])


def test_a_damaged_block_is_named_with_its_file_and_events(tmp_path):
    path = str(tmp_path / "run_042.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("energy", data=np.arange(1000, dtype=np.float32), chunks=(100,), compression="gzip")
    with h5py.File(path, "r") as f:
        offset = f["energy"].id.get_chunk_info(5).byte_offset  # the block of events 500-599
    with open(path, "r+b") as f:
        f.seek(offset + 2)
        f.write(b"\xff" * 40)
    assert read_h5_chunk((path, 0, 500), ["energy"])["energy"].tolist() == list(range(500))  # the rest reads
    # before: "Can't synchronously read data (filter returned failure during read)", no file named
    with pytest.raises(OSError, match=rf"{path}: cannot read 'energy'\[500:750\] \(.*filter returned failure"):
        read_h5_chunk((path, 500, 750), ["energy"])
