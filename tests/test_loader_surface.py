"""What a QueueFlowLoader tells about itself: ``len()`` from ``length=``, ``stats()``, ``QueueFlowLoader[T]``."""

from __future__ import annotations

import pickle
import typing

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import torchqueue as tq
from torchqueue import QueueFlowLoader

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_leaks")]

CHUNKS = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]


def dataset(length=None):
    return tq.QueueFlowDataset(CHUNKS, [tq.UnpackStep(), tq.ProcessStep(torch.tensor, 2)], length=length)


@pytest.mark.parametrize(
    "length, error, words",
    [("10", TypeError, "int"), (2.5, TypeError, "int"), (True, TypeError, "int"), (-1, ValueError, ">= 0")],
)
def test_a_bad_length_raises_at_construction(length, error, words):
    with pytest.raises(error, match=f"length.*{words}"):
        dataset(length)


@pytest.mark.parametrize("num_workers", [2.5, "2", None])
def test_a_num_workers_that_is_no_int_raises_at_construction(num_workers):
    # before: at the first iteration, as "ProcessStep nworkers must be an int >= 1" (a name you never wrote)
    with pytest.raises(TypeError, match=f"num_workers must be an int >= 0, got .*{num_workers!r}"):
        QueueFlowLoader(TensorDataset(torch.arange(8)), batch_size=2, num_workers=num_workers)


def test_num_workers_as_a_numpy_int_and_in_order_as_any_truth_value_work_as_in_dataloader():
    # before: in_order="yes" raised at the first iteration: "ProcessStep round_robin must be True or False"
    data = TensorDataset(torch.arange(8))
    for in_order in ("yes", 1, 0):
        loader = QueueFlowLoader(data, batch_size=2, num_workers=np.int64(2), in_order=in_order)
        assert sorted(int(b[0][0]) for b in loader) == [0, 2, 4, 6]
        assert loader.in_order == DataLoader(data, in_order=in_order).in_order
        loader.close()


def test_a_dataset_without_length_has_no_len_but_is_still_true():
    ds = dataset()
    with pytest.raises(TypeError, match="length="):
        len(ds)
    assert ds  # truth does not ask len()
    with pytest.raises(TypeError, match="length="):
        len(QueueFlowLoader(ds))


@pytest.mark.parametrize(
    "batch_size, drop_last, expected", [(None, False, 10), (4, False, 3), (4, True, 2), (5, False, 2)]
)
def test_the_loaders_len_follows_from_length_batch_size_and_drop_last(batch_size, drop_last, expected):
    ds = dataset(np.int64(10))  # a numpy integer, as from a config
    assert len(ds) == 10 and type(ds.length) is int
    loader = QueueFlowLoader(ds, batch_size=batch_size, drop_last=drop_last)
    assert len(loader) == expected
    assert len(list(loader)) == expected  # what the epoch then yields
    assert len(DataLoader(ds, batch_size=batch_size, drop_last=drop_last)) == expected  # a plain DataLoader too
    ds.close()


def test_stats_of_a_queueflow_dataset_are_its_pipelines():
    ds = dataset()
    loader = QueueFlowLoader(ds, batch_size=2)
    assert loader.stats()["UnpackStep()"].elements_in == 0  # not started: zeros
    list(loader)
    stats = loader.stats()
    assert isinstance(stats, tq.Stats) and list(stats) == ["UnpackStep()", "tensor"]
    assert stats["tensor"].elements_out == 10
    ds.close()


@pytest.mark.parametrize("persistent", [False, True])
def test_stats_of_a_map_style_loader_are_its_fetch_workers(persistent):
    data = TensorDataset(torch.arange(20.0))
    loader = QueueFlowLoader(data, batch_size=4, num_workers=2, persistent_workers=persistent)
    before = loader.stats()
    assert list(before) == ["fetch"] and before["fetch"].nworkers == 2 and before["fetch"].elements_out == 0
    iterator = iter(loader)
    next(iterator)
    assert loader.stats()["fetch"].elements_out >= 1  # the epoch running now
    del iterator
    list(loader)
    stats = loader.stats()
    assert stats["fetch"].elements_out >= 5 and stats.bottleneck == "fetch"  # the last epoch
    assert "fetch" in str(stats)
    loader.close()


def test_stats_without_workers_have_no_steps():
    loader = QueueFlowLoader(TensorDataset(torch.arange(8.0)), batch_size=4)
    list(loader)
    stats = loader.stats()
    assert isinstance(stats, tq.Stats) and len(stats) == 0 and stats.bottleneck is None


def test_the_loader_is_generic_as_dataloader_is():
    alias = QueueFlowLoader[torch.Tensor]
    assert typing.get_origin(alias) is QueueFlowLoader and typing.get_args(alias) == (torch.Tensor,)

    def batches(loader: QueueFlowLoader[int]) -> list[int]:  # an annotation that is evaluated
        return list(loader)

    assert typing.get_type_hints(batches)["loader"] == QueueFlowLoader[int]
    assert [b.tolist() for b in QueueFlowLoader[torch.Tensor]([1, 2], batch_size=2)] == [[1, 2]]


@pytest.mark.parametrize("workers", [0, 2])
def test_iter_draws_the_epoch_at_once_as_dataloader_does(workers):
    # DataLoader's iter() draws its base seed (and, with workers, its first index batches) at once: a draw
    # from the same random stream before the first next() must not change the batches
    def batches(loader_class):
        torch.manual_seed(0)
        loader = loader_class(TensorDataset(torch.arange(12)), 4, shuffle=True, num_workers=workers)
        it = iter(loader)
        torch.nn.Linear(4, 4)  # draws from the global generator, which the loader drew from too
        out = [batch[0].tolist() for batch in it]
        getattr(loader, "close", lambda: None)()
        return out

    assert batches(QueueFlowLoader) == batches(DataLoader)


def chunks_of_epoch(epoch):
    return [[epoch]]


def test_a_queueflow_datasets_loader_sampler_takes_the_epoch_and_pickles():
    # Lightning calls loader.sampler.set_epoch(e) each epoch
    loader = QueueFlowLoader(tq.QueueFlowDataset(chunks_of_epoch, [tq.UnpackStep()]))
    loader.sampler.set_epoch(3)
    assert loader.epoch == 3 and loader.dataset.epoch == 3 and list(loader) == [3]
    copied = pickle.loads(pickle.dumps(loader.sampler))  # DataLoader's sampler pickles: so does this one
    copied.set_epoch(5)
    assert loader.epoch == 3
    loader.close()
