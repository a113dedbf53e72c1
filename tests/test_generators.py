"""Pack / Unpack / Repack as pure generators, before any process is involved."""

import torch
from torch_geometric.data import Data

from torchqueue._generators import is_single_item, pack, pack_tracked, repack, repack_tracked, unpack, unpack_tracked


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


def test_tracked_generators_say_where_each_output_leaves_the_input():
    elements = [[0, 1, 2], [3, 4], [], [5, 6, 7, 8]]
    positioned = list(enumerate(elements))
    assert list(repack_tracked(positioned, 2)) == [
        ([0, 1], (0, 2)),  # two of element 0's three items used
        ([2, 3], (1, 1)),
        ([4, 5], (3, 1)),  # element 1 ended inside the list; the empty element 2 is passed over
        ([6, 7], (3, 3)),
        ([8], (3, None)),  # the rest: after the whole element 3
    ]
    assert list(unpack_tracked(positioned[:2])) == [
        (0, (0, 1)),
        (1, (0, 2)),
        (2, (0, None)),
        (3, (1, 1)),
        (4, (1, None)),
    ]
    assert list(pack_tracked([(0, "a"), (2, "b"), (3, "c")], 2)) == [(["a", "b"], (2, None)), (["c"], (3, None))]


def test_tracked_generators_leave_out_the_used_items_of_a_resumed_first_element():
    elements = list(enumerate([[0, 1, 2], [3, 4]]))
    assert list(repack_tracked(elements, 2, skip=lambda: 2)) == [([2, 3], (1, 1)), ([4], (1, None))]
    assert [item for item, _ in unpack_tracked(elements, skip=lambda: 1)] == [1, 2, 3, 4]
    generated = [(0, (i for i in range(5)))]  # not sized: the last item's cursor still counts it
    assert list(repack_tracked(generated, 5)) == [([0, 1, 2, 3, 4], (0, 5))]
