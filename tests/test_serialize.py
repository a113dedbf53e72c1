"""The wire format: what goes through shared memory, what is copied, what is passed on as it is."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import torchqueue as tq
from torchqueue import _serialize

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_leaks")]

MIB = 1 << 20


@pytest.fixture
def segment_dir():
    import shutil

    directory = _serialize.make_segment_dir()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


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
        assert torch.equal(got[key], value[key]) and got[key].is_shared(), key
    assert np.array_equal(got["array"], value["array"]) and got["array"].dtype == np.int16
    assert np.array_equal(got["tiny array"], value["tiny array"])
    assert got["text"] == "kept"


def test_a_received_large_array_is_passed_on_without_a_copy(segment_dir):
    array = np.random.default_rng(0).standard_normal((512, 1024)).astype(np.float32)  # 2 MiB
    first, received = roundtrip(array, segment_dir)
    assert _serialize.message_nbytes(first) > array.nbytes  # the first hop copies it into a segment
    again, passed = roundtrip({"whole": received, "rows": received[100:400]}, segment_dir)
    assert again[:1] == b"P" and _serialize.message_nbytes(again) < 4096  # by reference: no bytes copied
    assert np.array_equal(passed["whole"], array) and np.array_equal(passed["rows"], array[100:400])


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
