"""QueueFlowLoader's epochs against DataLoader's: left early, two iterators, resumed from checkpoints.

Every comparison is with a real torch DataLoader, tensor by tensor, over a dataset that draws from
``random``, numpy and torch in ``__getitem__`` (as augmentations do) where workers are involved.
"""

from __future__ import annotations

import random
import time
import warnings

import numpy as np
import pytest
import torch
from conftest import Stuck
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from torchqueue import QueueFlowLoader

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_leaks")]


class Augmented(Dataset):
    """An index and one draw of each of ``random``, numpy and torch, and the worker's id."""

    def __init__(self, n: int = 37) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        info = torch.utils.data.get_worker_info()
        draws = [random.random(), float(np.random.rand()), torch.rand(()).item()]
        return torch.tensor([i, *draws, info.id if info else -1], dtype=torch.float64)


def make(cls, n: int = 37, **kwargs):
    kwargs.setdefault("batch_size", 4)
    return cls(Augmented(n), generator=torch.Generator().manual_seed(3), **kwargs)


def equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def close(loader) -> None:
    if isinstance(loader, QueueFlowLoader):
        loader.close()


# -- an epoch left early (break) ---------------------------------------------------------------


def seed_this_process() -> None:
    """Without workers the dataset draws from this process's generators: the same for each loader."""
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)


def _after_a_break(cls, taken: int, epochs: int = 2, **kwargs) -> list[list[torch.Tensor]]:
    """Take ``taken`` batches of an epoch, break, then run ``epochs`` whole epochs."""
    seed_this_process()
    loader = make(cls, **kwargs)
    for k, _ in enumerate(loader, 1):
        if k == taken:
            break
    out = [list(loader) for _ in range(epochs)]
    close(loader)
    return out


@pytest.mark.parametrize("taken", [1, 3, 9])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"shuffle": True},  # DataLoader without workers takes one index batch per batch
        {"shuffle": True, "num_workers": 2},  # with workers, prefetch_factor * num_workers first
        {"shuffle": True, "num_workers": 2, "prefetch_factor": 1},
        {"shuffle": True, "num_workers": 2, "persistent_workers": True},
        {"num_workers": 2, "persistent_workers": True},  # DataLoader's workers fetch all they were handed
        {
            "batch_size": 1,
            "batch_sampler": lambda: BatchSampler(
                RandomSampler(range(37), replacement=True, generator=torch.Generator().manual_seed(1)), 4, False
            ),
            "num_workers": 2,
        },  # draws 32 indices at a time
    ],
)
def test_after_a_break_the_next_epochs_are_dataloaders(taken, kwargs):
    def arguments():
        return {k: v() if callable(v) else v for k, v in kwargs.items()}

    theirs = _after_a_break(DataLoader, taken, **arguments())
    ours = _after_a_break(QueueFlowLoader, taken, **arguments())
    assert all(equal(a, b) for a, b in zip(theirs, ours))


def test_after_a_break_out_of_order_epochs_hold_dataloaders_batches():
    # in_order=False: batches come as they are ready, but the order drawn is DataLoader's
    theirs = _after_a_break(DataLoader, 2, n=40, shuffle=True, num_workers=2, in_order=False)
    ours = _after_a_break(QueueFlowLoader, 2, n=40, shuffle=True, num_workers=2, in_order=False)
    for a, b in zip(theirs, ours):
        assert sorted(x[:, 0].tolist() for x in a) == sorted(x[:, 0].tolist() for x in b)


# -- two iterators of one loader -----------------------------------------------------------------


