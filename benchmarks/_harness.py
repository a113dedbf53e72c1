"""Timing, result lines and the same-items check shared by every workload."""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import signal
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


class Workload:
    """Runs contenders on one workload and prints their lines."""

    def __init__(self, name: str, unit: str, amount: float, checksum: Callable[[Any], Any]) -> None:
        """``amount``: how many units one run moves (items, or GB); the figure is amount / seconds.

        ``checksum`` consumes a contender's outputs (an iterable) and returns something comparable.
        """
        self.name = name
        self.unit = unit
        self.amount = amount
        self.checksum = checksum
        self.lines: list[Line] = []
        self._expected: Any = None

    def run(self, contender: str, fn: Callable[[], Any], amount: float | None = None) -> float | None:
        """Time ``checksum(fn())`` in a forked child of its own (killed with its processes after
        ``TIMEOUT_S``), so that a contender that hangs or crashes cannot take the suite with it."""
        outcome = _run_isolated(lambda: _timed(fn, self.checksum))
        if outcome[0] == "ok":
            seconds, got = outcome[1]
            if self._expected is None:
                self._expected = got
            elif got != self._expected:
                outcome = ("failed", f"different items: checksum {got!r}, expected {self._expected!r}")
        if outcome[0] != "ok":
            self._add(Line(self.name, contender, None, self.unit, str(outcome[1])[:90]))
            return None
        value = (amount if amount is not None else self.amount) / seconds
        self._add(Line(self.name, contender, value, self.unit, f"{seconds:.2f} s"))
        return value

    def _add(self, line: Line) -> None:
        self.lines.append(line)

    def finish(self) -> list[Line]:
        base = next((line.value for line in self.lines if line.contender == BASELINE and line.value), None)
        for line in self.lines:
            if base and line.value is not None:
                line.ratio = line.value / base
            print(format_line(line), flush=True)
        return self.lines


TIMEOUT_S = 180.0


def _timed(fn: Callable[[], Any], checksum: Callable[[Any], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    got = checksum(fn())
    return time.perf_counter() - start, got


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
    return f"{line.workload:13s} {line.contender:28s} {value} {line.unit:12s} {ratio}  {line.note}"


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
        f"Python {platform.python_version()}  {', '.join(versions)}\n"
        f"{'workload':13s} {'contender':28s} {'figure':>12} {'unit':12s} {'vs DataLoader':>8}"
    )


def save(lines: list[Line], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"header": header(), "lines": [asdict(line) for line in lines]}, indent=1))
