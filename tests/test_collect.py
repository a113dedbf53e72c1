"""The Collector restores order, joins pool parts and ends epochs last, whatever the arrival order."""

import random

import pytest

from torchqueue._collect import NOTHING, Collector
from torchqueue._messages import Bundle, EndOfEpoch, Envelope, Failure


def _noop():
    pass


def drain(collector, epoch):
    out = []
    while (elements := collector.take(epoch)) is not NOTHING:
        out.extend(elements)
    return out


def envelopes(epoch, values, parts=1):
    out = []
    for seq, value in enumerate(values):
        chunks = [value[i::parts] for i in range(parts)] if parts > 1 else [value]
        for part, chunk in enumerate(chunks):
            out.append(Envelope(epoch, seq, part, len(chunks), chunk))
    out.append(Envelope(epoch, len(values), 0, 1, EndOfEpoch(len(values))))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_ordered_output_is_in_seq_order_with_the_end_last(seed):
    envs = envelopes(0, list(range(20))) + envelopes(1, list(range(100, 105)))
    random.Random(seed).shuffle(envs)
    collector = Collector(True, _noop)
    for env in envs:
        collector.add(env)
    assert drain(collector, 0) == list(range(20)) + [EndOfEpoch(20)]
    assert drain(collector, 1) == list(range(100, 105)) + [EndOfEpoch(5)]


def test_ordered_pop_waits_for_the_missing_position():
    collector = Collector(True, _noop)
    collector.add(Envelope(0, 1, 0, 1, "b"))
    assert collector.take(0) is NOTHING
    collector.add(Envelope(0, 0, 0, 1, "a"))
    assert [collector.take(0), collector.take(0)] == [["a"], ["b"]]


def test_a_bundle_comes_out_whole_and_gives_one_credit_per_element_back():
    credits = []
    collector = Collector(True, lambda: credits.append(1))
    collector.add(Envelope(0, 3, 0, 1, "d"))
    collector.add(Envelope(0, 0, 0, 1, Bundle(["a", "b", "c"])))
    assert collector.take(0) == ["a", "b", "c"] and len(credits) == 3
    assert collector.take(0) == ["d"] and len(credits) == 4


@pytest.mark.parametrize("seed", range(5))
def test_unordered_output_holds_the_end_until_every_element_came(seed):
    envs = envelopes(0, list(range(10)))
    random.Random(seed).shuffle(envs)
    collector = Collector(False, _noop)
    seen = []
    for env in envs:
        collector.add(env)
        seen += drain(collector, 0)
    assert sorted(seen[:-1]) == list(range(10)) and seen[-1] == EndOfEpoch(10)


@pytest.mark.parametrize("ordered", [True, False])
def test_pool_parts_are_joined_in_part_order(ordered):
    values = [[1, 2, 3, 4, 5], [6], []]
    envs = [
        Envelope(0, 0, 1, 2, [4, 5]),
        Envelope(0, 1, 0, 1, [6]),
        Envelope(0, 0, 0, 2, [1, 2, 3]),
        Envelope(0, 2, 0, 1, []),
        Envelope(0, 3, 0, 1, EndOfEpoch(3)),
    ]
    collector = Collector(ordered, _noop)
    for env in envs:
        collector.add(env)
    out = drain(collector, 0)
    assert out[-1] == EndOfEpoch(3)
    assert (out[:-1] if ordered else sorted(out[:-1])) == (values if ordered else sorted(values))


def test_a_failed_part_fails_the_whole_element():
    failure = Failure("s", "ValueError", "bad", "tb", 1, None)
    collector = Collector(True, _noop)
    collector.add(Envelope(0, 0, 0, 2, [1]))
    collector.add(Envelope(0, 0, 1, 2, failure))
    assert collector.take(0) == [failure]
