"""``QueueFlowLoader``: the drop-in for ``torch.utils.data.DataLoader``.

    from torchqueue import QueueFlowLoader as DataLoader

Over a map-style dataset it yields the same batches in the same order as ``DataLoader`` with
the same arguments and generator: the arguments are checked, and the sampler, batch sampler and
collate function built, by a real ``DataLoader`` (so invalid combinations raise DataLoader's own
errors); each epoch draws from the generator exactly as DataLoader's iterator does (a base seed,
on every epoch unless workers persist, then the sampler's draws; ``_epochs`` for an epoch left
early), and the epoch's index batches are fetched by a ``tq.Sequence`` of ``num_workers``
processes. Workers are seeded as DataLoader seeds them (``base_seed + worker_id`` for ``random``
and torch, DataLoader's numpy seed), call ``worker_init_fn(worker_id)`` and answer
``torch.utils.data.get_worker_info()``. Without persistent workers every iterator has its own
workers, as in DataLoader; with them, a new iterator ends the previous one's epoch.

Over a ``QueueFlowDataset`` it runs that pipeline, batching and collating only when asked
(``batch_size`` defaults to ``None`` for it). Other iterable datasets are handed to a
``DataLoader`` as they are. Ranks get their share as ``_sharding`` describes.
"""

from __future__ import annotations

import copy
import functools
import operator
import sys
import types
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

import torch
from torch.utils.data import IterableDataset, Sampler

from torchqueue import _device, _progress, _sharding
from torchqueue._checkpoint import Checkpoints, Stream
from torchqueue._fetch import Batches
from torchqueue._mapstyle import MapStyleEpochs
from torchqueue._origins import Resumed
from torchqueue._runtime import _user_stacklevel
from torchqueue._torchloader import TorchLoader
from torchqueue.dataset import QueueFlowDataset, checked_epoch
from torchqueue.stats import Stats

__all__ = ["QueueFlowLoader"]

_DEFAULT: Any = object()

_T_co = TypeVar("_T_co", covariant=True)


_SET_AT_CONSTRUCTION = frozenset(
    ("batch_size", "batch_sampler", "sampler", "drop_last", "dataset", "persistent_workers")
)
_SETTABLE = frozenset(("collate_fn", "worker_init_fn", "timeout", "prefetch_factor", "multiprocessing_context"))