def _two_iterators(cls, **kwargs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    seed_this_process()
    loader = make(cls, n=12, shuffle=True, **kwargs)
    first = iter(loader)
    head = [next(first)]
    second = list(iter(loader))
    rest = list(first)
    close(loader)
    return head + rest, second


@pytest.mark.parametrize(
    "kwargs", [{}, {"num_workers": 2}, {"num_workers": 2, "persistent_workers": True}], ids=["0", "2", "persistent"]
)
def test_two_iterators_of_one_loader_as_with_dataloader(kwargs):
    # without persistent workers each iterator runs its own epoch; with them, the second ends the first
    theirs = _two_iterators(DataLoader, **kwargs)
    ours = _two_iterators(QueueFlowLoader, **kwargs)
    assert all(equal(a, b) for a, b in zip(theirs, ours))
    if kwargs.get("persistent_workers"):
        assert len(ours[0]) == 1


def _peeked(cls, **kwargs) -> list[list[torch.Tensor]]:
    seed_this_process()
    loader = make(cls, **kwargs)
    peek = iter(loader)  # kept, never advanced again
    out = [[next(peek)], list(loader), list(loader)]
    close(loader)
    return out


@pytest.mark.parametrize(
    "kwargs", [{}, {"num_workers": 2}, {"num_workers": 2, "persistent_workers": True}], ids=["0", "2", "persistent"]
)
def test_an_iterator_left_unfinished_ends_its_epoch_when_the_next_begins(kwargs):
    theirs = _peeked(DataLoader, shuffle=True, **kwargs)
    ours = _peeked(QueueFlowLoader, shuffle=True, **kwargs)
    assert all(equal(a, b) for a, b in zip(theirs, ours))


def _unadvanced(cls, **kwargs) -> list[list[torch.Tensor]]:
    loader = make(cls, shuffle=True, num_workers=2, persistent_workers=True, **kwargs)
    out = [[next(iter(loader))]]  # an epoch left after one batch
    for _ in range(2):
        iter(loader)  # an iterator never advanced: DataLoader's workers fetch its first batches all the same
    out += [list(loader), list(loader)]
    close(loader)
    return out


def test_iterators_never_advanced_move_persistent_workers_random_streams_as_dataloaders():
    # before: the epochs after them drew what DataLoader's drew 4 and 8 batches earlier
    theirs = _unadvanced(DataLoader)
    ours = _unadvanced(QueueFlowLoader)
    assert all(equal(a, b) for a, b in zip(theirs, ours))


# -- checkpoints -------------------------------------------------------------------------------


def _resumed(taken: int, epochs: int = 2, **kwargs) -> list[torch.Tensor]:
    """The batches of a loader stopped after ``taken`` batches, then resumed in a new one from its state."""
    first = make(QueueFlowLoader, **kwargs)
    iterator = iter(first)
    head = [next(iterator) for _ in range(taken)]
    state = first.state_dict()
    close(first)
    resumed = make(QueueFlowLoader, **kwargs)
    resumed.load_state_dict(state)
    out = head + [batch for _ in range(epochs) for batch in resumed]
    close(resumed)
    return out


@pytest.mark.parametrize("state, words", [({}, r"keys \[\]"), ({"step": 3}, r"keys \['step'\]"), ([1], "list")])
def test_loading_what_is_no_state_dict_of_the_loader_says_so(state, words):
    # before: KeyError: 'epoch'
    loader = make(QueueFlowLoader, num_workers=0)
    with pytest.raises(ValueError, match=f"takes what this loader's state_dict\\(\\) returned, got .*{words}"):
        loader.load_state_dict(state)
    assert [len(batch) for batch in loader][:2] == [4, 4]  # the loader is as it was


def test_a_checkpoint_of_a_loader_over_another_dataset_warns_at_load():
    # before: accepted without a word, then "IndexError in __getitem__(28) of batch 2 (loader worker 0, ...)"
    larger = make(QueueFlowLoader, n=30, shuffle=True)
    iterator = iter(larger)
    next(iterator)
    state = larger.state_dict()
    smaller = make(QueueFlowLoader, n=20, shuffle=True)
    with pytest.warns(
        RuntimeWarning, match="saved over a dataset of 30 items, and this loader's has 20: the 7 batches"
    ):
        smaller.load_state_dict(state)
    same = make(QueueFlowLoader, n=30, shuffle=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.load_state_dict(state)
    assert len([i for batch in same for i in batch[:, 0]]) == 30 - 4


@pytest.mark.parametrize("taken", [2, 3, 5])
@pytest.mark.parametrize("persistent", [False, True])
def test_resuming_restores_the_workers_random_state(taken, persistent):
    kwargs = {"shuffle": True, "num_workers": 2, "persistent_workers": persistent}
    reference = make(DataLoader, **kwargs)
    theirs = [batch for _ in range(2) for batch in reference]
    assert equal(_resumed(taken, **kwargs), theirs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"shuffle": True},
        {"shuffle": True, "num_workers": 2},
        {"shuffle": True, "num_workers": 2, "persistent_workers": True},
    ],
    ids=["0", "2", "persistent"],
)
def test_a_checkpoint_after_a_whole_epoch_resumes_with_the_next_epoch(kwargs):
    seed_this_process()
    reference = make(DataLoader, **kwargs)
    theirs = [list(reference) for _ in range(3)]
    seed_this_process()
    first = make(QueueFlowLoader, **kwargs)
    ours = [list(first)]
    state = first.state_dict()
    close(first)
    resumed = make(QueueFlowLoader, **kwargs)
    resumed.load_state_dict(state)
    ours += [list(resumed), list(resumed)]
    close(resumed)
    assert all(equal(a, b) for a, b in zip(theirs, ours))


