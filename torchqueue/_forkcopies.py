"""What a forked child shares with its parent, rebuilt in a worker of torchqueue's fork server.

A worker forked from your process has your objects as they are. One forked from the fork server
(``"fork"`` while another thread runs: ``_forkserver``) gets its step pickled instead, and some
objects pickle as something else than what a fork gives:

- a lock: pickle refuses it; a forked child has it unheld (nobody holds it there): a new lock;
- a ``numpy.memmap`` of a file: pickle copies its values into the worker's memory (a dataset over a
  300 MB file: 300 MB more per worker, and writes to the file unseen); a forked child maps the
  file: mapped again here, as shared (``"r"``, ``"r+"``; ``"w+"`` opens as ``"r+"``: it must not
  truncate the file). Copy-on-write (``"c"``) maps keep your process's private changes, so they,
  and arrays that are not contiguous, are copied as before;
- a file opened for binary reading (``open(path, "rb")``): pickle refuses it; a forked child
  shares the descriptor: opened again here, at the same position (a position of its own, where
  forked workers share one and move each other's).
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
import threading
from typing import Any

import numpy as np

_SHARED_MODES = {"r": "r", "readonly": "r", "r+": "r+", "readwrite": "r+", "w+": "r+", "write": "r+"}


def _memmap(array: np.memmap) -> Any:
    """A memory-mapped array as the same mapping of its file, where it is one contiguous part of a shared one
    (else a copy, as pickle makes it)."""
    place = _place_in_file(array)
    if place is None:
        return array.__reduce_ex__(pickle.HIGHEST_PROTOCOL)
    filename, mode, offset = place
    order = "C" if array.flags.c_contiguous else "F"
    return np.memmap, (filename, array.dtype, mode, offset, array.shape, order)


def _place_in_file(array: np.memmap) -> tuple[str, str, int] | None:
    """The file, the shared mode to map it in and the byte offset of ``array``'s data, where a worker can map
    the same bytes again: a contiguous, non-empty array of a shared mapping whose file is still there."""
    mapping, filename = getattr(array, "_mmap", None), getattr(array, "filename", None)
    mode = _SHARED_MODES.get(getattr(array, "mode", None))  # type: ignore[arg-type]
    contiguous = array.flags.c_contiguous or array.flags.f_contiguous
    if mapping is None or filename is None or mode is None or not contiguous or array.size == 0:
        return None
    if not os.path.isfile(filename):  # removed since it was mapped: only this process has the bytes
        return None
    try:
        mapped_at = np.frombuffer(mapping, dtype=np.uint8).__array_interface__["data"][0]
    except ValueError:  # the mapping was closed
        return None
    mapped_from = array.offset - array.offset % mmap.ALLOCATIONGRANULARITY  # where numpy's mapping starts
    return filename, mode, mapped_from + array.__array_interface__["data"][0] - mapped_at


def _binary_reader(file: io.BufferedReader | io.FileIO) -> Any:
    """A file open for binary reading as the same file opened again, at the same position."""
    name = getattr(file, "name", None)
    if file.closed or file.mode != "rb" or not isinstance(name, str) or not os.path.isfile(name):
        raise TypeError(f"cannot pickle {type(file).__name__!r} object")  # pickle's own refusal
    buffering = -1 if isinstance(file, io.BufferedReader) else 0
    return _reopened, (os.path.abspath(name), buffering, file.tell())


def _reopened(path: str, buffering: int, position: int) -> Any:
    file = open(path, "rb", buffering=buffering)  # noqa: SIM115 (the worker's step holds it open)
    file.seek(position)
    return file


AS_FORKED = {
    type(threading.Lock()): lambda lock: (threading.Lock, ()),
    type(threading.RLock()): lambda lock: (threading.RLock, ()),
    np.memmap: _memmap,
    io.BufferedReader: _binary_reader,
    io.FileIO: _binary_reader,
}
"""Reducers by exact type, for a step pickled for a fork server's worker."""
