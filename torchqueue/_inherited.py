"""What a worker forked from the consumer's process inherits of its settings, given to one forked from
the fork server instead (which started from a fresh interpreter).

A DataLoader worker made by ``fork`` computes with the consumer's settings as they were at the fork:
``torch.set_default_dtype(torch.float64)`` (common in physics) makes its ``torch.randn`` float64,
``torch.use_deterministic_algorithms(True)`` holds in it, and the warnings the script filtered stay
filtered. A fork server's worker had none of them: it made float32 tensors where DataLoader's made
float64, silently. So under ``"fork"`` the settings below are captured in the consumer as each worker
starts and set in that worker: torch's before its step is loaded, the warnings filters after (a forked
worker imports nothing, so it never sees a warning of the step's imports; under the filters, an
``"error"`` filter would fail the worker's start). What no setting call restores is not carried: module
globals the script changed at run time, and the seed of ``hash()`` (so the order of a set of strings),
which a fork shares and a fresh interpreter draws anew (``PYTHONHASHSEED`` fixes it for both).
Under ``"spawn"`` and ``"forkserver"`` nothing is carried, as DataLoader's workers get nothing there.

A worker sets only what differs from its own, the legacy API before the new one: torch refuses to read
a precision set through both (``torch.get_float32_matmul_precision()`` raises once the new
``fp32_precision`` attributes were set), so the new attributes are set only where the legacy calls
left them otherwise. Deterministic algorithms are set by torch's own switch, not by
``torch.use_deterministic_algorithms``, which imports ``torch._inductor`` (a second per worker, and
again in the fork server, which imports what its workers imported); inductor's flag is set where the
worker imported inductor already.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from typing import Any

import torch

_FLAGS = (
    # legacy first: setting them sets the new attributes below as the consumer's legacy calls did
    ("backends.cudnn", "allow_tf32"),
    ("backends.cudnn", "deterministic"),
    ("backends.cudnn", "benchmark"),
    ("utils.deterministic", "fill_uninitialized_memory"),
    *(
        (path, "fp32_precision")
        for path in (
            "backends",
            "backends.cuda.matmul",
            "backends.cudnn",
            "backends.cudnn.conv",
            "backends.cudnn.rnn",
            "backends.mkldnn",
            "backends.mkldnn.matmul",
            "backends.mkldnn.conv",
            "backends.mkldnn.rnn",
        )
    ),
)
"""``(object under torch, attribute)``: the backends' flags carried as they read in the consumer (those
this torch has, and that it lets read)."""

_UNREADABLE = object()


@dataclass(frozen=True)
class Settings:
    """The consumer's settings that a forked worker would have had."""

    default_dtype: torch.dtype
    deterministic: tuple[bool, bool]  # (mode, warn_only)
    matmul_precision: str | None  # the legacy API's; None where torch refuses to read it (both APIs used)
    flags: tuple[tuple[str, str, Any], ...]  # ``_FLAGS`` with their values
    print_options: dict[str, Any] | None
    warning_filters: tuple[Any, ...]  # ``warnings.filters``, each category as (module, qualified name)

    def apply(self) -> None:
        """Set torch's settings in this (worker) process, where they differ from its own."""
        if torch.get_default_dtype() != self.default_dtype:
            torch.set_default_dtype(self.default_dtype)
        if _deterministic() != self.deterministic:
            mode, warn_only = self.deterministic
            torch._C._set_deterministic_algorithms(mode, warn_only=warn_only)
            inductor = sys.modules.get("torch._inductor.config")
            if inductor is not None:  # what use_deterministic_algorithms also sets
                inductor.deterministic = mode
        if self.matmul_precision is not None and _read(torch.get_float32_matmul_precision) != self.matmul_precision:
            torch.set_float32_matmul_precision(self.matmul_precision)
        for path, name, value in self.flags:
            owner = _owner(path)
            if owner is not None and _read(getattr, owner, name) != value:
                try:
                    setattr(owner, name, value)
                except Exception:  # this torch takes no such value: the worker keeps its own
                    pass
        if self.print_options is not None and _print_options() != self.print_options:
            torch.set_printoptions(**self.print_options)

    def apply_warnings(self) -> None:
        """Set the consumer's warnings filters in this (worker) process (its step loaded), but those whose
        category's module it has not imported: a plug-in's, loaded from a path; a library's the step does
        not use (a warning of a module the step imports later, as it runs, is not filtered)."""
        filters = []
        for action, message, category, module, lineno in self.warning_filters:
            found = _category(*category)
            if found is not None:
                filters.append((action, message, found, module, lineno))
        warnings.filters[:] = filters  # as they are: regexes, or strings matched exactly
        mutated = getattr(warnings, "_filters_mutated", None)  # what filterwarnings calls: caches of earlier
        if mutated is not None:  # warnings (``__warningregistry__``) are looked at again
            mutated()


def capture() -> Settings:
    """The settings of this (consumer's) process now."""
    precision = _read(torch.get_float32_matmul_precision)
    flags = []
    for path, name in _FLAGS:
        owner = _owner(path)
        value = _UNREADABLE if owner is None else _read(getattr, owner, name)
        if value is not _UNREADABLE:
            flags.append((path, name, value))
    return Settings(
        torch.get_default_dtype(),
        _deterministic(),
        None if precision is _UNREADABLE else precision,
        tuple(flags),
        _print_options(),
        tuple(
            (action, message, (category.__module__, category.__qualname__), module, lineno)
            for action, message, category, module, lineno in warnings.filters
            if category.__module__ != "__main__"  # a worker does not import your script
        ),
    )


def _read(getter: Any, *args: Any) -> Any:
    try:
        return getter(*args)
    except Exception:  # torch refuses to read a precision set through both its APIs
        return _UNREADABLE


def _deterministic() -> tuple[bool, bool]:
    return torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()


def _owner(path: str) -> Any:
    owner: Any = torch
    for name in path.split("."):
        owner = getattr(owner, name, None)
        if owner is None:
            return None
    return owner


def _print_options() -> dict[str, Any] | None:
    get = getattr(torch._tensor_str, "get_printoptions", None)
    return None if get is None else dict(get())


def _category(module: str, qualname: str) -> type | None:
    """The warnings category ``module.qualname`` where this process imported its module, else ``None``:
    importing it only for a filter would cost the worker's start what the filters of ``import lightning``
    name (lightning, sympy: 1.3 s more to the first output, 1.6 s more to ``close()``)."""
    found: Any = sys.modules.get(module)
    for name in qualname.split("."):
        found = getattr(found, name, None)
    return found if isinstance(found, type) and issubclass(found, Warning) else None
