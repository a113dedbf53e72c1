"""Bytes on the wire: how a message is pickled for another process.

Tensors and large numpy arrays do not go through the pipe. ``dumps`` packs
the bytes of all of them in one message into one shared-memory segment (a
file in the pipeline's directory under ``/dev/shm``), and the pickle only
says where each one is. ``loads`` maps the segment once, removes its name at
once, and rebuilds every tensor and array as a view of that mapping: no copy
on the receiving side, one segment and one file descriptor per message
however many tensors it holds, and received tensors are ``is_shared()``.

    message = b"P" + pickle                                  (nothing to share)
            | b"S" + <name length, segment size> + name + pickle

The memory is freed when the last tensor or array viewing it is gone. A
segment whose message is never read (a stopped pipeline) is removed with
its directory by ``Runtime.close`` or, if the consumer's process died, by
the workers as they exit.

Tensors are sent contiguous (a strided view arrives as a compact copy with
the same values). Large tensors (``TENSOR_OWN_SEGMENT_BYTES``), tensor
subclasses, sparse, quantized and non-CPU tensors use torch's own reductions.
"""

from __future__ import annotations

import io
import itertools
import os
import pickle
import struct
import tempfile
from multiprocessing.reduction import ForkingPickler
from typing import Any

import numpy as np
import torch
import torch.multiprocessing  # noqa: F401  (registers torch's reductions for what we do not handle)

ARRAY_MIN_BYTES = 64 * 1024
"""numpy arrays at least this large go to shared memory; smaller ones stay in the pickle."""

TENSOR_OWN_SEGMENT_BYTES = 1 << 20
"""Tensors whose storage is at least this large keep torch's own sharing: their storage moves to
shared memory once, in place, and a tensor that is passed on from step to step is never copied
again (one file descriptor each, which is nothing for tensors this size)."""

_ALIGN = 64
_ZEROS = memoryview(bytes(_ALIGN))
_IOV_MAX = 1024
_SEGMENT = struct.Struct("<HQ")
_counter = itertools.count()
_new_shared_fd = getattr(torch.UntypedStorage, "_new_shared_fd_cpu")  # noqa: B009 (private torch API)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def make_segment_dir() -> str | None:
    """A fresh directory for one pipeline's segments (``None`` where there is no /dev/shm)."""
    if not os.path.isdir("/dev/shm"):
        return None
    return tempfile.mkdtemp(prefix=f"torchqueue-{os.getpid()}-", dir="/dev/shm")


def _shareable_tensor(obj: Any) -> bool:
    return (
        type(obj) is torch.Tensor
        and obj.untyped_storage().nbytes() < TENSOR_OWN_SEGMENT_BYTES
        and obj.device.type == "cpu"
        and obj.layout == torch.strided
        and not obj.is_quantized
        and not obj.is_nested
    )


def _shareable_array(obj: Any) -> bool:
    return (
        type(obj) is np.ndarray
        and obj.nbytes >= ARRAY_MIN_BYTES
        and not obj.dtype.hasobject
        and obj.dtype.fields is None
    )