class OwnRandomSampler(torch.utils.data.Sampler):
    """A shuffling sampler that keeps its generator under a name of its own (as bucketing samplers do)."""

    def __init__(self, n: int, kind: str) -> None:
        self.n, self.kind = n, kind
        self.rng = {
            "numpy": lambda: np.random.default_rng(5),
            "numpy MT19937": lambda: np.random.Generator(np.random.MT19937(5)),  # arrays in its state
            "numpy SFC64": lambda: np.random.Generator(np.random.SFC64(5)),
            "numpy-legacy": lambda: np.random.RandomState(5),
            "python": lambda: random.Random(5),
            "torch": lambda: torch.Generator().manual_seed(5),
        }[kind]()

    def __iter__(self):
        if self.kind == "torch":
            return iter(torch.randperm(self.n, generator=self.rng).tolist())
        if self.kind == "python":
            return iter(self.rng.sample(range(self.n), self.n))
        return iter(self.rng.permutation(self.n).tolist())

    def __len__(self) -> int:
        return self.n


class RandomInAList(torch.utils.data.Sampler):
    """Its generators in a list, and in ``__slots__``."""

    __slots__ = ("n", "rngs")

    def __init__(self, n: int) -> None:
        self.n, self.rngs = n, [np.random.default_rng(6)]

    def __iter__(self):
        return iter(self.rngs[0].permutation(self.n).tolist())

    def __len__(self) -> int:
        return self.n


class StatefulSampler(OwnRandomSampler):
    """The same, saying its own state as torchdata's ``Stateful`` samplers do: how far it went, which the
    loader, having drawn the epoch whole as it began, must not put back (the next epoch would be empty)."""

    def __init__(self, n: int, kind: str) -> None:
        super().__init__(n, "python")
        self.yielded, self.next_yielded = 0, None

    def __iter__(self):
        start, self.next_yielded = self.next_yielded or 0, None
        self.yielded = start
        for index in list(super().__iter__())[start:]:
            self.yielded += 1
            yield index

    def state_dict(self) -> dict:
        return {"yielded": self.yielded}

    def load_state_dict(self, state: dict) -> None:
        self.next_yielded = state["yielded"]


class BucketBatches(torch.utils.data.Sampler):
    """A batch sampler of random batch sizes, its generator under a name of its own, over a sampler."""

    def __init__(self, sampler: torch.utils.data.Sampler) -> None:
        self.sampler, self.sizes = sampler, np.random.default_rng(11)

    def __iter__(self):
        indices = list(self.sampler)
        while indices:
            size = int(self.sizes.integers(1, 5))
            yield indices[:size]
            del indices[:size]


