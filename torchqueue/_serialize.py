"""Bytes on the wire: how a message is pickled for another process.

Tensors and large numpy arrays do not go through the pipe. ``dumps`` packs
the bytes of all of them in one message into one shared-memory segment (a
file in the pipeline's directory under ``/dev/shm``, see ``_segments``: its
sender reuses it once nobody uses it), and the pickle only says where each
one is. ``loads`` maps the segment once and rebuilds every tensor and array
as a view of that mapping: no copy on the receiving side, one segment and
one file descriptor per message however many tensors it holds. Each block
(a large tensor, or small ones of one dtype) arrives as a storage of its own,
a slice of the mapping's (``_block``): ``torch.save`` of received tensors finds
one dtype per storage and writes only their bytes. Except small tensors (gathered, or in runs) of a
message that also carries large ones, or of a small message: their blocks are
copied out as they arrive (``_flat``), so that keeping them does not keep the
segment mapped.

    message = b"P" + pickle                                  (nothing to share)
            | b"S" + <name length, segment size, table length> + name + table + pickle

The table lists the segment's blocks (dtype, offset, size); the pickle refers
to a tensor as (block, element offset, shape).

The memory is free for reuse when the last tensor or array viewing it is
gone. Segments are removed with their directory by ``Runtime.close`` or, if
the consumer's process died, by the workers as they exit.

Tensors are sent contiguous (a strided view arrives as a compact copy with
the same values) and arrive as views of the segment. A large tensor
(``SHARED_TENSOR_MIN_BYTES``) that views a segment it arrived in, and a large
numpy array that does (a big tensor or array passed on from step to step),
is never copied again: the segment gets a second name (``_segments.link``)
and the pickle says where in it the values are (``_Passed``); the next
receiver maps it by that name. Other shared memory (a tensor the user
shared, a segment whose name went) is copied into the message's segment.
Tensor subclasses, sparse, quantized and non-CPU tensors keep torch's own
sharing. Writing a segment is one ``pwritev`` call, or one numpy copy into a segment the sender
reuses (``_segments``, "Recycling"); both release the GIL:
the feeder thread copies while the consumer's thread runs.

Why not torch's sharing for what is passed on: it sends a file descriptor
through ``multiprocessing.resource_sharer``, a server thread in the sending
process that the receiver connects to when it unpickles. A receiver that
unpickles after its sender stopped (a pipeline closing) failed there
(``ConnectionResetError``, ``EOFError``, ``FileNotFoundError``).

A plain torch_geometric ``Data`` is pickled as the mapping of its attributes (``_pyg``): a pool's graphs
are pickled one by one, and each paid for two objects' state and three classes by name.

Runs of small tensors skip the per-tensor Python on both sides. Pickle never
asks about exact lists and tuples, so before pickling ``dumps`` looks for runs
in the message's value (an envelope's payload; each item of a bundle whose
first item has one) and, if the value is a list, tuple or dict of at most
``_SCAN_CHILDREN`` items, in its items. A run is a list or tuple of at least
``RUN_MIN_TENSORS`` distinct, exact, CPU tensors of one dtype and one shape,
each under ``GATHER_BYTES`` (at least one dimension and one element, no
gradient): it is ``torch.stack``-ed into a block of its own and arrives as
one ``unsafe_split`` of it, in a list or a tuple as it was sent. Anything
else (a list subclass, a mixed list, a failed stack) takes the per-tensor
path, and so does a whole message in which a run's tensor is also seen
outside it, so that every object arrives once. Nothing deeper is walked.
"""

from __future__ import annotations

import contextlib
import copyreg
import io
import operator
import os
import pickle
import struct
import threading
from multiprocessing.reduction import ForkingPickler
from typing import Any

import numpy as np
import torch
import torch.multiprocessing  # noqa: F401  (registers torch's reductions for what we do not handle)

from torchqueue import _pyg, _segments
from torchqueue._mainmodule import MainClassPickler, reduce_main_class
from torchqueue._messages import Bundle, Envelope
from torchqueue._routing import EncodedItem, Source
from torchqueue._segments import make_segment_dir

__all__ = ["dumps", "loads", "make_segment_dir", "message_nbytes"]

ARRAY_MIN_BYTES = 64 * 1024
"""numpy arrays at least this large go to shared memory; smaller ones stay in the pickle."""

GATHER_BYTES = 16 * 1024
"""Tensors under this size are gathered per dtype into one block of the segment; larger ones get a block
each (written from where they are, without an extra copy)."""

