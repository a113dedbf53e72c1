"""The wire format: what goes through shared memory, what is copied, what is passed on as it is."""

from __future__ import annotations

import dataclasses
import io
import multiprocessing
import os
import pickle
import resource
from typing import NamedTuple

import numpy as np
import pytest
import torch
from conftest import in_a_segment, segment_spans

import torchqueue as tq
from torchqueue import _segments, _serialize
from torchqueue._messages import Bundle, Envelope

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_leaks")]

MIB = 1 << 20


@pytest.fixture
def segment_dir():
    directory = _serialize.make_segment_dir()
    yield directory
    _segments.remove_dir(directory)


def roundtrip(obj, segment_dir):
    data = _serialize.dumps(obj, segment_dir)
    return data, _serialize.loads(data)


def test_small_and_large_values_round_trip_bit_identical(segment_dir):
    value = {
        "small": torch.arange(10),
        "big": torch.randn(512, 1024, generator=torch.Generator().manual_seed(0)),
        "array": np.arange(100_000, dtype=np.int16),
        "tiny array": np.arange(5),
        "strided": torch.arange(40.0).reshape(8, 5)[:, 1::2],
        "bool": torch.tensor([True, False]),
        "text": "kept",
    }
    data, got = roundtrip(value, segment_dir)
    assert data[:1] == b"S"
    for key in ("small", "big", "strided", "bool"):
        assert torch.equal(got[key], value[key]), key
    assert in_a_segment(got["big"])  # a view of the segment
    assert not any(in_a_segment(got[key]) for key in ("small", "strided", "bool"))  # copied out: see below
    assert np.array_equal(got["array"], value["array"]) and got["array"].dtype == np.int16
    assert np.array_equal(got["tiny array"], value["tiny array"])
    assert got["text"] == "kept"


@pytest.mark.parametrize("size", [4, 64], ids=["small", "large"])
def test_dense_tensors_keep_their_layout_and_views_with_gaps_arrive_compact(size, segment_dir):
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    dense = {
        "channels_last": images.contiguous(memory_format=torch.channels_last),
        "transposed": images[0, 0].t(),
        "permuted": images.permute(2, 0, 3, 1),
    }
    gaps = {"sliced": images[:, :, ::2]}
    _, got = roundtrip({**dense, **gaps, "row major": images}, segment_dir)
    for key, value in {**dense, **gaps}.items():
        assert torch.equal(got[key], value), key
    for key, value in dense.items():  # as torch's own sharing (DataLoader's workers) delivers them
        assert got[key].stride() == value.stride(), key
    assert got["channels_last"].is_contiguous(memory_format=torch.channels_last)
    for key in gaps:
        assert got[key].is_contiguous(), key


@pytest.mark.parametrize(
    "make",
    [
        lambda x: x[:1].expand(100, -1, -1),  # a broadcast first dimension
        lambda x: x[:, :1].expand(-1, 500, -1),  # a middle one
        lambda x: x[0].t()[:, :1].expand(-1, 300),  # of a transposed tensor
        lambda x: torch.tensor(7.0).expand(50, 60),  # of a scalar
    ],
    ids=["first", "middle", "transposed", "scalar"],
)
def test_an_expanded_tensor_arrives_expanded_as_small_as_it_was_sent(make, segment_dir):
    # before: made whole in transit (a 4 MB tensor expanded 100 times arrived as 400 MB of shared memory);
    # torch's own sharing (DataLoader's) keeps it a view of its storage
    value = make(torch.randn(4, 1, 4096, generator=torch.Generator().manual_seed(2)))
    _, got = roundtrip(value, segment_dir)
    assert torch.equal(got, value) and got.stride() == value.stride()
    assert got.untyped_storage().nbytes() <= value.untyped_storage().nbytes()


def test_a_large_fortran_order_array_arrives_in_fortran_order(segment_dir):
    value = np.asfortranarray(np.arange(300 * 200, dtype=np.float32).reshape(300, 200))
    _, got = roundtrip({"fortran": value, "sliced": value[::2]}, segment_dir)
    assert np.array_equal(got["fortran"], value) and got["fortran"].flags.f_contiguous
    assert np.array_equal(got["sliced"], value[::2]) and got["sliced"].flags.c_contiguous


