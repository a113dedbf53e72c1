"""A map-style ``QueueFlowLoader``'s epochs, kept as DataLoader's iterator runs them; checkpoints.

The loader draws an epoch's index batches all at once as the epoch starts (the look-ahead and
checkpoints need the list), where DataLoader's iterator pulls them from the sampler one at a
time: ``prefetch_factor * num_workers`` as it starts (none without workers), then one each time
it yields a batch (``pulls``). Run to its end, both drew the same. Left early (``break``, or a new
``iter()``), DataLoader's generator drew less: a ``RandomSampler`` draws the permutation after an
epoch's last one only when its iterator runs out (with ``replacement=True``, 32 samples at a
time). So ``leave`` sets the sampler's generator where DataLoader's would be, by pulling as many
index batches from a private copy of the sampler, from the state the epoch was drawn from.

With persistent workers, DataLoader's workers go on to fetch every batch they were handed, also
after the epoch was left; ours drop what they had not fetched. So the next epoch first catches
up: it hands each worker those batches again, fetched for their random draws, not sent back. An
epoch that does not follow on from the last one in the same workers (resumed from a checkpoint;
with persistent workers, after a cancelled guess or an epoch left early) restores each worker's
random state, as reported after its last batch that was yielded (``_fetch``): that worker's first
job carries it, and jobs without indices shift the round robin so that batch ``k`` still goes to
worker ``k % num_workers``:

    epoch e     batches 0 .. k-1 yielded, then left; DataLoader had handed out batches up to d-1
    epoch e+1   [pads up to worker k % n] [e's batches k .. d-1, not kept] [pads up to worker 0] [e+1's]
                 └ the first job of each worker carries its state after e's last yielded batch

``checkpoint`` keeps an epoch's index batches, how many were yielded (and which, when they come
out of order, ``in_order=False``), whether it was left, its base seed, the generator states around
its draws and the workers' states: a resumed loader fetches only what was not yielded, in workers
put back in the states they had. A checkpoint taken after an epoch's last batch resumes as a
finished epoch: the uninterrupted run would have gone on to its end.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from torchqueue._fetch import Job, Start
from torchqueue._lookahead import base_sampler, predictable, private_copy
from torchqueue._rngstate import RandomState

_END = object()


@dataclass
class Epoch:
    """One epoch of a map-style loader; ``yielded``, ``left`` and ``states`` move as it is iterated."""

    base_seed: int
    batches: list[Any]
    drawn_from: torch.Tensor | None  # the sampler's generator before this epoch's draws
    drawn_to: torch.Tensor | None  # ... and after them
    yielded: int = 0
    left: bool = False  # over: run out, or left early
    states: dict[int, RandomState] = field(default_factory=dict)  # per worker, after its last yielded batch
    positions: set[int] | None = None  # out of order: the positions yielded (in order they are range(yielded))
    caught_up: list[tuple[int, list[Any], bool]] = field(default_factory=list)  # earlier epochs' batches fetched first

    @property
    def left_early(self) -> bool:
        return self.left and self.yielded < len(self.batches)

    def remaining(self) -> list[tuple[int, Any]]:
        """``(position, index batch)`` of every batch not yielded yet."""
        if self.positions is None:
            return [(k, self.batches[k]) for k in range(self.yielded, len(self.batches))]
        return [(k, indices) for k, indices in enumerate(self.batches) if k not in self.positions]


DRAW_AT_LEAST = 100_000
"""Index batches an epoch may have whatever its sampler's and dataset's lengths say (see ``draw``)."""


def draw(index_sampler: Any, dataset: Any, indices: Iterator[Any] | None = None) -> list[Any]:
    """Every index batch of an epoch, drawn as it begins (from ``indices``, the sampler's iterator, where it
    was made already). A sampler that goes on beyond four times its length, four times its dataset's and
    ``DRAW_AT_LEAST`` raises: an endless sampler would otherwise be drawn until memory runs out, where
    DataLoader pulls its batches one at a time."""
    lengths = [DRAW_AT_LEAST]
    for sized in (index_sampler, dataset):
        try:
            lengths.append(4 * len(sized))
        except Exception:  # no length (TypeError), or one that is undefined (ValueError: PyG's DynamicBatchSampler)
            continue
    bound = max(lengths)
    batches = list(itertools.islice(index_sampler if indices is None else indices, bound + 1))
    if len(batches) > bound:
        raise RuntimeError(
            f"the sampler gave more than {bound:,} index batches for one epoch: QueueFlowLoader draws an epoch's "
            "batches when it begins, so an endless sampler (one that never stops, as detectron2's TrainingSampler) "
            "cannot work; give the sampler an end per epoch (and call set_epoch between epochs), or use "
            "torch.utils.data.DataLoader for it"
        )
    return batches


def sampler_generator(index_sampler: Any) -> torch.Generator | None:
    """The generator the sampler draws its order from, if it has one."""
    generator = getattr(base_sampler(index_sampler), "generator", None)
    return generator if isinstance(generator, torch.Generator) else None


def pulls(yielded: int, num_workers: int, prefetch_factor: int) -> int:
    """How many index batches DataLoader's iterator took from the sampler once it yielded ``yielded``."""
    return yielded + (prefetch_factor * num_workers if num_workers else 0)


