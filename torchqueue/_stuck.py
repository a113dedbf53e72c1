"""What a consumer's timeout reports: the steps that hold elements now, and the oldest element.

Every worker's row of the stats array (see ``stats.Field``) says what the worker does and since
when: a call of the step's function going on (``BUSY_SINCE``), a wait for room downstream with
an element in hand (``OUT_SINCE``), and the position of the element it took last
(``AT_EPOCH``, ``AT_SEQ``; ``-1`` once it passes on an epoch's end: it holds none). A worker writes
these few numbers per element; the consumer reads them only when it gave up waiting, so a stuck step
is named without any message to or from it; and when a worker died, so that its ``WorkerDiedError``
names the element it held.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torchqueue._handles import STOPPED, process_stopped
from torchqueue.stats import NFIELDS, Field

IN_FUNCTION = "in its function"
WAITING = "waiting for room downstream"

Worker = tuple[str, int, "int | None"]
"""A worker as the runtime lists them: ``(step, index, pid)``."""


@dataclass(frozen=True)
class Holder:
    """A worker that holds an element: ``doing`` it for ``seconds``, the element at ``(epoch, seq)``."""

    step: str
    worker: int
    pid: int | None
    doing: str
    seconds: float
    epoch: int
    seq: int

    def __str__(self) -> str:
        return (
            f"{self.step!r} (worker {self.worker}, pid {self.pid}: {self.doing} for {self.seconds:.1f} s, "
            f"element {self.seq} of epoch {self.epoch})"
        )


def holders(workers: list[Worker], rows: Any, now: float) -> list[Holder]:
    """The workers (``(step, worker, pid)``, one per row in order) that hold an element: those in their
    function or stopped first (a cause), then those waiting for room downstream (what a cause makes of
    the steps before it, within milliseconds of each other); longest first in each."""
    found = []
    for row, (step, worker, pid) in enumerate(workers):
        base = row * NFIELDS
        busy, out = rows[base + Field.BUSY_SINCE], rows[base + Field.OUT_SINCE]
        if (busy <= 0 and out <= 0) or rows[base + Field.AT_SEQ] < 0:  # passing on an epoch's end: no element
            continue
        doing, since = (IN_FUNCTION, busy) if busy > 0 else (WAITING, out)
        if process_stopped(pid):  # what its row says it does, it does not do now
            doing = f"{STOPPED}, {IN_FUNCTION if busy > 0 else 'sending'}"
        epoch, seq = int(rows[base + Field.AT_EPOCH]), int(rows[base + Field.AT_SEQ])
        found.append(Holder(step, worker, pid, doing, max(0.0, now - since), epoch, seq))
    return sorted(found, key=lambda holder: (holder.doing == WAITING, -holder.seconds))


def stopped(workers: list[Worker]) -> list[Worker]:
    """The workers whose process is stopped."""
    return [(step, worker, pid) for step, worker, pid in workers if process_stopped(pid)]


def _named(worker: Worker) -> str:
    step, index, pid = worker
    return f"{step!r} (worker {index}, pid {pid})"


@dataclass(frozen=True)
class Died:
    """What the consumer found when a worker died after it started: the worker, how it ended (its exit
    code or signal, in words), what it held (``None``: nothing), and the traceback of what it raised
    outside its step's function, where it said so before it died (``WorkerFailure``)."""

    worker: Worker
    exit: str
    held: Holder | None
    raised: str | None = None


def raised_text(raised: str | None) -> str:
    """What a dead worker's ``WorkerDiedError`` adds for the traceback it said as it failed (else nothing)."""
    return f", raising outside your function (in torchqueue or the system under it):\n{raised}" if raised else ""


def died_of(error: BaseException) -> Died | None:
    """What the consumer found about the worker whose death ``error`` reports (``None``: not known)."""
    return getattr(error, "died", None)


def died_with(holder: Holder, stage: str) -> str:
    """What a worker that died held, for its ``WorkerDiedError``: the element it worked on or was sending
    (a step fused into its ``stage`` named)."""
    step = "" if holder.step == stage else f" in step {holder.step!r}"
    doing = "working on" if holder.doing == IN_FUNCTION else "sending"
    return f", while {doing} element {holder.seq} of epoch {holder.epoch}{step}"


def timed_out(
    timeout: float, held: list[Holder], ready: tuple[int, int] = (0, 0), halted: list[Worker] | None = None
) -> TimeoutError:
    """The consumer's ``TimeoutError``; ``ready``: of the workers, how many had started; ``halted``: the
    workers whose process is stopped (``stopped``).

    A plain ``TimeoutError`` (what users catch and see), which also carries what it found for a caller
    that says it in its own terms (a loader names batches): ``timeout``, ``held`` (the workers holding
    elements, longest first) and ``halted``; ``stuck_of`` reads them back."""
    error = TimeoutError(_waited(timeout, held, ready, bool(halted)) + halted_text(halted or []))
    error.stuck = Stuck(timeout, tuple(held), tuple(halted or ()))  # type: ignore[attr-defined]
    return error


@dataclass(frozen=True)
class Stuck:
    """What a consumer's timeout found: no output within ``timeout`` seconds, the workers that ``held``
    elements (longest first), and those ``halted`` (stopped)."""

    timeout: float
    held: tuple[Holder, ...]
    halted: tuple[Worker, ...]


def stuck_of(error: BaseException) -> Stuck | None:
    """What the consumer's timeout ``error`` found (``None``: another ``TimeoutError``)."""
    return getattr(error, "stuck", None)


def halted_text(halted: list[Worker] | tuple[Worker, ...], named: Callable[[Worker], str] | None = None) -> str:
    """The sentence a timeout's message ends with where workers are stopped (else nothing); ``named``: how
    a worker is called (``'step' (worker 0, pid 7)``)."""
    if not halted:
        return ""
    by_pid: dict[int | None, list[Worker]] = {}
    for worker in halted:  # a fused step runs in its host's process: one process, two names
        by_pid.setdefault(worker[2], []).append(worker)
    name = named or _named
    names = [
        " and ".join([*(repr(step) for step, *_ in workers[:-1]), name(workers[-1])]) for workers in by_pid.values()
    ]
    return f". Workers {STOPPED}: {', '.join(names)}; SIGCONT resumes them."


def _waited(timeout: float, held: list[Holder], ready: tuple[int, int], halted: bool) -> str:
    if not held and halted:  # the stopped workers, named next, are the likelier reason than the input
        return f"no output came within {timeout} seconds, and no step holds an element"
    if not held and ready[0] < ready[1]:
        return (
            f"no output came within {timeout} seconds, and the workers are still starting ({ready[0]} of "
            f"{ready[1]} ready; under spawn or forkserver each imports torch and your modules first): the "
            "timeout counts from the first output asked for, start-up included"
        )
    if not held:
        return (
            f"no output came within {timeout} seconds, and no step holds an element: the pipeline waits "
            "for its input (the iterable's next() has not returned)"
        )
    oldest = held[0]
    return (
        f"no output came within {timeout} seconds. Steps holding elements: {'; '.join(map(str, held))}. "
        f"The oldest is element {oldest.seq} of epoch {oldest.epoch}, in step {oldest.step!r}"
    )
