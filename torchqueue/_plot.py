"""``Stats.plot``: where each step's workers spend their time, now and over the run (matplotlib).

    ┌ bars: starting / busy / encoding+decoding /         ┐ ┌ outputs per second per step, over time ┐
    │ waiting for input / waiting for room, the input     │ ├ busy fraction per step, over time      ┤
    │ queue's fill and the share of the time on a CPU,    │ │                                        │
    │ one group per step; title: verdict                  │ │                                        │
    └─────────────────────────────────────────────────────┘ └────────────────────────────────────────┘

A step that stays busy near 1 while the others wait is the bottleneck. The title is the verdict the
table's hint gives (``_verdict``). The time series come from ``Stats.history``: each point is the
difference between two consecutive snapshots.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torchqueue._verdict import verdict

if TYPE_CHECKING:
    from torchqueue.stats import Stats


def plot(stats: Stats, ax: Any = None) -> Any:
    import matplotlib.pyplot as plt

    steps = list(stats.values())
    snapshots = [*stats.history, stats]
    over_time = ax is None and len(snapshots) >= 3
    if ax is not None:
        fig = ax.figure
    elif over_time:
        fig = plt.figure(figsize=(4.5 + 1.2 * max(len(steps), 1), 5.0))
        grid = fig.add_gridspec(2, 2, width_ratios=[1.2 * max(len(steps), 1), 6])
        ax = fig.add_subplot(grid[:, 0])
        rate_ax, busy_ax = fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, 1])
        _over_time(stats, snapshots, rate_ax, busy_ax)
    else:
        fig, ax = plt.subplots(figsize=(1.5 + 1.2 * max(len(steps), 1), 3.5))
    _bars(stats, ax)
    fig.tight_layout()
    return fig


def _bars(stats: Stats, ax: Any) -> None:
    steps = list(stats.values())
    span = [max(s.nworkers * stats.elapsed_s, 1e-9) for s in steps]
    parts = [
        ("starting", "tab:olive", [s.startup_s for s in steps]),
        ("busy", "tab:red", [s.busy_s for s in steps]),
        ("encoding, decoding", "tab:orange", [s.encode_s + s.decode_s for s in steps]),
        ("waiting for input", "tab:blue", [s.wait_in_s for s in steps]),
        ("waiting for room", "tab:gray", [s.wait_out_s for s in steps]),
    ]
    x = list(range(len(steps)))
    bottom = [0.0] * len(steps)
    for label, color, seconds in parts:
        heights = [part / t for part, t in zip(seconds, span)]
        ax.bar(x, heights, bottom=bottom, label=label, color=color)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.plot(x, [s.queue_fill for s in steps], "ko--", label="input queue fill")
    if any(s.cpu_s for s in steps):  # below "busy": sleeping, waiting on files, the GIL or a core
        ax.plot(x, [s.cpu_s / t for s, t in zip(steps, span)], "k_", markersize=18, mew=2, label="on a CPU")
    ax.set_xticks(x, [s.name for s in steps], rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction of worker time")
    ax.set_title(verdict(stats).title, fontsize="medium", wrap=True)
    ax.legend(fontsize="small", loc="upper right")


def _over_time(stats: Stats, snapshots: list[Stats], rate_ax: Any, busy_ax: Any) -> None:
    for name in stats:
        times, rates, busy = [], [], []
        for before, after in zip(snapshots, snapshots[1:]):
            seconds = after.elapsed_s - before.elapsed_s
            if seconds <= 0:
                continue
            step_before, step_after = before[name], after[name]
            times.append(after.elapsed_s)
            rates.append((step_after.elements_out - step_before.elements_out) / seconds)
            busy.append(min(1.0, (step_after.busy_s - step_before.busy_s) / (seconds * step_after.nworkers)))
        rate_ax.plot(times, rates, label=name)
        busy_ax.plot(times, busy, label=name)
    rate_ax.set_yscale("symlog", linthresh=1.0)  # steps of one pipeline differ by orders (items, chunks, batches)
    rate_ax.set_ylabel("outputs / s")
    rate_ax.legend(fontsize="small", loc="upper right")
    busy_ax.set_ylabel("busy fraction")
    busy_ax.set_ylim(0, 1.05)
    busy_ax.set_xlabel("seconds since start")