class QueueFlowLoader(Generic[_T_co]):
    """DataLoader's arguments with DataLoader's meaning, plus ``device=``, ``progress=``, ``rank=``, ``world_size=``.

    Generic as ``DataLoader[T]`` is: ``QueueFlowLoader[int]`` works in annotations.

    Args:
        device: Deliver batches on this device; for CUDA a background thread copies pinned
            batches on a dedicated stream. ``"cuda"`` without CUDA raises here.
        progress: ``True`` shows a tqdm bar for each epoch, titled with its number (``epoch 3``: the
            one ``set_epoch`` gave, else the count of epochs begun); anything but ``True``/``False``
            raises ``TypeError``. Needs the ``progress`` extra (tqdm).
        rank, world_size: This process's share of the data (default: from ``torch.distributed``
            when it is initialized): disjoint shares, the same count on every rank (see
            ``docs/from-dataloader.md``).
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int | None = _DEFAULT,
        shuffle: bool | None = None,
        sampler: Any = None,
        batch_sampler: Any = None,
        num_workers: int = 0,
        collate_fn: Callable | None = None,
        pin_memory: bool = False,
        drop_last: bool = False,
        timeout: float = 0,
        worker_init_fn: Callable[[int], None] | None = None,
        multiprocessing_context: Any = None,
        generator: torch.Generator | None = None,
        *,
        prefetch_factor: int | None = None,
        persistent_workers: bool = False,
        pin_memory_device: str = "",
        in_order: bool = True,
        device: str | torch.device | None = None,
        progress: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if batch_size is _DEFAULT:
            batch_size = None if isinstance(dataset, QueueFlowDataset) else 1
        self.device = torch.device(device) if device is not None else None
        if self.device is not None and self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device={device!r} but CUDA is not available: use device=None or 'cpu'")
        if generator is not None and not isinstance(generator, torch.Generator):  # DataLoader fails as it iterates
            raise TypeError(f"generator must be a torch.Generator (or None), not {type(generator).__name__}")
        self._shard = _sharding.shard(rank, world_size)
        # a source that shares out its chunks itself (H5Chunks under torch.distributed) is not shared out again
        self._chunk_shard = self._shard
        if self._shard is not None and isinstance(dataset, QueueFlowDataset):
            if _sharding.shared_out_by(dataset.source, self._shard):
                self._chunk_shard = None
        explicit = rank is not None or world_size is not None
        if explicit and isinstance(dataset, IterableDataset) and not isinstance(dataset, QueueFlowDataset):
            raise ValueError(
                "rank= and world_size= share out map-style datasets and a QueueFlowDataset's chunks; an "
                "IterableDataset yields what it yields, so it must split its data by rank itself (as with "
                "DataLoader): drop rank= and world_size= here"
            )
        try:
            num_workers = operator.index(num_workers)  # an int, a numpy int: DataLoader would fail only later
        except TypeError:
            raise TypeError(
                f"num_workers must be an int >= 0, got {type(num_workers).__name__} {num_workers!r}: e.g. num_workers=4"
            ) from None
        sampler, batch_sampler, shuffle = _sharding.samplers(
            dataset, sampler, batch_sampler, shuffle, drop_last, generator, self._shard
        )
        # A real DataLoader checks the arguments and builds the samplers and collate_fn.
        self._torch = TorchLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            batch_sampler=batch_sampler,
            num_workers=num_workers,
            collate_fn=collate_fn,
            pin_memory=pin_memory,
            drop_last=drop_last,
            timeout=timeout,
            worker_init_fn=worker_init_fn,
            multiprocessing_context=multiprocessing_context,
            generator=generator,
            prefetch_factor=prefetch_factor,
            persistent_workers=persistent_workers,
            pin_memory_device=pin_memory_device,
            in_order=in_order,
        )
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.generator = generator
        self.persistent_workers = persistent_workers
        self.progress = _progress.check(progress)
        self.epoch = 0
        self._bar_epoch = 0  # the number the next epoch's progress bar shows (``set_epoch`` sets it)
        self._warned_pin = False
        self._warned_ranks = False
        self._map_style = MapStyleEpochs(self._torch, dataset, persistent_workers, num_workers)
        self._checkpoints = Checkpoints()
        self._initialized = True

    def __setattr__(self, name: str, value: Any) -> None:
        """As DataLoader: what defines the batches cannot change after construction (``ValueError``);
        ``collate_fn``, ``worker_init_fn``, ``timeout``, ``prefetch_factor`` and ``multiprocessing_context``
        can, for the workers started from then on (persistent workers keep what they started with)."""
        if name in _SET_AT_CONSTRUCTION and self.__dict__.get("_initialized"):
            raise ValueError(f"{name} attribute should not be set after {type(self).__name__} is initialized")
        if name in _SETTABLE and "_torch" in self.__dict__:
            setattr(self._torch, name, value)  # DataLoader's own checks
            self._map_style.configure()
            return
        super().__setattr__(name, value)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled or copied as DataLoader is: its arguments and where its epochs stand, no workers."""
        state = self.__dict__.copy()
        state["_map_style"] = copy.copy(self._map_style)  # without workers: each copy starts its own
        return state

    # -- DataLoader's surface ------------------------------------------------------------------

    def __len__(self) -> int:
        """Batches per epoch, as ``len(DataLoader)``. Over a ``QueueFlowDataset``: from its ``length=``
        (outputs per epoch), ``batch_size`` and ``drop_last``; ``TypeError`` without a ``length``."""
        if isinstance(self.dataset, QueueFlowDataset) and self.dataset.length is None:
            raise TypeError(
                "the number of a QueueFlowDataset's outputs is not known ahead: give it one with "
                "QueueFlowDataset(..., length=outputs_per_epoch)"
            )
        return len(self._torch)

    @property
    def sampler(self) -> Any:
        """The sampler, as ``DataLoader.sampler`` (this rank's share under ranks). Over a
        ``QueueFlowDataset``, DataLoader's sampler of an iterable dataset that also takes ``set_epoch``
        for the loader: Lightning passes each epoch's number to the sampler of a loader it trains on."""
        if isinstance(self.dataset, QueueFlowDataset):
            return _EpochTaker(self._torch.sampler, self)
        return self._torch.sampler

    @property
    def batch_sampler(self) -> Any:
        """The batch sampler, as ``DataLoader.batch_sampler`` (``None`` without batching)."""
        return self._torch.batch_sampler

    @property
    def collate_fn(self) -> Any:
        """The collate function, as ``DataLoader.collate_fn``."""
        return self._torch.collate_fn

    drop_last = property(lambda self: self._torch.drop_last, doc="As ``DataLoader.drop_last``.")
    timeout = property(lambda self: self._torch.timeout, doc="As ``DataLoader.timeout``.")
    worker_init_fn = property(lambda self: self._torch.worker_init_fn, doc="As ``DataLoader.worker_init_fn``.")
    prefetch_factor = property(lambda self: self._torch.prefetch_factor, doc="As ``DataLoader.prefetch_factor``.")
    in_order = property(lambda self: self._torch.in_order, doc="As ``DataLoader.in_order``.")
    pin_memory_device = property(lambda self: self._torch.pin_memory_device, doc="As ``DataLoader.pin_memory_device``.")
    multiprocessing_context = property(
        lambda self: self._torch.multiprocessing_context, doc="As ``DataLoader.multiprocessing_context``."
    )

    def check_worker_number_rationality(self) -> None:
        """As ``DataLoader.check_worker_number_rationality``: warns when ``num_workers`` exceeds the CPUs."""
        self._torch.check_worker_number_rationality()

    def set_epoch(self, epoch: int) -> None:
        """Pass ``epoch`` to the sampler, batch sampler and dataset that take it (``set_epoch``), as
        Lightning does: a ``DistributedSampler`` (the one ``rank=`` builds, too) or a ``QueueFlowDataset``
        then draws that epoch's order. A plain ``shuffle=True`` draws from the generator, as DataLoader's.
        ``epoch`` is an int >= 0; anything else raises ``ValueError`` and changes nothing."""
        self.epoch = self._bar_epoch = checked_epoch(epoch)  # before any target takes it
        for target in (self._torch.sampler, self._torch.batch_sampler, self.dataset):
            set_target_epoch = getattr(target, "set_epoch", None)
            if callable(set_target_epoch):
                set_target_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        """The batches of one epoch (the rest of it after ``load_state_dict``), begun now, as DataLoader's
        iterator begins (its draws from the generator, its workers). But for Lightning's check that a
        loader iterates (``_lightning_probe``): that iterator begins its epoch at its first ``next()``."""
        if self.pin_memory and self.pin_memory_device and not self._warned_pin:  # as DataLoader's iterator warns
            warnings.warn(
                "pin_memory_device is deprecated, the current accelerator will be used as the device,"
                f"ignore pin_memory_device='{self.pin_memory_device}'.",
                stacklevel=2,
            )
        if self.pin_memory and not torch.cuda.is_available() and not self._warned_pin:
            self._warned_pin = True
            warnings.warn(
                "'pin_memory' argument is set as true but no accelerator is found, "
                "then device pinned memory won't be used.",
                stacklevel=2,
            )
        if _lightning_probe(sys._getframe(1)):
            if not isinstance(self.dataset, IterableDataset):
                self._map_style.check(self)  # what DataLoader's iterator refuses as it starts
            return _Unbegun(self._begin)
        return self._begin()

    def _begin(self) -> Iterator[Any]:
        """The epoch's batches, begun now."""
        if isinstance(self.dataset, IterableDataset):
            generator_before = self.generator.get_state() if self.generator is not None else None
            stream = self._checkpoints.stream(generator_before)  # before DataLoader's iterator draws
            source = self._iter_pipeline(stream) if isinstance(self.dataset, QueueFlowDataset) else iter(self._torch)
            batches = stream.counted(_device.deliver(source, self.pin_memory, self.device))
        else:
            batches = self._map_style.iterate(self)
        if self.progress:
            batches = _progress.bar(batches, self._length_or_none(), self._bar_epoch)
        self._bar_epoch += 1
        if not isinstance(self.dataset, IterableDataset):  # a batch that raised does not end the epoch
            batches = Batches(batches)
        return batches

    def _length_or_none(self) -> int | None:
        return _length(self)

    def _iter_pipeline(self, stream: Stream) -> Iterator[Any]:
        """The epoch's batches over a ``QueueFlowDataset``: its pipeline's outputs for this rank's chunks,
        exactly ``length`` of them under ranks where it has one (``_sharding.equal_outputs``), batched where
        asked; each batch's origin goes to ``stream`` as it is made (``_checkpoint``), and the epoch restarts
        at ``stream.resume``."""
        passes: list[Any] = []  # the first pass's outputs (``Sequence._resumable``) while they come
        outputs = self._first_pass(stream.resume, passes)
        if self._shard is not None and self._shard.world_size > 1:
            if self.dataset.length is None and not self._warned_ranks:
                self._warned_ranks = True
                warnings.warn(
                    "a QueueFlowDataset shared out over ranks without length=: each rank gets as many chunks, but "
                    "as many batches only if every chunk gives as many outputs, and a rank with fewer leaves the "
                    "others waiting in their collectives; give QueueFlowDataset(..., length=this_ranks_outputs), "
                    "and every rank yields exactly len(loader) batches",
                    stacklevel=_user_stacklevel(),
                )
            given = stream.yielded * (self.batch_size or 1) if stream.resume is not None else 0
            padding = functools.partial(self._padding_pass, passes)
            outputs = _sharding.equal_outputs(outputs, padding, self.dataset.length, given)

        def made() -> None:  # a batch is made: what tells its origin once it is yielded (``Stream``)
            stream.made.append((passes[0], passes[0]._consumed()) if passes else None)

        try:
            if self.batch_size is None:
                for output in outputs:
                    made()
                    yield output
                return
            batch: list[Any] = []
            for item in outputs:
                batch.append(item)
                if len(batch) == self.batch_size:
                    made()
                    yield self._torch.collate_fn(batch)
                    batch = []
            if batch and not self._torch.drop_last:
                made()
                yield self._torch.collate_fn(batch)
        except TimeoutError as exc:
            if not self._torch.timeout:  # the dataset's own timeout
                raise
            raise self._torch.timed_out() from exc

    def _first_pass(self, resume: Resumed | None, passes: list[Any]) -> Iterator[Any]:
        """The epoch's pass over this rank's chunks (begun at the first ``next``), its iterator in ``passes``
        (it tells each output's origin); ``resume``: it restarts there."""
        epoch = self.dataset._resumable_outputs(self._rank_chunks(), self._torch.timeout or None, resume)
        passes.append(epoch)
        yield from epoch

    def _padding_pass(self, passes: list[Any]) -> Iterator[Any]:
        """A pass that repeats a rank's chunks to make up its ``length``: where the epoch stands is not told
        by its outputs' origins (a checkpoint there computes the epoch's start again)."""
        passes.clear()
        yield from self.dataset._outputs(self._rank_chunks(), self._torch.timeout or None)

    def _rank_chunks(self) -> Iterable[Any]:
        """This rank's chunks of the dataset's epoch."""
        dataset: QueueFlowDataset = self.dataset
        chunks = dataset.chunks(dataset.epoch)
        if self._chunk_shard is not None:
            chunks = _sharding.shard_chunks(chunks, *self._chunk_shard, drop_last=self._torch.drop_last)
        return chunks

    # -- Lightning's teardown -------------------------------------------------------------------

    @property
    def _iterator(self) -> None:
        """DataLoader's persistent iterator, which Lightning drops when ``fit()`` ends (``CombinedLoader.reset``
        sets it to ``None`` after shutting its workers down). Here there is none to hand out."""
        return None

    @_iterator.setter
    def _iterator(self, value: None) -> None:
        if value is None:
            self._shutdown_workers()

    def _shutdown_workers(self) -> None:
        """What dropping DataLoader's iterator does: every worker stops (a ``QueueFlowDataset``'s too), and
        the next epoch begins as a new iterator's would: new workers, a new base seed, nothing carried
        over from the last epoch's workers. ``stats()`` keeps the stopped workers' figures until then."""
        self._map_style.shut_down(self)
        if isinstance(self.dataset, QueueFlowDataset):
            self.dataset._stop_workers()

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Where this epoch stands: resuming yields exactly the batches an uninterrupted run still yields."""
        state = self._checkpoints.state_dict(self.epoch, self.generator, self._map_style, self.num_workers)
        state["dataset_length"] = _length(self.dataset)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state_dict()``: the next iteration continues that epoch without refetching its
        start, or begins the next epoch if that one was over."""
        if not isinstance(state, dict) or "epoch" not in state:
            what = type(state).__name__
            if isinstance(state, dict):
                what = f"a dict with the keys {sorted(map(str, state))}"
            raise ValueError(
                f"load_state_dict() takes what this loader's state_dict() returned, got {what}: "
                "it has no 'epoch' (save loader.state_dict() with your checkpoint)"
            )
        _check_dataset(state, self.dataset)
        self.set_epoch(state["epoch"])
        self._checkpoints.load_state_dict(state, self.generator, self._map_style, self.num_workers)

    def stats(self) -> Stats:
        """The ``tq.Stats`` of the pipeline the loader runs (``print`` it, or ``.plot()`` it).

        Over a ``QueueFlowDataset``: that pipeline's. Over a map-style dataset with workers: the
        ``"fetch"`` step's (its workers fetch and collate the batches), for the epoch running now or
        the last one (each epoch has its own workers unless ``persistent_workers``); zeros before the
        first epoch. Without workers (``num_workers=0``), or over another iterable dataset (a plain
        DataLoader runs it), no pipeline runs: a ``Stats`` without steps.
        """
        if isinstance(self.dataset, QueueFlowDataset):
            return self.dataset.stats()
        if isinstance(self.dataset, IterableDataset) or self.num_workers == 0:
            return Stats.from_rows([], None, 0.0)
        return self._map_style.stats(self.num_workers)

    def plot(self, ax: Any = None) -> Any:
        """``stats().plot(ax)``: where the loader's pipeline spends its time, drawn with matplotlib."""
        return self.stats().plot(ax)

    def close(self) -> None:
        """Stop the worker processes (they also stop when the loader is garbage collected), a
        ``QueueFlowDataset``'s workers too: the dataset stays usable, and its next epoch starts new ones."""
        self._map_style.close()
        if isinstance(self.dataset, QueueFlowDataset):
            self.dataset._stop_workers()