SHARED_TENSOR_MIN_BYTES = 1 << 20
"""A tensor or array at least this large that views a segment it arrived in (it came from another step)
is passed on by reference to that segment, never copied again (``_Passed``). Smaller ones are cheaper
to copy than a link is to make."""

COPY_OUT_BYTES = 1 << 20
"""A message of small tensors only, under this size, arrives copied out of its segment (see ``_flat``)."""

RUN_MIN_TENSORS = 16
"""A list or tuple of at least this many small tensors alike is sent as one block (see above)."""

_SCAN_CHILDREN = 32
"""The pre-pass looks into lists, tuples and dicts of at most this many items for runs (``(images, label)``)."""

_ALIGN = 64
_SEGMENT = struct.Struct("<HQI")
_META = struct.Struct("<I")
_NUMPY_DTYPES = {
    torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool, torch.complex64, torch.complex128,
}  # fmt: skip


def _to_segment(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` (exactly a ``torch.Tensor``) goes into shared memory (the message's segment,
    or one it views, passed on).

    Cheap attributes only (``device.type`` costs five times ``is_cpu``): this runs per tensor."""
    return tensor.is_cpu and tensor.layout == torch.strided and not tensor.is_quantized and not tensor.is_nested


def _passable(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` may be passed on as a view of the segment it views, if it views one."""
    return tensor.nbytes >= SHARED_TENSOR_MIN_BYTES and not tensor.is_conj() and not tensor.is_neg()


def _tensor_bytes(tensor: torch.Tensor) -> Any:
    """The tensor's values, contiguous, as a buffer (a view of the tensor when it is contiguous)."""
    data = tensor.detach()
    if data.is_conj() or data.is_neg():
        data = data.resolve_conj().resolve_neg()
    data = data.contiguous()
    if data.dtype not in _NUMPY_DTYPES:
        data = data.reshape(-1).view(torch.uint8)
    return data.numpy().data


def _memory_order(tensor: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]] | None:
    """For a tensor laid out densely but not row-major (``channels_last``, a transpose): a contiguous
    view of it in memory order, and its strides, so that it arrives with the same layout (as torch's
    own sharing keeps it); else ``None`` (row-major, or with gaps: it travels as a row-major copy)."""
    if tensor.is_contiguous() or tensor.is_conj() or tensor.is_neg():
        return None
    strides = tensor.stride()
    view = tensor.permute(sorted(range(tensor.dim()), key=strides.__getitem__, reverse=True))
    return (view, strides) if view.is_contiguous() else None


def _unexpanded(tensor: torch.Tensor) -> torch.Tensor | None:
    """For a tensor with broadcast dimensions (stride 0: ``expand``), the tensor before them (size 1
    there), which travels instead: it arrives expanded again, as small as it was sent; else ``None``."""
    base = tensor
    for dim, (size, stride) in enumerate(zip(tensor.shape, tensor.stride())):
        if stride == 0 and size > 1:
            base = base.narrow(dim, 0, 1)
    return None if base is tensor else base


