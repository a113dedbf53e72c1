"""A real Lightning Trainer on QueueFlowLoaders: fit, epoch-wise shuffling, mid-epoch checkpoint restore."""

from __future__ import annotations

import functools
import multiprocessing

import pytest
import torch
from conftest import assert_no_workers
from torch.utils.data import Dataset, TensorDataset

import torchqueue as tq
from torchqueue import QueueFlowLoader

lightning = pytest.importorskip("lightning")
pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.usefixtures("no_leaks"),
    pytest.mark.filterwarnings("ignore::UserWarning:lightning"),
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),
]


class Points(Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int):
        x = torch.tensor([float(i) / 64.0])
        return x, 3.0 * x + 1.0, i


class Model(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        while len(self.seen) <= self.current_epoch:
            self.seen.append([])
        self.seen[self.current_epoch].extend(index.tolist())
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Data(lightning.LightningDataModule):
    def __init__(self, workers: int = 2, persistent: bool = False, loader_class=QueueFlowLoader) -> None:
        super().__init__()
        self.workers = workers
        self.persistent = persistent
        self.loader_class = loader_class
        self.loaders: list[QueueFlowLoader] = []

    def train_dataloader(self):
        loader = self.loader_class(
            Points(),
            batch_size=8,
            shuffle=True,
            num_workers=self.workers,
            generator=torch.Generator().manual_seed(0),
            persistent_workers=self.persistent,
        )
        self.loaders.append(loader)
        return loader

    def val_dataloader(self):
        loader = self.loader_class(Points(), batch_size=16, num_workers=1, persistent_workers=self.persistent)
        self.loaders.append(loader)
        return loader

    def close(self) -> None:
        for loader in self.loaders:
            if isinstance(loader, QueueFlowLoader):
                loader.close()


def trainer(**kwargs):
    return lightning.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def test_trainer_fit_runs_two_epochs_with_a_new_order_each_epoch(tmp_path):
    model, data = Model(), Data()
    trainer(max_epochs=2, enable_checkpointing=False, default_root_dir=tmp_path).fit(model, datamodule=data)
    data.close()
    assert len(model.seen) == 2
    assert all(sorted(epoch) == list(range(64)) for epoch in model.seen)
    assert model.seen[0] != model.seen[1]


@pytest.mark.parametrize("persistent", [False, True])
def test_a_fit_trains_on_dataloaders_batches(tmp_path, persistent):
    # Lightning calls iter() on a loader that is not a DataLoader, to check that it iterates, and drops
    # it: before, that iterator began an epoch, so the seeded generator had moved on and every epoch of
    # the fit was another order than DataLoader's
    seen = {}
    for loader_class in (torch.utils.data.DataLoader, QueueFlowLoader):
        model, data = Model(), Data(persistent=persistent, loader_class=loader_class)
        trainer(max_epochs=2, enable_checkpointing=False, default_root_dir=tmp_path).fit(model, datamodule=data)
        data.close()
        seen[loader_class] = model.seen
    assert seen[QueueFlowLoader] == seen[torch.utils.data.DataLoader]


def point(i: int):
    return Points()[i]


class PipelineData(lightning.LightningDataModule):
    def __init__(self, length: int | None = None) -> None:
        super().__init__()
        chunks = [list(range(0, 40)), list(range(40, 64))]
        self.dataset = tq.QueueFlowDataset(chunks, [tq.UnpackStep(), tq.ProcessStep(point, 2)], length=length)

    def train_dataloader(self):
        return QueueFlowLoader(self.dataset, batch_size=8)


def test_a_queueflow_datasets_length_sizes_lightnings_epochs(tmp_path):
    model, data = Model(), PipelineData(length=64)
    fit = trainer(max_epochs=1, enable_checkpointing=False, default_root_dir=tmp_path, limit_val_batches=0)
    fit.fit(model, datamodule=data)
    data.dataset.close()
    assert fit.num_training_batches == 8  # not inf: step-based schedules know the epoch
    assert sorted(model.seen[0]) == list(range(64))


def test_a_mid_epoch_checkpoint_restores_the_loader_position(tmp_path):
    reference, data = Model(), Data()
    trainer(max_epochs=2, enable_checkpointing=False, default_root_dir=tmp_path).fit(reference, datamodule=data)
    data.close()

    every_3_steps = lightning.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}"
    )
    first, data = Model(), Data()
    trainer(max_epochs=1, default_root_dir=tmp_path, callbacks=[every_3_steps]).fit(first, datamodule=data)
    data.close()

    resumed, data = Model(), Data()
    trainer(max_epochs=2, enable_checkpointing=False, default_root_dir=tmp_path).fit(
        resumed, datamodule=data, ckpt_path=str(tmp_path / "ckpt" / "step=3.ckpt")
    )
    data.close()
    # the rest of epoch 0 (3 batches of 8 were done: not again), then epoch 1 as uninterrupted
    assert resumed.seen[0] == reference.seen[0][24:]
    assert resumed.seen[1] == reference.seen[1]