def test_a_list_of_small_channels_last_tensors_keeps_their_layout(segment_dir):
    value = [torch.randn(1, 3, 4, 4).contiguous(memory_format=torch.channels_last) for _ in range(20)]
    _, got = roundtrip(value, segment_dir)
    assert all(torch.equal(a, b) and a.stride() == b.stride() for a, b in zip(got, value, strict=True))


def test_small_tensors_kept_from_a_message_do_not_keep_its_large_ones_in_shared_memory(segment_dir):
    images = torch.randn(64, 3, 32, 32)  # 768 KiB
    labels, ids = torch.arange(64), torch.arange(64, dtype=torch.int32)
    runs = [torch.full((8,), float(i)) for i in range(20)]
    _, (got_images, got_labels, got_ids, got_runs) = roundtrip((images, labels, ids, runs), segment_dir)
    segment = got_images.untyped_storage()
    assert in_a_segment(got_images) and segment.nbytes() >= images.nbytes
    for small, sent in [(got_labels, labels), (got_ids, ids), (got_runs[3], runs[3])]:
        assert torch.equal(small, sent) and not in_a_segment(small)
        assert small.untyped_storage().data_ptr() != segment.data_ptr()
        assert small.untyped_storage().nbytes() < 4096  # only its own block: not the segment
    path = io.BytesIO()
    torch.save({"images": got_images, "labels": got_labels}, path)  # one storage per dtype, as torch.save wants
    saved = torch.load(io.BytesIO(path.getvalue()))
    assert torch.equal(saved["images"], images) and torch.equal(saved["labels"], labels)


def test_a_small_message_of_small_tensors_arrives_copied_out_and_a_large_one_in_its_segment(segment_dir):
    small = {"labels": torch.arange(64), "runs": [torch.full((8,), float(i)) for i in range(20)]}
    _, got = roundtrip(small, segment_dir)  # unmapped at once: kept by the thousand, it holds no descriptor
    assert not in_a_segment(got["labels"]) and not any(in_a_segment(t) for t in got["runs"])
    assert torch.equal(got["labels"], small["labels"]) and torch.equal(got["runs"][7], small["runs"][7])
    many = [torch.full((64,), float(i)) for i in range(5000)]  # 1.2 MiB: no second copy of so much
    _, got = roundtrip(many, segment_dir)
    spans = segment_spans()
    assert all(in_a_segment(t, spans) for t in got) and torch.equal(got[4999], many[4999])


def test_thousands_of_small_outputs_can_be_kept_under_a_low_limit_of_open_files():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(512, hard), hard))
    try:
        with tq.Sequence(tq.ProcessStep(torch.ones, 2)) as seq:  # a tensor of x ones per element
            kept = list(seq([4] * 2000))  # caching a small data set
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(kept) == 2000 and all(torch.equal(t, torch.ones(4)) for t in kept)


def test_a_received_large_array_is_passed_on_without_a_copy(segment_dir):
    array = np.random.default_rng(0).standard_normal((512, 1024)).astype(np.float32)  # 2 MiB
    first, received = roundtrip(array, segment_dir)
    assert _serialize.message_nbytes(first) > array.nbytes  # the first hop copies it into a segment
    again, passed = roundtrip({"whole": received, "rows": received[100:400]}, segment_dir)
    assert again[:1] == b"P" and _serialize.message_nbytes(again) < 4096  # by reference: no bytes copied
    assert np.array_equal(passed["whole"], array) and np.array_equal(passed["rows"], array[100:400])


