"""A map-style ``QueueFlowLoader``'s epochs, begun, fetched and left as ``iter(DataLoader)`` runs them.

``iter(loader)`` begins an epoch at once, as DataLoader's iterator does: it leaves the last
iterator's epoch where it stands (``_epochs.leave`` moves the sampler's generator where DataLoader's
would be), draws a base seed (each epoch, unless workers persist) and the epoch's index batches, and
hands them to a ``tq.Sequence`` of ``num_workers`` fetch workers (``_fetch``); without workers the
fetches run in the loader's process, and the base seed is drawn at ``iter()`` but the order at the
first batch, as DataLoader's single-process iterator draws them.

    iter(loader) ─► leave the last epoch ─► begin: draw (or resume, or take the guess) ─► jobs
                                                                                        │
    batches ◄─ deliver: count what is yielded, keep workers' states ◄─ outputs ◄─ Sequence("fetch")

Without persistent workers every iterator has its own ``Sequence``, closed with it. With them, one
``Sequence`` runs every epoch, the next epoch is guessed and queued behind this one (``_lookahead``),
and a new iterator ends the previous one's epoch. Under ``"fork"`` the fork server is held between
epochs (``_forkserver.Hold``) until ``close()``.

What the loader's user may set between epochs (``num_workers``, ``generator``, ``pin_memory``,
``device``, and the settable DataLoader attributes on ``TorchLoader``) is read from the loader as
each epoch begins (``Settings``), so the same object drives every epoch however it was configured.
"""

from __future__ import annotations

import logging
import sys
import types
import weakref
from collections.abc import Iterator
from typing import Any, Protocol

import torch

from torchqueue import _device, _epochs, _forkserver
from torchqueue._batchtimeout import Handed, named, outputs_named
from torchqueue._epochs import Epoch
from torchqueue._fetch import Fetch, Fetched, Job
from torchqueue._lookahead import EpochStep, Guess, predictable
from torchqueue._rngstate import merged
from torchqueue._seeding import draw_base_seed
from torchqueue._torchloader import TorchLoader
from torchqueue.sequence import Sequence, uses_fork_server
from torchqueue.stats import Stats
from torchqueue.steps import ProcessStep, Queue

logger = logging.getLogger("torchqueue")


class Settings(Protocol):
    """The loader's attributes an epoch reads as it runs (a ``QueueFlowLoader``'s user may set them)."""

    num_workers: int
    generator: torch.Generator | None
    pin_memory: bool
    device: torch.device | None


