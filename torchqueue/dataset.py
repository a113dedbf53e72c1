"""``QueueFlowDataset``: a staged pipeline as a ``torch.utils.data.IterableDataset``."""

from __future__ import annotations

import collections.abc
import numbers
import warnings
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.context import BaseContext
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from torchqueue._origins import Resumed
from torchqueue.sequence import Sequence

__all__ = ["QueueFlowDataset"]


class QueueFlowDataset(IterableDataset):
    """Iterating it yields the pipeline's outputs for the current epoch.

    Args:
        source: An iterable (the same chunks every epoch), or ``source(epoch) -> iterable``.
        steps: The steps and queues of a ``tq.Sequence``.
        ordered: As for ``Sequence``.
        context: As for ``Sequence``.
        length: The number of outputs per epoch (of this rank's share under ranks), if known:
            ``len(ds)``, and ``len(QueueFlowLoader(ds, ...))`` with the loader's batching, which
            PyTorch Lightning sizes its epochs with. Without it ``len()`` raises ``TypeError``.
            It is not checked against what the pipeline yields.
        timeout: As for ``Sequence``: seconds to wait for the next output (``None``: no limit). A
            ``QueueFlowLoader`` with a ``timeout`` of its own uses that one instead.

    The pipeline's workers start at the first iteration and stay up across epochs until
    ``close()`` or garbage collection. Use it with ``QueueFlowLoader``, or with a plain
    ``DataLoader(ds, batch_size=None, num_workers=0)``: it runs its own worker processes, so
    inside DataLoader worker processes it raises.
    """

    def __init__(
        self,
        source: Iterable[Any] | Callable[[int], Iterable[Any]],
        steps: list[Any] | tuple[Any, ...],
        *,
        ordered: bool = True,
        context: str | BaseContext | None = None,
        length: int | None = None,
        timeout: float | None = None,
    ) -> None:
        # not iter(source): a source with a state of its own (a DataLoader of chunks) is read once per epoch
        if (
            not callable(source)
            and not isinstance(source, collections.abc.Iterable)
            and not hasattr(source, "__getitem__")
        ):
            raise TypeError(f"source must be an iterable or a function epoch -> iterable, got {type(source).__name__}")
        if not isinstance(steps, (list, tuple)):
            raise TypeError(f"steps must be a list of steps and queues, got {type(steps).__name__}")
        self.source = source
        self.length = _checked_length(length)
        self.steps = tuple(steps)
        self.ordered = ordered
        self.context = context
        self.epoch = 0
        self._read_once = False  # a source that is an iterator was read by an epoch
        self.timeout = timeout
        self._sequence = self._new_sequence()
        self._stopped = False  # by ``_stop_workers``: the next epoch starts a new pipeline

    def __len__(self) -> int:
        """The number of outputs per epoch given as ``length=`` (``TypeError`` without it, as ``len()`` of
        an iterable dataset that does not know its length)."""
        if self.length is None:
            raise TypeError(
                "QueueFlowDataset does not know how many outputs an epoch has: pass "
                "QueueFlowDataset(..., length=n) to give it a len()"
            )
        return self.length

    def __bool__(self) -> bool:
        return True  # not ``len() != 0``: a dataset without a length is still a dataset

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch the next iteration reads (passed to a callable ``source``)."""
        self.epoch = checked_epoch(epoch)

    def chunks(self, epoch: int) -> Iterable[Any]:
        """The input of ``epoch``."""
        if callable(self.source):
            return self.source(epoch)
        if isinstance(self.source, collections.abc.Iterator):  # a generator, say: it can be read once
            if self._read_once:
                warnings.warn(
                    "QueueFlowDataset's source is an iterator, which an earlier epoch used up: this epoch is "
                    "empty. Pass a list of chunks, or a function source(epoch) that returns the epoch's chunks",
                    RuntimeWarning,
                    stacklevel=3,
                )
            self._read_once = True
        return self.source

    def __iter__(self) -> Iterator[Any]:
        """The pipeline's outputs for the current epoch (see ``set_epoch``)."""
        return self._outputs(self.chunks(self.epoch))

    def _outputs(self, chunks: Iterable[Any], timeout: float | None = None) -> Iterator[Any]:
        """The pipeline's outputs for ``chunks`` (``QueueFlowLoader`` passes a rank's share of an epoch's,
        and its ``timeout``, if it has one, instead of the dataset's)."""
        return self._sequence_for(timeout)(chunks)

    def _resumable_outputs(
        self, chunks: Iterable[Any], timeout: float | None = None, resume: Resumed | None = None
    ) -> Any:
        """The pipeline's outputs for ``chunks``, an iterator that also tells where the epoch restarts to go
        on after each (``Sequence._resumable``); ``resume``: the epoch restarts there."""
        return self._sequence_for(timeout)._resumable(chunks, resume)

    def _sequence_for(self, timeout: float | None) -> Sequence:
        """The pipeline, ready for an epoch (``timeout``: the loader's, instead of the dataset's)."""
        if get_worker_info() is not None:
            raise RuntimeError(
                "QueueFlowDataset runs its own worker processes and cannot run inside DataLoader workers: "
                "use DataLoader(ds, batch_size=None, num_workers=0), or torchqueue.QueueFlowLoader(ds)"
            )
        if self._stopped:
            self._sequence, self._stopped = self._new_sequence(), False
        self._sequence.timeout = timeout if timeout is not None else self.timeout
        return self._sequence

    def stats(self) -> Any:
        """The pipeline's ``tq.Stats``."""
        return self._sequence.stats()

    def close(self) -> None:
        """Stop the pipeline's workers."""
        self._sequence.close()

    def _stop_workers(self) -> None:
        """Stop the workers but stay usable: the next epoch starts new ones (``stats()`` keeps the stopped
        ones' figures until then). ``QueueFlowLoader`` does this when Lightning shuts its workers down."""
        self._sequence.close()
        self._stopped = True

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_sequence")
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._sequence, self._stopped = self._new_sequence(), False

    def _new_sequence(self) -> Sequence:
        return Sequence(
            *self.steps, ordered=self.ordered, context=self.context, name="QueueFlowDataset", timeout=self.timeout
        )


def _checked_length(length: object) -> int | None:
    """``length=`` as an ``int`` (a numpy integer too), or ``None``; anything else raises."""
    if length is None:
        return None
    if isinstance(length, bool) or not isinstance(length, numbers.Integral):
        raise TypeError(
            f"length must be an int >= 0 (outputs per epoch) or None, got {type(length).__name__} {length!r}"
        )
    if length < 0:
        raise ValueError(f"length must be >= 0 (outputs per epoch), got {length}")
    return int(length)


def checked_epoch(epoch: Any) -> int:
    """``epoch``, if it is an epoch number (an int >= 0); else a ``ValueError``."""
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
    return epoch
