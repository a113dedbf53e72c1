"""Guessing a map-style loader's next epoch, so that persistent workers start it before ``iter()``.

DataLoader draws an epoch's order when the epoch starts, so with persistent workers the first
batch of every epoch costs a whole fetch. ``QueueFlowLoader`` instead guesses, as an epoch
starts, the index batches of the following one, and queues them behind it: the workers go on
from the last batch of one epoch to the first of the next. When the next epoch starts, the loader
draws its order for real, exactly as DataLoader does, and keeps the guessed work only if the two
are equal; else the guess is cancelled (its workers' random draws are undone, see ``_fetch``).

A guess must leave nothing changed, so it is only made for samplers whose order depends on
nothing but their own generator or epoch, whose states ``guess`` puts back:
``SequentialSampler``, ``RandomSampler`` and ``SubsetRandomSampler`` with a generator (without
one they draw from torch's global generator, which training moves), and ``DistributedSampler``,
optionally in a ``BatchSampler``. Any other sampler (a user's, ``WeightedRandomSampler`` whose
weights may be changed between epochs) is never iterated ahead.

A ``DistributedSampler``'s next epoch number is guessed from how it changed at the last epoch
start (Lightning and most training loops call ``set_epoch(epoch)`` every epoch; plain loops
often never do).
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import BatchSampler, DistributedSampler, RandomSampler, SequentialSampler, SubsetRandomSampler

_PREDICTABLE = (SequentialSampler, RandomSampler, SubsetRandomSampler, DistributedSampler)


def _base(index_sampler: Any) -> Any:
    return index_sampler.sampler if type(index_sampler) is BatchSampler else index_sampler


def predictable(index_sampler: Any) -> bool:
    """Whether ``index_sampler`` may be iterated ahead (see the module docstring)."""
    sampler = _base(index_sampler)
    return type(sampler) in _PREDICTABLE and getattr(sampler, "generator", True) is not None


class EpochGuess:
    """The next epoch's index batches of one loader's index sampler, drawn without side effects."""

    def __init__(self, index_sampler: Any) -> None:
        self._sampler = index_sampler
        self._last_epoch: int | None = None
        self._epoch_step = 1

    def started(self) -> None:
        """Called as each epoch starts: notes how a ``DistributedSampler``'s epoch moved."""
        epoch = getattr(_base(self._sampler), "epoch", None)
        if isinstance(epoch, int):
            if self._last_epoch is not None:
                self._epoch_step = epoch - self._last_epoch
            self._last_epoch = epoch

    def guess(self) -> list[Any]:
        """The batches the next epoch draws if nothing changes meanwhile; every state is put back."""
        sampler = _base(self._sampler)
        generator = getattr(sampler, "generator", None)
        generator_state = generator.get_state() if generator is not None else None
        epoch = getattr(sampler, "epoch", None)
        try:
            if isinstance(epoch, int):
                sampler.epoch = epoch + self._epoch_step
            return list(self._sampler)
        finally:
            if generator is not None:
                generator.set_state(generator_state)
            if isinstance(epoch, int):
                sampler.epoch = epoch