def logged_chunk(log, epoch_and_chunk) -> list[int]:
    """The 8 points of a chunk; the chunk is written to ``log`` (one line per read)."""
    epoch, chunk = epoch_and_chunk
    with open(log, "a") as f:
        f.write(f"{epoch} {chunk}\n")
    return list(range(8 * chunk, 8 * chunk + 8))


class LoggedPipeline(lightning.LightningDataModule):
    def __init__(self, log) -> None:
        super().__init__()
        steps = [tq.ProcessStep(functools.partial(logged_chunk, log), 2), tq.UnpackStep(), tq.ProcessStep(point, 2)]
        self.dataset = tq.QueueFlowDataset(lambda epoch: [(epoch, k) for k in range(8)], steps, length=64)

    def train_dataloader(self):
        return QueueFlowLoader(self.dataset, batch_size=8)


def test_a_mid_epoch_checkpoint_of_a_queueflowdataset_resumes_without_reading_the_consumed_chunks(tmp_path):
    fit = dict(default_root_dir=tmp_path, limit_val_batches=0)
    reference, data = Model(), LoggedPipeline(tmp_path / "reference.log")
    trainer(max_epochs=2, enable_checkpointing=False, **fit).fit(reference, datamodule=data)
    data.dataset.close()

    every_3_steps = lightning.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}"
    )
    data = LoggedPipeline(tmp_path / "first.log")
    trainer(max_epochs=1, callbacks=[every_3_steps], **fit).fit(Model(), datamodule=data)
    data.dataset.close()

    resumed, data = Model(), LoggedPipeline(tmp_path / "resumed.log")
    trainer(max_epochs=2, enable_checkpointing=False, **fit).fit(
        resumed, datamodule=data, ckpt_path=str(tmp_path / "ckpt" / "step=3.ckpt")
    )
    data.dataset.close()
    assert resumed.seen == [reference.seen[0][24:], reference.seen[1]]
    # 3 batches of 8 were chunks 0-2 of epoch 0: the resumed fit reads from chunk 3 (before: from chunk 0)
    reads = sorted(tuple(map(int, line.split())) for line in (tmp_path / "resumed.log").read_text().splitlines())
    assert reads == [(0, k) for k in range(3, 8)] + [(1, k) for k in range(8)]


def test_no_worker_outlives_fit_with_persistent_workers(tmp_path):
    model, data = Model(), Data(persistent=True)
    trainer(max_epochs=2, enable_checkpointing=False, default_root_dir=tmp_path).fit(model, datamodule=data)
    assert_no_workers()  # Lightning's teardown stops them, as it stops DataLoader's
    data.close()
    assert len(model.seen) == 2


def test_no_pipeline_worker_outlives_fit_over_a_queueflowdataset(tmp_path):
    model, data = Model(), PipelineData()
    fit = trainer(max_epochs=2, enable_checkpointing=False, default_root_dir=tmp_path, limit_val_batches=0)
    fit.fit(model, datamodule=data)
    assert_no_workers()
    assert data.dataset.stats()["point"].elements_out == 128  # the stopped pipeline's figures stay
    fit = trainer(max_epochs=1, enable_checkpointing=False, default_root_dir=tmp_path, limit_val_batches=0)
    fit.fit(Model(), datamodule=data)  # new workers for the next fit
    assert_no_workers()
    data.dataset.close()