def _saved(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def test_received_tensors_of_two_dtypes_save_with_torch_save_each_its_own_bytes(segment_dir):
    # before: "Cannot save multiple tensors or storages that view the same data as different types" (the
    # tensors of a message viewed one storage, its segment), and torch.save(x) wrote the whole segment
    value = {"x": torch.randn(512, 1024), "edge_index": torch.arange(MIB // 4).reshape(2, -1)}
    _, got = roundtrip(value, segment_dir)
    again, passed = roundtrip(got, segment_dir)
    assert _serialize.message_nbytes(again) < 4096  # passed on by reference, as before
    for received in (got, passed):
        assert all(in_a_segment(t) for t in received.values())  # views of the segment, not copies
        loaded = torch.load(io.BytesIO(_saved(received)))
        assert all(torch.equal(loaded[key], value[key]) for key in value)
        assert len(_saved(received["x"])) < value["x"].nbytes + 4096  # its bytes, not the segment's
        assert len(_saved(received["x"][:10])) < value["x"].nbytes + 4096


def _pass_on(data: bytes, segment_dir: str, conn) -> None:
    conn.send_bytes(_serialize.dumps(_serialize.loads(data), segment_dir))  # received, then sent on as it is


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_what_a_step_passes_on_can_be_read_after_that_step_stopped(context, segment_dir):
    """A received array or tensor passed on refers to its segment, not to its sender: the next
    receiver reads it even after the sender's process is gone (a pipeline closing). torch's own
    sharing, used before, served a file descriptor from the sender's process and failed then."""
    value = {"array": np.arange(MIB // 4, dtype=np.float32), "tensor": torch.arange(MIB // 8, dtype=torch.float64).t()}
    ctx = multiprocessing.get_context(context)
    receiver, sender = ctx.Pipe(duplex=False)
    step = ctx.Process(target=_pass_on, args=(_serialize.dumps(value, segment_dir), segment_dir, sender))
    step.start()
    sender.close()
    assert receiver.poll(60), "the step sent nothing"
    passed = receiver.recv_bytes()
    step.join(60)
    assert step.exitcode == 0
    got = _serialize.loads(passed)
    assert np.array_equal(got["array"], value["array"]) and torch.equal(got["tensor"], value["tensor"])
    assert b"resource_sharer" not in passed and _serialize.message_nbytes(passed) < 4096  # by reference


def test_a_segment_passed_on_is_not_reused_before_its_next_receiver_maps_it(segment_dir):
    """Between the step that passes a segment on and the next receiver, nobody maps it: its sender's
    lease would be granted. Its second name keeps the sender from writing a new message into it."""
    array = np.arange(MIB // 4, dtype=np.float32)
    _, received = roundtrip(array, segment_dir)
    passed = _serialize.dumps(received, segment_dir)
    del received  # the passing step lets go of it; the next receiver has not mapped it yet
    _serialize.dumps(np.ones(MIB // 4, dtype=np.float32), segment_dir)  # the first sender's next message
    assert np.array_equal(_serialize.loads(passed), array)


def test_arrays_that_do_not_view_shared_memory_are_copied(segment_dir):
    private = np.ones((512, 1024), dtype=np.float32)
    data, _ = roundtrip(private, segment_dir)
    assert data[:1] == b"S"
    _, received = roundtrip(private, segment_dir)
    data, got = roundtrip(received[:, ::2], segment_dir)  # not contiguous: sent compact
    assert data[:1] == b"S" and np.array_equal(got, private[:, ::2])


def shm_inode(array: np.ndarray) -> int:
    """The inode of the /dev/shm file that ``array``'s memory maps (from /proc/self/maps)."""
    address = array.__array_interface__["data"][0]
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, _perms, _offset, _dev, inode, *path = line.split()
            low, high = (int(x, 16) for x in span.split("-"))
            if low <= address < high and path and path[0].startswith("/dev/shm/"):
                return int(inode)
    raise AssertionError("the array is not in a /dev/shm mapping")


def big_array(i: int) -> np.ndarray:
    return np.full((4, MIB // 16), i, dtype=np.float32)  # 1 MiB


def inode_and_array(array: np.ndarray) -> tuple[int, np.ndarray]:
    return shm_inode(array), array


def inode_of_pair(pair: tuple[int, np.ndarray]) -> tuple[int, int, np.ndarray]:
    before, array = pair
    return before, shm_inode(array), array


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_a_large_array_passes_from_step_to_step_in_the_same_shared_memory(context):
    with tq.Sequence(
        tq.ProcessStep(big_array), tq.ProcessStep(inode_and_array, 2), tq.ProcessStep(inode_of_pair), context=context
    ) as seq:
        got = list(seq(range(6)))
    for i, (before, after, array) in enumerate(got):
        assert before == after, "the array was copied into new memory between the steps"
        assert shm_inode(array) == after  # and reached the consumer in it
        assert np.array_equal(array, big_array(i))


# Runs: lists and tuples of small tensors alike travel as one block (see the module docstring).


def table(data: bytes) -> list:
    """The blocks ``(dtype, offset, bytes)`` of a message's segment."""
    name_length, _size, table_length = _serialize._SEGMENT.unpack_from(data, 1)
    start = 1 + _serialize._SEGMENT.size + name_length
    return pickle.loads(data[start : start + table_length])


def sent_as_runs(data: bytes) -> bool:
    return b"_rebuild_run" in data


def per_tensor_roundtrip(obj, segment_dir, monkeypatch):
    """What the per-tensor path gives for ``obj`` (runs turned off)."""
    with monkeypatch.context() as patch:
        patch.setattr(_serialize, "RUN_MIN_TENSORS", 1 << 60)
        return roundtrip(obj, segment_dir)


def raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().reshape(-1).view(torch.uint8)


def assert_same(got, want, path="value", spans=None):
    """``got`` is ``want`` as it arrives: same types all the way down, tensors alike to the bit."""
    assert type(got) is type(want), path
    spans = segment_spans() if spans is None else spans
    if isinstance(want, torch.Tensor) and want.layout != torch.strided:
        assert got.layout == want.layout and torch.equal(got.to_dense(), want.to_dense()), path
    elif isinstance(want, torch.Tensor):
        assert (got.shape, got.dtype, got.stride()) == (want.shape, want.dtype, want.stride()), path
        assert got.requires_grad == want.requires_grad and in_a_segment(got, spans) == in_a_segment(want, spans), path
        assert not got.is_conj() and not got.is_neg() and not want.is_conj(), path
        assert torch.equal(raw_bytes(got), raw_bytes(want)), path
    elif dataclasses.is_dataclass(want):
        fields = [field.name for field in dataclasses.fields(want)]
        assert_same([getattr(got, f) for f in fields], [getattr(want, f) for f in fields], path, spans)
    elif isinstance(want, dict):
        assert list(got) == list(want), path
        for key in want:
            assert_same(got[key], want[key], f"{path}[{key!r}]", spans)
    elif isinstance(want, list | tuple):
        assert len(got) == len(want), path
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same(a, b, f"{path}[{i}]", spans)
    else:
        assert got == want, path


def small_tensors(count: int = 1000, shape=(64,), dtype=torch.float32) -> list[torch.Tensor]:
    return [torch.full(shape, float(i), dtype=dtype) for i in range(count)]


def test_a_list_of_small_tensors_travels_as_one_block_and_arrives_as_a_list(segment_dir, monkeypatch):
    value = small_tensors()
    data, got = roundtrip(value, segment_dir)
    assert len(table(data)) == 1 and len(data) < 1024  # one block, nothing per tensor in the pickle
    _, want = per_tensor_roundtrip(value, segment_dir, monkeypatch)
    assert_same(got, want)
    assert all(torch.equal(a, b) and not a.requires_grad for a, b in zip(got, value))


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: tuple(small_tensors(20)), id="tuple"),
        pytest.param(lambda: small_tensors(16, (2, 1, 3), torch.int16), id="3-d int16"),
        pytest.param(lambda: small_tensors(40, (8,), torch.bfloat16), id="bfloat16"),
        pytest.param(lambda: small_tensors(30, (5,), torch.bool), id="bool"),
        pytest.param(lambda: [torch.randn(4, 6)[:, ::2] for _ in range(20)], id="not contiguous"),
        pytest.param(lambda: [torch.randn(3, dtype=torch.complex64).conj() for _ in range(20)], id="conj bit"),
        pytest.param(lambda: [torch._neg_view(torch.randn(3)) for _ in range(20)], id="neg bit"),
        pytest.param(lambda: [t.detach() for t in torch.randn(20, 5, requires_grad=True)], id="detached rows"),
    ],
)
def test_runs_arrive_as_the_per_tensor_path_gives_them(make, segment_dir, monkeypatch):
    value = make()
    data, got = roundtrip(value, segment_dir)
    _, want = per_tensor_roundtrip(value, segment_dir, monkeypatch)
    assert len(table(data)) == 1 and sent_as_runs(data)
    assert_same(got, want)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: small_tensors(15), id="too few"),
        pytest.param(lambda: small_tensors(10) + small_tensors(10, dtype=torch.float64), id="mixed dtypes"),
        pytest.param(lambda: small_tensors(10) + small_tensors(10, (65,)), id="mixed shapes"),
        pytest.param(lambda: small_tensors(10) + small_tensors(1, (65,)) + small_tensors(10), id="one shape differs"),
        pytest.param(
            lambda: small_tensors(10) + small_tensors(1, dtype=torch.int32) + small_tensors(10), id="one dtype"
        ),
        pytest.param(lambda: small_tensors(20, ()), id="0-d"),
        pytest.param(lambda: small_tensors(20, (0, 3)), id="empty"),
        pytest.param(lambda: small_tensors(20, (64, 64)), id="large"),
        pytest.param(lambda: small_tensors(19) + [torch.ones(64, requires_grad=True)], id="requires grad"),
        pytest.param(lambda: small_tensors(19) + [torch.nn.Parameter(torch.ones(64), False)], id="subclass"),
        pytest.param(
            lambda: small_tensors(19) + [torch.ones(64).to_sparse()],
            id="sparse",
            marks=pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning"),  # torch's sharing
        ),
        pytest.param(lambda: small_tensors(19) + ["text"], id="not only tensors"),
        pytest.param(lambda: [torch.ones(8)] * 20, id="one tensor repeated"),
    ],
)
def test_what_is_not_a_run_takes_the_per_tensor_path(make, segment_dir, monkeypatch):
    value = make()
    data, got = roundtrip(value, segment_dir)
    reference, want = per_tensor_roundtrip(value, segment_dir, monkeypatch)
    assert not sent_as_runs(data) and table(data) == table(reference)
    assert_same(got, want)
    assert [id(t) for t in got].count(id(got[0])) == [id(t) for t in value].count(id(value[0]))  # repeats kept


class Rows(list):
    pass


class Row(tuple):
    pass


class Sample(NamedTuple):
    images: list[torch.Tensor]
    label: int


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: Rows(small_tensors(20)), id="list subclass"),
        pytest.param(lambda: Row(small_tensors(20)), id="tuple subclass"),
        pytest.param(lambda: Sample(small_tensors(20), 1), id="NamedTuple holding a list"),
    ],
)
def test_list_and_tuple_subclasses_are_left_to_the_per_tensor_path(make, segment_dir, monkeypatch):
    value = make()
    data, got = roundtrip(value, segment_dir)
    reference, want = per_tensor_roundtrip(value, segment_dir, monkeypatch)
    assert not sent_as_runs(data) and len(data) == len(reference) and type(got) is type(value)
    assert_same(got, want)


def test_runs_are_found_in_envelopes_bundles_dicts_and_short_tuples(segment_dir, monkeypatch):
    runs = [small_tensors(100) for _ in range(6)]
    values = [
        Envelope(0, 1, 0, 1, runs[0]),
        Envelope(0, 2, 0, 1, {"images": runs[1], "label": 3}),
        Envelope(0, 3, 0, 1, (runs[2], torch.tensor(7))),
        Envelope(0, 4, 0, 1, Bundle([(runs[3], 1), (runs[4], 2), (runs[5], 3)])),
    ]
    for value in values:
        data, got = roundtrip(value, segment_dir)
        _, want = per_tensor_roundtrip(value, segment_dir, monkeypatch)
        assert sent_as_runs(data) and len(data) < 1024  # nothing per tensor
        assert_same(got, want)
    assert isinstance(got.payload, Bundle) and len(table(data)) == 3


def test_runs_deeper_than_one_level_into_the_value_are_sent_per_tensor(segment_dir, monkeypatch):
    value = {"nested": {"images": small_tensors(100)}}
    data, got = roundtrip(value, segment_dir)
    reference, want = per_tensor_roundtrip(value, segment_dir, monkeypatch)
    assert not sent_as_runs(data) and len(data) == len(reference)
    assert_same(got, want)


def test_a_bundle_whose_first_element_has_no_run_is_sent_per_tensor(segment_dir):
    value = Envelope(0, 0, 0, 1, Bundle([1, small_tensors(100)]))
    data, got = roundtrip(value, segment_dir)
    assert not sent_as_runs(data) and got.payload.items[1][5].equal(torch.full((64,), 5.0))


def test_objects_seen_twice_arrive_as_one_object(segment_dir):
    run = small_tensors(50)
    data, got = roundtrip(Envelope(0, 0, 0, 1, Bundle([run, {"again": run}, (run,)])), segment_dir)
    items = got.payload.items
    assert sent_as_runs(data) and len(table(data)) == 1  # one run, sent once
    assert items[0] is items[1]["again"] is items[2][0]
    # A run's tensors seen elsewhere too (one of them, or the list where runs are not looked for): all per tensor.
    data, got = roundtrip((run, run[7]), segment_dir)
    assert not sent_as_runs(data) and got[1] is got[0][7]
    data, got = roundtrip((run, {"deeper": [run]}), segment_dir)
    assert not sent_as_runs(data) and got[1]["deeper"][0] is got[0]
    data, got = roundtrip([small_tensors(20), [run], run], segment_dir)
    assert not sent_as_runs(data) and got[1][0] is got[2]
    data, got = roundtrip([run, Sample(run, 0)], segment_dir)
    assert not sent_as_runs(data) and got[1].images is got[0]


def test_received_run_tensors_can_be_modified_in_place_with_a_gradient(segment_dir):
    _, got = roundtrip(small_tensors(20), segment_dir)
    weight = torch.ones(64, requires_grad=True)
    got[3].add_(weight)  # unbind's views would refuse this (outputs of a multi-view function)
    got[3].sum().backward()
    assert torch.equal(weight.grad, torch.ones(64)) and torch.equal(got[4], torch.full((64,), 4.0))


def test_in_inference_mode_a_run_with_a_gradient_keeps_it(segment_dir):
    value = small_tensors(19) + [torch.ones(64, requires_grad=True)]
    with torch.inference_mode():
        data, got = roundtrip(value, segment_dir)
    assert got[-1].requires_grad and not got[0].requires_grad


def double(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t * 2 for t in tensors]


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_runs_pass_through_process_steps(context):
    items = [small_tensors(200, (4, 4)) for _ in range(5)]
    with tq.Sequence(tq.ProcessStep(double, 2), tq.Queue(4), context=context) as seq:
        got = list(seq(items))
    for element, sent in zip(got, items):
        assert type(element) is list and len(element) == 200
        assert all(torch.equal(a, b * 2) for a, b in zip(element, sent))


class _Registered:
    """Pickled only through a reducer registered with ``ForkingPickler`` (as torch registers its own)."""

    def __init__(self, value):
        self.value = value

    def __reduce__(self):
        raise TypeError("only the registered reducer may pickle this")


def _rebuild_registered(value):
    return _Registered(("rebuilt", value))


def _reduce_registered(obj):
    return _rebuild_registered, (obj.value,)


@pytest.mark.parametrize("shared", [False, True])
def test_reducers_registered_with_forking_pickler_apply_also_when_registered_after_first_use(shared, segment_dir):
    from multiprocessing.reduction import ForkingPickler

    directory = segment_dir if shared else None
    roundtrip([torch.ones(3)], directory)  # the shared reducer table exists now
    ForkingPickler.register(_Registered, _reduce_registered)
    try:
        _, got = roundtrip({"x": _Registered(7), "t": torch.ones(3)}, directory)
    finally:
        del ForkingPickler._extra_reducers[_Registered]
    assert got["x"].value == ("rebuilt", 7)
    with pytest.raises(TypeError, match="only the registered reducer"):
        _serialize.dumps(_Registered(7), directory)  # unregistered again: the table followed


def test_running_out_of_file_descriptors_says_why_and_what_to_do():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    kept = []
    with tq.Sequence(tq.ProcessStep(torch.ones, 2), context="fork") as seq:
        outputs = seq([1 << 18] * 200)  # 1 MiB each: every kept one holds its segment's descriptor
        kept.append(next(outputs))  # the workers are running, with the limit they started with
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 30, hard))
        try:
            with pytest.raises(OSError, match="out of file descriptors.*clone.*ulimit"):
                kept.extend(outputs)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert 1 < len(kept) < 200


