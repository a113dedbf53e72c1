"""Pure re-chunking generators behind PackStep, UnpackStep and RepackStep.

They know nothing of processes: each takes the elements of one epoch and
yields that epoch's outputs, so a partial batch can never cross an epoch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
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