def leave(epoch: Epoch, index_sampler: Any, num_workers: int, prefetch_factor: int) -> None:
    """End ``epoch`` where it stands; if DataLoader's iterator had not run out of index batches by
    then, set the sampler's generator to the state DataLoader's would be in."""
    if epoch.left:
        return
    epoch.left = True
    taken = pulls(epoch.yielded, num_workers, prefetch_factor)
    generator = sampler_generator(index_sampler)
    if taken > len(epoch.batches) or generator is None or epoch.drawn_from is None:
        return  # DataLoader's iterator ran out too (or the order draws nothing from a generator)
    if not predictable(index_sampler) or not torch.equal(generator.get_state(), epoch.drawn_to):  # type: ignore[arg-type]
        return  # a user's sampler (drawn at its first index, as torch's are), or someone else drew meanwhile
    private = private_copy(index_sampler, 0)
    replay = base_sampler(private).generator
    replay.set_state(epoch.drawn_from)
    index_batches = iter(private)
    for _ in range(taken):
        if next(index_batches, _END) is _END:
            break
    generator.set_state(replay.get_state())


def catch_up(previous: Epoch | None, num_workers: int, prefetch_factor: int) -> list[tuple[int, list[Any], bool]]:
    """The batches of an epoch left early that DataLoader's workers had been handed but that were not
    yielded, as parts of ``restoring_jobs``: persistent workers fetch them before the next epoch. An
    epoch left before it yielded anything (an iterator never advanced) had not caught up on the one
    before it either: its own catch-up comes first, as DataLoader's workers fetched it."""
    if previous is None or not previous.left_early:
        return []
    handed = min(pulls(previous.yielded, num_workers, prefetch_factor), len(previous.batches))
    earlier = previous.caught_up if previous.yielded == 0 else []
    return [*earlier, (previous.yielded, previous.batches[previous.yielded : handed], False)]


def restoring_jobs(
    base_seed: int,
    number: int,
    num_workers: int,
    states: dict[int, RandomState],
    parts: list[tuple[int, list[Any], bool]],
) -> list[Job]:
    """Jobs that put every worker in its state in ``states`` first (its initial one if absent), then
    run ``parts``: ``(first batch number, index batches, keep)``, batch ``k`` on worker ``k % num_workers``."""
    pad = Job(base_seed, number, None)
    jobs: list[Job] = []
    for first, batches, keep in parts:
        if batches:
            jobs += [pad] * ((first - len(jobs)) % num_workers)
            jobs += [Job(base_seed, number, indices, None, keep, first + i) for i, indices in enumerate(batches)]
    jobs += [pad] * max(0, num_workers - len(jobs))  # every worker gets its state, with a job or without
    for worker in range(num_workers):
        jobs[worker] = jobs[worker]._replace(start=states.get(worker, Start.INITIAL))
    return jobs


def checkpoint(epoch: Epoch, num_workers: int) -> dict[str, Any]:
    """``epoch`` as plain values (``torch.load(weights_only=True)`` reads them back)."""
    return {
        "base_seed": epoch.base_seed,
        "batches": list(epoch.batches),
        "yielded": epoch.yielded,
        "left": epoch.left,
        "drawn_from": epoch.drawn_from,
        "drawn_to": epoch.drawn_to,
        "num_workers": num_workers,
        "worker_states": {worker: tuple(state) for worker, state in epoch.states.items()},
        "yielded_positions": sorted(epoch.positions) if epoch.positions is not None else None,
        "caught_up": [(first, list(batches)) for first, batches, _ in epoch.caught_up],
    }


def restored(state: dict[str, Any], num_workers: int) -> Epoch | None:
    """The epoch ``checkpoint`` saved (``None`` if it saved none); the workers' states only for as many workers."""
    if state.get("base_seed") is None:
        return None
    states = {}
    if state.get("num_workers") == num_workers:
        states = {int(w): tuple(s) for w, s in state.get("worker_states", {}).items()}
    positions = state.get("yielded_positions")
    epoch = Epoch(
        state["base_seed"],
        list(state["batches"]),
        state.get("drawn_from"),
        state.get("drawn_to"),
        state["yielded"],
        bool(state.get("left", False)),
        states,
        set(positions) if positions is not None else None,
        [(int(first), list(batches), False) for first, batches in state.get("caught_up", [])],
    )
    if epoch.yielded >= len(epoch.batches):
        # Saved after the epoch's last batch but before its iterator ran out (inside the ``for`` loop):
        # the uninterrupted run goes on to the end of the sampler, as a finished epoch does.
        epoch.left = True
    return epoch
