"""A loader's epochs as DataLoader runs them: the generator after an epoch left early; restoring jobs."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from torchqueue._epochs import Epoch, catch_up, checkpoint, leave, pulls, restored, restoring_jobs
from torchqueue._fetch import Job, Start


def _sampler(n: int, batch_size: int, replacement: bool = False) -> BatchSampler:
    generator = torch.Generator().manual_seed(3)
    return BatchSampler(RandomSampler(range(n), replacement=replacement, generator=generator), batch_size, False)


@pytest.mark.parametrize("n, batch_size, replacement", [(12, 4, False), (37, 4, False), (100, 4, True)])
@pytest.mark.parametrize("taken", [0, 1, 2, 3, 9, 10])
def test_leaving_an_epoch_leaves_the_generator_as_a_dataloader_iterator_left_there(n, batch_size, replacement, taken):
    # without workers DataLoader's iterator takes one index batch per batch it yields
    theirs = DataLoader(range(n), batch_sampler=_sampler(n, batch_size, replacement))
    iterator = iter(theirs)
    for _ in range(min(taken, len(theirs))):
        next(iterator)
    expected = theirs.batch_sampler.sampler.generator.get_state()

    ours = _sampler(n, batch_size, replacement)
    generator = ours.sampler.generator
    drawn_from = generator.get_state()
    epoch = Epoch(0, list(ours), drawn_from, generator.get_state(), yielded=min(taken, len(ours)))
    leave(epoch, ours, num_workers=0, prefetch_factor=0)
    assert epoch.left
    assert torch.equal(generator.get_state(), expected)


def test_an_epoch_left_after_someone_else_drew_from_the_generator_leaves_it_alone():
    sampler = _sampler(12, 4)
    drawn_from = sampler.sampler.generator.get_state()
    epoch = Epoch(0, list(sampler), drawn_from, sampler.sampler.generator.get_state(), yielded=1)
    torch.empty(1).random_(generator=sampler.sampler.generator)
    moved = sampler.sampler.generator.get_state()
    leave(epoch, sampler, num_workers=0, prefetch_factor=0)
    assert torch.equal(sampler.sampler.generator.get_state(), moved)


def test_dataloader_with_workers_takes_its_prefetch_window_first():
    assert pulls(0, 0, 0) == 0 and pulls(3, 0, 0) == 3
    assert pulls(0, 2, 2) == 4 and pulls(3, 2, 2) == 7


def test_persistent_workers_catch_up_on_the_batches_dataloaders_were_handed():
    epoch = Epoch(0, [[i] for i in range(10)], None, None, yielded=1, left=True)
    assert catch_up(epoch, 2, 2) == [(1, [[1], [2], [3], [4]], False)]  # 4 + 1 handed out, 1 yielded
    assert catch_up(Epoch(0, [[0]], None, None, yielded=1, left=True), 2, 2) == []  # run out


def test_an_epoch_left_before_its_first_batch_passes_its_own_catch_up_on():
    # DataLoader's workers fetched the epoch before's leftovers, then this one's first batches
    earlier = [(1, [[1], [2]], False)]
    unadvanced = Epoch(0, [[i] for i in range(10, 20)], None, None, left=True, caught_up=earlier)
    assert catch_up(unadvanced, 2, 2) == [*earlier, (0, [[10], [11], [12], [13]], False)]
    advanced = Epoch(0, [[i] for i in range(10, 20)], None, None, yielded=1, left=True, caught_up=earlier)
    assert catch_up(advanced, 2, 2) == [(1, [[11], [12], [13], [14]], False)]  # its first batch came after them


def test_restoring_jobs_give_every_worker_its_state_first_and_keep_the_round_robin():
    states = {0: ("s0",), 1: ("s1",)}  # stand-ins for random states
    jobs = restoring_jobs(7, 3, 2, states, [(1, [[1], [2], [3]], False), (0, [[10], [11]], True)])  # type: ignore[dict-item]
    pad = Job(7, 3, None)
    assert jobs == [
        pad._replace(start=("s0",)),  # worker 0: nothing to fetch before batch 2
        Job(7, 3, [1], ("s1",), False, position=1),  # batch 1 to worker 1
        Job(7, 3, [2], None, False, position=2),
        Job(7, 3, [3], None, False, position=3),
        Job(7, 3, [10], position=0),  # the next epoch's batch 0 to worker 0
        Job(7, 3, [11], position=1),
    ]
    # a worker without a job still gets its state; one never seen gets its initial state
    assert restoring_jobs(7, 3, 3, {}, [(0, [[5]], True)]) == [
        Job(7, 3, [5], Start.INITIAL, position=0),
        pad._replace(start=Start.INITIAL),
        pad._replace(start=Start.INITIAL),
    ]


def test_a_checkpoint_holds_plain_values_and_restores_the_epoch(tmp_path):
    epoch = Epoch(5, [[0, 1], [2]], torch.zeros(3, dtype=torch.uint8), None, yielded=1, states={1: (None, None, b"x")})
    epoch.caught_up = [(1, [[7, 8]], False)]  # the batches of the epoch before, fetched first
    path = tmp_path / "state.pt"
    torch.save(checkpoint(epoch, num_workers=2), path)
    state = torch.load(path, weights_only=True)  # as Lightning may read it
    back = restored(state, num_workers=2)
    assert back is not None and torch.equal(back.drawn_from, epoch.drawn_from)  # type: ignore[arg-type]
    back.drawn_from = epoch.drawn_from
    assert back == epoch
    assert restored(state, num_workers=3).states == {}  # other workers: their states do not apply
    assert restored({"epoch": 0, "base_seed": None, "batches": [], "yielded": 0}, 2) is None
