"""Exceptions raised in the consumer, and how a worker's exception gets there.

A worker wraps an exception into a ``Failure`` message (``capture``) with its
formatted traceback, the step name and the failing element's position, and
checks that the exception pickles. The consumer rebuilds it (``rebuild``) with
its original type when it can, else as ``PipelineError``; either way the
message says where it was raised (the step and element, the input iterable,
or a loader's ``__getitem__(index)``) and carries the original traceback. A
type whose constructor wants more than a message (``json.JSONDecodeError``) is
raised as the worker's own exception object, with that message as its text, or
as a note where its ``__str__`` ignores it.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import reprlib
import traceback

from torchqueue import _mainmodule
from torchqueue._mainmodule import MainClassPickler
from torchqueue._messages import Failure

__all__ = ["PipelineError", "TooManyWorkersWarning", "WorkerDiedError"]


class PipelineError(RuntimeError):
    """A pipeline failed: a step raised, or a worker could not run."""


class WorkerDiedError(PipelineError):
    """A worker process ended without being asked to (killed, segfault, out of memory)."""


class TooManyWorkersWarning(UserWarning):
    """A pipeline's steps ask for more workers than this process has CPUs (as DataLoader warns for
    ``num_workers``): the extra workers only share the cores, and slow each other down."""


class _KeyErrorMessage(str):
    """Keeps a multi-line message readable in ``str(KeyError(...))``, which uses ``repr``."""

    def __repr__(self) -> str:
        return str(self)


_worker_process = False  # this process is a worker of its own (a step's thread runs in your process)


def in_worker_process() -> None:
    """Mark this process as a worker's: errors captured here say "worker pid", else "your process"."""
    global _worker_process
    _worker_process = True
    _mainmodule.in_worker_process()


NO_ITEM = object()
"""``capture``'s ``item`` when the call was on a whole element (not one item of a ``PoolStep``'s)."""

INPUT = "input"
"""The name the input iterable goes by where a step's name would be (the feeder writes its elements)."""

_ITEM_REPR = reprlib.Repr()  # keyword arguments only from Python 3.12
_ITEM_REPR.maxstring = _ITEM_REPR.maxother = 60
_ITEM_REPR.maxlist = _ITEM_REPR.maxtuple = _ITEM_REPR.maxdict = 4
_ITEM_REPR.maxlevel = 2


def capture(
    step: str, exc: BaseException, epoch: int | None = None, seq: int | None = None, item: object = NO_ITEM
) -> Failure:
    """Wrap ``exc``, raised by ``step`` in this process, for the trip to the consumer.

    ``epoch`` and ``seq``: the position of the element that failed, which the message names;
    ``item``: the item of it a ``PoolStep``'s call failed on, which it shows (shortened).
    An exception whose arguments do not pickle (``ValueError("bad record", lock)``) travels as its
    type with its message, as DataLoader rebuilds every exception, so that ``except ValueError``
    still catches it; only one whose type cannot be built from a message becomes a ``PipelineError``."""
    process = f"worker pid {os.getpid()}" if _worker_process else f"in your process, pid {os.getpid()}"
    where = f"step {step!r} ({process})"
    if seq is not None:
        where += f" at element {seq} of epoch {epoch}"
    if item is not NO_ITEM:
        where += f", on its item {_short_repr(item)}"
    return capture_at(step, exc, where, in_consumer=not _worker_process)


def _short_repr(item: object) -> str:
    """``repr(item)``, shortened (``reprlib``); a placeholder where its ``__repr__`` raises."""
    try:
        return " ".join(_ITEM_REPR.repr(item).split())  # one line: a tensor's repr breaks its rows
    except Exception:
        return f"<{type(item).__qualname__}: its repr() raised>"


def capture_input(exc: BaseException, epoch: int, seq: int) -> Failure:
    """Wrap ``exc``, raised by the user's input iterable (read in the consumer's process) when asked
    for the element at position ``seq`` of ``epoch``."""
    where = f"the input iterable (read in the consumer's own process) at element {seq} of epoch {epoch}"
    return capture_at(INPUT, exc, where, in_consumer=True)


def capture_at(step: str, exc: BaseException, where: str, in_consumer: bool = False) -> Failure:
    """Wrap ``exc`` for the consumer, its message saying it was raised in ``where``."""
    pickled = _round_trip(exc)
    if pickled is None:
        try:
            pickled = _round_trip(type(exc)(str(exc)))
        except Exception:  # its type wants other arguments
            pickled = None
    return Failure(
        step=step,
        exc_type=type(exc).__qualname__,
        message=_text(exc, failed=f"<{type(exc).__qualname__}: its str() raised>"),
        traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        pid=os.getpid(),
        pickled=pickled,
        where=where,
        in_consumer=in_consumer,
    )


def _round_trip(exc: BaseException) -> bytes | None:
    """``exc`` pickled, if it comes back from its pickle (else ``None``)."""
    try:
        buffer = io.BytesIO()
        MainClassPickler(buffer).dump(exc)  # a class of __main__ also where the worker's came by value
        pickled = buffer.getvalue()
        pickle.loads(pickled)
    except Exception:  # any failure to round-trip means: rebuild from the message
        return None
    return pickled


def rebuild(failure: Failure) -> BaseException:
    """The exception to raise in the consumer for ``failure``."""
    where = failure.where or f"step {failure.step!r} (worker pid {failure.pid})"
    origin = "Worker" if not failure.in_consumer else "Input" if failure.step == INPUT else "Your process's"
    text = f": {failure.message}" if failure.message else ""  # ``raise ValueError`` has none
    message = f"{failure.exc_type} in {where}{text}\n\n{origin} traceback:\n{failure.traceback}"
    original = None
    if failure.pickled is not None:
        try:
            original = pickle.loads(failure.pickled)
        except Exception:
            original = None
    if not isinstance(original, BaseException):
        return PipelineError(message)
    if isinstance(original, (StopIteration, StopAsyncIteration)):
        # raised in your loop's ``next``, it would end the epoch there, silently (PEP 479's reason)
        stopped = PipelineError(message)
        stopped.__cause__ = original
        return stopped
    exc_type = type(original)
    try:
        if isinstance(original, OSError) and original.errno is not None:
            # ``except`` tests on errno keep working; set after, so that the text is the message alone (not
            # "[Errno 2] ...: [Errno 2] No such file"), and the worker's exception, as the cause, has the rest
            rebuilt = exc_type(message)
            rebuilt.errno = original.errno
        else:
            rebuilt = exc_type(_KeyErrorMessage(message) if issubclass(exc_type, KeyError) else message)
    except Exception:
        rebuilt = None
    if rebuilt is not None and failure.message in _text(rebuilt):
        rebuilt.__cause__ = original
        with contextlib.suppress(Exception):  # its own attributes (``exc.code``), as the worker's had them
            rebuilt.__dict__.update(original.__dict__)
        return rebuilt
    return _told(original, message)


def _told(original: BaseException, message: str) -> BaseException:
    """The worker's exception object itself (its type takes other arguments than a message), with
    ``message`` as its text where its ``__str__`` shows ``args``, else as a note (Python 3.11+)."""
    kept = original.args
    try:
        original.args = (message,)
    except Exception:
        pass
    if message not in _text(original):
        original.args = kept
        add_note = getattr(original, "add_note", None)
        if add_note is not None:
            add_note(message)
    return original


def _text(exc: BaseException, failed: str = "") -> str:
    """``str(exc)`` (empty for one raised without a message: ``raise StopIteration``), or ``failed``
    where it raises."""
    try:
        return str(exc)
    except Exception:
        return failed
