"""Timing, result lines and the same-items check shared by every workload."""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import platform
import resource
import signal
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BASELINE = "DataLoader"


@dataclass
class Line:
    workload: str
    contender: str
    value: float | None  # None: failed or not installed
    unit: str
    note: str = ""
    ratio: float | None = None


REPEAT = 3
"""Rounds per workload (``--repeat``): every contender runs once per round, rounds one after the other,
and its line shows the median. A contender that took more than ``REPEAT_UNDER_S`` is run once only."""

REPEAT_UNDER_S = 30.0

ONLY: tuple[str, ...] = ()
"""``--only``: run only the contenders whose name contains one of these (all when empty)."""


class Workload:
    """Runs contenders on one workload, in interleaved rounds, and prints their lines."""

    def __init__(
        self, name: str, unit: str, amount: float, checksum: Callable[[Any], Any], cpu_per: str | None = None
    ) -> None:
        """``amount``: how many units one run moves (items, or GB); the figure is amount / seconds.

        ``checksum`` consumes a contender's outputs (an iterable) and returns something comparable.
        ``cpu_per``: also print the CPU time per unit (named so: "event"), summed over every process
        of the run, and how much it is over the first contender's (the work alone, in a serial loop).
        """
        self.name = name
        self.unit = unit
        self.amount = amount
        self.checksum = checksum
        self.cpu_per = cpu_per
        self.lines: list[Line] = []
        self._contenders: list[tuple[str, Callable[[], Any], float | None, bool]] = []

    def run(self, contender: str, fn: Callable[[], Any], amount: float | None = None, check: bool = True) -> None:
        """Add a contender: ``checksum(fn())`` is timed in every round (``check=False``: ``fn()`` only,
        for a reference that produces no items). Skipped unless it is one of ``ONLY``."""
        if ONLY and not any(part in contender for part in ONLY):
            return
        self._contenders.append((contender, fn, amount, check))

    def finish(self, repeat: int | None = None) -> list[Line]:
        rounds = REPEAT if repeat is None else repeat
        seconds: dict[str, list[float]] = {name: [] for name, *_ in self._contenders}
        cpu: dict[str, dict[int, float]] = {name: {} for name, *_ in self._contenders}  # round -> seconds
        failures: dict[str, str] = {}
        expected: Any = None
        for round_ in range(rounds):
            for name, fn, _, check in self._contenders:
                if name in failures or (round_ and seconds[name] and seconds[name][0] > REPEAT_UNDER_S):
                    continue
                outcome = _run_isolated(lambda fn=fn, check=check: _timed(fn, self.checksum if check else _drain))
                if outcome[0] == "ok" and check:
                    got = outcome[1][1]
                    if expected is None:
                        expected = got
                    elif got != expected:
                        outcome = ("failed", f"different items: checksum {got!r}, expected {expected!r}")
                if outcome[0] != "ok":
                    failures[name] = str(outcome[1])[:90]
                    continue
                seconds[name].append(outcome[1][0])
                cpu[name][round_] = outcome[1][2]
        for name, _, amount, _ in self._contenders:
            if name in failures:
                self.lines.append(Line(self.name, name, None, self.unit, failures[name]))
                continue
            runs = sorted(seconds[name])
            median = statistics.median(runs)
            note = (
                f"{median:.2f} s"
                if len(runs) == 1
                else f"{median:.2f} s, median of {len(runs)} ({runs[0]:.2f}-{runs[-1]:.2f})"
            )
            value = (amount if amount is not None else self.amount) / median
            self.lines.append(Line(self.name, name, value, self.unit, note))
        # DataLoader as configured by default; where that failed, its first variant that ran (e.g. file_system)
        base = next((line.value for line in self.lines if line.contender.startswith(BASELINE) and line.value), None)
        for line in self.lines:
            if base and line.value is not None:
                line.ratio = line.value / base
            print(format_line(line), flush=True)
        if self.cpu_per is not None:
            self.lines += self._cpu_lines(cpu)
        return self.lines

    def _cpu_lines(self, cpu: dict[str, dict[int, float]]) -> list[Line]:
        """CPU milliseconds per unit, each run's processes summed (median of the rounds), and how much
        that is over the first contender's: what the stage boundaries, the queues and the processes cost
        over the work alone. The "over" figure is the median of each round's ratio to the first
        contender's run in the same round: this machine's speed drifts by 10-20% over minutes (other
        tenants), and runs side by side in time drift together."""
        amounts = {name: amount if amount is not None else self.amount for name, _, amount, _ in self._contenders}
        first = self._contenders[0][0]
        work = {r: seconds / amounts[first] for r, seconds in cpu[first].items()}  # round -> the work alone's
        lines = []
        for name, *_ in self._contenders:
            if not cpu[name]:
                continue
            per = {r: seconds / amounts[name] for r, seconds in cpu[name].items()}
            paired = [per[r] / work[r] for r in per if work.get(r)]
            if not paired:
                over = f"(no run of {first} to compare)"
            else:
                over = f"{100 * (statistics.median(paired) - 1):+.0f}% over {first}"
                if name != first and len(paired) > 1:
                    low, high = (100 * (ratio - 1) for ratio in (min(paired), max(paired)))
                    over += f" ({low:+.0f}% to {high:+.0f}% in {len(paired)} rounds)"
            value = 1000 * statistics.median(per.values())
            lines.append(Line(f"{self.name}-cpu", name, value, f"ms/{self.cpu_per}", over))
        for line in lines:
            print(format_line(line), flush=True)
        return lines


