"""What a map-style loader's timeout, or a worker's death, names: the batches its workers hold, by
their place in the epoch and their indices, instead of the pipeline's own terms (step ``'fetch'``,
element N).

The loader hands each epoch's jobs to its ``Sequence`` of fetch workers; ``Handed`` keeps them by
their position in that ``Sequence``'s epoch, which is what the pipeline's ``TimeoutError`` says each
worker holds (``_stuck.Holder``). Only the epoch iterated and those queued behind it are kept.

    RuntimeError: DataLoader timed out after 3 seconds
    ... caused by TimeoutError: no batch came within 3 seconds: loader worker 1 (pid 1739) has been
    fetching batch 3 (indices [12, 13, 14, 15]) for 3.0 s, in the dataset or collate_fn; ...

    WorkerDiedError: loader worker 0 (pid 987) died: killed by signal SIGKILL, while fetching batch 4
    (indices [16, 17, 18, 19])
"""

from __future__ import annotations

import collections
import reprlib
from collections.abc import Iterable, Iterator
from typing import Any

from torchqueue._fetch import Job
from torchqueue._stuck import IN_FUNCTION, Holder, Stuck, Worker, died_of, halted_text, raised_text, stuck_of
from torchqueue.errors import WorkerDiedError

KEPT_EPOCHS = 3
"""Epochs of a ``Sequence`` whose jobs are kept at most (the one iterated, and the next ones queued behind
it); those before the one iterated go as soon as it is (``forget_before``)."""

_indices_repr = reprlib.Repr()
_indices_repr.maxlist = _indices_repr.maxtuple = 8
_indices_repr.maxother = 60


class Handed:
    """The jobs handed to one ``Sequence``'s epochs, by that ``Sequence``'s epoch number and position."""

    def __init__(self) -> None:
        self._epochs: collections.OrderedDict[int, list[Job]] = collections.OrderedDict()
        self._queued = 0

    def record(self, jobs: Iterable[Job]) -> Iterable[Job]:
        """``jobs``, handed as the ``Sequence``'s next epoch: a list as it is (the feeder treats lists as
        in memory), anything else as it is taken."""
        number, self._queued = self._queued, self._queued + 1
        if isinstance(jobs, list):
            self._keep(number, jobs)
            return jobs
        taken: list[Job] = []
        self._keep(number, taken)
        return _taking(jobs, taken)

    def _keep(self, number: int, jobs: list[Job]) -> None:
        self._epochs[number] = jobs
        while len(self._epochs) > KEPT_EPOCHS:
            self._epochs.popitem(last=False)

    def forget_before(self, epoch: int) -> None:
        """Let go of the jobs of the epochs before ``epoch``, iterated now: a worker holds none of them any
        more (iterating an epoch waits until the one before is over), and they would hold an epoch's
        indices each."""
        for number in [number for number in self._epochs if number < epoch]:
            del self._epochs[number]

    def job(self, epoch: int, seq: int) -> Job | None:
        jobs = self._epochs.get(epoch)
        return jobs[seq] if jobs is not None and 0 <= seq < len(jobs) else None

    def timed_out(self, error: Stuck, current: int | None) -> TimeoutError | None:
        """The loader's ``TimeoutError`` for what the pipeline's timeout found: what each worker holds, as batches;
        ``current``: the ``Sequence``'s epoch being iterated (a batch of a later one was fetched ahead;
        ``None``: the timeout came as an epoch left before its end was cancelled, and names its batch).
        ``None`` where it names no holder (the pipeline's message says it: start-up, stopped workers)."""
        named = [text for holder in error.held if (text := self._holding(holder, current)) is not None]
        if not named:
            return None
        stopped = halted_text(error.halted, _worker)
        return TimeoutError(f"no batch came within {error.timeout} seconds: {'; '.join(named)}{stopped}")

    def worker_died(self, error: WorkerDiedError, current: int | None) -> WorkerDiedError:
        """The loader's ``WorkerDiedError`` for the pipeline's ``error``: the worker and the batch it held
        (see ``timed_out``); ``error`` itself where the pipeline found nothing more (a death at start-up)."""
        died = died_of(error)
        if died is None:
            return error
        text = f"{_worker(died.worker)} died: {died.exit}"
        held = died.held
        if held is not None and (what := self._batch(held, current)) is not None:
            text += f", while {'fetching' if held.doing == IN_FUNCTION else 'sending'} {what}"
        loaders = WorkerDiedError(text + raised_text(died.raised))
        loaders.died = died  # type: ignore[attr-defined]
        return loaders

    def _holding(self, holder: Holder, current: int | None) -> str | None:
        what = self._batch(holder, current)
        if what is None:
            return None
        worker = _worker((holder.step, holder.worker, holder.pid))
        if holder.doing == IN_FUNCTION:
            return (
                f"{worker} has been fetching {what} for {holder.seconds:.1f} s, in the dataset or collate_fn; "
                f"py-spy dump --pid {holder.pid} shows where"
            )
        return f"{worker} holds {what}, {holder.doing} for {holder.seconds:.1f} s"

    def _batch(self, holder: Holder, current: int | None) -> str | None:
        """The batch ``holder`` holds, with its indices (``None``: no batch of a kept epoch)."""
        job = self.job(holder.epoch, holder.seq)
        if job is None or job.indices is None:
            return None
        batch = f"batch {job.position}" if job.position >= 0 else "a batch"
        if current is None:
            batch += " of the epoch left before its end"
        elif holder.epoch != current:
            batch += " of the next epoch (fetched ahead)"
        elif not job.keep:
            batch += " of the last epoch (fetched again to restore the workers' random state)"
        indices = _indices_repr.repr(job.indices)
        return (
            f"{batch} (indices {indices})" if isinstance(job.indices, (list, tuple)) else f"{batch} (index {indices})"
        )


def _worker(worker: Worker) -> str:
    _, index, pid = worker
    return f"loader worker {index} (pid {pid})"


def _taking(jobs: Iterable[Job], taken: list[Job]) -> Iterator[Job]:
    for job in jobs:
        taken.append(job)
        yield job


def outputs_named(outputs: Iterator[Any], handed: Handed) -> Iterator[Any]:
    """``outputs`` (an epoch's iterator of the ``Sequence`` ``handed`` was handed to); its ``TimeoutError``
    and ``WorkerDiedError`` raised as the loader's."""
    current = outputs.state.epoch  # type: ignore[attr-defined]
    handed.forget_before(current)
    try:
        yield from outputs
    except TimeoutError as error:
        raise named(error, handed, current) from None
    except WorkerDiedError as error:
        raise handed.worker_died(error, current) from None


def named(error: TimeoutError, handed: Handed, current: int | None) -> TimeoutError:
    """The loader's ``TimeoutError`` for the pipeline's ``error`` (see ``Handed.timed_out``), or ``error``."""
    stuck = stuck_of(error)
    loaders = None if stuck is None else handed.timed_out(stuck, current)
    return error if loaders is None else loaders
