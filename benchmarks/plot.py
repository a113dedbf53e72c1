"""``python -m benchmarks.plot``: draw docs/benchmarks.png from benchmarks/results/latest.json."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    data = json.loads((ROOT / "benchmarks" / "results" / "latest.json").read_text())
    lines = [
        line
        for line in data["lines"]
        if line["ratio"] is not None and line["contender"] != "serial" and "MiB" not in line["unit"]  # throughputs
    ]
    workloads = list(dict.fromkeys(line["workload"] for line in lines))
    contenders = list(dict.fromkeys(line["contender"] for line in lines))
    fig, ax = plt.subplots(figsize=(10, 5.5))
    width = 0.8 / len(contenders)
    colors = plt.get_cmap("tab20").colors  # one distinct colour per contender (the default cycle has 10)
    for i, contender in enumerate(contenders):
        ratios = {line["workload"]: line["ratio"] for line in lines if line["contender"] == contender}
        xs = [w + i * width for w in range(len(workloads)) if workloads[w] in ratios]
        heights = [ratios[workloads[round(x - i * width)]] for x in xs]
        ax.bar(xs, heights, width, label=contender, color=colors[i % len(colors)])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks([w + 0.4 - width / 2 for w in range(len(workloads))], workloads)
    ax.set_ylabel("throughput / DataLoader's (log)")
    ax.set_title(data["header"].splitlines()[0].lstrip("# ")[:110], fontsize=8)
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.08), frameon=False)
    fig.tight_layout()
    out = ROOT / "docs" / "benchmarks.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
