"""Larger than RAM: streaming an HDF5 dataset several times larger than a memory budget stays under it.

Memory is counted by ``benchmarks._memory.footprint``: what every process holds, and all shared memory.
"""

from __future__ import annotations

import multiprocessing
import threading

import h5py
import numpy as np
import pytest

import torchqueue as tq
from benchmarks._memory import peak_growth
from torchqueue.sources import H5Chunks, read_h5_chunk

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("no_leaks")]

EVENT_FLOATS = 64 * 1024  # 256 KiB per event
BUDGET = 256 * 2**20


def read_sums(chunk):
    arrays = read_h5_chunk(chunk, keys=["x", "id"])
    return list(zip(arrays["id"].tolist(), arrays["x"]))


def event_check(event):
    event_id, values = event
    assert values[0] == event_id and values[-1] == event_id
    return event_id


def write_dataset(directory: str, files: int, events_per_file: int) -> None:
    for f in range(files):
        with h5py.File(f"{directory}/big{f}.h5", "w") as out:
            x = out.create_dataset("x", shape=(events_per_file, EVENT_FLOATS), dtype="float32")
            ids = np.arange(f * events_per_file, (f + 1) * events_per_file)
            for start in range(0, events_per_file, 128):
                x[start : start + 128] = np.repeat(
                    ids[start : start + 128, None].astype(np.float32), EVENT_FLOATS, axis=1
                )
            out["id"] = ids


def test_a_dataset_four_times_the_budget_streams_under_the_budget_with_every_event_once(tmp_path):
    events_per_file, files = 1024, 4  # 4 x 256 MiB = 4 x BUDGET
    writer = multiprocessing.get_context("fork").Process(
        target=write_dataset, args=(str(tmp_path), files, events_per_file)
    )
    writer.start()  # in another process, so that this one's memory is not the generator's
    writer.join(240)
    assert writer.exitcode == 0
    paths = [str(tmp_path / f"big{f}.h5") for f in range(files)]
    chunks = H5Chunks(paths, length_key="id", chunk_size=64, seed=1)

    def stream() -> list[int]:
        seen = []
        with tq.Sequence(tq.ProcessStep(read_sums, 2), tq.PoolStep(event_check, nworkers=2), tq.Queue(2)) as seq:
            for ids in seq(chunks(0)):
                seen.extend(ids)
        return seen

    # the fork server (about 150 MiB, under fork) is not what streaming costs: started before the baseline
    # (a thread runs, so the warm-up pipeline takes its workers from it), and kept running by that pipeline
    # left open meanwhile (whose feeder thread also makes the streaming pipeline use it)
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, daemon=True)
    thread.start()
    try:
        with tq.Sequence(tq.ProcessStep(abs)) as warm:
            list(warm([0]))
            growth, seen = peak_growth(stream)  # private memory of every process, and all shared memory
    finally:
        stop.set()
        thread.join(5)
    assert sorted(seen) == list(range(files * events_per_file))
    print(f"peak memory growth {growth / 2**20:.0f} MiB while streaming {files * 256} MiB")
    assert growth < BUDGET, f"peak memory growth {growth / 2**20:.0f} MiB over a {BUDGET / 2**20:.0f} MiB budget"


def private_mib_after_collecting(_element):
    """The worker's private (copied) memory after a full garbage collection, in MiB."""
    import gc

    import psutil

    gc.collect()
    return psutil.Process().memory_full_info().uss / 2**20


def test_a_forked_workers_garbage_collection_leaves_the_consumers_heap_shared():
    # a million small lists in the consumer's heap: about 80 MiB that a collection walks, page by page
    heap = [[i] for i in range(1_000_000)]
    with tq.Sequence(tq.ProcessStep(private_mib_after_collecting, 2), context="fork") as seq:
        private = list(seq(range(4)))
    assert len(heap) == 1_000_000
    # a worker's own memory is about 4 MiB here; with the heap copied it is about 110 MiB
    assert max(private) < 50, f"workers hold {private} MiB of private memory: the consumer's heap was copied"
