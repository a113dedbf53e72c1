"""Pure re-chunking generators behind PackStep, UnpackStep and RepackStep.

They know nothing of processes: each takes the elements of one epoch and
yields that epoch's outputs, so a partial batch can never cross an epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from itertools import islice
from typing import Any, TypeVar

import numpy as np
import torch

T = TypeVar("T")


def pack(elements: Iterable[T], n: int) -> Iterator[list[T]]:
    """Lists of ``n`` consecutive elements; the last may be shorter."""
    it = iter(elements)
    while batch := list(islice(it, n)):
        yield batch


def unpack(elements: Iterable[Iterable[T]]) -> Iterator[T]:
    """Every item of every element, in order."""
    for element in elements:
        yield from element


def is_array(element: Any) -> bool:
    """Whether ``element`` is a bare tensor or numpy array, which ``RepackStep`` refuses.

    Iterating one yields its slices (rows, channels, scalars), so repacking it would batch
    parts of different elements together, one tiny item at a time; ``PackStep`` batches
    whole elements."""
    return isinstance(element, (torch.Tensor, np.ndarray))


def is_single_item(element: Any) -> bool:
    """Whether ``repack`` takes ``element`` as one item rather than iterating it.

    Strings, bytes, mappings, torch_geometric ``Data`` objects and anything not
    iterable are single items; lists, tuples and other iterables contribute their
    items (``RepackStep`` refuses bare tensors and arrays before they get here, see
    ``is_array``).
    """
    if isinstance(element, (str, bytes, bytearray, Mapping)):
        return True
    if type(element).__module__.startswith("torch_geometric."):
        return True
    try:
        iter(element)
    except TypeError:
        return True
    return False


def repack(elements: Iterable[Any], batch_size: int, drop_last: bool = False) -> Iterator[list[Any]]:
    """Lists of exactly ``batch_size`` items across element boundaries, in order.

    Each element contributes its items (a single-item element, see
    ``is_single_item``, contributes itself). The remainder comes last as a
    shorter list unless ``drop_last``.
    """
    batch: list[Any] = []
    for element in elements:
        for item in [element] if is_single_item(element) else element:
            batch.append(item)
            if len(batch) == batch_size:
                yield batch
                batch = []
    if batch and not drop_last:
        yield batch


# -- with the cursor each output leaves: what a checkpoint resumes from (``_origins``) ------------------

Positioned = Iterable[tuple[int, Any]]
"""An epoch's elements with their input positions."""

Cursor = tuple[int, "int | None"]
"""Where an output leaves its step's input: ``(position, None)``, after the whole element at
``position``; ``(position, k)``, after its first ``k`` items."""


def pack_tracked(elements: Positioned, n: int) -> Iterator[tuple[list[Any], Cursor]]:
    """``pack``, each list with its cursor."""
    batch: list[Any] = []
    position = -1
    for position, element in elements:
        batch.append(element)
        if len(batch) == n:
            yield batch, (position, None)
            batch = []
    if batch:
        yield batch, (position, None)


def length(items: Any) -> int | None:
    """``len(items)``, or ``None`` where it has none (a generator) or it raises."""
    if not isinstance(items, Sized):
        return None
    try:
        return len(items)
    except Exception:
        return None


def items_with_cursors(position: int, items: Iterable[Any], skip: int) -> Iterator[tuple[Any, Cursor]]:
    """The items of the element at ``position``, each with the cursor after it (the first ``skip`` left out)."""
    size = length(items)
    used = 0
    for item in items:
        used += 1
        if used > skip:
            yield item, (position, None if used == size else used)


def _no_skip() -> int:
    return 0


def unpack_tracked(elements: Positioned, skip: Callable[[], int] = _no_skip) -> Iterator[tuple[Any, Cursor]]:
    """``unpack``, each item with its cursor; ``skip()``: items of the element at position 0 left out (asked
    once that element is there: a resumed epoch's first element says it)."""
    for position, element in elements:
        yield from items_with_cursors(position, element, skip() if position == 0 else 0)


def repack_tracked(
    elements: Positioned, batch_size: int, drop_last: bool = False, skip: Callable[[], int] = _no_skip
) -> Iterator[tuple[list[Any], Cursor]]:
    """``repack``, each list with its cursor; ``skip()``: as for ``unpack_tracked``."""
    batch: list[Any] = []
    cursor: Cursor = (-1, None)
    for position, element in elements:
        items = [element] if is_single_item(element) else element
        size = length(items)
        iterator = iter(items)
        used = sum(1 for _ in islice(iterator, skip())) if position == 0 else 0
        while taken := list(islice(iterator, batch_size - len(batch))):  # a list's worth at a time
            batch += taken
            used += len(taken)
            if len(batch) == batch_size:
                yield batch, (position, None if used == size else used)
                batch = []
        cursor = (position, None)
    if batch and not drop_last:
        yield batch, cursor
