"""What a worker forked from the consumer's process inherits of its settings, given to one forked from
the fork server instead (which started from a fresh interpreter).

A DataLoader worker made by ``fork`` computes with the consumer's settings as they were at the fork:
``torch.set_default_dtype(torch.float64)`` (common in physics) makes its ``torch.randn`` float64,
``torch.use_deterministic_algorithms(True)`` holds in it, and the warnings the script filtered stay
filtered. A fork server's worker had none of them: it made float32 tensors where DataLoader's made
float64, silently. So under ``"fork"`` the settings below are captured in the consumer as each worker
starts and set in that worker before its step is loaded. What no setting call restores is not carried:
module globals the script changed at run time, and the seed of ``hash()`` (so the order of a set of
strings), which a fork shares and a fresh interpreter draws anew (``PYTHONHASHSEED`` fixes it for both).
Under ``"spawn"`` and ``"forkserver"`` nothing is carried, as DataLoader's workers get nothing there.
"""

from __future__ import annotations

import pickle
import warnings
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Settings:
    """The consumer's settings that a forked worker would have had."""

    default_dtype: torch.dtype
    deterministic: bool
    deterministic_warn_only: bool
    matmul_precision: str
    warning_filters: tuple[Any, ...]  # ``warnings.filters``, in order, but for categories a worker cannot import

    def apply(self) -> None:
        """Set them in this (worker) process: only those that differ from its own. Setting deterministic
        algorithms imports ``torch._dynamo``, a second in each worker and again in the fork server, to
        which the worker reports its imports (``_preload``): delayed first outputs and ``close()``."""
        if torch.get_default_dtype() != self.default_dtype:
            torch.set_default_dtype(self.default_dtype)
        deterministic = torch.are_deterministic_algorithms_enabled()
        warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        if (deterministic, warn_only) != (self.deterministic, self.deterministic_warn_only):
            torch.use_deterministic_algorithms(self.deterministic, warn_only=self.deterministic_warn_only)
        if torch.get_float32_matmul_precision() != self.matmul_precision:
            torch.set_float32_matmul_precision(self.matmul_precision)
        warnings.filters[:] = self.warning_filters  # as they are: regexes, or strings matched exactly
        mutated = getattr(warnings, "_filters_mutated", None)  # what filterwarnings calls: caches of earlier
        if mutated is not None:  # warnings (``__warningregistry__``) are looked at again
            mutated()


def capture() -> Settings:
    """The settings of this (consumer's) process now."""
    return Settings(
        torch.get_default_dtype(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.get_float32_matmul_precision(),
        tuple(entry for entry in warnings.filters if _importable(entry[2])),
    )


def _importable(category: type) -> bool:
    """Whether a worker finds ``category`` by its name (not one of ``__main__``, which it does not import)."""
    if category.__module__ == "__main__":
        return False
    try:
        pickle.dumps(category)
    except Exception:  # defined in a function, say
        return False
    return True
