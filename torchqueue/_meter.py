"""A step's row of the pipeline's shared stats array, as the code running the step writes it."""

from __future__ import annotations

from typing import Any

from torchqueue.stats import NFIELDS, Field


class Meter:
    """A step's row of the shared stats array (only one thread of one process writes it), and the
    step's name."""

    def __init__(self, array: Any, row: int, step: str) -> None:
        self._array = array
        self._base = row * NFIELDS
        self.step = step
        self.busy_since = int(self._base + Field.BUSY_SINCE)  # written twice per call: kept at hand
        self.notified = False  # a skip notice was sent for this step

    def add(self, field: Field, value: float) -> None:
        self._array[self._base + field] += value

    def set(self, field: Field, value: float) -> None:
        self._array[self._base + field] = value

    def get(self, field: Field) -> float:
        return self._array[self._base + field]

    def holds_none(self) -> None:
        """The worker passes on a control message (an epoch's end): it holds no element any more."""
        self.set(Field.AT_SEQ, -1)

    def took(self, epoch: int, seq: int) -> None:
        """A message to work on, the element at ``seq`` of ``epoch`` (what a consumer's timeout reports)."""
        self.add(Field.MESSAGES, 1)
        self.set(Field.AT_EPOCH, epoch)
        self.set(Field.AT_SEQ, seq)