@pytest.mark.parametrize(
    "kind",
    ["numpy", "numpy MT19937", "numpy SFC64", "numpy-legacy", "python", "torch", "stateful", "list", "batch sampler"],
)
def test_a_resumed_loader_draws_the_next_epochs_as_an_uninterrupted_one_whatever_keeps_the_samplers_generator(
    kind, tmp_path
):
    # before: only a generator under the sampler's ``generator`` was saved; one under another name came
    # back at its seed, so the epoch after the resumed one repeated epoch 0's order
    def loader(cls):
        if kind == "batch sampler":
            return cls(Augmented(20), batch_sampler=BucketBatches(OwnRandomSampler(20, "numpy")), num_workers=2)
        if kind == "list":
            return cls(Augmented(20), batch_size=4, sampler=RandomInAList(20), num_workers=2)
        sampler = StatefulSampler(20, kind) if kind == "stateful" else OwnRandomSampler(20, kind)
        return cls(Augmented(20), batch_size=4, sampler=sampler, num_workers=2)

    reference = loader(DataLoader)
    theirs = [[batch[:, 0] for batch in reference] for _ in range(3)]
    first = loader(QueueFlowLoader)
    ours = [[batch[:, 0] for batch in first]]
    iterator = iter(first)
    ours.append([next(iterator)[:, 0]])
    torch.save(first.state_dict(), tmp_path / "checkpoint.pt")
    del iterator
    close(first)
    resumed = loader(QueueFlowLoader)
    resumed.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=True))
    ours[1] += [batch[:, 0] for batch in resumed]
    ours.append([batch[:, 0] for batch in resumed])
    close(resumed)
    assert all(equal(a, b) for a, b in zip(theirs, ours)) and len(ours) == 3
    assert not equal(theirs[0], theirs[2])


class IntsOnly(list):
    """A dataset that is a list, its ``__getitem__`` taking ints only."""

    def __getitem__(self, index):
        return torch.tensor(list.__getitem__(self, int(index)))


