"""The library logs to the "torchqueue" logger and prints nothing of its own."""

from __future__ import annotations

import logging

import pytest
from conftest import double

import torchqueue as tq

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_leaks")]


def test_a_pipeline_prints_nothing_and_logs_to_the_torchqueue_logger(capfd, caplog):
    caplog.set_level(logging.DEBUG, logger="torchqueue")
    with tq.Sequence(tq.ProcessStep(double, 2), name="quiet") as seq:
        assert list(seq(range(10))) == [2 * x for x in range(10)]
        it = iter(seq(range(100)))
        next(it)
        seq.queue_iterable(range(3))
        assert list(seq) == [0, 2, 4]  # the abandoned epoch is logged
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    messages = [r.getMessage() for r in caplog.records if r.name == "torchqueue"]
    assert any("started 2 workers for quiet" in m for m in messages)
    assert any("epoch 1 abandoned" in m for m in messages)
    assert any("closed quiet" in m for m in messages)
