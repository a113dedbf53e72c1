"""A worker in a process of its own: what the process sets up before it runs its stage's loop.

Only what a process needs is here (the loops are ``_runners``'): it freezes what it inherited out of
the garbage collector's reach, ignores Ctrl-C (the consumer's to handle), exits with its parent
(``_parentwatch``), and runs torch's operations on one thread (the pipeline's parallelism is its
workers).
"""

from __future__ import annotations

import gc
import signal

import torch

from torchqueue import _preload, _segments, errors
from torchqueue._loop import WorkerContext
from torchqueue._parentwatch import ParentWatch, clean_up_on_signal
from torchqueue._runners import run_worker


def worker_main(ctx: WorkerContext) -> None:
    """Entry point of every worker process."""
    # What the worker inherited by fork stays shared with the consumer's process only while nothing
    # writes to its pages, and a garbage collection writes to every object it walks. Freezing moves the
    # inherited objects out of the collector's reach (gc.freeze's documented use), so a worker's
    # collections copy none of the consumer's heap (about 40 MB per worker with torch imported);
    # objects the worker creates are collected as usual.
    gc.freeze()
    errors.in_worker_process()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the consumer's to handle
    _segments.survive_lease_breaks()
    ParentWatch(ctx.segment_dir).start()
    clean_up_on_signal(ctx.stop, ctx.segment_dir)
    torch.set_num_threads(1)
    run_worker(ctx, own_process=True, loading=_preload.reporting)  # what the fork server imports for the next