def _rebuild_expanded(base: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return base.expand(shape)


def _shareable_array(obj: np.ndarray) -> bool:
    return obj.nbytes >= ARRAY_MIN_BYTES and not obj.dtype.hasobject and obj.dtype.fields is None


def _shared_place(array: np.ndarray) -> tuple[tuple[int, int], int] | None:
    """``((mapping address, size), byte offset)`` of a large C-contiguous array that views a tensor's
    shared memory (a segment received from another step, or a shared tensor's ``.numpy()``), else ``None``.

    Such an array is passed on by reference to its segment (``_Passed``), never copied again: the
    rule ``SHARED_TENSOR_MIN_BYTES`` sets for tensors."""
    if array.nbytes < SHARED_TENSOR_MIN_BYTES or not array.flags.c_contiguous:
        return None
    root: Any = array.base
    while isinstance(root, np.ndarray):
        root = root.base
    if type(root) is not torch.Tensor or not root.is_cpu:
        return None
    storage = root.untyped_storage()
    place = _mapping_of(storage)
    if place is None:
        return None
    mapping, start = place
    offset = start + array.__array_interface__["data"][0] - storage.data_ptr()
    if offset < start or offset + array.nbytes > start + storage.nbytes():
        return None
    return mapping, offset


_BLOCKS = 256
"""Received blocks of ``SHARED_TENSOR_MIN_BYTES`` or more whose segment this process remembers (the
most recent ones), so that their tensors can be passed on."""

_blocks: dict[int, tuple[int, int]] = {}  # a block's address -> (address, size) of the mapping it is in
_blocks_lock = threading.Lock()  # the consumer's threads may each read messages


def _block(storage: torch.UntypedStorage, offset: int, nbytes: int) -> torch.UntypedStorage:
    """Bytes ``offset`` to ``offset + nbytes`` of a mapped segment, as a storage of their own: a view that
    keeps the mapping alive, so that ``torch.save`` of the tensors viewing it finds one storage per block
    (it refuses two dtypes viewing one storage) and writes only its bytes, not the segment's."""
    block = storage[offset : offset + nbytes]
    if nbytes >= SHARED_TENSOR_MIN_BYTES:  # it may be passed on: where it is
        with _blocks_lock:
            _blocks[block.data_ptr()] = (storage.data_ptr(), storage.nbytes())
            if len(_blocks) > _BLOCKS:
                del _blocks[next(iter(_blocks))]
    return block


def _mapping_of(storage: torch.UntypedStorage) -> tuple[tuple[int, int], int] | None:
    """``((address, size) of the mapping, byte offset in it)`` of a storage that is a whole shared mapping
    (``is_shared()``: a passed-on segment, or a tensor the user shared) or a block of a received segment
    (``_block``), else ``None``. A remembered block whose memory went since is harmless: ``link`` names
    a segment only where one maps exactly that range now, and the storage asked about lies in it."""
    if storage.is_shared():
        return (storage.data_ptr(), storage.nbytes()), 0
    address = storage.data_ptr()
    mapping = _blocks.get(address)
    if mapping is None:
        return None
    start = address - mapping[0]
    if start < 0 or start + storage.nbytes() > mapping[1]:
        return None
    return mapping, start


_CONTAINERS = frozenset((list, tuple, dict))
_ONLY_TENSORS = {torch.Tensor}
_dtype_of = operator.attrgetter("dtype")


class _Run:
    """Stands for a list or tuple of tensors stacked into one block; pickled as ``_rebuild_run``'s arguments."""

    __slots__ = ("args",)

    def __init__(self, args: tuple[int, int, tuple[int, ...], bool]) -> None:
        self.args = args

    def __reduce__(self) -> tuple[Any, tuple[int, int, tuple[int, ...], bool]]:
        return _rebuild_run, self.args


def _stack_run(values: list[Any] | tuple[Any, ...]) -> tuple[torch.Tensor, set[int]] | None:
    """``values`` stacked and their ids, if they are a run: distinct exact tensors, CPU, strided, one
    dtype and shape, under ``GATHER_BYTES`` each, with at least one dimension and one element, none
    requiring grad, the first one not dense in another order than row-major (a run arrives row-major).

    A few passes of C-level builtins over the list; ``torch.stack`` checks shapes and devices."""
    first, last = values[0], values[-1]
    if type(last) is not torch.Tensor or last.shape != first.shape:  # tensors of varied sizes, cheaply
        return None
    if set(map(type, values)) != _ONLY_TENSORS or not first.is_cpu or first.layout != torch.strided:
        return None
    if torch.is_inference_mode_enabled():  # the stack below would not tell whether an input requires grad
        return None
    if first.is_quantized or first.is_nested or not first.dim() or not 0 < first.nbytes < GATHER_BYTES:
        return None
    if _memory_order(first) is not None:  # a layout of its own (channels_last, ...): the per-tensor path keeps it
        return None
    ids = set(map(id, values))
    if len(ids) != len(values) or len(set(map(_dtype_of, values))) != 1:
        return None  # a repeated tensor arrives as one object twice: the per-tensor path keeps that
    try:
        with torch.enable_grad():  # so that requires_grad on the result says whether any input requires it
            stacked = torch.stack(values)
    except Exception:  # sizes or devices differ, or an exotic tensor: the per-tensor path decides
        return None
    if stacked.requires_grad or not stacked.is_cpu or stacked.layout != torch.strided or stacked.is_quantized:
        return None
    return stacked, ids


class _Passed:
    """A segment a tensor or array of the message views, passed on under a name of its own (see
    ``_segments.link``); pickled as ``_segments.map_passed``'s arguments. One per segment and message,
    so that pickle's memo rebuilds one storage for all its views."""

    __slots__ = ("args",)

    def __init__(self, path: str, size: int, origin: str) -> None:
        self.args = path, size, origin

    def __reduce__(self) -> tuple[Any, tuple[str, int, str]]:
        return _segments.map_passed, self.args


class _RunElsewhere(Exception):
    """A tensor of a run is in the message elsewhere too (or its list is, somewhere not looked at).

    Such a message is pickled again without runs: the per-tensor path sends one object once."""


_dispatch: tuple[tuple[int, int], dict[Any, Any]] | None = None


def _dispatch_table() -> dict[Any, Any]:
    """``ForkingPickler``'s reducers (copyreg's and those registered with it: torch's), built once.

    ``ForkingPickler()`` copies both tables for every pickler it makes (about 3 us of the 4 a
    message's pickler costs); this shares one copy, made again when a reducer was added or removed
    since (picklers only read it)."""
    global _dispatch
    extra = ForkingPickler._extra_reducers  # type: ignore[attr-defined]
    key = (len(copyreg.dispatch_table), len(extra))
    if _dispatch is None or _dispatch[0] != key:
        table = copyreg.dispatch_table.copy()
        table.update(extra)
        _dispatch = (key, table)
    return _dispatch[1]


def _forking_pickler(file: io.BytesIO) -> pickle.Pickler:
    """A pickler with ``ForkingPickler``'s reducers, without copying them (see ``_dispatch_table``)."""
    pickler = pickle.Pickler(file, pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = _dispatch_table()
    return pickler


class _Pickler(MainClassPickler):
    """Records tensors and large arrays as places in one segment instead of pickling their values.

    The segment is a row of blocks: one per dtype gathering every small tensor of that dtype
    (one copy and one write for thousands of them), and one per large tensor or array. A tensor
    is pickled as (block, element offset in it, shape). ``reducer_override`` (not
    ``persistent_id``) so that ints, strings, lists and dicts never reach Python code.
    ``with_runs`` adds a block per run before pickling starts.
    """

    def __init__(self, file: io.BytesIO, segment_dir: str) -> None:
        super().__init__(file, pickle.HIGHEST_PROTOCOL)
        self.dispatch_table = _dispatch_table()  # ForkingPickler's reducers
        self._segment_dir = segment_dir
        self._passed: dict[int, _Passed] = {}  # address of a segment this process maps -> its link
        self.blocks: list[list[Any]] = []  # [dtype (torch) or dtype string (numpy), tensors or a buffer, small]
        self._gathering: dict[torch.dtype, tuple[int, list[torch.Tensor], list[int]]] = {}
        self._scanned: dict[int, Any] = {}  # id of a list, tuple or dict looked at -> what stands for it
        self._in_runs: set[int] = set()  # ids of the tensors in runs
        self.refs: list[Source] = []  # the segments of the routed items in the message (``_routing``)
        self._ref_index: dict[int, int] = {}
        self._data_class = _pyg.data_class()  # torch_geometric's Data, pickled as its attributes (``_pyg``)
        self.passes_on = True  # received segments go on as links (items pickled one by one: copied, since
        # a stream step may drop an item, and nobody would remove its link)

    def sharing(self, file: io.BytesIO) -> _Pickler:
        """A pickler into ``file`` whose tensors go into this one's blocks (items pickled one by one)."""
        other = _Pickler(file, self._segment_dir)
        other.blocks, other._gathering, other.passes_on = self.blocks, self._gathering, self.passes_on
        return other

    def with_runs(self, obj: Any) -> Any:
        """``obj`` with the runs of small tensors in its value(s) replaced by ``_Run``s (blocks added)."""
        if type(obj) is not Envelope:
            return self._value(obj, True)
        payload = obj.payload
        if type(payload) is Bundle:  # consecutive elements of one step are alike: the first one decides
            items = payload.items
            if not items or self._value(items[0], True) is items[0]:
                return obj
            return obj._replace(payload=Bundle([self._value(item, True) for item in items]))
        value = self._value(payload, True)
        return obj if value is payload else obj._replace(payload=value)

    def _value(self, value: Any, children: bool) -> Any:
        """What stands for ``value``: a ``_Run``, a copy of a short container with runs in it, or itself."""
        kind = type(value)
        if kind not in _CONTAINERS:
            return value
        done = self._scanned.get(id(value))
        if done is not None:  # the same object twice in the message: one replacement, so pickle memoizes it
            return done
        new = value
        if kind is not dict and len(value) >= RUN_MIN_TENSORS and type(value[0]) is torch.Tensor:
            run = _stack_run(value)
            if run is not None:
                stacked, ids = run
                self.blocks.append([stacked.dtype, _tensor_bytes(stacked), True])
                new = _Run((len(self.blocks) - 1, len(value), tuple(value[0].shape), kind is tuple))
                self._in_runs |= ids
        elif children and len(value) <= _SCAN_CHILDREN:
            items = list(value.values()) if kind is dict else value
            if not _CONTAINERS.isdisjoint(map(type, items)):
                replaced = [self._value(item, False) for item in items]
                if any(map(operator.is_not, replaced, items)):
                    new = dict(zip(value, replaced)) if kind is dict else replaced if kind is list else tuple(replaced)
        self._scanned[id(value)] = new
        return new

    def dump(self, obj: Any) -> None:
        try:
            super().dump(obj)
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        """Remove the links made for a message that will not be sent."""
        for passed in self._passed.values():
            with contextlib.suppress(OSError):  # the pipeline is closing
                os.unlink(passed.args[0])
        self._passed.clear()

    def _pass_on(self, mapping: tuple[int, int]) -> _Passed | None:
        """The link to the segment mapped at ``(address, size)`` (made once per message), or ``None``: not a
        segment."""
        if not self.passes_on:
            return None
        address, size = mapping
        passed = self._passed.get(address)
        if passed is None:
            names = _segments.link(address, size, self._segment_dir)
            if names is None:
                return None
            passed = self._passed[address] = _Passed(names[0], size, names[1])
        return passed

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        if kind is EncodedItem:  # routed by a stream step: a reference to where it is (see ``_routing``)
            source = obj.source
            if source is None:
                return _rebuild_routed, (-1, obj.blob)
            index = self._ref_index.get(id(source))
            if index is None:
                index = self._ref_index[id(source)] = len(self.refs)
                self.refs.append(source)
            return _rebuild_routed, (index, obj.blob)
        if kind is torch.Tensor and id(obj) in self._in_runs:
            raise _RunElsewhere
        if kind is torch.Tensor and _to_segment(obj):
            if _passable(obj) and (place := _mapping_of(obj.untyped_storage())) is not None:
                passed = self._pass_on(place[0])
                if passed is not None:  # the element offset in the segment (blocks are aligned to 64 bytes)
                    offset = place[1] // obj.element_size() + obj.storage_offset()
                    view = (obj.dtype, offset, tuple(obj.shape), obj.stride(), obj.requires_grad)
                    return _rebuild_passed_tensor, (passed, *view)
            layout = None if obj.is_contiguous() else _memory_order(obj)
            if (
                layout is None
                and not obj.is_contiguous()
                and not obj.requires_grad
                and (base := _unexpanded(obj)) is not None
            ):
                return _rebuild_expanded, (base, tuple(obj.shape))
            values = obj if layout is None else layout[0]
            if obj.nbytes < GATHER_BYTES:
                gathering = self._gathering.get(obj.dtype)
                if gathering is None:
                    gathering = self._gathering[obj.dtype] = (len(self.blocks), [], [0])
                    self.blocks.append([obj.dtype, gathering[1], True])
                index, tensors, numel = gathering
                start = numel[0]
                tensors.append(values)
                numel[0] += obj.numel()
            else:
                index, start = len(self.blocks), 0
                self.blocks.append([obj.dtype, _tensor_bytes(values), False])
            if layout is None:
                return _rebuild_tensor, (index, start, tuple(obj.shape), obj.requires_grad)
            return _rebuild_tensor, (index, start, tuple(obj.shape), obj.requires_grad, layout[1])
        if kind is self._data_class and (reduced := _pyg.reduce_data(obj)) is not None:
            return reduced
        if isinstance(obj, type):
            return reduce_main_class(obj, self._segment_dir) or NotImplemented
        if kind is np.ndarray and _shareable_array(obj):
            shared = _shared_place(obj)
            if shared is not None and (passed := self._pass_on(shared[0])) is not None:  # it came from another step
                return _rebuild_passed_array, (passed, shared[1], obj.dtype.str, obj.shape)
            if obj.flags.f_contiguous and not obj.flags.c_contiguous:  # Fortran order: it arrives in it
                self.blocks.append([obj.dtype.str, obj.T.reshape(-1).view(np.uint8).data, False])
                return _rebuild_fortran_array, (len(self.blocks) - 1, obj.shape)
            self.blocks.append([obj.dtype.str, np.ascontiguousarray(obj).reshape(-1).view(np.uint8).data, False])
            return _rebuild_array, (len(self.blocks) - 1, obj.shape)
        return NotImplemented

    def layout(self) -> tuple[list[tuple[Any, int, int, bool]], list[tuple[int, Any]], int]:
        """The blocks' ``(dtype, byte offset, bytes, private)``, the buffers to write at their offsets, the
        segment size. ``private``: the block's small tensors are copied out on arrival (see ``_flat``)."""
        entries, chunks, size = [], [], 0
        for dtype, data, small in self.blocks:
            if isinstance(data, list):  # gathered small tensors: one contiguous copy
                with torch.no_grad():
                    data = _tensor_bytes(torch._utils._flatten_dense_tensors(data))
            entries.append((dtype, size, data.nbytes, small))
            if data.nbytes:
                chunks.append((size, data))
            size += -(-data.nbytes // _ALIGN) * _ALIGN
        copy_out = not all(small for *_, small in entries) or size < COPY_OUT_BYTES  # see ``_flat``
        table = [(dtype, offset, nbytes, small and copy_out) for dtype, offset, nbytes, small in entries]
        return table, chunks, max(size, _ALIGN)


class _Loading(threading.local):
    """The segment of the message being unpickled in this thread, and its blocks as flat views; for a
    message with items pickled one by one, or routed ones, where they are (see ``_routing``)."""

    def __init__(self) -> None:
        self.storage: torch.UntypedStorage | None = None
        self.table: list[tuple[Any, int, int, bool]] = []
        self.flat: dict[int, Any] = {}
        self.own: Any = None  # lazily: the Source of the message's own segment; else its (storage, table, flat)
        self.refs: list[Any] = []  # per routed segment: a Source (lazily), or (storage, table, flat)
        self.lazy = False


_loading = _Loading()
_strides: dict[tuple[int, ...], tuple[int, ...]] = {}


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides = _strides.get(shape)
    if strides is None:
        out, step = [], 1
        for size in reversed(shape):
            out.append(step)
            step *= max(size, 1)
        strides = _strides[shape] = tuple(reversed(out))
    return strides


def _flat(index: int) -> Any:
    """Block ``index`` of the segment as a flat tensor or array of its dtype.

    A block of small tensors (gathered, or a run) in a message that also carries large ones is
    copied out of the segment, once: a tensor the receiver keeps (a batch's labels) then keeps
    only that copy alive, not the whole segment with the large ones (its images). So are those
    of a message of small tensors only, under ``COPY_OUT_BYTES``: the segment is then unmapped
    at once, and outputs kept by the thousand hold no file descriptor each."""
    flat = _loading.flat.get(index)
    if flat is None:
        if _loading.storage is None:
            raise pickle.UnpicklingError("a torchqueue shared-memory reference outside of its message")
        dtype, offset, nbytes, private = _loading.table[index]
        if private:  # copied out below
            raw = torch.empty(0, dtype=torch.uint8).set_(_loading.storage, offset, (nbytes,), (1,))
        else:
            raw = torch.empty(0, dtype=torch.uint8).set_(_block(_loading.storage, offset, nbytes))
        flat = raw.view(dtype) if isinstance(dtype, torch.dtype) else raw.numpy().view(np.dtype(dtype))
        if private:
            flat = flat.clone()
        _loading.flat[index] = flat
    return flat


def _rebuild_tensor(
    index: int, start: int, shape: tuple[int, ...], requires_grad: bool, strides: tuple[int, ...] | None = None
) -> torch.Tensor:
    """A tensor at element ``start`` of block ``index``: row-major, or with the ``strides`` of a tensor
    that was dense in another order (its values came in memory order, ``_memory_order``)."""
    flat = _flat(index)
    tensor = flat.as_strided(shape, strides or _contiguous_strides(shape), flat.storage_offset() + start)
    return tensor.requires_grad_() if requires_grad else tensor


def _rebuild_run(
    index: int, count: int, shape: tuple[int, ...], as_tuple: bool
) -> list[torch.Tensor] | tuple[torch.Tensor, ...]:
    """The tensors of a run, split from block ``index`` in one call.

    ``unsafe_split``, not ``unbind``: its parts are not multi-output views, which autograd forbids
    to modify in place with a gradient-requiring operand. Each part has the shape and strides that
    ``_rebuild_tensor`` gives."""
    tensors = _flat(index).view(count * shape[0], *shape[1:]).unsafe_split(shape[0])
    return tuple(tensors) if as_tuple else list(tensors)


def _items(blobs: list[bytes]) -> list[Any]:
    """The items of a list pickled one by one: routed (``EncodedItem``) by a stream step that reads the
    message lazily, else unpickled here."""
    if _loading.lazy:
        return [EncodedItem(_loading.own, blob) for blob in blobs]
    return [_decode(_loading.own, blob) for blob in blobs]


def _rebuild_routed(index: int, blob: bytes) -> Any:
    """An item a stream step routed: routed on (lazily), or unpickled from its segment (``index``; -1: none)."""
    where = _loading.refs[index] if index >= 0 else None
    if _loading.lazy:
        return EncodedItem(where, blob)
    return _decode(where, blob)


def _decode(where: Any, blob: bytes) -> Any:
    """Unpickle ``blob`` against a mapped segment ``(storage, table, flat)`` (or none)."""
    saved = _loading.storage, _loading.table, _loading.flat, _loading.lazy
    _loading.storage, _loading.table, _loading.flat = where if where is not None else (None, [], {})
    _loading.lazy = False
    try:
        return pickle.loads(blob)
    finally:
        _loading.storage, _loading.table, _loading.flat, _loading.lazy = saved


class _Items:
    """Stands for a list whose items are pickled one by one (``dumps(..., items=True)``)."""

    __slots__ = ("blobs",)

    def __init__(self, blobs: list[bytes]) -> None:
        self.blobs = blobs

    def __reduce__(self) -> tuple[Any, tuple[list[bytes]]]:
        return _items, (self.blobs,)


def _rebuild_array(index: int, shape: tuple[int, ...]) -> np.ndarray:
    return _flat(index).reshape(shape)


def _rebuild_fortran_array(index: int, shape: tuple[int, ...]) -> np.ndarray:
    """An array that was in Fortran order, in it again (its values came in memory order)."""
    return _flat(index).reshape(shape[::-1]).T


def _rebuild_passed_tensor(
    storage: torch.UntypedStorage,
    dtype: torch.dtype,
    offset: int,
    shape: tuple[int, ...],
    strides: tuple[int, ...],
    requires_grad: bool,
) -> torch.Tensor:
    """A tensor passed on (``_Passed``): a view of the segment (of its own bytes there, ``_block``), with
    the layout it had."""
    size = dtype.itemsize
    extent = 0 if 0 in shape else 1 + sum((n - 1) * stride for n, stride in zip(shape, strides))
    tensor = torch.empty(0, dtype=dtype).set_(_block(storage, offset * size, extent * size), 0, shape, strides)
    return tensor.requires_grad_() if requires_grad else tensor


def _rebuild_passed_array(storage: torch.UntypedStorage, offset: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """An array passed on (``_Passed``): a view of the segment at byte ``offset``."""
    count = int(np.prod(shape, dtype=np.int64))
    raw = torch.empty(0, dtype=torch.uint8).set_(_block(storage, offset, count * np.dtype(dtype).itemsize))
    return raw.numpy().view(np.dtype(dtype)).reshape(shape)


def dumps(obj: Any, segment_dir: str | None, spare: int = 0, items: bool = False) -> bytes:
    """Serialise ``obj``; tensors and large arrays go to a new segment in ``segment_dir`` (``spare``: see
    ``_segments.write``). ``items``: an envelope whose payload is a list or tuple goes with its items
    pickled one by one, for a stream step that routes them (``_routing``)."""
    buffer = io.BytesIO()
    if segment_dir is None:
        pickler = _forking_pickler(buffer)
        pickler.dump(obj)
        return b"P" + buffer.getvalue()
    if items and type(obj) is Envelope and type(obj.payload) in (list, tuple):
        return _dumps_items(obj, segment_dir, spare)
    pickler = _Pickler(buffer, segment_dir)
    try:
        pickler.dump(pickler.with_runs(obj))
    except _RunElsewhere:
        buffer = io.BytesIO()
        pickler = _Pickler(buffer, segment_dir)
        pickler.dump(obj)
    body = buffer.getvalue()
    if pickler.refs:
        return _with_meta(pickler, segment_dir, spare, body, items_only=False)
    if not pickler.blocks:
        return b"P" + body
    table, chunks, size = pickler.layout()
    try:
        name = _segments.write(segment_dir, chunks, size, spare).encode()  # type: ignore[arg-type]
    except BaseException:
        pickler.discard()
        raise
    encoded_table = pickle.dumps(table, pickle.HIGHEST_PROTOCOL)
    return b"S" + _SEGMENT.pack(len(name), size, len(encoded_table)) + name + encoded_table + body


def _dumps_items(envelope: Envelope, segment_dir: str, spare: int) -> bytes:
    """An envelope whose payload's items are pickled one by one, their tensors in one segment."""
    first: _Pickler | None = None
    blobs = []
    for item in envelope.payload:
        buffer = io.BytesIO()
        if first is None:
            pickler = first = _Pickler(buffer, segment_dir)
            first.passes_on = False
        else:
            pickler = first.sharing(buffer)
        pickler.dump(item)
        blobs.append(buffer.getvalue())
    body = pickle.dumps(envelope._replace(payload=_Items(blobs)), pickle.HIGHEST_PROTOCOL)
    return _with_meta(first, segment_dir, spare, body, items_only=True)


def _with_meta(pickler: _Pickler | None, segment_dir: str, spare: int, body: bytes, items_only: bool) -> bytes:
    """A message with its own segment (if any blocks) and the routed segments it refers to (linked for it)."""
    own = None
    if pickler is not None and pickler.blocks:
        table, chunks, size = pickler.layout()
        own = (_segments.write(segment_dir, chunks, size, spare), size, table)
    refs = [(source.link(), source.size, source.table) for source in (pickler.refs if pickler else [])]
    meta = pickle.dumps((own, refs, items_only), pickle.HIGHEST_PROTOCOL)
    return b"M" + _META.pack(len(meta)) + meta + body


def message_nbytes(data: bytes | bytearray) -> int:
    """Size of a message from ``dumps``, its shared-memory segment included (routed items: where they are)."""
    if data[:1] == b"S":
        return len(data) + _SEGMENT.unpack_from(data, 1)[1]
    if data[:1] == b"M":
        (length,) = _META.unpack_from(data, 1)
        own, refs, _ = pickle.loads(memoryview(data)[1 + _META.size : 1 + _META.size + length])
        return len(data) + sum(size for _, size, _ in ([own] if own else []) + refs)
    return len(data)


def pickle_part(data: bytes | bytearray) -> memoryview:
    """The pickle of a message from ``dumps`` (without its segment's name and table)."""
    view = memoryview(data)
    if view[:1] == b"P":
        return view[1:]
    if view[:1] == b"M":
        return view[1 + _META.size + _META.unpack_from(view, 1)[0] :]
    name_length, _, table_length = _SEGMENT.unpack_from(view, 1)
    return view[1 + _SEGMENT.size + name_length + table_length :]


def loads(data: bytes | bytearray | memoryview, lazy: bool = False) -> Any:
    """The object ``dumps`` serialised (maps and unlinks its segment, if any). ``lazy``: a stream step
    that routes items reads items pickled one by one, and routed ones, as ``EncodedItem``s, without
    mapping their segments (``_routing``)."""
    view = memoryview(data)
    if view[:1] == b"P":
        return pickle.loads(view[1:])
    if view[:1] == b"M":
        return _loads_meta(view, lazy)
    name_length, size, table_length = _SEGMENT.unpack_from(view, 1)
    start = 1 + _SEGMENT.size
    name = bytes(view[start : start + name_length]).decode()
    start += name_length
    table = pickle.loads(view[start : start + table_length])
    _loading.storage, _loading.table, _loading.flat = _segments.map_segment(name, size), table, {}
    try:
        return pickle.loads(view[start + table_length :])
    finally:
        _loading.storage, _loading.table, _loading.flat = None, [], {}


def _loads_meta(view: memoryview, lazy: bool) -> Any:
    """A message with items pickled one by one or routed items (``b"M"``, see ``_with_meta``)."""
    (length,) = _META.unpack_from(view, 1)
    start = 1 + _META.size
    own, refs, items_only = pickle.loads(view[start : start + length])
    mapped = None
    if own is not None and not (lazy and items_only):  # the message's own tensors are read here
        name, size, table = own
        mapped = (_segments.map_segment(name, size), table, {})
    if lazy:
        reuse = _segments.REUSE_MIN_BYTES
        _loading.own = Source(own[0], own[1], own[2], False, reuse) if own is not None and items_only else None
        _loading.refs = [Source(path, size, table, True, reuse) for path, size, table in refs]
    else:
        _loading.own = mapped
        _loading.refs = [(_segments.map_segment(path, size, link=True), table, {}) for path, size, table in refs]
    _loading.lazy = lazy
    _loading.storage, _loading.table, _loading.flat = mapped if mapped is not None else (None, [], {})
    try:
        return pickle.loads(view[start + length :])
    finally:
        _loading.storage, _loading.table, _loading.flat = None, [], {}
        _loading.own, _loading.refs, _loading.lazy = None, [], False