def test_a_class_of_your_script_travels_with_its_definition_once_per_pipeline(segment_dir):
    # a worker of the fork server has no __main__ of yours: the class goes by name and definition. Before,
    # the definition went with every message (3.6 KB for a namedtuple; 1.6 MB for a class whose method
    # refers to a large table of the script's, which cloudpickle takes with it)
    table = np.arange(200_000)

    class Fat(NamedTuple):
        i: int

        def lookup(self):
            return int(table[self.i])

    Fat.__module__, Fat.__qualname__ = "__main__", "Fat"  # as your script's class (pytest's __main__ lacks it)
    sizes, got = [], []
    for i in range(3):
        data, value = roundtrip(Fat(i), segment_dir)
        sizes.append(len(data))
        got.append(value)
    assert max(sizes) < 1000
    assert [value.lookup() for value in got] == [0, 1, 2] and [value.i for value in got] == [0, 1, 2]
    assert len([name for name in os.listdir(segment_dir) if name.startswith("class-")]) == 1


# -- torch_geometric's Data (``_pyg``) -------------------------------------------------------------


def _graph():
    from torch_geometric.data import Data

    x = torch.arange(12, dtype=torch.float32).reshape(4, 3).t().contiguous().t()  # column-major, as numpy makes
    data = Data(x=x, edge_index=torch.tensor([[0, 1, 2], [1, 2, 3]]), y=torch.tensor([1.5]))
    data.name, data.count, data.weights, data.none = "event 7", 3, np.arange(5.0), None
    return data