class _Pickler(ForkingPickler):
    """Records tensors and large arrays as (offset, size) in a segment instead of pickling them."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, pickle.HIGHEST_PROTOCOL)
        self.chunks: list[tuple[int, torch.Tensor | np.ndarray]] = []
        self.size = 0

    def _reserve(self, nbytes: int) -> int:
        offset = self.size
        self.size += -(-nbytes // _ALIGN) * _ALIGN
        return offset

    def persistent_id(self, obj: Any) -> Any:
        if _shareable_tensor(obj):
            data = obj.detach()
            if data.is_conj() or data.is_neg():
                data = data.resolve_conj().resolve_neg()
            data = data.contiguous().reshape(-1).view(torch.uint8)
            offset = self._reserve(data.numel())
            self.chunks.append((offset, data))
            return ("T", offset, obj.dtype, tuple(obj.shape), obj.requires_grad)
        if _shareable_array(obj):
            data = np.ascontiguousarray(obj).reshape(-1).view(np.uint8)
            offset = self._reserve(data.nbytes)
            self.chunks.append((offset, data))
            return ("A", offset, obj.dtype.str, obj.shape)
        return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, storage: torch.UntypedStorage) -> None:
        super().__init__(file)
        self._storage = storage
        self._bytes: np.ndarray | None = None  # the whole segment as a numpy uint8 array

    def persistent_load(self, pid: Any) -> Any:
        if pid[0] == "T":
            _, offset, dtype, shape, requires_grad = pid
            tensor = torch.empty(0, dtype=dtype).set_(
                self._storage, offset // dtype.itemsize, shape, _contiguous_strides(shape)
            )
            return tensor.requires_grad_() if requires_grad else tensor
        _, offset, dtype_str, shape = pid
        if self._bytes is None:
            self._bytes = torch.empty(0, dtype=torch.uint8).set_(self._storage).numpy()
        dtype = np.dtype(dtype_str)
        count = int(np.prod(shape, dtype=np.int64))
        return self._bytes[offset : offset + count * dtype.itemsize].view(dtype).reshape(shape)


def dumps(obj: Any, segment_dir: str | None) -> bytes:
    """Serialise ``obj``; tensors and large arrays go to a new segment in ``segment_dir``."""
    buffer = io.BytesIO()
    pickler = _Pickler(buffer) if segment_dir is not None else ForkingPickler(buffer, pickle.HIGHEST_PROTOCOL)
    pickler.dump(obj)
    body = buffer.getvalue()
    if not isinstance(pickler, _Pickler) or not pickler.chunks:
        return b"P" + body
    name = _write_segment(segment_dir, pickler.chunks, pickler.size)  # type: ignore[arg-type]
    encoded = name.encode()
    return b"S" + _SEGMENT.pack(len(encoded), pickler.size) + encoded + body


def message_nbytes(data: bytes | bytearray) -> int:
    """Size of a message from ``dumps``, its shared-memory segment included."""
    if data[:1] == b"S":
        return len(data) + _SEGMENT.unpack_from(data, 1)[1]
    return len(data)


def loads(data: bytes | bytearray | memoryview) -> Any:
    """The object ``dumps`` serialised (maps and unlinks its segment, if any)."""
    view = memoryview(data)
    if view[:1] == b"P":
        return pickle.loads(view[1:])
    name_length, size = _SEGMENT.unpack_from(view, 1)
    start = 1 + _SEGMENT.size
    name = bytes(view[start : start + name_length]).decode()
    storage = _map_segment(name, size)
    return _Unpickler(io.BytesIO(view[start + name_length :]), storage).load()


def _write_segment(directory: str, chunks: list[tuple[int, Any]], size: int) -> str:
    """Write the chunks at their offsets into a new file; ``write`` (not a mapping) so the
    kernel fills fresh pages without a page fault per page, and a full /dev/shm is an OSError."""
    path = os.path.join(directory, f"{os.getpid()}-{next(_counter)}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        iov: list[memoryview] = []
        position = start = 0
        for offset, data in chunks:
            if offset > position:
                iov.append(_ZEROS[: offset - position])
            view = (data.numpy() if isinstance(data, torch.Tensor) else data).data
            iov.append(view)
            position = offset + view.nbytes
            if len(iov) >= _IOV_MAX - 1:
                start += _pwritev_all(fd, iov, start)
                iov = []
        if iov:
            _pwritev_all(fd, iov, start)
        os.ftruncate(fd, size)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)
    return path


def _pwritev_all(fd: int, iov: list[memoryview], offset: int) -> int:
    """Write every buffer of ``iov`` at ``offset``, retrying short writes; return the bytes written."""
    total = sum(view.nbytes for view in iov)
    done = 0
    while done < total:
        written = os.pwritev(fd, iov, offset + done)
        done += written
        while iov and written >= iov[0].nbytes:
            written -= iov[0].nbytes
            iov = iov[1:]
        if iov and written:
            iov[0] = iov[0][written:]
    return total


def _map_segment(path: str, size: int) -> torch.UntypedStorage:
    """Map a segment as a torch shared storage (the call torch's own fd-sharing uses) and unlink it."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.unlink(path)
        return _new_shared_fd(fd, size)
    finally:
        os.close(fd)
