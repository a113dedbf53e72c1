"""``python -m benchmarks [workload ...] [--quick] [--save] [--repeat N] [--workers N] [--only a,b]``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def _workers_first() -> None:
    """``--workers N`` before the contenders are imported: they read it once (``_contenders.WORKERS``)."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--workers", type=int, default=None)
    workers = early.parse_known_args()[0].workers
    if workers is not None:
        if workers < 1:
            raise SystemExit(f"--workers must be at least 1, got {workers}")
        os.environ["TORCHQUEUE_BENCH_WORKERS"] = str(workers)


_workers_first()

from benchmarks import _harness  # noqa: E402
from benchmarks._harness import header, save  # noqa: E402
from benchmarks.workloads import ALL  # noqa: E402


def main() -> None:
    import warnings

    import torchqueue as tq

    # Every contender gets the same worker count, above a 2-core machine's cores on purpose in the staged shapes.
    warnings.simplefilter("ignore", tq.TooManyWorkersWarning)
    parser = argparse.ArgumentParser(description="torchqueue against DataLoader, torchdata.nodes, SPDL and serial")
    parser.add_argument("--workers", type=int, default=2, help="workers per contender (default 2)")
    parser.add_argument("workloads", nargs="*", choices=[*ALL, []], help=f"default: all of {', '.join(ALL)}")
    parser.add_argument("--quick", action="store_true", help="about 10x smaller, for a smoke test")
    parser.add_argument("--save", action="store_true", help="also write benchmarks/results/latest.json")
    parser.add_argument("--repeat", type=int, default=_harness.REPEAT, help="rounds per workload; lines show medians")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated parts of contender names: run only those (e.g. 'serial,DataLoader,thread')",
    )
    args = parser.parse_args()
    _harness.REPEAT = args.repeat
    _harness.ONLY = tuple(part for part in args.only.split(",") if part)
    print(header(), flush=True)
    lines = []
    for name in args.workloads or list(ALL):
        lines += ALL[name](args.quick)
    if args.save:
        save(lines, Path(__file__).parent / "results" / "latest.json")


if __name__ == "__main__":
    main()
