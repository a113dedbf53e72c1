"""The one vocabulary of what travels between processes.

Data moves in an envelope, a plain tuple ``(epoch, seq, part, nparts, payload, origin)``:

- ``epoch``: the number of the queued iterable (0, 1, ...) the element belongs to;
- ``seq``: its position in that epoch, counted where positions are assigned
  (the feeder, or a stream step that re-chunks);
- ``part`` / ``nparts``: a PoolStep hands an element out as ``nparts`` groups of
  items; everything else travels whole as part 0 of 1;
- ``payload``: the user's value, or one of the control messages below;
- ``origin``: where the epoch's input would restart to go on after this element (``_origins``);
  ``None`` for the feeder's elements, whose positions say it.

Control messages are frozen dataclasses. They crossed a process boundary as
pickles, so compare them with ``isinstance``, never ``is``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple


class Envelope(NamedTuple):
    epoch: int
    seq: int
    part: int
    nparts: int
    payload: Any
    origin: Any = None

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickled as ``_envelope(epoch, seq, part, nparts, bundled, origin, payload)``: the position comes
        first, so that it can be read from the pickle even when the payload fails to rebuild
        (``_unreadable``); ``bundled``: the number of elements of a ``Bundle`` payload, else 0."""
        payload = self.payload
        bundled = len(payload.items) if type(payload) is Bundle else 0
        return _envelope, (self.epoch, self.seq, self.part, self.nparts, bundled, self.origin, payload)


def _envelope(epoch: int, seq: int, part: int, nparts: int, bundled: int, origin: Any, payload: Any) -> Envelope:
    return Envelope(epoch, seq, part, nparts, payload, origin)


@dataclass(frozen=True)
class EndOfEpoch:
    """Takes the last position of an epoch: ``count`` positions came before it."""

    count: int


@dataclass(frozen=True)
class Bundle:
    """Consecutive elements at positions ``seq``, ``seq + 1``, ... sent as one message.

    It holds one credit per element, as single elements do (see ``_bundle``).
    """

    items: list[Any]


@dataclass(frozen=True)
class Skipped:
    """Holds the position of an element that was dropped (``on_error="skip"`` or a cancelled epoch)."""

    step: str


@dataclass(frozen=True)
class Failure:
    """An exception raised by a step function, carried in order to the consumer.

    ``pickled`` is the pickled exception when it pickles, else ``None``. ``where`` says where it
    was raised, for the message (``"step 'f' (worker pid 12) at element 13 of epoch 0"``);
    ``in_consumer``: raised in the consumer's own process (by the input iterable, a thread step, or the
    feeder sending an element).
    """

    step: str
    exc_type: str
    message: str
    traceback: str
    pid: int
    pickled: bytes | None
    where: str = ""
    in_consumer: bool = False


# Side-channel notices (worker -> consumer), outside the data stream.


@dataclass(frozen=True)
class SkipNotice:
    """First element a worker dropped under ``on_error="skip"``; the consumer warns once per step."""

    step: str
    summary: str


@dataclass(frozen=True)
class StartupFailure:
    """A worker could not start (its step did not unpickle, an import failed, ...)."""

    step: str
    worker: int
    traceback: str


@dataclass(frozen=True)
class WorkerFailure:
    """A worker's loop raised outside the step's function (torchqueue's own code, or the system under it),
    just before the worker exits: its traceback, which the consumer's ``WorkerDiedError`` shows."""

    step: str
    worker: int
    traceback: str


CONTROL = (EndOfEpoch, Failure, Skipped)
"""Payloads every stage passes on untouched (a ``Bundle`` is not one: its items are work)."""
