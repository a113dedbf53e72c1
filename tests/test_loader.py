"""QueueFlowLoader against torch's DataLoader: the same batches, tensor by tensor."""

from __future__ import annotations

import random
import re
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Stuck, assert_no_workers
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    WeightedRandomSampler,
)

import torchqueue as tq
from torchqueue import QueueFlowLoader

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_leaks")]


class Squares(Dataset):
    def __init__(self, n: int = 23) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"x": torch.tensor([i, i * i], dtype=torch.float32), "i": i}


def pairs(batch):
    return [(item["i"], item["x"].sum().item()) for item in batch]


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def both(epochs: int = 2, **kwargs):
    """Batches of DataLoader and QueueFlowLoader over the same arguments, epoch by epoch.

    A value that is a function is called for each loader (a fresh sampler each).
    """
    seed = kwargs.pop("seed", None)

    def arguments():
        fresh = {k: v() if callable(v) and k in ("sampler", "batch_sampler") else v for k, v in kwargs.items()}
        return {"generator": torch.Generator().manual_seed(seed) if seed is not None else None, **fresh}

    theirs_loader = DataLoader(Squares(), **arguments())
    ours_loader = QueueFlowLoader(Squares(), **arguments())
    theirs = [list(theirs_loader) for _ in range(epochs)]
    ours = [list(ours_loader) for _ in range(epochs)]
    ours_loader.close()
    return theirs, ours, theirs_loader, ours_loader


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"batch_size": 4},
        {"batch_size": 4, "shuffle": True, "seed": 1},
        {"batch_size": 5, "shuffle": True, "drop_last": True, "seed": 2},
        {"batch_size": None},
        {"batch_size": 3, "num_workers": 2, "shuffle": True, "seed": 3},
        {"batch_size": 3, "num_workers": 2, "shuffle": True, "seed": 3, "persistent_workers": True},
        {"batch_size": 3, "num_workers": 1, "collate_fn": pairs, "shuffle": True, "seed": 4},
        {"batch_size": 2, "num_workers": 2, "prefetch_factor": 1, "drop_last": True},
        {"batch_size": 4, "sampler": lambda: SequentialSampler(range(23))},
        {
            "batch_sampler": lambda: BatchSampler(
                RandomSampler(range(23), generator=torch.Generator().manual_seed(5)), 6, False
            )
        },
    ],
)
def test_the_same_batches_in_the_same_order_as_dataloader(kwargs):
    theirs, ours, theirs_loader, ours_loader = both(**kwargs)
    assert same(theirs, ours)
    assert len(theirs_loader) == len(ours_loader)


def test_the_same_batches_under_spawn():
    theirs, ours, _, _ = both(batch_size=4, shuffle=True, seed=9, num_workers=2, multiprocessing_context="spawn")
    assert same(theirs, ours)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_size": 2, "shuffle": True, "sampler": SequentialSampler(range(3))},
        {"batch_sampler": BatchSampler(SequentialSampler(range(3)), 2, False), "batch_size": 2},
        {"num_workers": -1},
        {"prefetch_factor": 2},
        {"persistent_workers": True},
        {"timeout": -1},
    ],
)
def test_invalid_combinations_give_dataloaders_errors(kwargs):
    with pytest.raises(ValueError) as theirs:
        DataLoader(Squares(), **kwargs)
    with pytest.raises(ValueError) as ours:
        QueueFlowLoader(Squares(), **kwargs)
    assert str(ours.value) == str(theirs.value)


