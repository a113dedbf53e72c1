"""Workers' random streams: one base seed drawn from the consumer's torch generator as a pipeline
starts, and a stream of ``random``, numpy and torch per (step, worker, epoch)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

import torchqueue as tq
from torchqueue import QueueFlowLoader

pytestmark = pytest.mark.timeout(120)

_positions: dict[object, int] = {}  # in a worker: how many draws each of its streams gave so far


def record() -> tuple:
    """This worker's next draws: (step, worker, seed, place in the seed's stream, torch's initial seed,
    random, numpy, torch)."""
    info = tq.get_worker_info()
    seed = getattr(info, "seed", None)
    position = _positions[seed] = _positions.get(seed, -1) + 1
    draws = random.random(), np.random.random(), torch.rand(1).item()
    return (info.step, info.id, seed, position, torch.initial_seed(), *draws)


def extend(items: list) -> list:
    return [*items, record()]


def wrap(value: object) -> list:
    return [value, record()]


def records_in(value: object) -> list[tuple]:
    """Every record inside ``value`` (nested lists)."""
    if isinstance(value, tuple):
        return [value]
    return [r for item in value for r in records_in(item)]  # type: ignore[attr-defined]


def of_step(value: object, step: str) -> list[tuple]:
    return [r for r in records_in(value) if r[0] == step]


STEPS = (
    tq.ProcessStep(extend, 2, round_robin=True, name="first"),  # element k to worker k % 2, in order
    tq.PoolStep(wrap, 2, name="pool"),  # items of an element to any worker
    tq.ProcessStep(wrap, 2, name="last"),  # elements to any worker
)
RECORDS = {"first": 1, "pool": 4, "last": 1}
"""Records per element of each step (the pool's items: the element's three, and the first step's record)."""

SHORT = (STEPS[0], STEPS[2])  # fewer processes to spawn


def epoch_input(epoch: int) -> list[list]:
    return [[[], [], []] for _ in range(6)]


def run_sequence(context: str, seed: int = 0, epochs: int = 2, steps: tuple = STEPS) -> list[list]:
    """Each epoch's outputs (6 elements, each holding its records as ``RECORDS`` says)."""
    torch.manual_seed(seed)
    with tq.Sequence(*steps, context=context) as seq:
        return [list(seq(epoch_input(epoch))) for epoch in range(epochs)]


def streams(epochs: list[list]) -> dict[tuple, tuple]:
    """(step, worker, seed, position) -> its draws, over all epochs."""
    return {r[:4]: r[5:] for epoch in epochs for r in records_in(epoch)}


def check_streams(epochs: list[list], again: list[list], steps: set[str]) -> None:
    """Distinct streams in ``epochs``; the same draws in ``again`` (the same manual seed)."""
    records = [r for epoch in epochs for r in records_in(epoch)]
    assert len(records) == len(epochs) * 6 * sum(RECORDS[step] for step in steps)
    for column, name in ((5, "random"), (6, "numpy"), (7, "torch")):
        assert len({r[column] for r in records}) == len(records), f"two draws of {name} coincide"
    assert all(isinstance(r[2], int) and r[2] == r[4] for r in records)  # the seed reported is torch's
    for r in records:  # the n-th draws of a stream: those of random and torch seeded with the seed reported
        assert r[5] == nth_draw(random.Random(r[2]).random, r[3])
        generator = torch.Generator().manual_seed(r[2])
        assert r[7] == nth_draw(lambda generator=generator: torch.rand(1, generator=generator).item(), r[3])
    # the first step hands out elements in order: every element gets the same draws on every run
    firsts = [[of_step(element, "first") for element in epoch] for epoch in epochs]
    assert firsts == [[of_step(element, "first") for element in epoch] for epoch in again]
    # the other steps: a stream's draws are the same, whichever elements its worker took (which worker takes
    # which element varies from run to run: a stream both runs have gives the same draws, and the seed of each
    # (step, worker, epoch) is the same in both)
    ours, theirs = streams(epochs), streams(again)
    common = ours.keys() & theirs.keys()
    assert {key[0] for key in common} >= {"first"}
    assert all(ours[key] == theirs[key] for key in common)
    ours_seeds, theirs_seeds = seeds_of(epochs), seeds_of(again)
    assert all(ours_seeds[key] == theirs_seeds[key] for key in ours_seeds.keys() & theirs_seeds.keys())


def seeds_of(epochs: list[list]) -> dict[tuple, int]:
    """(step, worker, epoch) -> the seed its records report."""
    return {(r[0], r[1], index): r[2] for index, epoch in enumerate(epochs) for r in records_in(epoch)}


def nth_draw(draw, n: int) -> float:
    for _ in range(n):
        draw()
    return draw()


def test_every_worker_of_every_step_draws_its_own_reproducible_stream():
    check_streams(run_sequence("fork"), run_sequence("fork"), {"first", "pool", "last"})


@pytest.mark.parametrize("context", ["spawn", "forkserver"])
def test_the_streams_are_the_same_under_every_start_method(context):
    check_streams(run_sequence(context, steps=SHORT), run_sequence("fork", steps=SHORT), {"first", "last"})


def test_each_epoch_is_a_new_stream_of_each_worker():
    epochs = run_sequence("fork")
    seeds = [{(r[0], r[1]): r[2] for r in records_in(epoch)} for epoch in epochs]  # (step, worker) -> seed
    both = seeds[0].keys() & seeds[1].keys()
    assert both and all(seeds[0][key] != seeds[1][key] for key in both)
    assert len({*seeds[0].values(), *seeds[1].values()}) == len(seeds[0]) + len(seeds[1])  # no stream shared


def test_another_manual_seed_gives_other_streams():
    one, two = streams(run_sequence("fork", seed=1, epochs=1)), streams(run_sequence("fork", seed=2, epochs=1))
    assert {key[2] for key in one}.isdisjoint(key[2] for key in two)
    assert {draws[2] for draws in one.values()}.isdisjoint(draws[2] for draws in two.values())


def test_starting_a_pipeline_draws_one_base_seed_from_the_consumers_generator():
    from torchqueue._seeding import draw_base_seed, stream_base

    torch.manual_seed(5)
    expected_base = draw_base_seed()
    after = torch.rand(1)
    torch.manual_seed(5)
    with tq.Sequence(tq.ProcessStep(wrap, 1), context="fork") as seq:
        outputs = list(seq([[]]))
        assert torch.equal(torch.rand(1), after)  # one draw, as iter(DataLoader) makes
        list(seq([[]]))
    ((step, worker, seed, *_),) = records_in(outputs)
    assert seed == stream_base(expected_base, 0, 0) + worker


def source(epoch: int) -> list[list]:
    return [[[] for _ in range(3)] for _ in range(4)]


def run_dataset(seed: int) -> list[list]:
    torch.manual_seed(seed)
    ds = tq.QueueFlowDataset(source, [tq.PoolStep(wrap, 2, name="pool"), tq.ProcessStep(wrap, 2, name="last")])
    loader = QueueFlowLoader(ds)
    try:
        epochs = []
        for epoch in range(2):
            loader.set_epoch(epoch)
            epochs.append(list(loader))
        return epochs
    finally:
        ds.close()


def test_a_queueflow_dataset_draws_distinct_reproducible_streams_epoch_after_epoch():
    epochs, again = run_dataset(0), run_dataset(0)
    records = [r for epoch in epochs for r in records_in(epoch)]
    assert len(records) == 2 * 4 * (3 + 1)
    for column in (5, 6, 7):
        assert len({r[column] for r in records}) == len(records)
    ours, theirs = streams(epochs), streams(again)
    common = ours.keys() & theirs.keys()
    # which worker takes which element varies from run to run: compare the streams both runs have
    assert common and {key[0] for key in common} <= {"pool", "last"}
    assert all(ours[key] == theirs[key] for key in common)
    seeds = [{(r[0], r[1]): r[2] for r in records_in(epoch)} for epoch in epochs]
    assert all(seeds[0][key] != seeds[1][key] for key in seeds[0].keys() & seeds[1].keys())


class Seeds(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> tuple:
        ours, theirs = tq.get_worker_info(), torch.utils.data.get_worker_info()
        return getattr(ours, "seed", None), theirs.seed, torch.initial_seed()


def test_a_loaders_fetch_workers_report_dataloaders_seed():
    loader = QueueFlowLoader(Seeds(), batch_size=None, num_workers=2, generator=torch.Generator().manual_seed(3))
    try:
        for ours, theirs, initial in loader:
            assert ours == theirs == initial
    finally:
        loader.close()
