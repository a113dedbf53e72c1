"""Where the seed shape's CPU goes: ``python -m benchmarks.hops [--rounds N] [--events-per-file N] [--epochs N]``.

The seed shape (read -> pool -> repack -> collate) costs more CPU per event than the work alone; this
splits each worker process's CPU time into its step's calls, encoding the messages it sends (and of that,
writing their shared-memory segments), decoding those it receives, and the rest (queues, bookkeeping).
Beside it, the same calls timed in a serial loop, in a forked process of the same round: a call slower
in the pipeline than alone shows what sharing the cores costs (caches, switches), an encode or a decode
what a stage boundary costs. A pipeline's start and close cost CPU too, whatever it carries: the probe
measures them first, with no data (forking the workers, their first steps, joining them), and
``--epochs N`` runs N epochs through each round's pipeline, so that its figures are those of a pipeline
that keeps running (a training's) rather than of one short run (the benchmark's).

A probe, not a contender: it wraps torchqueue's private ``_serialize.dumps``, ``_serialize.loads``,
``_segments.write`` and ``Loop.call`` in this process before the pipeline forks its workers (Linux's
default start method), and reads each thread's CPU clock around them.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

PARTS = ("call", "encode", "write", "decode")
"""The CPU a worker spent in its step's calls, in encoding (``write`` is part of it), in decoding."""

_SLOTS = 64


class _Clocks:
    """Per worker process (a slot each), the thread CPU seconds spent in each part, in shared memory."""

    def __init__(self) -> None:
        self.seconds = mp.RawArray("d", _SLOTS * len(PARTS))
        self.pids = mp.RawArray("l", _SLOTS)
        self._inside: set[str] = set()  # this process: the parts being timed (an encode inside an encode counts once)

    def wrap(self, owner: Any, name: str, part: str) -> None:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            if part in self._inside:
                return original(*args, **kwargs)
            self._inside.add(part)
            start = time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[self._slot() * len(PARTS) + PARTS.index(part)] += time.thread_time() - start
                self._inside.discard(part)

        setattr(owner, name, timed)

    def _slot(self) -> int:
        pid = os.getpid()
        for slot in range(_SLOTS):
            if self.pids[slot] in (0, pid):
                self.pids[slot] = pid
                return slot
        raise RuntimeError("more worker processes than the probe has slots")

    def of(self, pid: int) -> dict[str, float]:
        for slot in range(_SLOTS):
            if self.pids[slot] == pid:
                return {part: self.seconds[slot * len(PARTS) + i] for i, part in enumerate(PARTS)}
        return dict.fromkeys(PARTS, 0.0)

    def reset(self) -> None:
        for i in range(len(self.seconds)):
            self.seconds[i] = 0.0
        for slot in range(_SLOTS):
            self.pids[slot] = 0