def _drain(out: Any) -> None:
    if out is not None:
        for _ in out:
            pass


TIMEOUT_S = 180.0


def _timed(fn: Callable[[], Any], checksum: Callable[[Any], Any]) -> tuple[float, Any, float]:
    """Seconds, the checksum, and the CPU seconds of this process and of every child process it reaped
    meanwhile (run in a fresh process: each contender's workers are gone when its iterator ends)."""
    cpu = _cpu_seconds()
    start = time.perf_counter()
    got = checksum(fn())
    elapsed = time.perf_counter() - start
    gc.collect()  # an iterator dropped without being closed: its workers are reaped now
    return elapsed, got, _cpu_seconds() - cpu


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _child(job: Callable[[], Any], conn: Any) -> None:
    os.setsid()  # its own process group: a timeout kills the contender's workers too
    try:
        conn.send(("ok", job()))
    except ImportError as exc:
        conn.send(("missing", f"not installed ({exc.name})"))
    except BaseException as exc:
        traceback.print_exc()
        conn.send(("failed", f"failed: {type(exc).__name__}: {exc}"))


def _run_isolated(job: Callable[[], Any]) -> tuple[str, Any]:
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(job, child))
    process.start()
    child.close()
    try:
        if parent.poll(TIMEOUT_S):
            return parent.recv()
        return ("failed", f"timed out after {TIMEOUT_S:.0f} s")
    except EOFError:
        return ("failed", f"crashed (exit code {process.exitcode})")
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.join(10)


def format_line(line: Line) -> str:
    value = f"{line.value:12,.2f}" if line.value is not None else f"{'-':>12}"
    ratio = f"{line.ratio:7.2f}x" if line.ratio is not None else f"{'':>8}"
    return f"{line.workload:13s} {line.contender:44s} {value} {line.unit:12s} {ratio}  {line.note}"


def header() -> str:
    import os

    import numpy
    import torch

    versions = [f"torch {torch.__version__}", f"numpy {numpy.__version__}"]
    for name in ("torchdata", "spdl"):
        try:
            module = __import__(name)
            versions.append(f"{name} {getattr(module, '__version__', '?')}")
        except ImportError:
            versions.append(f"{name} missing")
    return (
        f"# {time.strftime('%Y-%m-%d %H:%M')}  {platform.platform()}  {os.cpu_count()} CPUs  "
        f"{os.environ.get('TORCHQUEUE_BENCH_WORKERS', '2')} workers  "
        f"Python {platform.python_version()}  {', '.join(versions)}\n"
        f"{'workload':13s} {'contender':44s} {'figure':>12} {'unit':12s} {'vs DataLoader':>8}"
    )


def save(lines: list[Line], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"header": header(), "lines": [asdict(line) for line in lines]}, indent=1))