class _EpochTaker(Sampler[Any]):
    """DataLoader's sampler of an iterable dataset (endless ``None``), with ``set_epoch`` for the
    loader it belongs to (``QueueFlowLoader.set_epoch``). Made at each ``loader.sampler``, so that the
    loader holds no reference back to itself; a copy (or unpickled one) sets its copy of the loader."""

    def __init__(self, sampler: Sampler[Any], loader: QueueFlowLoader[Any]) -> None:
        self._sampler = sampler
        self._loader = loader

    def __iter__(self) -> Iterator[Any]:
        return iter(self._sampler)

    def set_epoch(self, epoch: int) -> None:
        self._loader.set_epoch(epoch)


_PROBES = frozenset(
    {
        ("lightning.pytorch.trainer.connectors.data_connector", "_check_dataloader_iterable"),
        ("pytorch_lightning.trainer.connectors.data_connector", "_check_dataloader_iterable"),
    }
)
"""Where Lightning calls ``iter()`` on any loader that is not a ``DataLoader``, to check that it iterates,
and drops the iterator (it skips a real DataLoader: "calling iter() would be expensive")."""


def _lightning_probe(caller: types.FrameType) -> bool:
    """Whether ``caller`` (the frame that called ``iter(loader)``) is Lightning's check that it iterates.
    An epoch begun there would draw from the generator and start workers for an iterator nobody reads:
    the fit would then train on other batches than DataLoader's, which Lightning never probes."""
    return (caller.f_globals.get("__name__"), caller.f_code.co_name) in _PROBES