def shuffled_chunks(epoch: int) -> list[list[int]]:
    order = torch.randperm(8, generator=torch.Generator().manual_seed(epoch)).tolist()
    return [list(range(8 * k, 8 * k + 8)) for k in order]


def test_each_epoch_of_a_fit_reads_its_own_epoch_of_a_queueflowdataset(tmp_path):
    # before: Lightning passes the epoch to the loader's sampler only, so every epoch read source(0)
    dataset = tq.QueueFlowDataset(shuffled_chunks, [tq.UnpackStep(), tq.ProcessStep(point, 2)], length=64)
    model = Model()

    class Pipeline(lightning.LightningDataModule):
        def train_dataloader(self):
            return QueueFlowLoader(dataset, batch_size=8)

    fit = trainer(max_epochs=3, enable_checkpointing=False, default_root_dir=tmp_path, limit_val_batches=0)
    fit.fit(model, datamodule=Pipeline())
    dataset.close()
    assert model.seen == [[i for chunk in shuffled_chunks(epoch) for i in chunk] for epoch in range(3)]


class Noisy(Points):
    def __getitem__(self, i: int):
        x, y, i = super().__getitem__(i)
        return x, y, i, torch.rand(())  # from the worker's random stream


def fits_after_teardowns(loader_class) -> list[tuple[int, float]]:
    """Two "fits" of two epochs each, with Lightning's teardown after each (what ``CombinedLoader.reset`` calls)."""
    from lightning.pytorch.utilities.combined_loader import _shutdown_workers_and_reset_iterator

    generator = torch.Generator().manual_seed(0)
    loader = loader_class(
        Noisy(), batch_size=8, shuffle=True, num_workers=2, persistent_workers=True, generator=generator
    )
    seen = []
    for _ in range(2):
        for _ in range(2):
            seen += [(i, noise) for _, _, index, noise in loader for i, noise in zip(index.tolist(), noise.tolist())]
        _shutdown_workers_and_reset_iterator(loader)
    assert_no_workers()
    return seen


def test_after_the_teardown_the_next_epoch_gives_dataloaders_batches():
    # DataLoader's next iterator after Lightning's teardown draws a new base seed and starts new workers
    assert fits_after_teardowns(QueueFlowLoader) == fits_after_teardowns(torch.utils.data.DataLoader)


class _Counting(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(range(4))


@pytest.mark.parametrize(
    "make",
    [
        lambda g, w, p: QueueFlowLoader(
            TensorDataset(torch.arange(16)), 4, shuffle=True, num_workers=w, generator=g, persistent_workers=p
        ),
        lambda g, w, p: QueueFlowLoader(
            tq.QueueFlowDataset([[1, 2, 3], [4, 5]], [tq.UnpackStep(), tq.ProcessStep(torch.tensor, 2)]),
            num_workers=w,
            generator=g,
            persistent_workers=p,
        ),
        lambda g, w, p: QueueFlowLoader(_Counting(), 2, num_workers=w, generator=g, persistent_workers=p),
    ],
    ids=["map-style", "QueueFlowDataset", "IterableDataset"],
)
@pytest.mark.parametrize(("workers", "persistent"), [(0, False), (2, False), (2, True)])
def test_lightnings_check_that_a_loader_iterates_begins_no_epoch(make, workers, persistent):
    # Lightning calls iter() on a loader that is not a DataLoader, and drops it. Before, that drew from
    # the generator (and started workers), so the epochs that followed were not DataLoader's
    from lightning.pytorch.trainer.connectors.data_connector import _check_dataloader_iterable
    from lightning.pytorch.trainer.states import TrainerFn

    generator = torch.Generator().manual_seed(0)
    loader = make(generator, workers, persistent)
    before = generator.get_state()
    _check_dataloader_iterable(loader, None, TrainerFn.FITTING)
    assert torch.equal(generator.get_state(), before)
    assert not multiprocessing.active_children()
    reference = make(torch.Generator().manual_seed(0), workers, persistent)
    assert [repr(batch) for batch in loader] == [repr(batch) for batch in reference]
    loader.close()
    reference.close()
