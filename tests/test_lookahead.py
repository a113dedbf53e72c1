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

from torchqueue._lookahead import EpochGuess, predictable


def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_only_samplers_that_depend_on_their_own_state_are_predictable():
    data = range(10)
    assert predictable(SequentialSampler(data))
    assert predictable(BatchSampler(RandomSampler(data, generator=generator()), 3, False))
    assert predictable(SubsetRandomSampler([1, 2], generator=generator()))
    assert predictable(DistributedSampler(data, num_replicas=2, rank=0))
    assert not predictable(RandomSampler(data))  # torch's global generator: training moves it
    assert not predictable(WeightedRandomSampler([1.0] * 10, 10, generator=generator()))  # weights may change
    assert not predictable([[0, 1], [2]])  # a user's batch sampler


def test_a_guess_is_the_next_epochs_draw_and_changes_no_state():
    sampler = BatchSampler(RandomSampler(range(10), generator=generator()), 3, False)
    guess = EpochGuess(sampler)
    before = sampler.sampler.generator.get_state()
    guessed = guess.guess()
    assert torch.equal(sampler.sampler.generator.get_state(), before)
    assert guessed == list(sampler)


def test_a_distributed_samplers_epoch_is_guessed_from_how_it_moved():
    sampler = DistributedSampler(range(20), num_replicas=2, rank=0, shuffle=True)
    guess = EpochGuess(sampler)
    sampler.set_epoch(0)
    guess.started()
    ahead = guess.guess()
    assert sampler.epoch == 0
    sampler.set_epoch(1)
    assert ahead == list(sampler)  # first guess: set_epoch is called every epoch
    guess.started()  # epoch 1 starts
    guess.started()  # the next one starts without set_epoch: the epoch stays
    assert guess.guess() == list(sampler)