def _process_cpu(pid: int) -> float:
    """CPU seconds (user and system, every thread) of a live process."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _seed_shape(tq: Any, calo: Any, workers: int) -> Any:
    return tq.Sequence(
        tq.ProcessStep(calo.read_chunk, 2),  # two reads at a time, in the pool's workers (as the benchmark's)
        tq.PoolStep(calo.event_to_graph, nworkers=workers),
        tq.RepackStep(64),
        tq.ProcessStep(calo.collate, 1),
        tq.Queue(4),
    )


def _start_and_close(tq: Any, calo: Any, workers: int) -> float:
    """CPU seconds (this process's and its workers') of the seed shape started, run for an empty epoch
    and closed: what a pipeline costs whatever it carries."""

    def spent() -> float:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)  # workers joined by close() are counted
        return time.process_time() + children.ru_utime + children.ru_stime

    before = spent()
    with _seed_shape(tq, calo, workers) as seq:
        for _ in seq([]):
            pass
    return spent() - before


def _serial(chunks: list[Any], calo: Any) -> dict[str, float]:
    """The seed's calls in a serial loop, in a forked process (as the harness runs the work alone):
    thread CPU seconds per function."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        import torch

        torch.set_num_threads(1)  # as in a worker
        spent = {"read_chunk": 0.0, "event_to_graph": 0.0, "collate": 0.0}
        pending: list[Any] = []

        def timed(name: str, fn: Callable[[], Any]) -> Any:
            start = time.thread_time()
            out = fn()
            spent[name] += time.thread_time() - start
            return out

        for chunk in chunks:
            events = timed("read_chunk", lambda chunk=chunk: calo.read_chunk(chunk))
            pending += timed("event_to_graph", lambda events=events: [calo.event_to_graph(e) for e in events])
            while len(pending) >= 64:
                timed("collate", lambda batch=pending[:64]: calo.collate(batch))
                del pending[:64]
        os.write(write, json.dumps(spent).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        return json.loads(pipe.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--events-per-file", type=int, default=500, help="4 files of these (default 500)")
    parser.add_argument("--workers", type=int, default=2, help="the pool's workers (default 2)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs through each round's pipeline (default 1)")
    args = parser.parse_args()

    import torchqueue as tq
    from torchqueue import _loop, _segments, _serialize
    from torchqueue.demo import calorimeter as calo
    from torchqueue.sources import H5Chunks

    warnings.simplefilter("ignore", tq.TooManyWorkersWarning)
    clocks = _Clocks()
    clocks.wrap(_loop.Loop, "call", "call")
    clocks.wrap(_serialize, "dumps", "encode")
    clocks.wrap(_segments, "write", "write")
    clocks.wrap(_serialize, "loads", "decode")

    directory = tempfile.mkdtemp(prefix="tq-bench-hops-")
    paths = calo.generate_dataset(directory, n_files=4, events_per_file=args.events_per_file)
    chunks = H5Chunks(paths, length_key=calo.ENERGY_KEY, chunk_size=100, shuffle=False)()
    events = 4 * args.events_per_file
    ms = 1000 / (events * args.epochs)
    print(
        f"seed shape, {events} events x {args.epochs} epoch(s), pool of {args.workers}; CPU ms per event "
        "(thread clocks; total: the process's)"
    )
    start = min(_start_and_close(tq, calo, args.workers) for _ in range(3))
    print(
        f"a pipeline's start and close, no data: {start:.3f} s of CPU (the least of 3), {start * 1000 / events:.3f} ms "
        f"per event of one epoch"
    )
    for round_ in range(args.rounds):
        alone = _serial(chunks, calo)
        clocks.reset()
        consumer = time.process_time()
        with _seed_shape(tq, calo, args.workers) as seq:
            for _ in range(args.epochs):
                for _ in seq(chunks):
                    pass
            rows = [
                (f"{stage[:16]}#{worker}", _process_cpu(handle.pid), clocks.of(handle.pid))
                for stage, worker, handle in seq._runtime.workers
            ]
        consumer = time.process_time() - consumer
        work = sum(alone.values()) * args.epochs
        print(
            f"round {round_ + 1}: the work alone {work * ms:.3f} ("
            + ", ".join(f"{k} {v * args.epochs * ms:.3f}" for k, v in alone.items())
            + ")"
        )
        for name, total, part in rows:
            rest = total - part["call"] - part["encode"] - part["decode"]
            print(
                f"  {name:19s} total {total * ms:.3f}  call {part['call'] * ms:.3f}  encode {part['encode'] * ms:.3f} "
                f"(write {part['write'] * ms:.3f})  decode {part['decode'] * ms:.3f}  rest {rest * ms:.3f}"
            )
        total = sum(cpu for _, cpu, _ in rows) + consumer
        summed = {key: sum(part[key] for *_, part in rows) for key in PARTS}
        print(
            f"  {'your process':19s} total {consumer * ms:.3f}\n"
            f"  all: {total * ms:.3f} ms per event, {100 * (total / work - 1):+.0f}% over the work alone: calls "
            f"{100 * (summed['call'] / work - 1):+.1f}%, encode {100 * summed['encode'] / work:.1f}% (write "
            f"{100 * summed['write'] / work:.1f}%), decode {100 * summed['decode'] / work:.1f}%",
            flush=True,
        )
    shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
