"""Exceptions raised in the consumer, and how a worker's exception gets there.

A worker wraps an exception into a ``Failure`` message (``capture``) with its
formatted traceback and the step name, and checks that the exception pickles.
The consumer rebuilds it (``rebuild``) with its original type when it can,
else as ``PipelineError``; either way the message names the step and carries
the worker's traceback.
"""

from __future__ import annotations

import os
import pickle
import traceback

from torchqueue._messages import Failure

__all__ = ["PipelineError", "WorkerDiedError"]


class PipelineError(RuntimeError):
    """A pipeline failed: a step raised, or a worker could not run."""


class WorkerDiedError(PipelineError):
    """A worker process ended without being asked to (killed, segfault, out of memory)."""


class _KeyErrorMessage(str):
    """Keeps a multi-line message readable in ``str(KeyError(...))``, which uses ``repr``."""

    def __repr__(self) -> str:
        return str(self)


def capture(step: str, exc: BaseException) -> Failure:
    """Wrap ``exc``, raised by ``step`` in this process, for the trip to the consumer."""
    pickled: bytes | None
    try:
        pickled = pickle.dumps(exc)
        pickle.loads(pickled)
    except Exception:  # any failure to round-trip means: rebuild from the message
        pickled = None
    return Failure(
        step=step,
        exc_type=type(exc).__qualname__,
        message=str(exc),
        traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        pid=os.getpid(),
        pickled=pickled,
    )


def rebuild(failure: Failure) -> BaseException:
    """The exception to raise in the consumer for ``failure``."""
    message = (
        f"{failure.exc_type} in step {failure.step!r} (worker pid {failure.pid}): {failure.message}\n"
        f"\nWorker traceback:\n{failure.traceback}"
    )
    original = None
    if failure.pickled is not None:
        try:
            original = pickle.loads(failure.pickled)
        except Exception:
            original = None
    exc_type = type(original) if isinstance(original, BaseException) else None
    if exc_type is None:
        return PipelineError(message)
    try:
        rebuilt = exc_type(_KeyErrorMessage(message) if issubclass(exc_type, KeyError) else message)
    except Exception:
        return PipelineError(message)
    if failure.message not in str(rebuilt):
        return PipelineError(message)
    rebuilt.__cause__ = original
    return rebuilt
