"""A ``QueueFlowLoader``'s checkpoints: ``state_dict`` and ``load_state_dict``.

A checkpoint says where the loader's epochs stand, so that resuming yields exactly the batches an
uninterrupted run still yields. Over a map-style dataset that is the last epoch begun (``_epochs``
keeps its index batches, what was yielded and the workers' random states) and the generators' states
(the loader's, and its sampler's when that is another). An iterable dataset has no index to resume
from: ``Stream`` counts the batches its epoch yielded, and a resumed loader runs that epoch again
from the generator's state before it began (its workers get the same seeds) and drops as many
batches, as torchdata's ``StatefulDataLoader`` does for datasets without a state. A ``QueueFlowDataset``
says where each batch came from (``_origins``): a resumed loader restarts its epoch right after the last
batch yielded, and runs no step again on what came before it (but on the elements a Repack- or
UnpackStep had used in part).
"""

from __future__ import annotations

import collections
import itertools
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from torchqueue import _epochs
from torchqueue._mapstyle import MapStyleEpochs
from torchqueue._origins import UNTRACKED, Origin, Resumed


class Stream:
    """An iterable dataset's epoch, as far as it went.

    Over a ``QueueFlowDataset`` the producing side tells, as it makes each batch, which of its pipeline's
    outputs it ends with (``made``: the pass's iterator and the outputs it had yielded; ``None`` for a
    batch of a pass that pads a rank's share). ``counted`` asks that pass the batch's origin
    (``_origins``) as the batch is yielded (the batches may be made ahead, by a pinning thread), and a
    checkpoint saves the last one. A loader resumed from it (``resume``) restarts the epoch there: no
    step runs again on the batches yielded before."""

    def __init__(self, generator_before: torch.Tensor | None, skip: int, resume: Origin | None = None) -> None:
        self.generator_before = generator_before  # the loader's generator before the epoch's draws
        self.skip = 0 if resume is not None else skip  # batches yielded before: computed again, not yielded
        self.yielded = skip if resume is not None else 0
        self.over = False  # it ran out
        self.resume = None if resume is None else Resumed(resume[0], resume[1])  # where the epoch restarts
        self.made: collections.deque[tuple[Any, int] | None] = collections.deque()  # batches made, not yielded
        self._origin: Origin | None = resume  # of the last batch yielded (``UNTRACKED``: not known) ...
        self._last: Any = _TOLD  # ... or, until asked, what tells it (``made``'s)

    def counted(self, batches: Iterator[Any]) -> Iterator[Any]:
        """``batches``, counted, but for the first ``skip``."""
        for batch in batches:
            self.yielded += 1
            self._last = self.made.popleft() if self.made else None
            if self.yielded % _ASK_EVERY == 0:
                self.origin()  # the pass forgets what it kept for the batches before (dropped ones' too)
            if self.yielded > self.skip:
                yield batch
        self.over = True

    def origin(self) -> Origin | None:
        """The origin of the last batch yielded (``UNTRACKED``: not known; ``None``: none yielded, not resumed)."""
        if self._last is not _TOLD:
            made, self._last = self._last, _TOLD
            self._origin = UNTRACKED if made is None else made[0]._origin_after(made[1])
        return self._origin

    def saved_origin(self) -> list[Any] | None:
        """The origin a checkpoint saves (plain lists), or ``None`` where it is not known."""
        return _plain_origin(self.origin()) if self.yielded >= self.skip else None

    def __getstate__(self) -> dict[str, Any]:
        """Where the epoch stands, without the pass that tells origins (a pickled or copied loader)."""
        self.origin()
        state = dict(self.__dict__)
        del state["made"], state["_last"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.made, self._last = collections.deque(), _TOLD


_TOLD = object()
"""``Stream._last`` when its origin was asked already."""

_ASK_EVERY = 64
"""Batches between two askings of the origin as they are yielded: the pass keeps what tells the origins of
the outputs since (a few bytes each)."""


class Checkpoints:
    """What a checkpoint saves and puts back besides the map-style epochs: an iterable dataset's epoch."""

    def __init__(self) -> None:
        self._stream: Stream | None = None  # an iterable dataset's epoch: batches yielded so far
        self._skip = 0  # an iterable dataset's batches yielded before (``load_state_dict``)
        self._resume: Origin | None = None  # a QueueFlowDataset's: where its epoch restarts, if known

    def stream(self, generator_before: torch.Tensor | None) -> Stream:
        """Count a new epoch of an iterable dataset (``generator_before``: before its draws)."""
        self._stream = Stream(generator_before, self._skip, self._resume)
        self._skip, self._resume = 0, None
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
            over = self._stream.over
            state["stream_yielded"] = 0 if over else max(self._stream.yielded, self._stream.skip)
            state["stream_origin"] = None if over else self._stream.saved_origin()
            if not over:  # resumed, the epoch runs again from its start
                state["generator"] = self._stream.generator_before
        elif self._skip:  # loaded, and not begun since: where the loaded checkpoint stood (its generator is put back)
            state["stream_yielded"], state["stream_origin"] = self._skip, _plain_origin(self._resume)
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
        self._resume = _origin(state.get("stream_origin")) if self._skip else None
        epochs.restore(_epochs.restored(state, num_workers))


def _plain_origin(origin: Origin | None) -> list[Any] | None:
    """``origin`` in plain lists, for a checkpoint (``None``: not known)."""
    if origin is None or origin[0] < 0:
        return None
    return [origin[0], [list(pair) for pair in origin[1]]]


def _origin(saved: Any) -> Origin | None:
    """The origin ``Stream.saved_origin`` saved, or ``None`` (none saved, or not one)."""
    try:
        start, skips = saved
        origin = int(start), tuple((int(stage), int(used)) for stage, used in skips)
    except (TypeError, ValueError):
        return None
    return origin if origin[0] >= 0 else None


def _samplers(index_sampler: Any) -> dict[str, Any]:
    """The sampler chain by path: ``index_sampler`` (``"sampler"``) and those it draws from, each the one
    before's ``.sampler`` (a ``BatchSampler``'s, a batch sampler of yours)."""
    chain: dict[str, Any] = {}
    path, sampler = "sampler", index_sampler
    while sampler is not None and len(chain) < 4 and all(sampler is not s for s in chain.values()):
        chain[path] = sampler
        path, sampler = path + ".sampler", _attribute(sampler, "sampler")
    return chain


def _attribute(owner: Any, name: str) -> Any:
    """``owner.name``, or ``None`` where it has none or reading it raises (a property of yours)."""
    try:
        return getattr(owner, name, None)
    except Exception:
        return None


def _attributes(sampler: Any) -> Iterator[tuple[str, Any]]:
    """``(path, value)`` of a sampler's attributes (``__dict__`` and ``__slots__``), and of the items of
    those that are plain lists, tuples or dicts (``rngs[0]``, ``rngs['train']``): not of a subclass, which
    may be a dataset (``RandomSampler.data_source``) whose ``__getitem__`` takes no slice."""
    names = list(getattr(sampler, "__dict__", {}))
    for kind in type(sampler).__mro__:
        slots = kind.__dict__.get("__slots__", ())
        names += [slots] if isinstance(slots, str) else list(slots)
    for name in dict.fromkeys(names):
        value = _attribute(sampler, name)
        yield name, value
        if type(value) in (list, tuple):
            yield from ((f"{name}[{i}]", item) for i, item in enumerate(value[:_ITEMS]))
        elif type(value) is dict:
            yield from ((f"{name}[{key!r}]", item) for key, item in itertools.islice(value.items(), _ITEMS))


_ITEMS = 16
"""Items of a list, tuple or dict attribute looked at for generators (not a dataset's)."""


def sampler_states(index_sampler: Any, saved: tuple[Any, ...]) -> dict[str, tuple[str, Any]]:
    """The state of every torch, numpy and Python generator the sampler chain keeps in its attributes
    (``self.rng = np.random.default_rng(seed)``, in ``__slots__``, in a list of them), by path, but those
    in ``saved`` (the loader's generator and the sampler's ``generator``, saved apart). The state is the one
    after the epoch's draws, which the loader makes as the epoch begins: a resumed run draws the next
    epoch as the uninterrupted one. A sampler's own ``state_dict()`` (torchdata's ``Stateful``) is not
    asked: it would say the epoch was drawn to its end (``yielded``), and the next one would then be
    empty; its generators are found as anyone's."""
    return {
        path: (kind, _random_state(value, kind))
        for path, (kind, value) in _generators(index_sampler).items()
        if all(value is not other for other in saved)
    }


def restore_sampler_states(index_sampler: Any, states: dict[str, tuple[str, Any]]) -> None:
    """Put back what ``sampler_states`` saved, where this loader's sampler chain has a generator of the
    same kind at the same path."""
    found = _generators(index_sampler)
    for path, (kind, state) in states.items():
        if path in found and found[path][0] == kind:
            _set_random_state(found[path][1], kind, state)


def _generators(index_sampler: Any) -> dict[str, tuple[str, Any]]:
    """``{path: (kind, generator)}`` of the random generators among the sampler chain's attributes."""
    found = {}
    for path, sampler in _samplers(index_sampler).items():
        for name, value in _attributes(sampler):
            kind = _kind(value)
            if kind is not None:
                found[f"{path}.{name}"] = kind, value
    return found


def _kind(value: Any) -> str | None:
    """Which kind of random generator ``value`` is (``None``: none)."""
    if isinstance(value, torch.Generator):
        return "torch"
    if isinstance(value, np.random.Generator):
        return "numpy"
    if isinstance(value, np.random.RandomState):
        return "numpy-legacy"
    if isinstance(value, random.Random) and not isinstance(value, random.SystemRandom):
        return "python"
    return None


def _random_state(value: Any, kind: str) -> Any:
    """A generator's state in plain values and tensors (``torch.load(weights_only=True)`` reads them: a
    numpy array in a state goes as its bytes)."""
    if kind == "torch":
        return value.get_state()
    if kind == "numpy":
        return _plain(value.bit_generator.state)
    if kind == "numpy-legacy":
        return _plain(value.get_state())
    return value.getstate()


def _set_random_state(value: Any, kind: str, state: Any) -> None:
    if kind == "torch":
        value.set_state(state)
    elif kind == "numpy":
        value.bit_generator.state = _numpy(state)
    elif kind == "numpy-legacy":
        value.set_state(_numpy(state))
    else:
        value.setstate(state)


_ARRAY = "numpy.ndarray"


def _plain(state: Any) -> Any:
    """``state`` (a numpy generator's: dicts, tuples, ints, arrays) with each array as
    ``(_ARRAY, dtype, shape, its bytes as a uint8 tensor)``."""
    if isinstance(state, np.ndarray):
        return (
            _ARRAY,
            state.dtype.str,
            state.shape,
            torch.from_numpy(np.ascontiguousarray(state).view(np.uint8).reshape(-1).copy()),
        )
    if isinstance(state, dict):
        return {key: _plain(value) for key, value in state.items()}
    if isinstance(state, tuple):
        return tuple(_plain(value) for value in state)
    return state


def _numpy(state: Any) -> Any:
    """What ``_plain`` was given."""
    if isinstance(state, tuple) and len(state) == 4 and state[0] == _ARRAY:
        _, dtype, shape, data = state
        return data.numpy().view(np.dtype(dtype)).reshape(shape)
    if isinstance(state, dict):
        return {key: _numpy(value) for key, value in state.items()}
    if isinstance(state, tuple):
        return tuple(_numpy(value) for value in state)
    return state
