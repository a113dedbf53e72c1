"""Guessing a map-style loader's next epoch, so that persistent workers start it before ``iter()``.

DataLoader draws an epoch's order when the epoch starts, so with persistent workers the first
batch of every epoch costs a whole fetch. ``QueueFlowLoader`` instead queues, as an epoch starts,
a ``Guess`` of the following one behind it. The feeder thread draws the guess when it gets there
(after this epoch's last batch was handed out: off your loop's path) from a private copy of the
sampler, so no state of yours is touched, and the workers go on from this epoch's last batch into
the next one's first. When the next epoch starts, ``Guess.take`` keeps the guess only if the
sampler would draw exactly that: its generator is in the state the guess started from, and
everything else the draw depends on (lengths, epoch, seed, batch size, ...) is unchanged. Then
the generator is moved to the state the draw left, as if the loader had drawn it now. Otherwise
the guess is cancelled, and the next epoch's jobs put every worker back in the random state it
had after its last batch that was yielded (see ``_epochs``). A guess is also dropped when the
epoch before it is left early: DataLoader's workers then fetch a different set of batches.

Guesses are only made for samplers whose order depends on nothing but their own generator or
epoch and the configuration compared: ``SequentialSampler``, ``RandomSampler`` with a generator
(without one it draws from torch's global generator, which training moves), and
``DistributedSampler``, optionally in a ``BatchSampler``. Any other sampler (a user's,
``WeightedRandomSampler`` whose weights may be changed between epochs) is never iterated ahead.

A ``DistributedSampler``'s next epoch number is guessed from how it moved at the last epoch start
(``EpochStep``): Lightning and most training loops call ``set_epoch(epoch)`` every epoch; plain
loops often never do.

    consumer thread                              feeder thread
    epoch e starts: queue e, queue Guess(e+1)
    ...                                          feeds e's jobs, then Guess.jobs(): draws e+1
    epoch e+1 starts: Guess.take() ─ equal? ──►  (its jobs are queued already)
                      │ no: cancel, draw anew
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import BatchSampler, DistributedSampler, RandomSampler, SequentialSampler

_PREDICTABLE = (SequentialSampler, RandomSampler, DistributedSampler)


def base_sampler(index_sampler: Any) -> Any:
    return index_sampler.sampler if type(index_sampler) is BatchSampler else index_sampler


def predictable(index_sampler: Any) -> bool:
    """Whether ``index_sampler`` may be guessed ahead (see the module docstring)."""
    sampler = base_sampler(index_sampler)
    return type(sampler) in _PREDICTABLE and getattr(sampler, "generator", True) is not None


def _fingerprint(index_sampler: Any) -> tuple[Any, ...]:
    """Everything but the generator's state that the next draw of a predictable sampler depends on."""
    sampler = base_sampler(index_sampler)
    parts: list[Any] = [type(index_sampler), getattr(index_sampler, "batch_size", None)]
    parts += [getattr(index_sampler, "drop_last", None), type(sampler)]
    if isinstance(sampler, SequentialSampler):
        parts += [len(sampler.data_source)]  # type: ignore[arg-type]
    elif isinstance(sampler, RandomSampler):
        parts += [sampler.replacement, sampler.num_samples, len(sampler.data_source)]  # type: ignore[arg-type]
    elif isinstance(sampler, DistributedSampler):
        parts += [sampler.epoch, sampler.seed, sampler.shuffle, sampler.num_replicas, sampler.rank]
        parts += [sampler.drop_last, len(sampler.dataset)]  # type: ignore[arg-type]
    return tuple(parts)


def private_copy(index_sampler: Any, epoch_step: int) -> Any:
    """A copy of the sampler chain that draws what the original would next, with its own generator."""
    sampler = copy.copy(base_sampler(index_sampler))
    generator = getattr(sampler, "generator", None)
    if generator is not None:
        sampler.generator = torch.Generator().set_state(generator.get_state())
    if isinstance(sampler, DistributedSampler):
        sampler.epoch += epoch_step
    if type(index_sampler) is BatchSampler:
        outer = copy.copy(index_sampler)
        outer.sampler = sampler
        return outer
    return sampler


class EpochStep:
    """How a ``DistributedSampler``'s epoch moves from one epoch start to the next (1 until seen)."""

    def __init__(self, index_sampler: Any) -> None:
        self._sampler = base_sampler(index_sampler)
        self._last: int | None = None
        self.step = 1

    def started(self) -> None:
        """Called as each epoch starts."""
        epoch = getattr(self._sampler, "epoch", None)
        if isinstance(epoch, int):
            if self._last is not None:
                self.step = epoch - self._last
            self._last = epoch


class Guess:
    """One guessed epoch: drawn in the feeder thread by ``jobs``, kept or dropped by ``take``."""

    def __init__(self, number: int, index_sampler: Any, epoch_step: int, job: Callable[[int, Any], Any]) -> None:
        """``number``: the epoch number its jobs carry; ``job(position, indices)`` makes one job."""
        self.number = number
        self.batches: list[Any] | None = None  # the guessed index batches, once drawn
        self._sampler = index_sampler
        self._epoch_step = epoch_step
        self._job = job
        self._lock = threading.Lock()  # between the feeder's draw and the consumer's take
        self._dead = False
        self._from: tuple[tuple[Any, ...], torch.Tensor | None] | None = None  # what the draw started from
        self._after: torch.Tensor | None = None  # the generator's state after the draw

    def jobs(self) -> Iterator[Any]:
        """The guessed epoch's jobs; the draw happens at the first ``next`` (in the feeder thread),
        unless ``take`` drew it already."""
        with self._lock:
            if self._dead:
                return
            if self.batches is None:
                self._draw(self._epoch_step)
            assert self.batches is not None
        for position, indices in enumerate(self.batches):
            yield self._job(position, indices)

    def _draw(self, epoch_step: int) -> None:
        generator = getattr(base_sampler(self._sampler), "generator", None)
        state = generator.get_state() if generator is not None else None
        private = private_copy(self._sampler, epoch_step)
        self._from = (_fingerprint(private), state)
        self.batches = list(private)
        copied = getattr(base_sampler(private), "generator", None)
        self._after = copied.get_state() if copied is not None else None

    def drop(self) -> None:
        """Never use this guess: its jobs are not drawn, or stop."""
        with self._lock:
            self._dead = True

    def take(self) -> bool:
        """Whether the epoch starting now draws exactly the guess; if so, its generator moves on as if
        it had drawn it. If not, the guess is dropped and must be cancelled.

        A guess the feeder has not drawn yet (the last epoch was consumed faster than the feeder
        got to it) is drawn here, from the sampler as it is now: what the loader would draw."""
        with self._lock:
            if self.batches is None and not self._dead:
                self._draw(0)
            sampler = base_sampler(self._sampler)
            generator = getattr(sampler, "generator", None)
            state = generator.get_state() if generator is not None else None
            right = (
                self._from is not None
                and self._from[0] == _fingerprint(self._sampler)
                and (state is None or torch.equal(state, self._from[1]))  # type: ignore[arg-type]
            )
            if not right:
                self._dead = True
                return False
            if generator is not None:
                generator.set_state(self._after)
            return True
