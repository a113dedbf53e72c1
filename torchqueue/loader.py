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

import logging
import sys
import types
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import torch
from torch.utils.data import DataLoader, IterableDataset

from torchqueue import _device, _epochs, _forkserver, _progress, _sharding
from torchqueue._epochs import Epoch
from torchqueue._fetch import Batches, Fetch, Fetched, Job
from torchqueue._lookahead import EpochStep, Guess, predictable
from torchqueue._rngstate import merged
from torchqueue._seeding import draw_base_seed
from torchqueue.dataset import QueueFlowDataset
from torchqueue.sequence import Sequence, uses_fork_server
from torchqueue.stats import Stats
from torchqueue.steps import ProcessStep, Queue

__all__ = ["QueueFlowLoader"]

logger = logging.getLogger("torchqueue")

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
        explicit = rank is not None or world_size is not None
        if explicit and isinstance(dataset, IterableDataset) and not isinstance(dataset, QueueFlowDataset):
            raise ValueError(
                "rank= and world_size= share out map-style datasets and a QueueFlowDataset's chunks; an "
                "IterableDataset yields what it yields, so it must split its data by rank itself (as with "
                "DataLoader): drop rank= and world_size= here"
            )
        sampler, batch_sampler, shuffle = _sharding.samplers(
            dataset, sampler, batch_sampler, shuffle, drop_last, generator, self._shard
        )
        # A real DataLoader checks the arguments and builds the samplers and collate_fn.
        self._torch = DataLoader(
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
        self._configure()
        self._restorable = num_workers > 0 and in_order
        self._base_seed: int | None = None
        self._epoch: Epoch | None = None  # the last epoch begun (what state_dict describes)
        self._resume: Epoch | None = None  # an epoch load_state_dict left to finish
        self._sequence: Sequence | None = None  # the persistent workers
        self._running: weakref.WeakSet[Sequence] = weakref.WeakSet()  # each iterator's own workers (not persistent)
        self._latest: weakref.ref[Sequence] | None = None  # the last of them (``stats``)
        self._latest_stats: Stats | None = None  # its figures when it closed
        self._epochs_sent = 0  # epochs handed to the workers, guesses included (``Job.epoch``)
        self._epoch_step = EpochStep(self._torch._index_sampler)
        self._ahead: Guess | None = None  # the guessed next epoch, queued behind the current one
        self._stream: _Stream | None = None  # an iterable dataset's epoch: batches yielded so far
        self._unbegun: torch.Tensor | None = None  # the generator before an iterator's draws, until it begins
        self._skip = 0  # an iterable dataset's batches to compute again and drop (``load_state_dict``)
        self._fresh = False  # the workers were shut down (``_iterator = None``): the next epoch follows none
        self._server: _forkserver.Hold | None = None  # under "fork": the fork server, kept between epochs
        self._initialized = True

    def _configure(self) -> None:
        """What the workers run, from the wrapped DataLoader's settings (again when one is set)."""
        self._fetch = Fetch(
            self.dataset,
            self._torch._auto_collation,
            self._torch.collate_fn,
            self._torch.drop_last,
            self._torch.worker_init_fn,
            report=self._torch.in_order,  # worker states are restored only where batch k goes to worker k % n
        )
        self._prefetch = self._torch.prefetch_factor or 0

    def __setattr__(self, name: str, value: Any) -> None:
        """As DataLoader: what defines the batches cannot change after construction (``ValueError``);
        ``collate_fn``, ``worker_init_fn``, ``timeout``, ``prefetch_factor`` and ``multiprocessing_context``
        can, for the workers started from then on (persistent workers keep what they started with)."""
        if name in _SET_AT_CONSTRUCTION and self.__dict__.get("_initialized"):
            raise ValueError(f"{name} attribute should not be set after {type(self).__name__} is initialized")
        if name in _SETTABLE and "_torch" in self.__dict__:
            setattr(self._torch, name, value)  # DataLoader's own checks
            self._configure()
            return
        super().__setattr__(name, value)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled or copied as DataLoader is: its arguments and where its epochs stand, no workers."""
        state = self.__dict__.copy()
        state.update(_sequence=None, _ahead=None, _running=None, _latest=None, _server=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._running = weakref.WeakSet()

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
        """The sampler, as ``DataLoader.sampler`` (this rank's share under ranks)."""
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
        then draws that epoch's order. A plain ``shuffle=True`` draws from the generator, as DataLoader's."""
        self.epoch = self._bar_epoch = epoch
        for target in (self._torch.sampler, self._torch.batch_sampler, self.dataset):
            set_target_epoch = getattr(target, "set_epoch", None)
            if callable(set_target_epoch):
                set_target_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        """The batches of one epoch (the rest of it after ``load_state_dict``)."""
        if self.pin_memory and not torch.cuda.is_available() and not self._warned_pin:
            self._warned_pin = True
            warnings.warn(
                "'pin_memory' argument is set as true but no accelerator is found, "
                "then device pinned memory won't be used.",
                stacklevel=2,
            )
        if isinstance(self.dataset, IterableDataset):
            stream = self._stream = _Stream(self._generator_state())  # before DataLoader's iterator draws
            skip, self._skip = self._skip, 0
            source = self._iter_pipeline() if isinstance(self.dataset, QueueFlowDataset) else iter(self._torch)
            batches = self._counted(self._on_device(source), stream, skip)
        else:
            if self.num_workers > 0 and self._prefetch <= 0:  # DataLoader's iterator raises this when it starts
                raise AssertionError("prefetch_factor must be greater than 0 for MultiProcessingDataLoaderIter")
            if self.num_workers == 0 and self._torch.timeout != 0:  # as DataLoader's single-process iterator
                raise AssertionError(f"timeout={self._torch.timeout} needs workers: it bounds the wait for one")
            batches = self._iter_map_style()
        if self.progress:
            batches = _progress.bar(batches, self._length_or_none(), self._bar_epoch)
        self._bar_epoch += 1
        if not isinstance(self.dataset, IterableDataset):  # a batch that raised does not end the epoch
            batches = Batches(batches)
        return batches

    def _on_device(self, batches: Iterator[Any], fetched: bool = False) -> Iterator[Any]:
        """``batches`` pinned and moved to ``device`` (``_device``); ``fetched``: they are ``Fetched``
        outputs, whose batch is moved and which the consumer makes ready (``_device.ready``)."""
        pin = self.pin_memory and torch.cuda.is_available()
        if pin or (self.device is not None and self.device.type == "cuda"):
            work = _device.prepare(pin, self.device)
            if fetched:
                return _device.in_background(batches, lambda out: (work(out[0]), *out[1:]) if out[3] else out)
            return _device.in_background(batches, work)
        if self.device is None:
            return batches
        device = self.device
        if fetched:
            return ((_device.move(out[0], device), *out[1:]) for out in batches)
        return (_device.move(batch, device) for batch in batches)

    def _generator_state(self) -> torch.Tensor | None:
        return self.generator.get_state() if self.generator is not None else None

    def _counted(self, batches: Iterator[Any], stream: _Stream, skip: int) -> Iterator[Any]:
        """An iterable dataset's batches, counted in ``stream`` for ``state_dict``. Such a dataset has no
        index to resume from, so after ``load_state_dict`` the epoch is run again from the generator's
        state before it began (its workers get the same seeds) and the ``skip`` batches the checkpoint had
        yielded are dropped (as torchdata's ``StatefulDataLoader`` does for datasets without a state)."""
        for batch in batches:
            stream.yielded += 1
            if stream.yielded > skip:
                yield batch
        stream.over = True

    def _length_or_none(self) -> int | None:
        try:
            return len(self)
        except TypeError:
            return None

    def _iter_pipeline(self) -> Iterator[Any]:
        dataset: QueueFlowDataset = self.dataset
        chunks = dataset.chunks(dataset.epoch)
        if self._shard is not None:
            chunks = _sharding.shard_chunks(chunks, *self._shard, drop_last=self._torch.drop_last)
        outputs = dataset._outputs(chunks, self._torch.timeout or None)
        try:
            if self.batch_size is None:
                yield from outputs
                return
            batch: list[Any] = []
            for item in outputs:
                batch.append(item)
                if len(batch) == self.batch_size:
                    yield self._torch.collate_fn(batch)
                    batch = []
            if batch and not self._torch.drop_last:
                yield self._torch.collate_fn(batch)
        except TimeoutError as exc:
            if not self._torch.timeout:  # the dataset's own timeout
                raise
            raise self._timed_out() from exc

    # -- map-style epochs ----------------------------------------------------------------------

    def _iter_map_style(self) -> Iterator[Any]:
        """Begin an epoch now, as ``iter(DataLoader)`` does (its draws, its workers), and iterate it."""
        if self._epoch is not None:
            self._leave(self._epoch)  # a new iterator ends the last one's epoch (DataLoader's _reset)
        if self.num_workers == 0 and self._resume is None:
            # DataLoader's single-process iterator draws its base seed now, the order at its first batch;
            # a checkpoint taken in between saves the generator as it was before (``state_dict``)
            self._unbegun = self._generator_state()
            return self._begin_lazily(self._next_base_seed())
        epoch, outputs, own = self._begin()
        return self._deliver(epoch, outputs, own)

    def _begin_lazily(self, base_seed: int) -> Iterator[Any]:
        self._unbegun = None
        epoch, outputs, own = self._begin(base_seed)
        yield from self._deliver(epoch, outputs, own)

    def _deliver(self, epoch: Epoch, outputs: Iterator[Fetched], own: Sequence | None) -> Iterator[Any]:
        """The epoch's batches; ``own``: this iterator's own workers (without persistent workers)."""
        try:
            while True:
                if self.persistent_workers and epoch is not self._epoch:
                    return  # a later iter() reset the workers: DataLoader's (one) persistent iterator moved on
                try:
                    batch, worker, state, kept, position = next(outputs)
                except StopIteration:
                    break
                if state is not None:
                    epoch.states[worker] = merged(epoch.states.get(worker), state)
                if kept:
                    batch = _device.ready(batch)
                    epoch.yielded += 1
                    if epoch.positions is not None:
                        epoch.positions.add(position)
                    yield batch
            epoch.left = True
        except GeneratorExit:  # left before its end (break; Lightning stops at len(loader) batches)
            if not sys.is_finalizing():  # at exit nothing draws again (and copying a sampler may fail)
                self._leave(epoch)
            raise
        except BaseException as exc:
            if own is None:
                self._drop_workers()  # a failed pipeline is closed: the next epoch starts a new one
            if isinstance(exc, TimeoutError):
                raise self._timed_out() from exc
            raise
        finally:
            if isinstance(outputs, types.GeneratorType):  # a device thread's (or the fetches in this process)
                outputs.close()
            if own is not None:  # DataLoader stops an iterator's workers with it
                own.close()
                self._latest_stats = own.stats()

    def _timed_out(self) -> RuntimeError:
        """DataLoader's error for its ``timeout`` (the pipeline's ``TimeoutError``, which names the stuck
        step, is its cause)."""
        return RuntimeError(f"DataLoader timed out after {self._torch.timeout} seconds")

    def _leave(self, epoch: Epoch) -> None:
        """``epoch`` is left where it stands; only the last epoch begun moves the generator."""
        if epoch is self._epoch and not epoch.left:
            _epochs.leave(epoch, self._torch._index_sampler, self.num_workers, self._prefetch)
            if self._ahead is not None and epoch.left_early:
                self._ahead.drop()

    def _begin(self, base_seed: int | None = None) -> tuple[Epoch, Iterator[Fetched], Sequence | None]:
        """Begin an epoch (a new one, or the one ``load_state_dict`` left to finish) and start fetching;
        ``base_seed``: drawn already (``_next_base_seed``).

        Returns the epoch, its outputs, and the workers of this iterator alone (``None`` with
        persistent workers or none)."""
        previous, ahead, self._ahead = (None if self._fresh else self._epoch), self._ahead, None
        self._fresh = False
        self._epoch_step.started()
        if self._resume is not None:
            epoch, guessed, self._resume = self._resume, False, None
            parts = [(epoch.yielded, epoch.batches[epoch.yielded :], True)]
            restore = self._restorable and epoch.positions is None
        else:
            epoch, guessed = self._draw(previous, ahead, base_seed)
            # persistent workers are where DataLoader's are only if they went on into a right guess
            restore = self._restorable and self.persistent_workers and not guessed
            parts = [_epochs.catch_up(previous, self.num_workers, self._prefetch)] if restore else []
            parts.append((0, epoch.batches, True))
        self._epoch = epoch
        seed = epoch.base_seed
        if self.num_workers == 0:
            fetched = (self._fetch(Job(seed, 0, indices, position=k)) for k, indices in epoch.remaining())
            return epoch, self._on_device(fetched, fetched=True), None
        self._epochs_sent += 1
        if restore:
            jobs = _epochs.restoring_jobs(seed, self._epochs_sent, self.num_workers, epoch.states, parts)
        else:
            jobs = [Job(seed, self._epochs_sent, indices, position=k) for k, indices in epoch.remaining()]
        if not self.persistent_workers:
            own = self._new_pipeline()
            self._latest = weakref.ref(own)
            self._running.add(own)  # weakly: an iterator dropped unstarted takes its workers with it
            return epoch, self._on_device(own(jobs), fetched=True), own
        return epoch, self._on_device(self._persistent_outputs(ahead, guessed, jobs), fetched=True), None

    def _next_base_seed(self) -> int:
        """The base seed of the epoch beginning: a new draw, as DataLoader's iterator makes, unless workers persist."""
        if self._base_seed is None or not self.persistent_workers:
            self._base_seed = draw_base_seed(self.generator)
        return self._base_seed

    def _draw(self, previous: Epoch | None, ahead: Guess | None, base_seed: int | None) -> tuple[Epoch, bool]:
        """A new epoch, drawn from the generator as DataLoader's iterator draws it; and whether it is
        ``ahead``, the guess queued when the last one began. ``base_seed``: drawn already."""
        if base_seed is None:
            base_seed = self._next_base_seed()
        generator = _epochs.sampler_generator(self._torch._index_sampler)
        drawn_from = generator.get_state() if generator is not None else None
        follows = previous is None or not previous.left_early  # else DataLoader's workers fetched other batches
        guessed = ahead is not None and follows and ahead.take()
        if ahead is not None and guessed:
            assert ahead.batches is not None  # take() drew it
            batches = ahead.batches
        else:
            batches = _epochs.draw(self._torch._index_sampler, self.dataset)
        epoch = Epoch(base_seed, batches, drawn_from, generator.get_state() if generator is not None else None)
        if self.num_workers > 0 and not self._torch.in_order:
            epoch.positions = set()  # batches come as they are ready: a checkpoint lists which were yielded
        if self.persistent_workers and previous is not None and previous.base_seed == self._base_seed:
            epoch.states = dict(previous.states)  # the same workers go on
        return epoch, guessed

    def _persistent_outputs(self, ahead: Guess | None, guessed: bool, jobs: list[Job]) -> Iterator[Any]:
        """This epoch's outputs from the persistent workers: the guessed epoch if it was right, else ``jobs``.

        The following epoch is guessed and queued behind this one (see ``_lookahead``), so the
        workers run from this epoch's last batch into the next one's first.
        """
        if self._sequence is None:
            self._sequence = self._new_pipeline()
        sequence = self._sequence
        sequence.timeout = self._torch.timeout or None  # as set now (DataLoader's timeout may be set any time)
        if ahead is not None:
            epoch = iter(sequence)  # the guessed epoch's outputs, queued behind the previous epoch
        if not guessed:  # iterating the new epoch cancels a wrong guess
            if ahead is not None:
                logger.debug("the epoch guessed ahead is not the one drawn now: it is cancelled")
            sequence.queue_iterable(jobs)
            epoch = iter(sequence)
        if predictable(self._torch._index_sampler):
            self._epochs_sent += 1
            base_seed, number = self._base_seed, self._epochs_sent
            assert base_seed is not None
            self._ahead = Guess(
                number,
                self._torch._index_sampler,
                self._epoch_step.step,
                lambda position, indices: Job(base_seed, number, indices, position=position),
            )
            sequence.queue_iterable(self._ahead.jobs())
        return epoch

    def _new_pipeline(self) -> Sequence:
        if self._server is None and uses_fork_server(self._torch.multiprocessing_context):
            self._server = _forkserver.Hold(self)  # not restarted for each epoch's workers, until close()
        return Sequence(
            # in order: batch k to worker k % num_workers, each worker in order, as DataLoader does
            ProcessStep(self._fetch, self.num_workers, name="fetch", round_robin=self._torch.in_order),
            Queue(self._prefetch * self.num_workers),
            ordered=self._torch.in_order,
            context=self._torch.multiprocessing_context,
            name="QueueFlowLoader",
            timeout=self._torch.timeout or None,
            _seed_workers=False,  # seeded by ``Fetch``, as DataLoader seeds (no draw of the pipeline's own)
        )

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
        if self._epoch is not None:
            self._leave(self._epoch)
        if self._sequence is not None:
            self._latest_stats = self._sequence.stats()
        self.close()
        if isinstance(self.dataset, QueueFlowDataset):
            self.dataset._stop_workers()
        self._base_seed, self._fresh = None, True

    def _drop_workers(self) -> None:
        """Stop the persistent workers (the next epoch starts new ones)."""
        if self._sequence is not None:
            self._sequence.close()
        self._sequence, self._ahead = None, None

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Where this epoch stands: resuming yields exactly the batches an uninterrupted run still yields."""
        state: dict[str, Any] = {"epoch": self.epoch, "base_seed": None, "batches": [], "yielded": 0}
        epoch = self._resume or self._epoch
        if epoch is not None:
            state.update(_epochs.checkpoint(epoch, self.num_workers))
        state["generator"] = self._generator_state()
        if self._stream is not None:  # an iterable dataset: how far its epoch went (0 once it ran out)
            state["stream_yielded"] = 0 if self._stream.over else self._stream.yielded
            if not self._stream.over:  # resumed, the epoch runs again from its start
                state["generator"] = self._stream.generator_before
        if self._unbegun is not None:  # iter() drew a base seed, the epoch has not begun: as if not called
            state["generator"] = self._unbegun
        sampler_generator = _epochs.sampler_generator(self._torch._index_sampler)
        if sampler_generator is not None and sampler_generator is not self.generator:
            state["sampler_generator"] = sampler_generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state_dict()``: the next iteration continues that epoch without refetching its
        start, or begins the next epoch if that one was over."""
        self.set_epoch(state["epoch"])
        self._drop_workers()  # the workers' random states are the checkpoint's
        if state.get("generator") is not None and self.generator is not None:
            self.generator.set_state(state["generator"])
        sampler_generator = _epochs.sampler_generator(self._torch._index_sampler)
        if state.get("sampler_generator") is not None and sampler_generator is not None:
            sampler_generator.set_state(state["sampler_generator"])
        self._skip, self._stream, self._unbegun = state.get("stream_yielded", 0), None, None
        epoch = _epochs.restored(state, self.num_workers)
        self._base_seed = epoch.base_seed if epoch is not None else None
        resume = epoch is not None and not epoch.left and epoch.yielded < len(epoch.batches)
        self._resume, self._epoch = (epoch, None) if resume else (None, epoch)

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
        latest = self._latest() if self._latest is not None else None
        pipeline = self._sequence if self.persistent_workers else latest
        if pipeline is not None:
            return pipeline.stats()
        if self._latest_stats is not None:
            return self._latest_stats
        return Stats.from_rows([("fetch", self.num_workers, False, True)], None, 0.0)

    def plot(self, ax: Any = None) -> Any:
        """``stats().plot(ax)``: where the loader's pipeline spends its time, drawn with matplotlib."""
        return self.stats().plot(ax)

    def close(self) -> None:
        """Stop the worker processes (they also stop when the loader is garbage collected)."""
        self._drop_workers()
        for sequence in list(self._running):
            sequence.close()
        if self._server is not None:  # the fork server exits once no pipeline or loader uses it
            self._server.close()
            self._server = None


class _Stream:
    """An iterable dataset's epoch, as far as it went."""

    def __init__(self, generator_before: torch.Tensor | None) -> None:
        self.generator_before = generator_before  # the loader's generator before the epoch's draws
        self.yielded = 0
        self.over = False  # it ran out