class _Unbegun(Iterator[Any]):
    """A loader's iterator whose epoch begins at its first ``next()`` (``begin()``); one dropped before
    that begins nothing: no draw from the generator, no worker started."""

    def __init__(self, begin: Callable[[], Iterator[Any]]) -> None:
        self._begin: Callable[[], Iterator[Any]] | None = begin
        self._batches: Iterator[Any] | None = None

    def __next__(self) -> Any:
        if self._batches is None:
            if self._begin is None:  # closed before it began, or its beginning raised
                raise StopIteration
            begin, self._begin = self._begin, None
            self._batches = begin()
        return next(self._batches)

    def close(self) -> None:
        """Leave the epoch where it stands (one not begun: never begin it)."""
        self._begin = None
        close = getattr(self._batches, "close", None)
        if close is not None:
            close()


def _length(dataset: Any) -> int | None:
    try:
        return len(dataset)
    except Exception:  # an iterable dataset, a map-style one without a length, a batch sampler whose is undefined
        return None


def _check_dataset(state: dict[str, Any], dataset: Any) -> None:
    """Warn where a checkpoint's epoch, not over yet, was drawn over a dataset of another length: the rest
    of it indexes that one (an ``IndexError`` in a worker later, or other samples). An epoch that was over
    resumes with the next one, drawn from this dataset: no warning."""
    saved, length = state.get("dataset_length"), _length(dataset)
    left = len(state.get("batches") or ()) - int(state.get("yielded") or 0)
    if saved is not None and length is not None and saved != length and left > 0 and not state.get("left"):
        warnings.warn(
            f"this checkpoint was saved over a dataset of {saved} items, and this loader's has {length}: the "
            f"{left} batches left of its epoch index that one. Load it into a loader over the same dataset",
            RuntimeWarning,
            stacklevel=3,
        )
