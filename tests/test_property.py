"""Random pipelines: ordered output equals the sequential reference; unordered, the same multiset."""

from __future__ import annotations

import random
import time
from collections import Counter

import pytest
from conftest import assert_no_workers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchqueue as tq
from torchqueue._generators import pack, repack, unpack
from torchqueue._origins import Resumed

pytestmark = pytest.mark.timeout(600)


def jitter(x):
    """Identity with a delay that depends on the element, so workers finish out of order."""
    time.sleep(random.random() * 0.002)
    return x


def tag(x):
    return ("t", x) if not isinstance(x, list) else [("t", v) for v in x]


def reference(kinds, epoch):
    """What running every step in order in one process gives."""
    stream = list(epoch)
    for kind, arg in kinds:
        if kind == "process":
            stream = [tag(x) for x in stream]
        elif kind == "pool":
            stream = [[tag(x) for x in element] for element in stream]
        elif kind == "pack":
            stream = list(pack(stream, arg))
        elif kind == "unpack":
            stream = list(unpack(stream))
        elif kind == "repack":
            stream = list(repack(stream, arg))
    return stream


def build(kinds, workers, capacities):
    elements = []
    for (kind, arg), n, cap in zip(kinds, workers, capacities):
        if kind == "process":
            elements.append(tq.ProcessStep(_tag_jitter, n))
        elif kind == "pool":
            elements.append(tq.PoolStep(_tag_jitter, nworkers=n))
        elif kind == "pack":
            elements.append(tq.PackStep(arg))
        elif kind == "unpack":
            elements.append(tq.UnpackStep())
        elif kind == "repack":
            elements.append(tq.RepackStep(arg))
        if cap:
            elements.append(tq.Queue(cap))
    return elements


def _tag_jitter(x):
    return tag(jitter(x))


_DEPTH = {  # how many list levels an element has after each kind of step, from how many it had
    "process": lambda depth: min(depth, 1),  # tag() tags a list's items, a list inside one whole
    "pool": lambda depth: min(depth, 2),
    "pack": lambda depth: depth + 1,
    "unpack": lambda depth: depth - 1,
    "repack": lambda depth: depth,
}


@st.composite
def pipelines(draw):
    """Step kinds chosen so that every element is a list where a step needs an iterable. The input's
    elements are lists of ints, or lists of lists of ints (so that an UnpackStep can feed a pool)."""
    kinds = []
    depth = start = draw(st.integers(1, 2))
    for _ in range(draw(st.integers(1, 4))):
        options = ["process", "pack"] + (["pool", "unpack", "repack"] if depth >= 1 else [])
        kind = draw(st.sampled_from(options))
        arg = draw(st.integers(1, 4)) if kind in ("pack", "repack") else None
        kinds.append((kind, arg))
        depth = _DEPTH[kind](depth)
    workers = [draw(st.integers(1, 3)) for _ in kinds]
    capacities = [draw(st.sampled_from([0, 1, 3])) for _ in kinds]
    element = st.lists(st.integers(0, 99), max_size=5)
    if start == 2:
        element = st.lists(element, max_size=4)
    epochs = draw(st.lists(st.lists(element, max_size=8), min_size=1, max_size=3))
    return kinds, workers, capacities, epochs


def canonical(value):
    return repr(value)


def leaves(value):
    """Every non-list value inside ``value`` (unordered packing regroups them, never changes them), with the
    tags put on it: a tagged list (a step's call on an item that is a list, after an unordered PackStep
    grouped it as the elements came) counts as its leaves, each tagged."""
    if isinstance(value, list):
        return [leaf for item in value for leaf in leaves(item)]
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "t" and isinstance(value[1], list):
        return [("t", leaf) for leaf in leaves(value[1])]
    return [value]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pipeline=pipelines(), ordered=st.booleans())
def test_random_pipelines_match_the_sequential_reference(pipeline, ordered):
    kinds, workers, capacities, epochs = pipeline
    with tq.Sequence(*build(kinds, workers, capacities), ordered=ordered, context="fork") as seq:
        for epoch in epochs:
            seq.queue_iterable(epoch)
        got = [list(seq) for _ in epochs]
    for out, epoch in zip(got, epochs):
        want = reference(kinds, epoch)
        if ordered:
            assert out == want
        else:
            assert len(out) == len(want)
            assert Counter(map(canonical, leaves(out))) == Counter(map(canonical, leaves(want)))
    assert_no_workers()


def _with_origins(iterator):
    out = []
    while True:
        try:
            out.append(iterator._next_with_origin())
        except StopIteration:
            return out


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pipeline=pipelines(), data=st.data())
def test_a_random_pipeline_resumed_after_any_output_yields_exactly_the_rest(pipeline, data):
    """Every output's origin (``_origins``) restarts the epoch right after it: the rest comes, exact, and
    with the origins an uninterrupted run gives (so a resumed run checkpoints again)."""
    kinds, workers, capacities, epochs = pipeline
    with tq.Sequence(*build(kinds, workers, capacities), context="fork") as seq:
        full = _with_origins(seq._resumable(epochs[0]))
        assert [value for value, _ in full] == reference(kinds, epochs[0])
        cuts = data.draw(st.lists(st.integers(0, max(0, len(full) - 1)), max_size=3)) if full else []
        for cut in cuts:
            start, skips = full[cut][1]
            assert start >= 0, full[cut]
            assert _with_origins(seq._resumable(epochs[0], Resumed(start, skips))) == full[cut + 1 :]
    assert_no_workers()