def test_a_checkpoint_never_indexes_a_dataset_that_is_a_list_as_it_looks_for_the_samplers_generators():
    # before: state_dict() looked into RandomSampler.data_source as into a list of generators: dataset[:16],
    # and "int() argument must be ... not 'slice'" from the user's __getitem__ (Lightning saving a checkpoint)
    dataset = IntsOnly(range(40))
    loader = QueueFlowLoader(dataset, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    first = next(it)
    state = loader.state_dict()
    resumed = QueueFlowLoader(dataset, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    resumed.load_state_dict(state)
    assert [b.tolist() for b in resumed] == [b.tolist() for b in it] and len(first) == 4


def test_a_resumed_loader_checkpoints_again():
    reference = make(DataLoader, shuffle=True, num_workers=2)
    theirs = [batch for _ in range(2) for batch in reference]
    first = make(QueueFlowLoader, shuffle=True, num_workers=2)
    iterator = iter(first)
    ours = [next(iterator) for _ in range(3)]
    state = first.state_dict()
    close(first)
    second = make(QueueFlowLoader, shuffle=True, num_workers=2)
    second.load_state_dict(state)
    iterator = iter(second)
    ours += [next(iterator) for _ in range(2)]
    state = second.state_dict()
    assert state["generator"] is not None
    close(second)
    third = make(QueueFlowLoader, shuffle=True, num_workers=2)
    third.load_state_dict(state)
    ours += [batch for _ in range(2) for batch in third]
    close(third)
    assert equal(ours, theirs)


def test_a_checkpoint_taken_after_a_break_resumes_as_the_loader_would_have_gone_on():
    # the epoch was left: DataLoader's next iterator begins a new epoch, after its workers' catch-up
    kwargs = {"shuffle": True, "num_workers": 2, "persistent_workers": True}
    theirs = _after_a_break(DataLoader, 2, epochs=1, **kwargs)
    loader = make(QueueFlowLoader, **kwargs)
    for k, _ in enumerate(loader, 1):
        if k == 2:
            break
    state = loader.state_dict()
    close(loader)
    resumed = make(QueueFlowLoader, **kwargs)
    resumed.load_state_dict(state)
    ours = [list(resumed)]
    close(resumed)
    assert equal(ours[0], theirs[0])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_checkpoint_after_the_last_batch_inside_the_loop_resumes_with_the_next_epoch(num_workers):
    # the uninterrupted loop goes on past its last batch, so its sampler runs out (a RandomSampler then
    # draws once more): the resumed loader's next epoch must be that loop's next epoch
    kwargs = {"shuffle": True, "num_workers": num_workers}
    seed_this_process()
    reference = make(DataLoader, n=12, **kwargs)
    theirs = [list(reference) for _ in range(2)]
    seed_this_process()
    loader = make(QueueFlowLoader, n=12, **kwargs)
    ours = []
    for batch in loader:
        ours.append(batch)
        if len(ours) == len(loader):
            state = loader.state_dict()
    close(loader)
    resumed = make(QueueFlowLoader, n=12, **kwargs)
    resumed.load_state_dict(state)
    nexts = list(resumed)
    close(resumed)
    assert equal(ours, theirs[0])
    assert equal(nexts, theirs[1])


def test_without_workers_a_checkpoint_between_iter_and_the_first_batch_resumes_that_epoch():
    # iter() drew the base seed, the order is drawn at the first batch: the checkpoint is taken as if
    # iter() had not been called
    seed_this_process()
    reference = make(DataLoader, n=12, shuffle=True)
    theirs = [list(reference) for _ in range(2)]
    seed_this_process()
    loader = make(QueueFlowLoader, n=12, shuffle=True)
    ours = [list(loader)]
    iterator = iter(loader)
    state = loader.state_dict()
    del iterator
    resumed = make(QueueFlowLoader, n=12, shuffle=True)
    resumed.load_state_dict(state)
    ours.append(list(resumed))
    assert all(equal(a, b) for a, b in zip(theirs, ours, strict=True))


class SlowFirst(Dataset):
    """Index 0 takes a while (the data, not a synchronisation): its batch comes last out of order."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> int:
        if i == 0:
            time.sleep(1.0)
        return i


def test_out_of_order_a_checkpoint_resumes_with_exactly_the_batches_not_yet_yielded():
    loader = QueueFlowLoader(SlowFirst(), batch_size=1, num_workers=2, in_order=False)
    iterator = iter(loader)
    taken = [int(next(iterator)) for _ in range(5)]
    state = loader.state_dict()
    del iterator
    loader.close()
    assert 0 not in taken  # out of order indeed: batch 0 was still being fetched
    resumed = QueueFlowLoader(SlowFirst(), batch_size=1, num_workers=2, in_order=False)
    resumed.load_state_dict(state)
    rest = [int(batch) for batch in resumed]
    resumed.close()
    assert sorted(taken + rest) == list(range(12))


def test_without_workers_the_order_is_drawn_at_the_first_batch_as_dataloader_draws_it():
    # DataLoader's single-process iterator draws its base seed at iter() and the order at its first
    # next(): anything drawing from the same generator in between changes the order alike
    def epoch(cls) -> list[list[int]]:
        generator = torch.Generator().manual_seed(5)
        iterator = iter(cls(list(range(8)), batch_size=4, shuffle=True, generator=generator))
        torch.empty(()).random_(generator=generator)  # e.g. a model's initialisation from the generator
        return [batch.tolist() for batch in iterator]

    assert epoch(QueueFlowLoader) == epoch(DataLoader)


def test_timeout_without_workers_raises_dataloaders_error_when_iterated():
    with pytest.raises(AssertionError):
        iter(DataLoader(Augmented(), timeout=5))
    with pytest.raises(AssertionError, match="timeout"):
        iter(QueueFlowLoader(Augmented(), timeout=5))


# -- DataLoader's errors -------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # DataLoader's iterator's __del__
def test_prefetch_factor_zero_with_workers_raises_dataloaders_error_when_iterated():
    with pytest.raises(AssertionError) as theirs:
        iter(DataLoader(Augmented(), num_workers=2, prefetch_factor=0))
    loader = QueueFlowLoader(Augmented(), num_workers=2, prefetch_factor=0)
    with pytest.raises(AssertionError) as ours:
        iter(loader)
    assert str(ours.value) == str(theirs.value)


def test_a_timeout_is_raised_promptly_though_a_worker_is_stuck():
    loader = QueueFlowLoader(Stuck(), batch_size=None, num_workers=2, timeout=2)  # start-up counts in it
    iterator = iter(loader)
    next(iterator), next(iterator)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="timed out after 2 seconds"):
        next(iterator)
    # the stuck worker is not waited for as at a normal close (2 s more): it is stopped at once
    assert time.monotonic() - start < 3.0
    loader.close()
