"""Small elements of in-memory inputs travel bundled; nothing else changes for the user."""

from __future__ import annotations

import multiprocessing
import time

import pytest
from conftest import double, fail_on_seven

import torchqueue as tq
from torchqueue._bundle import BUNDLE_BYTES, MAX_BUNDLE, SLOW_INPUT_S, SMALL_BYTES, BundlePolicy

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_leaks")]


def ramped(policy: BundlePolicy, step_s: float = 0.0, bytes_out: float = 10.0, rounds: int = 10) -> int:
    for _ in range(rounds):
        policy.observe_downstream(step_s, bytes_out)
    return policy.limit


def test_the_policy_ramps_up_for_small_cheap_elements_from_a_fast_input():
    policy = BundlePolicy()
    assert policy.limit == 1
    policy.observe_input(1e-7)
    policy.observe_message(40, 1)
    assert ramped(policy) == MAX_BUNDLE


def test_a_bundle_of_small_elements_stays_under_its_byte_bound():
    policy = BundlePolicy()
    policy.observe_input(1e-7)
    assert ramped(policy, bytes_out=2048, rounds=20) * 2048 <= BUNDLE_BYTES  # 2 KiB elements: 128 at most


@pytest.mark.parametrize(
    "setup",
    [
        lambda p: [p.observe_input(10 * SLOW_INPUT_S) for _ in range(50)],
        lambda p: [p.observe_message(10 * SMALL_BYTES, 1) for _ in range(50)],
    ],
)
def test_the_policy_does_not_bundle_slow_inputs_or_large_elements(setup):
    policy = BundlePolicy()
    setup(policy)
    assert ramped(policy) == 1


def test_the_policy_caps_a_bundle_at_about_a_millisecond_of_work_and_large_outputs_stop_it():
    policy = BundlePolicy()
    assert ramped(policy, step_s=1e-4) == 10
    assert ramped(policy, bytes_out=10 * SMALL_BYTES) == 1


@pytest.mark.parametrize("ordered", [True, False])
def test_a_list_of_small_elements_is_bundled_and_comes_out_as_without_bundles(ordered):
    data = list(range(20_000))
    with tq.Sequence(tq.ProcessStep(double, 2), tq.ProcessStep(double, 2), tq.Queue(512), ordered=ordered) as seq:
        out = list(seq(data))
        stats = seq.stats()
    assert out == [4 * x for x in data] if ordered else sorted(out) == [4 * x for x in data]
    assert stats["double"].elements_in == 20_000
    assert stats["double"].messages_in < 20_000 / 16  # bundled
    assert stats["double#2"].messages_in == stats["double"].messages_in  # bundles pass map stages whole


_calls = multiprocessing.get_context("fork").RawValue("q", 0)


def counted(x):
    _calls.value += 1  # one worker: no race
    return x


@pytest.mark.parametrize("capacity", [1, 8])
def test_capacities_count_elements_even_when_small_elements_travel_bundled(capacity):
    _calls.value = 0
    with tq.Sequence(tq.ProcessStep(counted, 1), tq.Queue(capacity), context="fork") as seq:
        outputs = seq(list(range(100_000)))
        taken = [next(outputs) for _ in range(3000)]
        credits = capacity + 1 + 1  # the queue, the worker, the capacity-1 queue before it
        bound = credits + credits // 2  # and the rest of the bundle this loop is reading
        deadline = time.monotonic() + 0.5  # watching a bound that holds at every instant (not waiting for it)
        while time.monotonic() < deadline:
            assert _calls.value - len(taken) <= bound
        stats = seq.stats()
    assert taken == list(range(3000))
    assert stats["counted"].messages_in < stats["counted"].elements_in or capacity == 1


def test_a_generator_is_never_bundled():
    with tq.Sequence(tq.ProcessStep(double, 2)) as seq:
        out = list(seq(x for x in range(500)))
        stats = seq.stats()
    assert out == [2 * x for x in range(500)]
    assert stats["double"].messages_in == 500  # one message per element (the end of the epoch is not counted)


def test_an_error_inside_a_bundle_is_raised_at_its_place():
    got = []
    with tq.Sequence(tq.ProcessStep(fail_on_seven, 2)) as seq:
        with pytest.raises(ValueError, match="seven"):
            for value in seq(list(range(100, 5000)) + [7] + list(range(1000))):
                got.append(value)
    assert got == list(range(100, 5000))


def test_skipped_elements_inside_bundles_are_dropped_and_counted():
    data = [7 if i % 100 == 0 else i for i in range(1, 5001)]
    with tq.Sequence(tq.ProcessStep(fail_on_seven, 2, name="f"), on_error="skip") as seq:
        with pytest.warns(RuntimeWarning, match="'f'"):
            out = list(seq(data))
        assert seq.stats()["f"].skipped == data.count(7)
    assert out == [x for x in data if x != 7]


def describe(x):
    return f"value {x!r}"


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_an_element_that_failed_in_a_bundle_never_reaches_the_next_steps_function(on_error):
    data = list(range(2000))
    with tq.Sequence(
        tq.ProcessStep(fail_on_seven, 1, name="f"), tq.ProcessStep(describe, 2, name="d"), on_error=on_error
    ) as seq:
        if on_error == "raise":
            with pytest.raises(ValueError, match="seven"):  # the step's own error, not the next step's TypeError
                list(seq(data))
            return
        with pytest.warns(RuntimeWarning, match="'f'"):
            out = list(seq(data))
        stats = seq.stats()
    assert out == [f"value {x!r}" for x in data if x != 7]
    assert stats["f"].skipped == 1 and stats["d"].skipped == 0 and stats["d"].elements_in == len(data) - 1


def test_bundles_feed_stream_steps_in_order():
    data = [[i, i + 1] for i in range(0, 4000, 2)]
    with tq.Sequence(tq.UnpackStep(), tq.RepackStep(3)) as seq:
        out = list(seq(data))
    flat = list(range(4000))
    assert out == [flat[i : i + 3] for i in range(0, 4000, 3)]


def test_an_abandoned_bundled_epoch_is_cancelled():
    with tq.Sequence(tq.ProcessStep(double, 2)) as seq:
        first = seq(list(range(200_000)))
        assert [next(first) for _ in range(10)] == [2 * x for x in range(10)]
        assert list(seq([1, 2, 3])) == [2, 4, 6]
