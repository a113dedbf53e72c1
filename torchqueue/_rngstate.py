"""A loader worker's random state (``random``, numpy, torch), reported after every batch at little cost.

To resume an epoch, or to put persistent workers back where DataLoader's would be, the loader
keeps the random state each worker had after its last batch that was yielded (see ``_epochs``).
So a worker sends its state with every batch. Capturing it costs about 65 µs (numpy's
``get_state`` alone 43 µs), as much as all the rest of a batch of one small item, so a worker
sends only the parts that changed since its last report: most datasets draw from one generator
or none. Telling that nothing changed must cost less than capturing: ``random``'s and numpy's
global generators are compared by the raw bytes of their C structs (CPython's ``_random.Random``:
``int index; uint32_t state[624]`` after the object header; numpy's ``mt19937_state``:
``uint32_t key[624]; int pos`` at the bit generator's public ``ctypes.state_address``), torch's
by its state, copied once. In a worker, between batches, a report that nothing changed costs
about 15 µs (torch's 9 of them). Both layouts are checked once per process against the public
state of a private generator; if a check fails the public state is compared instead (exact, 40 µs
slower). The Gaussian caches (``random``'s ``gauss_next``, numpy's ``has_gauss``) change
without a draw, so they are compared too (numpy's through its last capture: while full, the numpy
part is captured at every report).
"""

from __future__ import annotations

import array
import ctypes
import random
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

_MT_WORDS = 624
_MT_BYTES = 4 * _MT_WORDS + 4  # the words and the position (an int)


PythonState = tuple[int, bytes, "float | None"]  # random.getstate(), its words as bytes
NumpyState = tuple[bytes, int, int, float]  # np.random.get_state(): key, pos, has_gauss, cached gaussian
RandomState = tuple["PythonState | None", "NumpyState | None", "bytes | None"]
"""A worker's random state: ``(python, numpy, torch)``; in a report, a part that did not change since
the last report is ``None``. A plain tuple: a NamedTuple costs microseconds more to pickle, per batch."""


def capture() -> RandomState:
    """The whole random state of this process."""
    return _capture_python(), _capture_numpy(), _capture_torch()


def restore(state: RandomState) -> None:
    """Set this process's random state to ``state`` (a whole one)."""
    python, numpy, torch_state = state
    assert python is not None and numpy is not None and torch_state is not None
    version, words, gauss = python
    random.setstate((version, tuple(array.array("I", words)), gauss))
    key, pos, has_gauss, cached = numpy
    np.random.set_state(("MT19937", np.frombuffer(key, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(torch_state), dtype=torch.uint8))


def merged(old: RandomState | None, report: RandomState) -> RandomState:
    """The state a worker reported as ``report``, given its last whole state ``old``."""
    if old is None:
        return report
    return (
        report[0] if report[0] is not None else old[0],
        report[1] if report[1] is not None else old[1],
        report[2] if report[2] is not None else old[2],
    )


def _capture_python() -> PythonState:
    version, words, gauss = random.getstate()
    return version, array.array("I", words).tobytes(), gauss


def _capture_numpy() -> NumpyState:
    _, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return np.asarray(key).tobytes(), int(pos), int(has_gauss), float(cached)


def _capture_torch() -> bytes:
    state = torch.default_generator.get_state()
    return ctypes.string_at(state.data_ptr(), state.numel())  # one copy (.numpy().tobytes() costs 2x more)


class Tracker:
    """Reports this process's random state: whole after ``forget()``, else only the parts that changed."""

    def __init__(self) -> None:
        self._fingerprints: tuple[Callable[[], Any], Callable[[], Any]] | None = None  # made in the worker
        self._python: Any = None  # the python part's fingerprint at the last report
        self._numpy: Any = None
        self._numpy_gauss = False  # numpy's Gaussian cache was full at the last capture
        self._torch: bytes | None = None
        self._whole = True

    def forget(self) -> None:
        """The next report is whole (its receiver may not have the earlier ones)."""
        self._whole = True

    def report(self) -> RandomState | None:
        """The parts of the state that changed since the last report (``None``: nothing did)."""
        if self._fingerprints is None:
            self._fingerprints = _python_fingerprint(), _numpy_fingerprint()
        python_print, numpy_print = self._fingerprints[0](), self._fingerprints[1]()
        torch_state = _capture_torch()  # its own fingerprint: getting it costs as much as comparing
        whole, self._whole = self._whole, False
        python = numpy = torch_part = None
        if whole or python_print != self._python:
            self._python, python = python_print, _capture_python()
        if whole or self._numpy_gauss or numpy_print is None or numpy_print != self._numpy:
            self._numpy, numpy = numpy_print, _capture_numpy()
            self._numpy_gauss = bool(numpy[2])
        if whole or torch_state != self._torch:
            self._torch = torch_part = torch_state
        if python is None and numpy is None and torch_part is None:
            return None
        return python, numpy, torch_part

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fingerprints": None}  # readers of this process's memory


_MT_LAYOUT_CHECKED: dict[str, bool] = {}


def _python_fingerprint() -> Callable[[], Any]:
    """A function giving something equal as long as ``random``'s state is (the global generator's)."""
    instance = random._inst  # type: ignore[attr-defined]  # the generator behind random.random()
    if _layout_holds("python"):
        address = id(instance) + object.__basicsize__
        return lambda: (ctypes.string_at(address, _MT_BYTES), instance.gauss_next)  # type: ignore[attr-defined]
    return random.getstate


def _numpy_fingerprint() -> Callable[[], Any]:
    """The same for numpy's global generator; it gives ``None`` when it cannot tell."""
    bits = np.random.mtrand._rand._bit_generator
    if not _layout_holds("numpy"):
        return lambda: None
    address = bits.ctypes.state_address
    return lambda: ctypes.string_at(address, _MT_BYTES) if np.random.mtrand._rand._bit_generator is bits else None


def _layout_holds(kind: str) -> bool:
    """Whether the raw C state reads as the public state says, on a private generator (once per process)."""
    if kind not in _MT_LAYOUT_CHECKED:
        try:
            _MT_LAYOUT_CHECKED[kind] = _check_layout(kind)
        except Exception:  # not CPython, or not numpy's layout: compare the public state instead
            _MT_LAYOUT_CHECKED[kind] = False
    return _MT_LAYOUT_CHECKED[kind]


def _check_layout(kind: str) -> bool:
    generator: Any
    if kind == "python":
        generator = random.Random(0)
        if type(generator).__basicsize__ < object.__basicsize__ + _MT_BYTES:
            return False

        def read() -> bytes:
            return ctypes.string_at(id(generator) + object.__basicsize__, _MT_BYTES)

        def public() -> bytes:
            words = generator.getstate()[1]
            return struct.pack("i", words[-1]) + array.array("I", words[:-1]).tobytes()

    else:
        generator = np.random.RandomState(0)
        address = generator._bit_generator.ctypes.state_address

        def read() -> bytes:
            return ctypes.string_at(address, _MT_BYTES)

        def public() -> bytes:
            _, key, pos, _, _ = generator.get_state()
            return np.asarray(key, dtype=np.uint32).tobytes() + struct.pack("i", pos)

    for _ in range(2):  # before and after a draw
        if read() != public():
            return False
        generator.random()
    return True
