"""stats(): per-step figures, the bottleneck, a readable table and a plot."""

import time

import matplotlib
import pytest
from conftest import double, identity

import torchqueue as tq

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_leaks")]


def spin(seconds: float) -> None:
    """Keep a core busy (a sleep would not count as busy)."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        pass


def busy(x):
    spin(0.004)
    return x


def test_stats_count_elements_and_name_the_bottleneck():
    with tq.Sequence(tq.ProcessStep(identity, 1, name="fast"), tq.PoolStep(busy, nworkers=1), tq.RepackStep(10)) as seq:
        out = list(seq([list(range(50)), list(range(50))]))
        stats = seq.stats()
    assert len(out) == 10
    assert list(stats) == ["fast", "busy", "RepackStep(10)"]
    assert stats["fast"].elements_in == 2 and stats["fast"].elements_out == 2
    assert stats["busy"].elements_in == 100 and stats["busy"].elements_out == 100
    assert stats["busy"].busy_s >= 100 * 0.004 * 0.9
    assert stats["RepackStep(10)"].elements_in == 2 and stats["RepackStep(10)"].elements_out == 10
    assert stats.bottleneck == "busy"
    assert 0.0 <= stats["fast"].queue_fill <= 1.0
    assert stats["fast"].wait_in_s > 0


def test_printing_stats_shows_one_row_per_step_and_a_hint():
    with tq.Sequence(tq.ProcessStep(busy, 1, name="slowstep"), tq.ProcessStep(double, 1)) as seq:
        list(seq(range(100)))
        text = str(seq.stats())
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["step", "workers", "in"]
    assert lines[1].startswith("slowstep") and lines[2].startswith("double")
    assert "slowstep" in lines[-1] and "more workers" in lines[-1]


def test_a_process_step_after_a_pool_step_has_one_row_and_no_internal_stage_shows():
    with tq.Sequence(tq.PoolStep(double, nworkers=2, name="transform"), tq.ProcessStep(sum, name="sum")) as seq:
        assert seq.step_names == ["transform", "sum"]
        assert list(seq.stats()) == ["transform", "sum"]  # before the start too
        assert list(seq([[1, 2], [3]])) == [6, 6]
        stats = seq.stats()
    assert list(stats) == ["transform", "sum"]
    assert [line.split()[0] for line in str(stats).splitlines()[1:-1]] == ["transform", "sum"]


def slow(x):
    spin(0.05)
    return x


def test_an_idle_pipeline_does_not_look_busy():
    with tq.Sequence(tq.ProcessStep(slow, 1, name="slow"), tq.RepackStep(4, name="repack")) as seq:
        list(seq(range(20)))
        before = seq.stats()
        # nothing is queued: every worker waits for input, and the figures must say so while it lasts
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            after = seq.stats()
            assert after["repack"].busy_s <= before["repack"].busy_s + 0.05
            assert after.bottleneck == "slow"
    assert after["repack"].wait_in_s >= before["repack"].wait_in_s + 0.9


def test_stats_before_start_are_zero():
    seq = tq.Sequence(tq.ProcessStep(double, 2))
    stats = seq.stats()
    assert stats["double"].elements_in == 0 and stats["double"].nworkers == 2
    seq.close()


def test_plot_returns_a_matplotlib_figure(tmp_path):
    matplotlib.use("Agg")
    with tq.Sequence(tq.ProcessStep(busy, 1), tq.ProcessStep(double, 1)) as seq:
        list(seq(range(20)))
        figure = seq.stats().plot()
    figure.savefig(tmp_path / "stats.png")
    assert (tmp_path / "stats.png").stat().st_size > 1000
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == ["busy", "double"]


def test_history_records_the_figures_while_running_and_plot_draws_them_over_time(tmp_path):
    matplotlib.use("Agg")
    with tq.Sequence(tq.ProcessStep(busy, 1, name="slow"), tq.ProcessStep(double, 1, name="quick")) as seq:
        list(seq(range(300)))  # about 1.2 s of work
        stats = seq.stats()
    history = stats.history
    assert len(history) >= 3
    times = [snapshot.elapsed_s for snapshot in history]
    assert times == sorted(times) and times[-1] <= stats.elapsed_s
    counts = [snapshot["slow"].elements_out for snapshot in history] + [stats["slow"].elements_out]
    assert counts == sorted(counts) and counts[0] < counts[-1] == 300  # totals grow while it runs
    figure = stats.plot()
    assert len(figure.axes) == 3  # the bars, outputs per second over time, busy fraction over time
    assert {line.get_label() for line in figure.axes[1].get_lines()} == {"slow", "quick"}
    figure.savefig(tmp_path / "stats.png")


def test_history_stays_bounded_in_a_long_run():
    from torchqueue import _runtime

    seq = tq.Sequence(tq.ProcessStep(double, 1))
    list(seq(range(3)))
    runtime = seq._runtime
    for second in range(3 * _runtime.MAX_SAMPLES):  # as if the consumer read for hours
        runtime._sample(runtime._started + (second + 1) * runtime._sample_every)
    assert len(seq.stats().history) <= _runtime.MAX_SAMPLES
    seq.close()
