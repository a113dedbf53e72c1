"""The workloads. Each function runs every contender and returns its lines."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from benchmarks._contenders import (
    WORKERS,
    _Mapped,
    all_map_contenders,
    dataloader,
    file_system_sharing,
    torchqueue,
    torchqueue_loader,
)
from benchmarks._harness import Line, Workload


def small_op(x: int) -> int:
    return x * 2 + 1


def numpy_work(seed: int) -> float:
    """About 2 ms of numpy work."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((200, 200))
    for _ in range(6):
        a = a @ a.T / 200.0
    return float(a.trace())


def python_work(seed: int) -> int:
    """About 2 ms of pure Python: it holds the GIL all along (threads take turns)."""
    total = 0
    for i in range(25_000):
        total += (i * seed) % 7
    return total


def touch(x: object) -> object:
    return x


def _sum_checksum(out: Iterable[int]) -> int:
    return sum(out)


def _tensor_checksum(out: Iterable[Any]) -> str:
    """A digest of the outputs, cheap next to moving them: every 512th byte of each tensor or array,
    and every byte of a list of small tensors, joined by one ``torch.cat`` with their sizes (a Python
    loop over 1,000 tensors cost more than receiving them, and capped every contender near 230/s)."""
    digest = hashlib.sha1()
    for element in out:
        if isinstance(element, list):
            digest.update(torch.cat(element).numpy().tobytes() + repr([t.numel() for t in element]).encode())
            continue
        array = element.numpy() if isinstance(element, torch.Tensor) else element
        flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        digest.update(flat[::512].tobytes() + str(flat.size).encode())
    return digest.hexdigest()


def _raw_queue_producer(queue: mp.Queue, n: int) -> None:
    for i in range(n):
        queue.put(small_op(i))
    queue.put(None)


def tiny(quick: bool) -> list[Line]:
    n = 20_000 if quick else 200_000
    work = Workload("tiny", "items/s", n, _sum_checksum)
    items = list(range(n))
    for name, fn in all_map_contenders(items, small_op).items():
        work.run(name, fn)
    # Both tuned for many small elements, with the same 1,024 elements in flight at most.
    work.run("DataLoader, prefetch_factor=512", lambda: dataloader(items, small_op, prefetch_factor=512))
    work.run("torchqueue, Queue(1024)", lambda: torchqueue(items, small_op, capacity=1024))
    work.run("torchqueue, Pack(256)->Pool->Unpack", lambda: packed(items, small_op, 256))

    def raw_queue() -> Iterator[int]:
        queue = mp.get_context("fork").Queue(64)
        producer = mp.get_context("fork").Process(target=_raw_queue_producer, args=(queue, n))
        producer.start()
        while (x := queue.get()) is not None:
            yield x
        producer.join()

    work.run("raw mp.Queue, 1 producer", raw_queue)
    return work.finish()


def packed(items: list[Any], fn: Any, n: int) -> Iterator[Any]:
    """The seed idea's way with tiny elements: lists of ``n`` to a pool, items out one by one."""
    import torchqueue as tq

    with tq.Sequence(tq.PackStep(n), tq.PoolStep(fn, nworkers=WORKERS), tq.UnpackStep(), tq.Queue(4)) as seq:
        yield from seq(items)


def _half(args: tuple[int, int]) -> None:
    start, stop = args
    for i in range(start, stop):
        numpy_work(i)