def _assert_same_graph(got, sent):
    from torch_geometric.data import Data

    assert type(got) is Data and got.keys() == sent.keys()
    for key in sent.keys():
        value, expected = got[key], sent[key]
        if isinstance(expected, torch.Tensor):
            assert (
                torch.equal(value, expected) and value.dtype == expected.dtype and value.stride() == expected.stride()
            )
        elif isinstance(expected, np.ndarray):
            assert np.array_equal(value, expected)
        else:
            assert value == expected
    assert got._store._parent() is got  # the storage knows its Data, as after unpickling
    assert got.num_nodes == 4 and got.num_edges == 3 and got.is_directed()


@pytest.mark.parametrize("items", [False, True])
def test_a_plain_data_goes_as_its_attributes_and_arrives_as_unpickling_makes_it(items, segment_dir):
    sent = _graph()
    data = _serialize.dumps(Envelope(0, 0, 0, 1, [sent, sent.clone()]), segment_dir, items=items)
    # neither its storage's class nor Data's attribute classes are in the pickle: only the rebuild
    assert b"GlobalStorage" not in data and b"DataEdgeAttr" not in data
    for got in _serialize.loads(data).payload:
        _assert_same_graph(got, sent)
        again = pickle.loads(pickle.dumps(got))  # a received graph pickles as any Data does
        _assert_same_graph(again, sent)
        got.z = torch.ones(4)  # and takes new attributes into its storage
        assert "z" in got.keys() and got._store["z"] is got.z


