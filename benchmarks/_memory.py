"""Memory of a process tree, counted so that no way of holding data escapes it.

``footprint()`` is the summed proportional set size (PSS) of this process and its descendants,
without their shared-memory part, plus all shared memory (tmpfs, /dev/shm, torch's shared
storages) the machine holds, mapped or not:

- PSS counts a page shared by forked workers once, where USS would drop as workers share
  pages copy-on-write;
- shared memory is counted whether a process maps it or not: a segment waiting in a queue, or
  one kept for reuse, is memory too.

Shared memory is read machine-wide (``Shmem`` in /proc/meminfo): run on a quiet machine.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import psutil


def _rollup_kib(pid: int) -> tuple[int, int]:
    """(Pss, Pss_Shmem) of one process, in KiB."""
    pss = shmem = 0
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
            elif line.startswith("Pss_Shmem:"):
                shmem = int(line.split()[1])
    return pss, shmem


def _machine_shmem_kib() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("Shmem:"):
                return int(line.split()[1])
    return 0


def footprint() -> int:
    """Bytes: the process tree's private and file-backed PSS, plus the machine's shared memory."""
    me = psutil.Process()
    total = 0
    for process in [me, *me.children(recursive=True)]:
        try:
            pss, shmem = _rollup_kib(process.pid)
        except OSError:  # gone meanwhile
            continue
        total += pss - shmem
    return (total + _machine_shmem_kib()) * 1024


class PeakSampler(threading.Thread):
    """Samples ``footprint()`` every 20 ms until ``done`` is set (a measurement, not synchronisation)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.02):
            self.peak = max(self.peak, footprint())


def peak_growth(run: Callable[[], Any]) -> tuple[int, Any]:
    """(peak ``footprint()`` growth in bytes while ``run()`` ran, what it returned)."""
    baseline = footprint()
    sampler = PeakSampler()
    sampler.start()
    try:
        result = run()
    finally:
        sampler.done.set()
        sampler.join()
    return max(sampler.peak, footprint()) - baseline, result
