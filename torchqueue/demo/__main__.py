"""``python -m torchqueue.demo``: the seed pipeline against torch's DataLoader on the same events."""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch.utils.data import DataLoader

import torchqueue as tq
from torchqueue.demo import calorimeter as calo
from torchqueue.sources import H5Chunks


def run_torchqueue(chunks: list[calo.Chunk], batch_size: int, workers: int) -> tuple[int, float, tq.Stats]:
    with tq.Sequence(
        tq.ProcessStep(calo.read_chunk, 2, name="read"),
        tq.PoolStep(calo.event_to_graph, nworkers=workers, name="graph"),
        tq.RepackStep(batch_size),
        tq.ProcessStep(calo.collate, 1, name="collate"),
        tq.Queue(4),
    ) as seq:
        events, start = 0, time.perf_counter()
        for batch in seq(chunks):
            events += batch.num_graphs
        return events, time.perf_counter() - start, seq.stats()


def run_dataloader(loader: DataLoader) -> tuple[int, float]:
    events, start = 0, time.perf_counter()
    for batch in loader:
        events += batch.num_graphs
    return events, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="demo_data", help="directory for the generated HDF5 files")
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--events", type=int, default=500, help="events per file")
    parser.add_argument("--chunk-size", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    # The seed pipeline's pool (the reads run in its workers) and its repack-and-collate process: more
    # processes than a 2-core machine has cores with --workers 2, on purpose (they take turns, as
    # DataLoader's workers and its main process do).
    warnings.simplefilter("ignore", tq.TooManyWorkersWarning)

    start = time.perf_counter()
    paths = calo.generate_dataset(args.data, args.files, args.events)
    chunks = H5Chunks(paths, length_key=calo.ENERGY_KEY, chunk_size=args.chunk_size, seed=0)(epoch=0)
    total = sum(stop - start for _, start, stop in chunks)
    took = time.perf_counter() - start
    print(f"dataset: {len(paths)} files, {total} events of {calo.SHAPE} in {args.data}/ ({took:.1f} s)")

    events, seconds, stats = run_torchqueue(chunks, args.batch_size, args.workers)
    assert events == total, (events, total)
    tq_rate = events / seconds
    print(f"torchqueue Sequence:                 {tq_rate:8.0f} events/s  ({events} events in {seconds:.2f} s)")

    baselines = {
        "DataLoader, one event per item": DataLoader(
            calo.EventDataset(paths), batch_size=args.batch_size, num_workers=args.workers, collate_fn=calo.collate
        ),
        "DataLoader, chunks per worker": DataLoader(
            calo.ChunkDataset(chunks, args.batch_size), batch_size=None, num_workers=args.workers
        ),
        # the fastest way DataLoader runs this work, with batches of a chunk's events, not of --batch-size
        "DataLoader, one batch per chunk": DataLoader(
            calo.ChunkBatches(chunks), batch_size=None, num_workers=args.workers
        ),
    }
    for name, loader in baselines.items():
        events, seconds = run_dataloader(loader)
        assert events == total, (name, events, total)
        rate = events / seconds
        print(f"{name + ':':36s} {rate:8.0f} events/s  (torchqueue: {tq_rate / rate:.2f}x)")
    print(f"(one batch per chunk: batches of {args.chunk_size} events; the others make batches of {args.batch_size})")
    print()
    print(stats)


if __name__ == "__main__":
    main()