def test_subclasses_batches_and_data_with_attributes_of_its_own_are_pickled_as_before(segment_dir):
    from torch_geometric.data import Batch, HeteroData

    batch = Batch.from_data_list([_graph(), _graph()])
    hetero = HeteroData()
    hetero["event"].x = torch.ones(2, 2)
    odd = _graph()
    odd.__dict__["extra"] = 1  # set on the object, past Data's __setattr__
    for sent, storage in ((batch, b"GlobalStorage"), (hetero, b"NodeStorage"), (odd, b"GlobalStorage")):
        data, got = roundtrip(sent, segment_dir)
        assert type(got) is type(sent) and storage in data  # pickled as pickle pickles them
    assert torch.equal(got.x, odd.x) and got.__dict__["extra"] == 1
    data, got = roundtrip(batch, segment_dir)
    assert got.num_graphs == 2 and torch.equal(got.get_example(1).x, batch.get_example(1).x)


def _large_graph(i: int):
    from torch_geometric.data import Data

    return Data(x=torch.full((20_000, 4), float(i)), edge_index=torch.arange(160_000).reshape(2, -1) + i)


@pytest.mark.timeout(60)
def test_a_batch_of_graphs_from_a_pipeline_saves_with_torch_save():
    # before: every received Batch of large graphs (float x, int64 edge_index and batch) failed to save
    from torch_geometric.data import Batch

    steps = (tq.ProcessStep(_large_graph, 2), tq.RepackStep(2), tq.ProcessStep(Batch.from_data_list))
    with tq.Sequence(*steps) as seq:
        batches = list(seq(range(4)))
    for number, batch in enumerate(batches):
        want = Batch.from_data_list([_large_graph(2 * number), _large_graph(2 * number + 1)])
        loaded = torch.load(io.BytesIO(_saved(batch)), weights_only=False)
        assert isinstance(loaded, Batch) and loaded.num_graphs == 2
        for key in ("x", "edge_index", "batch", "ptr"):
            assert torch.equal(loaded[key], want[key]), key
