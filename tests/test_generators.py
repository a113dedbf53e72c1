"""Pack / Unpack / Repack as pure generators, before any process is involved."""

import torch
from torch_geometric.data import Data

from torchqueue._generators import is_single_item, pack, repack, unpack


def test_pack_groups_consecutive_elements_and_keeps_a_short_tail():
    assert list(pack(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(pack([], 3)) == []
    assert list(pack(range(6), 3)) == [[0, 1, 2], [3, 4, 5]]


def test_unpack_flattens_one_level():
    assert list(unpack([[1, 2], [], (3,), range(4, 6)])) == [1, 2, 3, 4, 5]
    assert list(unpack([[[1]], [[2, 3]]])) == [[1], [2, 3]]


def test_repack_crosses_element_boundaries_in_order():
    assert list(repack([[1, 2], [3, 4, 5], [6]], 4)) == [[1, 2, 3, 4], [5, 6]]
    assert list(repack([[1, 2], [3, 4, 5], [6]], 3)) == [[1, 2, 3], [4, 5, 6]]
    assert list(repack([], 3)) == []
    assert list(repack([[], []], 3)) == []


def test_repack_drop_last_drops_only_the_short_tail():
    assert list(repack([[1, 2], [3, 4, 5]], 2, drop_last=True)) == [[1, 2], [3, 4]]
    assert list(repack([[1, 2], [3, 4]], 2, drop_last=True)) == [[1, 2], [3, 4]]


def test_repack_takes_non_iterables_strings_mappings_and_graphs_as_single_items():
    graph = Data(x=torch.zeros(2, 1))
    elements = [1, "ab", {"k": 1}, graph, [2, 3]]
    assert [len(b) for b in repack(elements, 2)] == [2, 2, 2]
    flat = [item for batch in repack(elements, 2) for item in batch]
    assert flat[:4] == [1, "ab", {"k": 1}, graph] and flat[4:] == [2, 3]
    assert is_single_item(graph) and is_single_item("s") and is_single_item(5)
    assert not is_single_item([1]) and not is_single_item(torch.zeros(2))