def cpu(quick: bool) -> list[Line]:
    n = 300 if quick else 3000
    torch.set_num_threads(1)
    work = Workload("cpu", "items/s", n, lambda out: round(sum(out), 3))
    items = list(range(n))
    for name, fn in all_map_contenders(items, numpy_work).items():
        work.run(name, fn)

    def bare() -> None:
        ctx = mp.get_context("fork")
        shares = [(i * n // WORKERS, (i + 1) * n // WORKERS) for i in range(WORKERS)]
        halves = [ctx.Process(target=_half, args=(share,)) for share in shares]
        for p in halves:
            p.start()
        for p in halves:
            p.join()

    work.run("2 bare processes (limit)", bare, check=False)
    return work.finish()


def python(quick: bool) -> list[Line]:
    """Python-bound work, where threads cannot run in parallel (the cpu workload's numpy releases the GIL)."""
    n = 200 if quick else 2000
    work = Workload("python", "items/s", n, sum)
    for name, fn in all_map_contenders(list(range(n)), python_work).items():
        work.run(name, fn)
    return work.finish()


def bigarrays(quick: bool) -> list[Line]:
    lines = []
    count = 4 if quick else 16
    for kind in ("numpy", "tensor"):
        size = 64 * 2**20 // 4
        if kind == "numpy":
            items = [np.full(size, i, dtype=np.float32) for i in range(count)]
        else:
            items = [torch.full((size,), float(i)) for i in range(count)]
        gigabytes = count * 64 * 2**20 / 1e9
        work = Workload(f"bigarrays-{kind[:2]}", "GB/s", gigabytes, _tensor_checksum)
        for name, fn in all_map_contenders(items, touch).items():
            work.run(name, fn)
        work.run("torchqueue QueueFlowLoader", lambda items=items: torchqueue_loader(items, touch))
        lines += work.finish()
    return lines


def smalltensors(quick: bool) -> list[Line]:
    count = 20 if quick else 100
    items = [[torch.full((64,), float(i * 1000 + j)) for j in range(1000)] for i in range(count)]
    work = Workload("smalltensors", "elements/s", count, _tensor_checksum)
    for name, fn in all_map_contenders(items, touch).items():
        work.run(name, fn)
        if name in ("DataLoader", "torchdata.nodes process", "SPDL process pool"):  # run out of descriptors by default
            work.run(f"{name}, file_system", file_system_sharing(fn))
    work.run("torchqueue QueueFlowLoader", lambda: torchqueue_loader(items, touch))
    return work.finish()


ALL = {"tiny": tiny, "cpu": cpu, "python": python, "bigarrays": bigarrays, "smalltensors": smalltensors}


SEED_READERS = max(2, WORKERS // 3)
"""The seed shape's readers: two, as the seed declares them, and a third of the pool's workers on more
cores. The read is about a third of this work (0.42 of 1.23 ms per event on the 2-core machine), so one
reader bounds the whole shape at about 2,400 events/s, whatever the pool: 16 cores showed it (issue 17's
table, 2,754 events/s with a pool 14% busy). Two or more readers run in the pool's workers, at most
that many reads at once (``_premap``): a reader costs no process of its own. The thread reader stays
one thread: h5py runs one call at a time."""


SEED_COLLATES = max(1, WORKERS // 7)
"""The seed shapes' collating processes: one (fused into the repack's process), and two on 16 cores. One
process that repacks and collates costs about 0.15 ms per event here (decoding the graphs, collating,
encoding the batch: ``stats()``'s rows of that process), so it bounds a shape at about 6,500 events/s,
under issue 17's 16-core target (1.5x DataLoader's 5,652). Two are not fused: the repack routes the
graphs to them without decoding, and they share the work."""


def seed(quick: bool) -> list[Line]:
    """The calorimeter pipeline of the demo: HDF5 -> graphs -> Batch, events/s."""
    import tempfile

    from torch.utils.data import DataLoader

    import torchqueue as tq
    from torchqueue.demo import calorimeter as calo
    from torchqueue.sources import H5Chunks

    directory = tempfile.mkdtemp(prefix="tq-bench-seed-")
    paths = calo.generate_dataset(directory, n_files=2 if quick else 4, events_per_file=100 if quick else 500)
    chunks = H5Chunks(paths, length_key=calo.ENERGY_KEY, chunk_size=100, shuffle=False)()
    events = sum(stop - start for _, start, stop in chunks)
    batch = 64

    def checksum(batches: Iterable[Any]) -> float:
        return round(sum(float(b.y.sum()) for b in batches), 1)

    def serial() -> Iterator[Any]:  # the work alone: chunk by chunk, batches of 64 as they fill
        pending: list[Any] = []
        for chunk in chunks:
            pending += [calo.event_to_graph(event) for event in calo.read_chunk(chunk)]
            while len(pending) >= batch:
                yield calo.collate(pending[:batch])
                del pending[:batch]
        if pending:
            yield calo.collate(pending)

    def torchqueue(reader: str = "process") -> Iterator[Any]:
        """The seed shape; ``reader``: the HDF5 read's backend (a thread of this process, or a process)."""
        with tq.Sequence(
            tq.ProcessStep(calo.read_chunk, SEED_READERS if reader == "process" else 1, backend=reader),
            tq.PoolStep(calo.event_to_graph, nworkers=WORKERS),
            tq.RepackStep(batch),
            tq.ProcessStep(calo.collate, SEED_COLLATES),
            tq.Queue(4),
        ) as seq:
            yield from seq(chunks)

    def fused() -> Iterator[Any]:  # read and transform in one step, then the same repack and collate
        with tq.Sequence(
            tq.ProcessStep(calo.chunk_to_graphs, WORKERS),
            tq.RepackStep(batch),
            tq.ProcessStep(calo.collate, SEED_COLLATES),
            tq.Queue(4),
        ) as seq:
            yield from seq(chunks)

    def one_map() -> Iterator[Any]:  # the ceiling: one step does it all, one batch per chunk
        with tq.Sequence(tq.ProcessStep(calo.chunk_to_batch, WORKERS), tq.Queue(4)) as seq:
            yield from seq(chunks)

    def per_event() -> Iterator[Any]:
        dataset = calo.EventDataset(paths)
        yield from DataLoader(dataset, batch_size=batch, num_workers=WORKERS, collate_fn=calo.collate)

    def chunked() -> Iterator[Any]:
        yield from DataLoader(calo.ChunkDataset(chunks, batch), batch_size=None, num_workers=WORKERS)

    def batch_per_chunk() -> Iterator[Any]:
        dataset = _Mapped(chunks, calo.chunk_to_batch)
        yield from DataLoader(dataset, batch_size=None, num_workers=WORKERS)

    def chunked_drop_in() -> Iterator[Any]:  # the same code as ``chunked``, QueueFlowLoader swapped in
        loader = tq.QueueFlowLoader(calo.ChunkDataset(chunks, batch), batch_size=None, num_workers=WORKERS)
        yield from loader
        loader.close()

    work = Workload("seed", "events/s", events, checksum, cpu_per="event")
    work.run("serial", serial)
    work.run("DataLoader", per_event)
    work.run("DataLoader, chunks per worker", chunked)
    work.run("DataLoader, one batch per chunk", batch_per_chunk)
    shape = "".join(f", {n} {what}" for n, what in ((SEED_READERS, "readers"), (SEED_COLLATES, "collates")) if n > 1)
    work.run(f"torchqueue{shape}", torchqueue)
    work.run("torchqueue, read in a thread", lambda: torchqueue(reader="thread"))
    work.run("torchqueue, read+transform fused", fused)
    work.run("torchqueue, one map per chunk", one_map)
    work.run("torchqueue QueueFlowLoader, chunks per worker", chunked_drop_in)
    import shutil

    try:
        return work.finish()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


ALL["seed"] = seed


EVENT_FLOATS = 64 * 1024  # 256 KiB per event
MEMORY_BATCH = 64


def _write_big(directory: str, files: int, events_per_file: int) -> list[str]:
    import h5py

    paths = []
    for f in range(files):
        path = f"{directory}/big{f}.h5"
        with h5py.File(path, "w") as out:
            x = out.create_dataset("x", shape=(events_per_file, EVENT_FLOATS), dtype="float32")
            ids = np.arange(f * events_per_file, (f + 1) * events_per_file)
            for start in range(0, events_per_file, 128):
                x[start : start + 128] = np.repeat(ids[start : start + 128, None].astype(np.float32), EVENT_FLOATS, 1)
            out["id"] = ids
        paths.append(path)
    return paths


def _read_batch(chunk: tuple[str, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One batch of events read as one contiguous slice: (ids, events)."""
    from torchqueue.sources import read_h5_chunk

    arrays = read_h5_chunk(chunk, keys=["id", "x"])
    return arrays["id"], arrays["x"]


class _BigEvents(torch.utils.data.Dataset):
    """DataLoader's way: one event per ``__getitem__`` (files opened lazily in each worker)."""

    def __init__(self, paths: list[str], per_file: int) -> None:
        self.paths, self.per_file, self.files = paths, per_file, {}

    def __len__(self) -> int:
        return len(self.paths) * self.per_file

    def __getitem__(self, i: int) -> tuple[int, np.ndarray]:
        import h5py

        path = self.paths[i // self.per_file]
        if path not in self.files:
            self.files[path] = h5py.File(path, "r")
        return i, self.files[path]["x"][i % self.per_file]


def _consume(batches: Iterable[tuple[Any, Any]]) -> int:
    """Every event's values must be its id; returns the number of events."""
    events = 0
    for ids, x in batches:
        ids, x = np.asarray(ids), np.asarray(x)
        assert np.array_equal(x[:, 0], ids.astype(np.float32)) and np.array_equal(x[:, -1], x[:, 0])
        events += len(ids)
    return events


def memory(quick: bool) -> list[Line]:
    """Peak memory of the whole process tree while the same stream of batches of 64 events (16 MiB)
    arrives from ~1 GB of HDF5 (and from 4x that for torchqueue). See ``benchmarks._memory``."""
    import shutil
    import tempfile

    import torchqueue as tq
    from benchmarks._memory import peak_growth
    from torchqueue.sources import H5Chunks

    per_file = 256 if quick else 1024  # 256 KiB events: 1 GiB in 4 files (quick: 256 MiB)
    lines = []
    for factor in (1, 4):
        directory = tempfile.mkdtemp(prefix="tq-bench-memory-", dir="/tmp")
        try:
            paths = _write_big(directory, 4 * factor, per_file)
            chunks = H5Chunks(paths, length_key="id", chunk_size=MEMORY_BATCH, shuffle=False)(0)

            def torchqueue_stream(chunks: list = chunks) -> int:
                with tq.Sequence(tq.ProcessStep(_read_batch, WORKERS), tq.Queue(1)) as seq:
                    return _consume(seq(chunks))

            def dataloader_stream(paths: list = paths) -> int:
                events = _BigEvents(paths, per_file)
                return _consume(torch.utils.data.DataLoader(events, batch_size=MEMORY_BATCH, num_workers=WORKERS))

            size = f"{len(paths) * per_file * 256 / 1024:.0f} MiB"
            runs = [("torchqueue", torchqueue_stream)] + ([("DataLoader", dataloader_stream)] if factor == 1 else [])
            for name, run in runs:
                growth, events = peak_growth(run)
                note = f"{events} events, {size}, batches of {MEMORY_BATCH} events (16 MiB)"
                lines.append(Line(f"memory-{factor}x", name, growth / 2**20, "MiB peak", note))
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    baseline = next((line.value for line in lines if line.contender == "DataLoader"), None)
    for line in lines:
        if baseline and line.value is not None:
            line.ratio = line.value / baseline
    from benchmarks._harness import format_line

    for line in lines:
        print(format_line(line), flush=True)
    return lines


ALL["memory"] = memory


class _Images(torch.utils.data.Dataset):
    """A map-style dataset with some per-sample work: a 3x64x64 image and a label."""

    def __len__(self) -> int:
        return 20_000

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(i)
        image = torch.rand(3, 64, 64, generator=g)
        return (image - image.mean()) / (image.std() + 1e-6), i % 10


def dropin(quick: bool) -> list[Line]:
    """``QueueFlowLoader`` as a drop-in: batch 64, shuffle with a fixed generator, 2 workers; samples/s."""
    from torchqueue import QueueFlowLoader

    dataset = _Images()
    n = len(dataset) if not quick else 2_000
    subset = torch.utils.data.Subset(dataset, range(n))

    def checksum(batches: Iterable[Any]) -> float:
        return round(sum(float(labels.sum()) + float(images[:, 0, 0, 0].sum()) for images, labels in batches), 2)

    def loader(cls: Any) -> Iterator[Any]:
        args = dict(batch_size=64, shuffle=True, num_workers=WORKERS, generator=torch.Generator().manual_seed(0))
        instance = cls(subset, **args)
        yield from instance
        if hasattr(instance, "close"):
            instance.close()

    work = Workload("dropin", "samples/s", n, checksum)
    work.run("DataLoader", lambda: loader(torch.utils.data.DataLoader))
    work.run("torchqueue QueueFlowLoader", lambda: loader(QueueFlowLoader))
    return work.finish()


def _first_batch_seconds(make: Any, epochs: int) -> list[float]:
    """Seconds from ``iter()`` to the first batch, for each epoch, with one loader."""
    loader = make()
    out = []
    for _ in range(epochs):
        start = time.perf_counter()
        it = iter(loader)
        next(it)
        out.append(time.perf_counter() - start)
        for _ in it:
            pass
    if hasattr(loader, "close"):
        loader.close()
    return out


def firstbatch(quick: bool) -> list[Line]:
    """Time to the first batch under fork and spawn, and at the start of the second epoch (persistent workers)."""
    from torchqueue import QueueFlowLoader

    subset = torch.utils.data.Subset(_Images(), range(640))
    lines = []
    for context in ("fork", "spawn"):
        for name, cls in (("DataLoader", torch.utils.data.DataLoader), ("torchqueue QueueFlowLoader", QueueFlowLoader)):

            def make(cls: Any = cls, context: str = context) -> Any:
                return cls(
                    subset, batch_size=64, num_workers=WORKERS, persistent_workers=True, multiprocessing_context=context
                )

            first, second = _first_batch_seconds(make, 2)
            lines.append(Line(f"firstbatch-{context}", name, first * 1000, "ms epoch 1"))
            lines.append(Line(f"firstbatch-{context}", name, second * 1000, "ms epoch 2", "persistent workers"))
    from benchmarks._harness import format_line

    for line in lines:
        print(format_line(line), flush=True)
    return lines


ALL["dropin"] = dropin
ALL["firstbatch"] = firstbatch
