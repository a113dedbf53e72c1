"""``TorchLoader``: the real ``DataLoader`` inside a ``QueueFlowLoader``, the one place that reads its
private attributes.

A ``QueueFlowLoader`` builds a real ``DataLoader`` with its arguments, so that invalid combinations
raise DataLoader's own errors and its sampler, batch sampler and collate function are DataLoader's
own. The loader reads that DataLoader's public attributes as they are; the two private ones it needs,
the index sampler (the batch sampler, or the sampler without batching) and whether batches are
collated, are read here alone, under public names: a torch release that renames them changes this
module and nothing else. A subclass (not a wrapper) keeps every public attribute, and DataLoader's
checks on setting them, exactly DataLoader's.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader


class TorchLoader(DataLoader):
    """A ``DataLoader`` that also names what its iterators read privately."""

    @property
    def index_sampler(self) -> Any:
        """What yields each batch's indices: the batch sampler, or the sampler when not batching."""
        return self._index_sampler

    @property
    def auto_collation(self) -> bool:
        """Whether indices come in batches that ``collate_fn`` collates (``batch_size`` or a batch sampler)."""
        return self._auto_collation

    def timed_out(self) -> RuntimeError:
        """DataLoader's error for its ``timeout`` (raised from the pipeline's ``TimeoutError``, which names
        the stuck step)."""
        return RuntimeError(f"DataLoader timed out after {self.timeout} seconds")
