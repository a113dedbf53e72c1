"""The loader's progress bar (``QueueFlowLoader(progress=True)``): checked at construction, shown per epoch."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from typing import Any


def check(progress: object) -> bool:
    """``progress`` if it is ``True`` or ``False``; anything else fails here, at the call, not at the first epoch.

    A string (``"tqdm"``), a number or a tqdm class would otherwise read as "true" and silently show the
    default bar; naming what to pass is kinder. tqdm is an extra, so its absence is reported here too."""
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False, not {progress!r}: True shows a tqdm bar per epoch")
    if progress and importlib.util.find_spec("tqdm") is None:
        raise ImportError("progress=True needs tqdm: pip install 'torchqueue[progress]' (or tqdm)")
    return progress


def bar(batches: Iterator[Any], total: int | None, epoch: int) -> Iterator[Any]:
    """``batches`` through a tqdm bar titled ``epoch N`` (closed when the epoch ends or is left)."""
    from tqdm.auto import tqdm

    class Bar(tqdm):  # type: ignore[misc, valid-type]
        # tqdm's monitor thread would outlive the epoch: a later pipeline of this process, seeing another
        # Python thread, would then start its workers from the fork server (1.1-1.3 s), not by a fork
        monitor_interval = 0

    with Bar(batches, total=total, unit="batch", desc=f"epoch {epoch}") as shown:
        yield from shown