class Noisy(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        info = torch.utils.data.get_worker_info()
        return (info.id if info else -1, random.random(), float(np.random.rand()), torch.rand(()).item())


def test_workers_are_seeded_per_worker_and_epoch_and_report_worker_info():
    loader = QueueFlowLoader(Noisy(), batch_size=None, num_workers=2, generator=torch.Generator().manual_seed(0))
    first, second = list(loader), list(loader)
    loader.close()
    assert {w for w, *_ in first} <= {0, 1}
    draws = [tuple(v[1:]) for v in first] + [tuple(v[1:]) for v in second]
    assert len(set(draws)) == len(draws)  # different per element, per worker and per epoch


def _record_init(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    assert info is not None and info.id == worker_id
    random.seed(1000 + worker_id)


def test_worker_init_fn_runs_in_every_worker():
    loader = QueueFlowLoader(Noisy(), batch_size=None, num_workers=2, worker_init_fn=_record_init)
    values = list(loader)
    loader.close()
    expected = {random.Random(1000 + w).random() for w in (0, 1)}
    assert {v[1] for v in values} & expected  # the first draw after init_fn in some worker


def _init_fails_in_worker_1(worker_id: int) -> None:
    if worker_id == 1:
        raise KeyError("no such shard")


def test_an_error_in_worker_init_fn_names_it_and_the_worker():
    loader = QueueFlowLoader(Squares(), batch_size=2, num_workers=2, worker_init_fn=_init_fails_in_worker_1)
    with pytest.raises(KeyError) as caught:
        list(loader)
    loader.close()
    text = str(caught.value)
    assert text.startswith("KeyError in worker_init_fn(1) (loader worker 1, pid ")
    assert "no such shard" in text and "element" not in text.split("\n")[0]


def test_state_dict_resumes_mid_epoch_with_exactly_the_remaining_batches():
    def make():
        return QueueFlowLoader(
            Squares(), batch_size=3, shuffle=True, num_workers=2, generator=torch.Generator().manual_seed(7)
        )

    uninterrupted = make()
    full = [list(uninterrupted), list(uninterrupted)]
    uninterrupted.close()

    first = make()
    it = iter(first)
    head = [next(it) for _ in range(3)]
    state = first.state_dict()
    first.close()

    resumed = make()
    resumed.load_state_dict(state)
    rest = list(resumed)
    following = list(resumed)
    resumed.close()
    assert same(head + rest, full[0])
    assert same(following, full[1])  # the next epoch is not lost or repeated


class Counting(IterableDataset):
    """(i, a draw from the worker's torch generator) for i = 0, 1, ..., n - 1, split among DataLoader's
    workers by worker id: the draws depend on the seeds DataLoader gives its workers."""

    def __init__(self, n: int = 20) -> None:
        self.n = n

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return ((i, int(torch.randint(10**6, ()))) for i in range(worker, self.n, workers))


@pytest.mark.parametrize("kind", ["QueueFlowDataset", "IterableDataset, 2 workers"])
def test_state_dict_over_an_iterable_dataset_resumes_with_the_remaining_batches(kind):
    # no index to resume from: the loader computes the yielded batches again and drops them
    def make():
        if kind == "QueueFlowDataset":
            return QueueFlowLoader(tq.QueueFlowDataset(chunk_source, [tq.UnpackStep()]), batch_size=2)
        return QueueFlowLoader(Counting(), batch_size=2, num_workers=2, generator=torch.Generator().manual_seed(4))

    def done(loader):
        if isinstance(loader.dataset, tq.QueueFlowDataset):
            loader.dataset.close()

    def plain(batch):
        return batch.tolist() if isinstance(batch, torch.Tensor) else [t.tolist() for t in batch]

    uninterrupted = make()
    full = [[plain(b) for b in uninterrupted] for _ in range(2)]
    done(uninterrupted)
    first = make()
    iterator = iter(first)
    head = [plain(next(iterator)) for _ in range(2)]
    state = first.state_dict()
    del iterator
    done(first)
    resumed = make()
    resumed.load_state_dict(state)
    rest = [plain(b) for b in resumed]
    following = [plain(b) for b in resumed]
    done(resumed)
    assert head + rest == full[0]
    assert following == full[1]


def test_a_queueflow_dataset_reads_its_source_once_per_epoch():
    # a source with a state of its own (a shuffled DataLoader of chunks, say) must not be iterated twice
    class Source:
        def __init__(self) -> None:
            self.iterations = 0

        def __iter__(self):
            self.iterations += 1
            return iter([[1, 2], [3]])

    source = Source()
    ds = tq.QueueFlowDataset(source, [tq.UnpackStep()])
    assert [list(ds) for _ in range(3)] == [[1, 2, 3]] * 3
    ds.close()
    assert source.iterations == 3


def test_rank_arguments_over_a_plain_iterable_dataset_raise_at_construction():
    with pytest.raises(ValueError, match="IterableDataset"):
        QueueFlowLoader(Counting(), batch_size=2, rank=0, world_size=2)


def test_a_loader_pickles_and_copies_as_dataloader_does_also_with_workers_running():
    import copy
    import pickle

    loader = QueueFlowLoader(Squares(), batch_size=4, num_workers=2, persistent_workers=True)
    iterator = iter(loader)
    first = next(iterator)
    for copied in (copy.copy(loader), copy.deepcopy(loader), pickle.loads(pickle.dumps(loader))):
        assert same(list(copied), list(DataLoader(Squares(), batch_size=4)))
        copied.close()
    assert len([first, *iterator]) == 6  # the original goes on
    loader.close()


def test_dataloaders_attributes_read_as_dataloaders():
    kwargs = {
        "batch_size": 4,
        "num_workers": 2,
        "drop_last": True,
        "timeout": 3,
        "prefetch_factor": 3,
        "in_order": False,
    }
    ours, theirs = QueueFlowLoader(Squares(), **kwargs), DataLoader(Squares(), **kwargs)
    for name in (
        "drop_last",
        "timeout",
        "worker_init_fn",
        "prefetch_factor",
        "in_order",
        "pin_memory_device",
        "multiprocessing_context",
        "batch_size",
        "num_workers",
        "pin_memory",
        "persistent_workers",
    ):
        assert getattr(ours, name) == getattr(theirs, name), name


class Watched(Squares):
    """Sets ``ahead`` once ``items`` items were fetched (here by the device thread, without workers)."""

    def __init__(self, items: int) -> None:
        super().__init__()
        self.fetched, self.items, self.ahead = 0, items, threading.Event()

    def __getitem__(self, i: int) -> dict:
        self.fetched += 1
        if self.fetched >= self.items:
            self.ahead.set()
        return super().__getitem__(i)


def test_batches_a_device_thread_prepared_ahead_do_not_count_as_yielded(monkeypatch):
    # pin_memory with CUDA prepares batches in a thread, ahead of the consumer; a checkpoint counts only
    # what the consumer got. Without CUDA here, the thread's work is the identity.
    import torchqueue._device as device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(device, "prepare", lambda pin, where: lambda batch: batch)

    def make(dataset):
        return QueueFlowLoader(
            dataset, batch_size=3, shuffle=True, pin_memory=True, generator=torch.Generator().manual_seed(1)
        )

    full = list(make(Squares()))
    watched = Watched(items=4 * 3)  # the thread is two batches ahead of the two taken
    first = make(watched)
    iterator = iter(first)
    head = [next(iterator) for _ in range(2)]
    assert watched.ahead.wait(timeout=30)
    state = first.state_dict()
    del iterator
    resumed = make(Squares())
    resumed.load_state_dict(state)
    assert state["yielded"] == 2
    assert same(head + list(resumed), full)


def test_ranks_get_disjoint_shares_with_equal_batch_counts():
    shares = []
    for rank in range(3):
        loader = QueueFlowLoader(Squares(), batch_size=2, shuffle=True, rank=rank, world_size=3)
        shares.append([i for batch in loader for i in batch["i"].tolist()])
    assert len({len(s) for s in shares}) == 1
    assert set().union(*map(set, shares)) == set(range(23))


def test_set_epoch_reshuffles_deterministically():
    a = QueueFlowLoader(Squares(), batch_size=4, shuffle=True, rank=0, world_size=1)
    b = QueueFlowLoader(Squares(), batch_size=4, shuffle=True, rank=0, world_size=1)
    a.set_epoch(3)
    b.set_epoch(3)
    assert same(list(a), list(b))
    b.set_epoch(4)
    assert not same(list(a), list(b))


@pytest.mark.filterwarnings("ignore:a QueueFlowDataset shared out over ranks without length=")
@pytest.mark.parametrize("epoch", [-1, 1.0, True, "2"])
def test_a_bad_set_epoch_raises_and_changes_nothing(epoch):
    # before: -1 set the loader's epoch and the sampler's, then the QueueFlowDataset refused it
    ds = tq.QueueFlowDataset(chunk_source, [tq.UnpackStep()])
    loader = QueueFlowLoader(ds, batch_size=4, rank=0, world_size=2)
    loader.set_epoch(3)
    with pytest.raises(ValueError, match="epoch must be an int >= 0"):
        loader.set_epoch(epoch)
    assert loader.epoch == ds.epoch == 3
    assert [b.tolist() for b in loader][0][0] == 300
    ds.close()


def test_pin_memory_without_cuda_warns_once_and_goes_on():
    loader = QueueFlowLoader(Squares(), batch_size=4, pin_memory=True)
    with pytest.warns(UserWarning, match="pin_memory"):
        first = list(loader)
    second = list(loader)
    assert len(first) == len(second) == 6


def test_pin_memory_device_warns_that_it_is_deprecated_as_dataloader_does():
    def warned(kind):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batches = [b.tolist() for b in kind(list(range(8)), batch_size=4, pin_memory=True, pin_memory_device="cpu")]
        return batches, sorted(str(w.message) for w in caught)

    assert warned(QueueFlowLoader) == warned(DataLoader)  # before: no word of the deprecation


def test_device_cuda_without_cuda_raises_at_construction():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(RuntimeError, match="CUDA"):
        QueueFlowLoader(Squares(), device="cuda")


def test_device_cpu_delivers_batches_on_the_cpu():
    loader = QueueFlowLoader(Squares(), batch_size=4, device="cpu")
    assert all(batch["x"].device.type == "cpu" for batch in loader)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_cuda_delivers_batches_on_the_gpu_ready_on_the_current_stream():
    loader = QueueFlowLoader(Squares(), batch_size=4, num_workers=2, pin_memory=True, device="cuda")
    batches = list(loader)
    loader.close()
    assert all(b["x"].is_cuda for b in batches)
    assert torch.equal(torch.cat([b["x"] for b in batches]).cpu(), torch.stack([Squares()[i]["x"] for i in range(23)]))


def chunk_source(epoch: int):
    return [list(range(epoch * 100 + i * 4, epoch * 100 + i * 4 + 4)) for i in range(3)]


def test_over_a_queueflow_dataset_it_runs_the_pipeline_and_batches_only_when_asked():
    ds = tq.QueueFlowDataset(chunk_source, [tq.UnpackStep(), tq.ProcessStep(torch.tensor, 2)])
    plain = QueueFlowLoader(ds)
    assert [t.item() for t in plain] == list(range(12))
    ds.set_epoch(1)
    batched = QueueFlowLoader(ds, batch_size=5)
    assert [b.tolist() for b in batched] == [list(range(100, 105)), list(range(105, 110)), [110, 111]]
    ds.close()


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_closing_the_loader_stops_its_queueflow_datasets_workers_and_both_stay_usable(backend):
    # before: loader.close() left the dataset's workers running until the dataset was closed or collected
    ds = tq.QueueFlowDataset(chunk_source, [tq.PoolStep(torch.tensor, 2, backend=backend), tq.UnpackStep()])
    loader = QueueFlowLoader(ds, batch_size=4)
    first = [b.tolist() for b in loader]
    loader.close()
    assert_no_workers()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("torchqueue")]
    assert [b.tolist() for b in loader] == first  # the next epoch starts new workers
    loader.close()
    assert_no_workers()


def test_a_queueflow_dataset_over_a_generator_warns_when_a_second_epoch_finds_it_used_up():
    ds = tq.QueueFlowDataset((chunk for chunk in [[1, 2], [3]]), [tq.UnpackStep()])
    assert list(ds) == [1, 2, 3]
    with pytest.warns(RuntimeWarning, match="iterator"):
        assert list(ds) == []
    ds.close()


def test_a_queueflow_dataset_works_in_a_plain_dataloader_without_workers():
    ds = tq.QueueFlowDataset([[1, 2], [3]], [tq.UnpackStep()])
    assert [int(x) for x in DataLoader(ds, batch_size=None, num_workers=0)] == [1, 2, 3]
    ds.close()


def test_a_queueflow_dataset_refuses_to_run_inside_dataloader_workers():
    ds = tq.QueueFlowDataset([[1, 2], [3]], [tq.UnpackStep()])
    with pytest.raises(RuntimeError, match="num_workers=0"):
        list(DataLoader(ds, batch_size=None, num_workers=1))
    ds.close()


@dataclass
class Pair:
    a: torch.Tensor
    b: int


def test_progress_bar_wraps_the_batches(capsys):
    loader = QueueFlowLoader(Squares(), batch_size=4, progress=True)
    assert len(list(loader)) == 6
    assert "6/6" in capsys.readouterr().err


def test_progress_bar_shows_the_epoch_counted_or_set(capsys):
    loader = QueueFlowLoader(Squares(), batch_size=4, progress=True)
    for _ in range(2):
        list(loader)
    counted = capsys.readouterr().err
    assert "epoch 0: 100%" in counted and "epoch 1: 100%" in counted
    loader.set_epoch(7)  # as Lightning does before each epoch
    list(loader)
    assert "epoch 7: 100%" in capsys.readouterr().err


@pytest.mark.parametrize("progress", ["tqdm", 1, None, "False"])
def test_progress_takes_only_true_or_false(progress):
    with pytest.raises(TypeError, match="progress must be True or False"):
        QueueFlowLoader(Squares(), progress=progress)


def test_timeout_raises_dataloaders_error_and_the_next_epoch_starts_afresh():
    loader = QueueFlowLoader(Stuck(), batch_size=None, num_workers=1, timeout=0.5)
    with pytest.raises(RuntimeError, match="DataLoader timed out after 0.5 seconds"):
        list(loader)
    loader.close()


@pytest.mark.parametrize("persistent", [False, True])
def test_a_timeout_names_the_stuck_batch_its_indices_and_its_worker(persistent):
    """Item 2 never comes back: batch 1 (indices [2, 3]), fetched by worker 1 (batch k to worker k % 2)."""
    # 3 s: the timeout counts the workers' start (the fork server's, a second or more on a loaded machine)
    loader = QueueFlowLoader(Stuck(), batch_size=2, num_workers=2, timeout=3, persistent_workers=persistent)
    with pytest.raises(RuntimeError, match="DataLoader timed out after 3 seconds") as raised:
        list(loader)
    cause = str(raised.value.__cause__)
    assert isinstance(raised.value.__cause__, TimeoutError)
    assert re.fullmatch(
        r"no batch came within 3 seconds: loader worker 1 \(pid \d+\) has been fetching batch 1 \(indices \[2, 3\]\) "
        r"for \d+\.\d s, in the dataset or collate_fn; py-spy dump --pid \d+ shows where",
        cause,
    ), cause
    loader.close()


@pytest.mark.timeout(60)
def test_a_persistent_loader_keeps_the_jobs_of_no_finished_epoch():
    # before: the jobs of the last three epochs handed to the workers were kept, two of them finished
    # (an epoch's indices each: tens of MB over ImageNet), only to name a batch in a timeout's message
    loader = QueueFlowLoader(list(range(40)), batch_size=2, num_workers=2, persistent_workers=True)
    for _ in range(4):
        assert len(list(loader)) == 20
    iterator = iter(loader)
    next(iterator)
    kept = dict(loader._map_style._handed._epochs)
    del iterator
    loader.close()
    assert len(kept) <= 2  # the epoch iterated, and the one guessed ahead


@pytest.mark.timeout(60)
def test_a_timeout_as_an_epoch_left_early_is_cancelled_is_dataloaders_and_the_next_epoch_starts_afresh(tmp_path):
    # before: iter() raised the pipeline's bare TimeoutError ("'fetch' ... element 4 of epoch 0"), and every
    # later epoch a PipelineError: the loader was broken for good. DataLoader: "DataLoader timed out"
    flag = tmp_path / "stuck"
    flag.touch()
    loader = QueueFlowLoader(StuckAt(9, flag), batch_size=2, num_workers=2, persistent_workers=True, timeout=3)
    try:
        for _ in loader:
            break  # batch 4 (indices [8, 9]) is fetched ahead: wait until a worker is stuck in item 9
        deadline = time.monotonic() + 20
        while not entered(flag).exists():
            assert time.monotonic() < deadline, "no worker fetched item 9"
            time.sleep(0.01)
        with pytest.raises(RuntimeError, match="DataLoader timed out after 3 seconds") as raised:
            iter(loader)
        assert "batch 4 of the epoch left before its end (indices [8, 9])" in str(raised.value.__cause__)
        flag.unlink()
        assert [batch.tolist() for batch in loader] == [[2 * k, 2 * k + 1] for k in range(6)]
    finally:
        loader.close()


def entered(flag: Path) -> Path:
    return flag.with_name(flag.name + ".entered")


class StuckAt(Dataset):
    """Item ``at`` never comes back (none: every item does); with a ``flag`` file, only while it exists,
    and a worker fetching it then makes ``<flag>.entered``."""

    def __init__(self, at: int | None = None, flag: Path | None = None) -> None:
        self.at, self.flag = at, flag

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> int:
        if i == self.at and (self.flag is None or self.flag.exists()):
            if self.flag is not None:
                entered(self.flag).touch()
            threading.Event().wait(30)
        return i


def test_a_timeout_in_a_resumed_epoch_names_the_batch_by_its_place_in_the_epoch():
    loader = QueueFlowLoader(StuckAt(), batch_size=2, num_workers=2)
    iterator = iter(loader)
    next(iterator), next(iterator)
    state = loader.state_dict()
    loader.close()
    resumed = QueueFlowLoader(StuckAt(9), batch_size=2, num_workers=2, timeout=3)
    resumed.load_state_dict(state)
    with pytest.raises(RuntimeError) as raised:
        list(resumed)
    # the third job handed to the resumed epoch's workers; before: "element 2 of epoch 0"
    assert "fetching batch 4 (indices [8, 9]) for" in str(raised.value.__cause__)
    resumed.close()


def test_a_timeout_without_batching_names_the_index():
    loader = QueueFlowLoader(Stuck(), batch_size=None, num_workers=2, timeout=3)
    with pytest.raises(RuntimeError) as raised:
        list(loader)
    assert "has been fetching batch 2 (index 2) for" in str(raised.value.__cause__)
    loader.close()


class Augmented(Dataset):
    """Random draws in every sample, as augmentations make: equal batches need DataLoader's seeding
    and DataLoader's batch-to-worker assignment (batch k to worker k % num_workers, in order)."""

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> torch.Tensor:
        draws = [random.random(), float(np.random.rand()), torch.rand(()).item()]
        return torch.tensor([i + self.offset, *draws], dtype=torch.float64)


def _epochs(cls, between, epochs: int = 4, **kwargs) -> list[torch.Tensor]:
    """Every batch of ``epochs`` epochs; ``between(loader, generator, epoch)`` runs before each epoch."""
    generator = torch.Generator().manual_seed(0)
    dataset = kwargs.pop("dataset", None) or Augmented()
    loader = cls(dataset, batch_size=4, num_workers=2, generator=generator, **kwargs)
    out = []
    for epoch in range(epochs):
        between(loader, generator, epoch)
        out.append(torch.stack(list(loader)))
    if hasattr(loader, "close"):
        loader.close()
    return out


def _nothing(loader, generator, epoch):
    pass


def _draw_from_the_generator(loader, generator, epoch):
    if epoch == 2:  # the user draws from the loader's generator: the next epoch's order changes
        torch.empty(3).random_(generator=generator)


def _jump_the_sampler_epoch(loader, generator, epoch):
    loader.sampler.set_epoch(7 if epoch == 2 else epoch)  # as Lightning does, with one jump


@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize(
    "between, sampler",
    [
        (_nothing, None),
        (_draw_from_the_generator, None),
        (_jump_the_sampler_epoch, "distributed"),
        (_nothing, "distributed"),  # a DistributedSampler whose epoch never moves
        (_nothing, "weighted"),
    ],
)
def test_random_augmentations_give_dataloaders_batches_epoch_after_epoch(persistent, between, sampler):
    def arguments():
        if sampler == "distributed":
            return {"sampler": DistributedSampler(Augmented(), num_replicas=2, rank=0, shuffle=True)}
        if sampler == "weighted":
            return {"sampler": WeightedRandomSampler([1.0] * 40, 40, generator=torch.Generator().manual_seed(1))}
        return {"shuffle": True}

    theirs = _epochs(DataLoader, between, persistent_workers=persistent, **arguments())
    ours = _epochs(QueueFlowLoader, between, persistent_workers=persistent, **arguments())
    assert all(torch.equal(a, b) for a, b in zip(theirs, ours))
    assert not torch.equal(ours[0][..., 1:], ours[1][..., 1:])  # the draws move on from epoch to epoch


def _shift_the_dataset(loader, generator, epoch):
    loader.dataset.offset = 100.0 * epoch


def test_without_persistent_workers_each_epoch_sees_the_dataset_as_it_is_then():
    theirs = _epochs(DataLoader, _shift_the_dataset, epochs=2, dataset=Augmented())
    ours = _epochs(QueueFlowLoader, _shift_the_dataset, epochs=2, dataset=Augmented())
    assert all(torch.equal(a, b) for a, b in zip(theirs, ours))
    assert ours[1][..., 0].min() >= 100


class Logged(Dataset):
    """Appends every index it is asked for to a file, from whichever worker asks."""

    def __init__(self, path) -> None:
        self.path = path

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> int:
        with open(self.path, "a") as log:
            log.write(f"{i}\n")
        return i


def _fetched(path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def test_persistent_workers_fetch_the_next_epoch_before_it_starts_and_only_once(tmp_path):
    log = tmp_path / "fetched.txt"

    def arguments():
        generator = torch.Generator().manual_seed(0)
        return dict(batch_size=3, shuffle=True, num_workers=2, persistent_workers=True, generator=generator)

    reference = DataLoader(Logged(tmp_path / "reference.txt"), **arguments())
    expected = [list(reference), list(reference)]
    del reference  # its persistent workers go with it
    loader = QueueFlowLoader(Logged(log), **arguments())
    try:
        first = list(loader)
        _wait_for_lines(log, 24)
        assert sorted(_fetched(log)) == sorted(list(range(12)) * 2)  # 4 batches fit in what may be in flight
        second = list(loader)
        _wait_for_lines(log, 36)  # the third epoch, ahead
    finally:
        loader.close()
    assert same([first, second], expected)
    assert len(_fetched(log)) == 36  # the second epoch used what was fetched ahead: nothing twice


def _wait_for_lines(path, count: int) -> None:
    deadline = time.monotonic() + 30
    while len(_fetched(path)) < count and time.monotonic() < deadline:
        threading.Event().wait(0.01)


def test_persistent_workers_outlive_epochs_left_before_their_end_as_lightning_leaves_them():
    """Lightning takes len(loader) batches and drops the iterator: the workers and their random
    streams must go on as DataLoader's do."""

    def epochs(cls):
        loader = cls(
            Augmented(),
            **dict(
                batch_size=4,
                shuffle=True,
                num_workers=2,
                persistent_workers=True,
                generator=torch.Generator().manual_seed(0),
            ),
        )
        out = []
        for _ in range(3):
            it = iter(loader)
            out.append(torch.stack([next(it) for _ in range(len(loader))]))
            del it
        if cls is QueueFlowLoader:
            workers = loader._map_style._sequence._runtime.workers
            loader.close()
            return out, workers
        return out, None

    theirs, _ = epochs(DataLoader)
    ours, workers = epochs(QueueFlowLoader)
    assert all(torch.equal(a, b) for a, b in zip(theirs, ours))
    assert len(workers) == 2


class Images(Dataset):
    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.full((3, 32, 32), float(i)), i


def test_labels_kept_from_batches_do_not_keep_their_images_and_batches_save_as_dataloaders_do(tmp_path):
    kept, saved = [], tmp_path / "batch.pt"
    loader = QueueFlowLoader(Images(), batch_size=8, num_workers=2)
    for images, labels in loader:  # an evaluation loop keeps the targets, as DataLoader's users do
        kept.append(labels)
        torch.save((images, labels), saved)  # two dtypes: DataLoader gives each its own storage
        loaded_images, loaded_labels = torch.load(saved)
        assert torch.equal(loaded_images, images) and torch.equal(loaded_labels, labels)
    assert torch.equal(torch.cat(kept), torch.arange(40))
    assert all(labels.untyped_storage().nbytes() == labels.nbytes for labels in kept)  # not the batch's segment


class Endless(torch.utils.data.Sampler):
    """A sampler that never stops (detectron2's ``TrainingSampler``), with or without a ``__len__``."""

    def __init__(self, n: int, length: int | None = None) -> None:
        self.n, self.length = n, length

    def __iter__(self):
        generator = torch.Generator().manual_seed(0)
        while True:
            yield from torch.randperm(self.n, generator=generator).tolist()

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("endless")
        return self.length


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("length", [None, 10])
def test_an_endless_sampler_raises_a_clear_error_instead_of_drawing_until_memory_runs_out(num_workers, length):
    loader = QueueFlowLoader(Squares(10), batch_size=4, sampler=Endless(10, length), num_workers=num_workers)
    with pytest.raises(RuntimeError, match="endless sampler"):
        next(iter(loader))
    loader.close()


def test_a_sampler_without_a_length_is_drawn_to_its_end():
    sampler = Endless(10)
    finite = lambda: (i for _, i in zip(range(25), sampler))  # noqa: E731
    got = [b["x"] for b in QueueFlowLoader(Squares(10), batch_size=4, sampler=finite(), num_workers=2)]
    want = [b["x"] for b in DataLoader(Squares(10), batch_size=4, sampler=finite(), num_workers=2)]
    assert len(got) == len(want) == 7 and all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("generator", [np.random.default_rng(0), 0])
def test_a_generator_that_is_not_torchs_is_a_type_error_at_construction(generator):
    with pytest.raises(TypeError, match="torch.Generator"):
        QueueFlowLoader(Squares(10), batch_size=4, shuffle=True, generator=generator)
    with pytest.raises(TypeError):  # DataLoader's, as it iterates
        list(DataLoader(Squares(10), batch_size=4, shuffle=True, generator=generator))


def tagged(batch):
    return ("tagged", [sample["i"] for sample in batch])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_attributes_set_after_construction_behave_as_dataloaders(num_workers):
    loader = QueueFlowLoader(Squares(6), batch_size=2, num_workers=num_workers)
    for name, value in [("batch_size", 3), ("drop_last", True), ("sampler", None), ("dataset", Squares(2))]:
        with pytest.raises(ValueError, match=f"{name} attribute should not be set"):
            setattr(loader, name, value)
    loader.collate_fn = tagged
    loader.timeout = 5 if num_workers else 0
    if num_workers:
        loader.prefetch_factor = 4
    assert list(loader) == [("tagged", [0, 1]), ("tagged", [2, 3]), ("tagged", [4, 5])]
    assert loader.collate_fn is tagged and loader.prefetch_factor == (4 if num_workers else None)
    loader.close()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_batch_sampler_whose_length_is_undefined_works_as_in_dataloader(num_workers):
    """PyG's DynamicBatchSampler without num_steps: its len() raises ValueError, as DataLoader's len() then does."""
    from torch_geometric.datasets import FakeDataset
    from torch_geometric.loader import DynamicBatchSampler
    from torch_geometric.loader.dataloader import Collater

    torch.manual_seed(0)
    dataset = FakeDataset(num_graphs=30, avg_num_nodes=10)

    def loader(kind, **kwargs):
        sampler = DynamicBatchSampler(dataset, max_num=60, mode="node")
        return kind(dataset, batch_sampler=sampler, collate_fn=Collater(dataset), num_workers=num_workers, **kwargs)

    expected = [batch.x for batch in loader(DataLoader)]
    ours = loader(QueueFlowLoader, progress=True)
    got = [batch.x for batch in ours]  # before: ValueError "The length of 'DynamicBatchSampler' is undefined"
    assert len(got) == len(expected) > 1 and all(map(torch.equal, got, expected))
    with pytest.raises(ValueError, match="undefined"):
        len(ours)
    iterator = iter(ours)
    next(iterator)
    state = ours.state_dict()
    resumed = loader(QueueFlowLoader)
    resumed.load_state_dict(state)
    assert all(map(torch.equal, [batch.x for batch in resumed], expected[1:]))
    ours.close()
    resumed.close()


class KillsItsWorkerAt(torch.utils.data.Dataset):
    def __init__(self, index: int) -> None:
        self.index = index

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> int:
        if i == self.index:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        return i


@pytest.mark.parametrize("persistent", [False, True])
def test_a_worker_that_dies_is_named_with_the_batch_it_was_fetching(persistent):
    # before: "worker 0 of step 'fetch' (pid 987) died: killed by signal SIGKILL, while working on element 4
    # of epoch 0": the loader's internal step and the position of a job in its pipeline
    loader = QueueFlowLoader(KillsItsWorkerAt(17), batch_size=4, num_workers=2, persistent_workers=persistent)
    try:
        with pytest.raises(tq.WorkerDiedError) as info:
            list(loader)
    finally:
        loader.close()
    words = r"loader worker 0 \(pid \d+\) died: killed by signal SIGKILL, while fetching batch 4 "
    assert re.fullmatch(words + r"\(indices \[16, 17, 18, 19\]\)", str(info.value)), str(info.value)


class BucketBatches(torch.utils.data.Sampler):
    """A batch sampler that draws its epoch's batches as ``iter()`` is called (not lazily, as torch's do)."""

    def __init__(self, n, size):
        self.n, self.size, self.generator = n, size, torch.Generator().manual_seed(0)

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.generator).tolist()
        return iter([order[i : i + self.size] for i in range(0, self.n, self.size)])

    def __len__(self):
        return -(-self.n // self.size)


@pytest.mark.parametrize("num_workers, persistent", [(0, False), (2, False), (2, True)])
def test_a_sampler_that_draws_as_iter_is_called_gives_dataloaders_batches(num_workers, persistent):
    # DataLoader's new multi-process iterator calls iter() on the sampler twice and drops the first
    # (with persistent workers, only the first epoch's does); QueueFlowLoader called it once, and every
    # epoch's batches differed from DataLoader's
    def epochs(kind):
        loader = kind(
            list(range(20)), batch_sampler=BucketBatches(20, 4), num_workers=num_workers, persistent_workers=persistent
        )
        return [[batch.tolist() for batch in loader] for _ in range(3)]

    assert epochs(QueueFlowLoader) == epochs(DataLoader)


class GlobalBucketBatches(BucketBatches):
    """``BucketBatches`` drawing from torch's global generator, as the loader draws its base seed without
    a ``generator=``: the order of the two draws decides the batches."""

    def __iter__(self):
        order = torch.randperm(self.n).tolist()
        return iter([order[i : i + self.size] for i in range(0, self.n, self.size)])


def test_without_workers_a_sampler_that_draws_as_iter_is_called_draws_before_the_base_seed():
    # DataLoader's single-process iterator calls iter() on the sampler as it is made, then draws its base
    # seed; QueueFlowLoader called iter() at the first batch: after the seed, and not at all for an
    # iterator dropped before its first batch, so the epochs after differed from DataLoader's
    def epochs(kind):
        torch.manual_seed(0)
        loader = kind(list(range(20)), batch_sampler=GlobalBucketBatches(20, 4))
        iter(loader)  # made and dropped before its first batch (Lightning's sanity checks do so)
        return [[batch.tolist() for batch in loader] for _ in range(3)] + [torch.rand(()).item()]

    assert epochs(QueueFlowLoader) == epochs(DataLoader)


class ChannelsLastClips(torch.utils.data.Dataset):
    """Video clips ``(T, C, H, W)`` stored channels_last."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return (
            torch.arange(4 * 3 * 8 * 8, dtype=torch.float32)
            .reshape(4, 3, 8, 8)
            .add(i)
            .to(memory_format=torch.channels_last)
        )


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batches_are_laid_out_as_dataloaders_in_its_workers_and_in_its_own_process(num_workers):
    # DataLoader's workers stack into a new storage (out=): a contiguous batch; its own process keeps
    # the samples' memory format. Before, QueueFlowLoader's workers kept it too: .view(4, -1) raised
    def batches(kind):
        return list(kind(ChannelsLastClips(), batch_size=4, num_workers=num_workers))

    expected, got = batches(DataLoader), batches(QueueFlowLoader)
    assert [b.stride() for b in got] == [b.stride() for b in expected] and all(map(torch.equal, got, expected))
    assert all(b.is_contiguous() for b in got) == bool(num_workers)


class Reading:
    """A sample type with a collate function of its own in torch's ``default_collate_fn_map``."""

    def __init__(self, value: int) -> None:
        self.value = value


def collate_readings(batch, *, collate_fn_map=None):
    """Which worker collates the batch (``get_worker_info()``): as a user's entry of the map sees it."""
    info = torch.utils.data.get_worker_info()
    return [r.value for r in batch], None if info is None else (info.id, info.num_workers)


# registered as this module is imported, as a library registers its types: so in every worker too (a
# worker of the fork server or a spawned one imports this module to unpickle the dataset)
torch.utils.data._utils.collate.default_collate_fn_map[Reading] = collate_readings


class Readings(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return Reading(i)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_collate_function_registered_for_a_type_sees_the_worker_as_in_dataloader(num_workers):
    # before, QueueFlowLoader's workers collated with get_worker_info() None: a function of
    # default_collate_fn_map that asked which worker it ran in (to seed, to shard) was told "none"
    def batches(kind):
        return list(kind(Readings(), batch_size=2, num_workers=num_workers))

    expected = batches(DataLoader)
    assert batches(QueueFlowLoader) == expected
    assert all((info is None) == (num_workers == 0) for _, info in expected)
