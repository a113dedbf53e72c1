"""The idle time of the CPUs this process may run on, from Linux's ``/proc/stat``: whether cores were
left free, whatever else ran on the machine (other programs, other pipelines).

The verdict needs it because a process's own CPU time cannot tell threads that take turns holding the
GIL from threads that release it but find no free core: both keep about one core busy. Only in the
first case does a core stay idle.
"""

from __future__ import annotations

import os

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


def idle_seconds() -> float | None:
    """Seconds the CPUs this process may use have spent idle (or waiting on I/O) since boot, summed
    over them; ``None`` where ``/proc/stat`` is not there (macOS, Windows) or cannot be read."""
    ticks = 0
    try:
        allowed = {f"cpu{n}" for n in os.sched_getaffinity(0)}
        with open("/proc/stat") as stat:
            for line in stat:  # the cpu lines come first; the rest (interrupt counts) is long
                if not line.startswith("cpu"):
                    break
                name, *fields = line.split()
                if name in allowed and len(fields) >= 4:
                    ticks += int(fields[3]) + (int(fields[4]) if len(fields) > 4 else 0)  # idle, iowait
    except (AttributeError, OSError, ValueError):
        return None
    return ticks * _TICK_S