class MapStyleEpochs:
    """The epochs of one map-style loader: the last begun, the one a checkpoint left to finish, and
    their workers."""

    def __init__(self, torch_loader: TorchLoader, dataset: Any, persistent_workers: bool, num_workers: int) -> None:
        self._torch = torch_loader
        self._dataset = dataset
        self._persistent = persistent_workers
        self.configure()
        self._restorable = num_workers > 0 and torch_loader.in_order
        self.base_seed: int | None = None
        self.epoch: Epoch | None = None  # the last epoch begun (what state_dict describes)
        self.resume: Epoch | None = None  # an epoch load_state_dict left to finish
        self.unbegun: torch.Tensor | None = None  # the generator before an iterator's draws, until it begins
        self._sequence: Sequence | None = None  # the persistent workers
        self._handed = Handed()  # the jobs handed to them (what a timeout names)
        self._running: weakref.WeakSet[Sequence] = weakref.WeakSet()  # each iterator's own workers (not persistent)
        self._latest: weakref.ref[Sequence] | None = None  # the last of them (``stats``)
        self._latest_stats: Stats | None = None  # its figures when it closed
        self._epochs_sent = 0  # epochs handed to the workers, guesses included (``Job.epoch``)
        self._epoch_step = EpochStep(torch_loader.index_sampler)
        self._ahead: Guess | None = None  # the guessed next epoch, queued behind the current one
        self._fresh = False  # the workers were shut down: the next epoch follows none
        self._server: _forkserver.Hold | None = None  # under "fork": the fork server, kept between epochs

    def configure(self) -> None:
        """What the workers run, from the DataLoader's settings (again when one is set)."""
        self.fetch = Fetch(
            self._dataset,
            self._torch.auto_collation,
            self._torch.collate_fn,
            self._torch.drop_last,
            self._torch.worker_init_fn,
            report=self._torch.in_order,  # worker states are restored only where batch k goes to worker k % n
        )
        self.prefetch = self._torch.prefetch_factor or 0

    def __getstate__(self) -> dict[str, Any]:
        """Where the epochs stand, without workers (a pickled or copied loader starts its own)."""
        state = self.__dict__.copy()
        state.update(_sequence=None, _ahead=None, _running=None, _latest=None, _server=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._running = weakref.WeakSet()

    def check(self, loader: Settings) -> None:
        """Raise what DataLoader's iterator raises as it starts, for these settings."""
        if loader.num_workers > 0 and self.prefetch <= 0:
            raise AssertionError("prefetch_factor must be greater than 0 for MultiProcessingDataLoaderIter")
        if loader.num_workers == 0 and self._torch.timeout != 0:  # as DataLoader's single-process iterator
            raise AssertionError(f"timeout={self._torch.timeout} needs workers: it bounds the wait for one")

    def iterate(self, loader: Settings) -> Iterator[Any]:
        """Begin an epoch now, as ``iter(DataLoader)`` does (its draws, its workers), and iterate it."""
        self.check(loader)
        if self.epoch is not None:
            self._leave(loader, self.epoch)  # a new iterator ends the last one's epoch (DataLoader's _reset)
        if loader.num_workers == 0 and self.resume is None:
            # DataLoader's single-process iterator calls iter() on its sampler now (a sampler that draws its
            # order in __iter__ itself draws then) and draws its base seed, the order at its first batch;
            # a checkpoint taken in between saves the generator as it was before (``state_dict``)
            self.unbegun = loader.generator.get_state() if loader.generator is not None else None
            indices = iter(self._torch.index_sampler)  # as DataLoader's iterator: before its base seed (below)
            return self._begin_lazily(loader, self._next_base_seed(loader), indices)
        epoch, outputs, own = self._begin(loader)
        return self._deliver(loader, epoch, outputs, own)

    def shut_down(self, loader: Settings) -> None:
        """Stop every worker, as dropping DataLoader's iterator does: the next epoch begins as a new
        iterator's would (new workers, a new base seed); ``stats()`` keeps the stopped workers' figures."""
        if self.epoch is not None:
            self._leave(loader, self.epoch)
        if self._sequence is not None:
            self._latest_stats = self._sequence.stats()
        self.close()
        self.base_seed, self._fresh = None, True

    def restore(self, epoch: Epoch | None) -> None:
        """Go on from a checkpoint's ``epoch`` (``None``: it saved none): finish it if it was not over."""
        self.base_seed = epoch.base_seed if epoch is not None else None
        resume = epoch is not None and not epoch.left and epoch.yielded < len(epoch.batches)
        self.resume, self.epoch = (epoch, None) if resume else (None, epoch)

    @property
    def index_sampler(self) -> Any:
        """What yields each batch's indices (see ``TorchLoader.index_sampler``)."""
        return self._torch.index_sampler

    def sampler_generator(self) -> torch.Generator | None:
        """The generator the sampler draws each epoch's order from, if it has one."""
        return _epochs.sampler_generator(self._torch.index_sampler)

    def stats(self, num_workers: int) -> Stats:
        """The ``"fetch"`` step's figures: the epoch's running now or the last one's; zeros before the first."""
        latest = self._latest() if self._latest is not None else None
        pipeline = self._sequence if self._persistent else latest
        if pipeline is not None:
            return pipeline.stats()
        if self._latest_stats is not None:
            return self._latest_stats
        return Stats.from_rows([("fetch", num_workers, False, True)], None, 0.0)

    def drop_workers(self) -> None:
        """Stop the persistent workers (the next epoch starts new ones)."""
        if self._sequence is not None:
            self._sequence.close()
        self._sequence, self._ahead = None, None

    def close(self) -> None:
        """Stop every worker process, and let the fork server go."""
        self.drop_workers()
        for sequence in list(self._running):
            sequence.close()
        if self._server is not None:  # the fork server exits once no pipeline or loader uses it
            self._server.close()
            self._server = None

    def _begin_lazily(self, loader: Settings, base_seed: int, indices: Iterator[Any]) -> Iterator[Any]:
        self.unbegun = None
        epoch, outputs, own = self._begin(loader, base_seed, indices)
        yield from self._deliver(loader, epoch, outputs, own)

    def _deliver(
        self, loader: Settings, epoch: Epoch, outputs: Iterator[Fetched], own: Sequence | None
    ) -> Iterator[Any]:
        """The epoch's batches; ``own``: this iterator's own workers (without persistent workers)."""
        try:
            while True:
                if self._persistent and epoch is not self.epoch:
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
                self._leave(loader, epoch)
            raise
        except BaseException as exc:
            if own is None:
                self.drop_workers()  # a failed pipeline is closed: the next epoch starts a new one
            if isinstance(exc, TimeoutError):
                raise self._torch.timed_out() from exc
            raise
        finally:
            if isinstance(outputs, types.GeneratorType):  # a device thread's (or the fetches in this process)
                outputs.close()
            if own is not None:  # DataLoader stops an iterator's workers with it
                own.close()
                self._latest_stats = own.stats()

    def _leave(self, loader: Settings, epoch: Epoch) -> None:
        """``epoch`` is left where it stands; only the last epoch begun moves the generator."""
        if epoch is self.epoch and not epoch.left:
            _epochs.leave(epoch, self._torch.index_sampler, loader.num_workers, self.prefetch)
            if self._ahead is not None and epoch.left_early:
                self._ahead.drop()

    def _begin(
        self, loader: Settings, base_seed: int | None = None, indices: Iterator[Any] | None = None
    ) -> tuple[Epoch, Iterator[Fetched], Sequence | None]:
        """Begin an epoch (a new one, or the one ``restore`` left to finish) and start fetching;
        ``base_seed``: drawn already (``_next_base_seed``); ``indices``: the sampler's iterator, made already.

        Returns the epoch, its outputs, and the workers of this iterator alone (``None`` with
        persistent workers or none)."""
        previous, ahead, self._ahead = (None if self._fresh else self.epoch), self._ahead, None
        self._fresh = False
        self._epoch_step.started()
        num_workers = loader.num_workers
        if self.resume is not None:
            epoch, guessed, self.resume = self.resume, False, None
            parts = [(epoch.yielded, epoch.batches[epoch.yielded :], True)]
            restore = self._restorable and epoch.positions is None
        else:
            epoch, guessed = self._draw(loader, previous, ahead, base_seed, indices)
            # persistent workers are where DataLoader's are only if they went on into a right guess
            restore = self._restorable and self._persistent and not guessed
            parts = _epochs.catch_up(previous, num_workers, self.prefetch) if restore else []
            epoch.caught_up = list(parts)
            parts.append((0, epoch.batches, True))
        self.epoch = epoch
        seed = epoch.base_seed
        if num_workers == 0:
            fetched = (self.fetch(Job(seed, 0, indices, position=k)) for k, indices in epoch.remaining())
            return epoch, _device.deliver(fetched, loader.pin_memory, loader.device, fetched=True), None
        self._epochs_sent += 1
        if restore:
            jobs = _epochs.restoring_jobs(seed, self._epochs_sent, num_workers, epoch.states, parts)
        else:
            jobs = [Job(seed, self._epochs_sent, indices, position=k) for k, indices in epoch.remaining()]
        if not self._persistent:
            own = self._new_pipeline(num_workers)
            self._latest = weakref.ref(own)
            self._running.add(own)  # weakly: an iterator dropped unstarted takes its workers with it
            handed = Handed()
            outputs = outputs_named(own(handed.record(jobs)), handed)
            return epoch, _device.deliver(outputs, loader.pin_memory, loader.device, fetched=True), own
        outputs = self._persistent_outputs(num_workers, ahead, guessed, jobs)
        return epoch, _device.deliver(outputs, loader.pin_memory, loader.device, fetched=True), None

    def _next_base_seed(self, loader: Settings) -> int:
        """The base seed of the epoch beginning: a new draw, as DataLoader's iterator makes, unless workers persist."""
        if self.base_seed is None or not self._persistent:
            self.base_seed = draw_base_seed(loader.generator)
        return self.base_seed

    def _draw(
        self,
        loader: Settings,
        previous: Epoch | None,
        ahead: Guess | None,
        base_seed: int | None,
        indices: Iterator[Any] | None = None,
    ) -> tuple[Epoch, bool]:
        """A new epoch, drawn from the generator as DataLoader's iterator draws it; and whether it is
        ``ahead``, the guess queued when the last one began. ``base_seed``: drawn already; ``indices``: the
        sampler's iterator, made already."""
        if base_seed is None:
            if loader.num_workers > 0 and (self.base_seed is None or not self._persistent):
                # a new multi-process DataLoader iterator calls iter() on the sampler twice (as it starts,
                # and in its _reset) and drops the first: a sampler that draws its order in __iter__
                # itself, not lazily, draws once more, before the base seed
                iter(self._torch.index_sampler)
            base_seed = self._next_base_seed(loader)
        generator = self.sampler_generator()
        drawn_from = generator.get_state() if generator is not None else None
        follows = previous is None or not previous.left_early  # else DataLoader's workers fetched other batches
        guessed = ahead is not None and follows and ahead.take()
        if ahead is not None and guessed:
            assert ahead.batches is not None  # take() drew it
            batches = ahead.batches
        else:
            batches = _epochs.draw(self._torch.index_sampler, self._dataset, indices)
        epoch = Epoch(base_seed, batches, drawn_from, generator.get_state() if generator is not None else None)
        if loader.num_workers > 0 and not self._torch.in_order:
            epoch.positions = set()  # batches come as they are ready: a checkpoint lists which were yielded
        if self._persistent and previous is not None and previous.base_seed == self.base_seed:
            epoch.states = dict(previous.states)  # the same workers go on
        return epoch, guessed

    def _persistent_outputs(
        self, num_workers: int, ahead: Guess | None, guessed: bool, jobs: list[Job]
    ) -> Iterator[Any]:
        """This epoch's outputs from the persistent workers: the guessed epoch if it was right, else ``jobs``.

        The following epoch is guessed and queued behind this one (see ``_lookahead``), so the
        workers run from this epoch's last batch into the next one's first.
        """
        if self._sequence is None:
            self._sequence, self._handed = self._new_pipeline(num_workers), Handed()
        sequence = self._sequence
        sequence.timeout = self._torch.timeout or None  # as set now (DataLoader's timeout may be set any time)
        try:  # iterating an epoch waits until the one before is over: one left by a break is cancelled
            if ahead is not None:
                epoch = iter(sequence)  # the guessed epoch's outputs, queued behind the previous epoch
            if not guessed:  # iterating the new epoch cancels a wrong guess
                if ahead is not None:
                    logger.debug("the epoch guessed ahead is not the one drawn now: it is cancelled")
                sequence.queue_iterable(self._handed.record(jobs))
                epoch = iter(sequence)
        except TimeoutError as error:  # a batch of the epoch left is stuck: DataLoader's error, as in _deliver
            self.drop_workers()  # a failed pipeline is closed: the next epoch starts a new one
            raise self._torch.timed_out() from named(error, self._handed, None)
        if predictable(self._torch.index_sampler):
            self._epochs_sent += 1
            base_seed, number = self.base_seed, self._epochs_sent
            assert base_seed is not None
            self._ahead = Guess(
                number,
                self._torch.index_sampler,
                self._epoch_step.step,
                lambda position, indices: Job(base_seed, number, indices, position=position),
            )
            sequence.queue_iterable(self._handed.record(self._ahead.jobs()))
        return outputs_named(epoch, self._handed)

    def _new_pipeline(self, num_workers: int) -> Sequence:
        if self._server is None and uses_fork_server(self._torch.multiprocessing_context):
            self._server = _forkserver.Hold(self)  # not restarted for each epoch's workers, until close()
        return Sequence(
            # in order: batch k to worker k % num_workers, each worker in order, as DataLoader does
            ProcessStep(self.fetch, num_workers, name="fetch", round_robin=bool(self._torch.in_order)),
            Queue(self.prefetch * num_workers),
            ordered=bool(self._torch.in_order),  # DataLoader takes any truth value
            context=self._torch.multiprocessing_context,
            name="QueueFlowLoader",
            timeout=self._torch.timeout or None,
            _seed_workers=False,  # seeded by ``Fetch``, as DataLoader seeds (no draw of the pipeline's own)
            _warn_workers=False,  # check_worker_number_rationality warned, as DataLoader's own warning
        )
