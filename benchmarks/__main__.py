"""``python -m benchmarks [workload ...] [--quick] [--save]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks import _harness
from benchmarks._harness import header, save
from benchmarks.workloads import ALL


def main() -> None:
    parser = argparse.ArgumentParser(description="torchqueue against DataLoader, torchdata.nodes, SPDL and serial")
    parser.add_argument("workloads", nargs="*", choices=[*ALL, []], help=f"default: all of {', '.join(ALL)}")
    parser.add_argument("--quick", action="store_true", help="about 10x smaller, for a smoke test")
    parser.add_argument("--save", action="store_true", help="also write benchmarks/results/latest.json")
    parser.add_argument("--repeat", type=int, default=_harness.REPEAT, help="rounds per workload; lines show medians")
    args = parser.parse_args()
    _harness.REPEAT = args.repeat
    print(header(), flush=True)
    lines = []
    for name in args.workloads or list(ALL):
        lines += ALL[name](args.quick)
    if args.save:
        save(lines, Path(__file__).parent / "results" / "latest.json")


if __name__ == "__main__":
    main()
