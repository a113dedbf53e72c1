"""A ``QueueFlowLoader``'s checkpoints: ``state_dict`` and ``load_state_dict``.

A checkpoint says where the loader's epochs stand, so that resuming yields exactly the batches an
uninterrupted run still yields. Over a map-style dataset that is the last epoch begun (``_epochs``
keeps its index batches, what was yielded and the workers' random states) and the generators' states
(the loader's, and its sampler's when that is another). An iterable dataset has no index to resume
from: ``Stream`` counts the batches its epoch yielded, and a resumed loader runs that epoch again
from the generator's state before it began (its workers get the same seeds) and drops as many
batches, as torchdata's ``StatefulDataLoader`` does for datasets without a state.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from torchqueue import _epochs
from torchqueue._mapstyle import MapStyleEpochs


class Stream:
    """An iterable dataset's epoch, as far as it went."""

    def __init__(self, generator_before: torch.Tensor | None, skip: int) -> None:
        self.generator_before = generator_before  # the loader's generator before the epoch's draws
        self.skip = skip  # batches a loaded checkpoint had yielded: computed again, not yielded
        self.yielded = 0
        self.over = False  # it ran out

    def counted(self, batches: Iterator[Any]) -> Iterator[Any]:
        """``batches``, counted, but for the first ``skip``."""
        for batch in batches:
            self.yielded += 1
            if self.yielded > self.skip:
                yield batch
        self.over = True


class Checkpoints:
    """What a checkpoint saves and puts back besides the map-style epochs: an iterable dataset's epoch."""

    def __init__(self) -> None:
        self._stream: Stream | None = None  # an iterable dataset's epoch: batches yielded so far
        self._skip = 0  # an iterable dataset's batches to compute again and drop (``load_state_dict``)

    def stream(self, generator_before: torch.Tensor | None) -> Stream:
        """Count a new epoch of an iterable dataset (``generator_before``: before its draws)."""
        self._stream = Stream(generator_before, self._skip)
        self._skip = 0
        return self._stream

    def state_dict(
        self, number: int, generator: torch.Generator | None, epochs: MapStyleEpochs, num_workers: int
    ) -> dict[str, Any]:
        """The checkpoint of the loader at epoch ``number`` (``set_epoch``'s) drawing from ``generator``."""
        state: dict[str, Any] = {"epoch": number, "base_seed": None, "batches": [], "yielded": 0}
        epoch = epochs.resume or epochs.epoch
        if epoch is not None:
            state.update(_epochs.checkpoint(epoch, num_workers))
        state["generator"] = generator.get_state() if generator is not None else None
        if self._stream is not None:  # an iterable dataset: how far its epoch went (0 once it ran out)
            state["stream_yielded"] = 0 if self._stream.over else self._stream.yielded
            if not self._stream.over:  # resumed, the epoch runs again from its start
                state["generator"] = self._stream.generator_before
        if epochs.unbegun is not None:  # iter() drew a base seed, the epoch has not begun: as if not called
            state["generator"] = epochs.unbegun
        sampler_generator = epochs.sampler_generator()
        if sampler_generator is not None and sampler_generator is not generator:
            state["sampler_generator"] = sampler_generator.get_state()
        state["sampler_states"] = sampler_states(epochs.index_sampler, (generator, sampler_generator))
        return state

    def load_state_dict(
        self, state: dict[str, Any], generator: torch.Generator | None, epochs: MapStyleEpochs, num_workers: int
    ) -> None:
        """Put back what ``state_dict`` saved: the next epoch goes on from there."""
        epochs.drop_workers()  # the workers' random states are the checkpoint's
        if state.get("generator") is not None and generator is not None:
            generator.set_state(state["generator"])
        sampler_generator = epochs.sampler_generator()
        if state.get("sampler_generator") is not None and sampler_generator is not None:
            sampler_generator.set_state(state["sampler_generator"])
        restore_sampler_states(epochs.index_sampler, state.get("sampler_states", {}))
        self._skip, self._stream, epochs.unbegun = state.get("stream_yielded", 0), None, None
        epochs.restore(_epochs.restored(state, num_workers))


def _samplers(index_sampler: Any) -> dict[str, Any]:
    """The sampler chain by path: ``index_sampler`` (``"sampler"``) and those it draws from, each the one
    before's ``.sampler`` (a ``BatchSampler``'s, a batch sampler of yours)."""
    chain: dict[str, Any] = {}
    path, sampler = "sampler", index_sampler
    while sampler is not None and len(chain) < 4 and all(sampler is not s for s in chain.values()):
        chain[path] = sampler
        path, sampler = path + ".sampler", getattr(sampler, "sampler", None)
    return chain


def sampler_states(index_sampler: Any, saved: tuple[Any, ...]) -> dict[str, tuple[str, Any]]:
    """The random state the sampler chain keeps, by path: what a sampler with ``state_dict()`` and
    ``load_state_dict()`` (torchdata's ``Stateful``) returns, else each torch, numpy or Python generator
    among its attributes (``self.rng = np.random.default_rng(seed)``) but those in ``saved`` (the loader's
    generator and the sampler's ``generator``, saved apart). The state is the one after the epoch's draws,
    which the loader makes as the epoch begins: a resumed run draws the next epoch as the uninterrupted one."""
    states: dict[str, tuple[str, Any]] = {}
    for path, sampler in _samplers(index_sampler).items():
        if callable(getattr(sampler, "state_dict", None)) and callable(getattr(sampler, "load_state_dict", None)):
            states[path] = ("state_dict", sampler.state_dict())
            continue
        for name, value in getattr(sampler, "__dict__", {}).items():
            if all(value is not other for other in saved) and (state := _random_state(value)) is not None:
                states[f"{path}.{name}"] = state
    return states


def restore_sampler_states(index_sampler: Any, states: dict[str, tuple[str, Any]]) -> None:
    """Put back what ``sampler_states`` saved, where this loader's sampler chain has the same paths."""
    chain = _samplers(index_sampler)
    for path, (kind, state) in states.items():
        if kind == "state_dict":
            if path in chain:
                chain[path].load_state_dict(state)
            continue
        owner, _, name = path.rpartition(".")
        value = getattr(chain.get(owner), name, None)
        if value is not None and (current := _random_state(value)) is not None and current[0] == kind:
            _set_random_state(value, kind, state)


def _random_state(value: Any) -> tuple[str, Any] | None:
    """``(kind, state)`` of a random generator (plain values and tensors, for ``torch.load(weights_only=True)``),
    or ``None``: not one."""
    if isinstance(value, torch.Generator):
        return "torch", value.get_state()
    if isinstance(value, np.random.Generator):
        return "numpy", value.bit_generator.state
    if isinstance(value, np.random.RandomState):
        name, keys, position, has_gauss, gauss = value.get_state()
        return "numpy-legacy", (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss)
    if isinstance(value, random.Random) and not isinstance(value, random.SystemRandom):
        return "python", value.getstate()
    return None


def _set_random_state(value: Any, kind: str, state: Any) -> None:
    if kind == "torch":
        value.set_state(state)
    elif kind == "numpy":
        value.bit_generator.state = state
    elif kind == "numpy-legacy":
        name, keys, position, has_gauss, gauss = state
        value.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    else:
        value.setstate(state)
