"""A worker's random state: captured and restored exactly, reported only where it changed, cheaply."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from torchqueue import _rngstate
from torchqueue._rngstate import Tracker, capture, merged, restore


def draws() -> tuple[float, float, float, float, float]:
    return random.random(), random.gauss(0, 1), float(np.random.rand()), float(np.random.randn()), torch.rand(()).item()


@pytest.fixture(autouse=True)
def _keep_the_global_generators():
    """These tests move the global generators: leave them as they were."""
    state = capture()
    yield
    restore(state)


def test_a_restored_state_draws_exactly_what_the_captured_one_drew():
    random.gauss(0, 1)  # fill both Gaussian caches: they are part of the state
    np.random.randn()
    state = pickle.loads(pickle.dumps(capture()))
    first = draws()
    restore(state)
    assert draws() == first


def test_the_raw_state_readers_hold_on_this_platform():
    # else every report falls back to the public state, exact but about 40 us slower per batch
    assert _rngstate._layout_holds("python") and _rngstate._layout_holds("numpy")


@pytest.mark.parametrize(
    "move, part",
    [
        (lambda: random.random(), 0),
        (lambda: random.seed(5), 0),
        (lambda: random.gauss(0, 1), 0),
        (lambda: np.random.rand(), 1),
        (lambda: np.random.seed(5), 1),
        (lambda: np.random.randn(), 1),
        (lambda: torch.rand(()), 2),
        (lambda: torch.manual_seed(5), 2),
    ],
)
def test_a_report_has_exactly_the_parts_that_changed(move, part):
    tracker = Tracker()
    whole = tracker.report()
    assert whole is not None and None not in whole  # the first report is whole
    assert tracker.report() is None  # nothing changed
    move()
    report = tracker.report()
    assert report is not None and [p is not None for p in report] == [i == part for i in range(3)]
    assert merged(whole, report) == capture()


def test_a_gaussian_taken_from_the_cache_is_a_change():
    # the second of a pair of Gaussians comes from the cache: no word of the generator moves
    tracker = Tracker()
    random.gauss(0, 1)
    np.random.randn()
    state = tracker.report()
    random.gauss(0, 1)
    np.random.randn()
    report = tracker.report()
    assert report is not None and report[0] is not None and report[1] is not None
    assert merged(state, report) == capture()


def test_forget_makes_the_next_report_whole_and_a_tracker_pickles_without_its_readers():
    tracker = Tracker()
    tracker.report()
    tracker.forget()
    report = tracker.report()
    assert report is not None and None not in report
    copy = pickle.loads(pickle.dumps(tracker))  # as under spawn
    assert copy.report() is None
