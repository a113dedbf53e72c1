"""Guessing a loader's next epoch: only for samplers that depend on nothing else, and without side effects."""

from __future__ import annotations

import torch
from torch.utils.data import (
    BatchSampler,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

from torchqueue._lookahead import EpochStep, Guess, predictable


def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_only_samplers_that_depend_on_their_own_state_are_predictable():
    data = range(10)
    assert predictable(SequentialSampler(data))
    assert predictable(BatchSampler(RandomSampler(data, generator=generator()), 3, False))
    assert not predictable(SubsetRandomSampler([1, 2], generator=generator()))  # its indices may change
    assert predictable(DistributedSampler(data, num_replicas=2, rank=0))
    assert not predictable(RandomSampler(data))  # torch's global generator: training moves it
    assert not predictable(WeightedRandomSampler([1.0] * 10, 10, generator=generator()))  # weights may change
    assert not predictable([[0, 1], [2]])  # a user's batch sampler


def test_a_guess_is_the_next_epochs_draw_and_touches_no_state_of_the_sampler():
    sampler = BatchSampler(RandomSampler(range(10), generator=generator()), 3, False)
    before = sampler.sampler.generator.get_state()
    guess = Guess(1, sampler, 1, lambda position, indices: indices)
    jobs = list(guess.jobs())
    assert torch.equal(sampler.sampler.generator.get_state(), before)  # drawn from a private copy
    assert guess.take()  # nothing changed meanwhile: the guess is what the sampler draws now
    after = sampler.sampler.generator.get_state()
    replay = BatchSampler(RandomSampler(range(10), generator=generator()), 3, False)
    assert jobs == guess.batches == list(replay)
    assert torch.equal(after, replay.sampler.generator.get_state())  # the generator moved on as if it drew


def test_a_guess_is_dropped_when_the_generator_or_the_configuration_changed():
    sampler = RandomSampler(range(10), generator=generator())
    moved = Guess(1, sampler, 1, lambda position, indices: indices)
    list(moved.jobs())
    torch.empty(1).random_(generator=sampler.generator)
    assert not moved.take()
    assert list(moved.jobs()) == []  # dropped: it draws nothing any more

    batches = BatchSampler(SequentialSampler(range(10)), 3, False)
    resized = Guess(1, batches, 1, lambda position, indices: indices)
    list(resized.jobs())
    batches.batch_size = 4
    assert not resized.take()


def test_a_guess_the_feeder_has_not_drawn_yet_is_drawn_when_the_epoch_starts():
    sampler = DistributedSampler(range(20), num_replicas=2, rank=0, shuffle=True)
    sampler.set_epoch(3)
    late = Guess(1, sampler, 1, lambda position, indices: indices)
    assert late.take()  # drawn now, from the sampler as it is (epoch 3, not 3 + 1)
    assert late.batches == list(sampler)
    assert list(late.jobs()) == late.batches  # the feeder then sends those, without drawing again

    random = RandomSampler(range(10), generator=generator())
    early = Guess(1, random, 1, lambda position, indices: indices)
    assert early.take()
    replay = RandomSampler(range(10), generator=generator())
    assert early.batches == list(replay)
    assert torch.equal(random.generator.get_state(), replay.generator.get_state())  # moved on as if it drew


def test_a_distributed_samplers_epoch_is_guessed_from_how_it_moved():
    sampler = DistributedSampler(range(20), num_replicas=2, rank=0, shuffle=True)
    step = EpochStep(sampler)
    sampler.set_epoch(0)
    step.started()
    guess = Guess(1, sampler, step.step, lambda position, indices: indices)
    ahead = list(guess.jobs())
    assert sampler.epoch == 0
    sampler.set_epoch(1)  # as Lightning does
    assert guess.take() and ahead == list(sampler)
    step.started()  # epoch 1 starts
    step.started()  # the next one starts without set_epoch: the epoch stays
    still = Guess(2, sampler, step.step, lambda position, indices: indices)
    assert list(still.jobs()) == list(sampler) and still.take()


def test_a_dropped_guess_is_never_drawn_nor_taken():
    sampler = RandomSampler(range(10), generator=generator())
    before = sampler.generator.get_state()
    guess = Guess(1, sampler, 1, lambda position, indices: indices)
    guess.drop()  # the epoch before it was left early
    assert list(guess.jobs()) == [] and guess.batches is None
    assert not guess.take()
    assert torch.equal(sampler.generator.get_state(), before)
