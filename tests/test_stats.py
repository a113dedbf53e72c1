"""stats(): per-step figures, the bottleneck, a readable table and a plot."""

import os
import threading
import time
import warnings
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from conftest import double, identity

import torchqueue as tq
from torchqueue import _verdict
from torchqueue.stats import StepStats

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
        # 2 s of work: longer than a fork server's start (1.1-1.3 s, when a thread left by an earlier test
        # makes the pipeline use one), which the hint would otherwise name as what took most of the run
        list(seq(range(500)))
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
        # nothing is queued: every worker waits for input, and the figures must not call it work, nor a
        # wait for a slow input (the pause is counted apart, see the pause test below)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            after = seq.stats()
            assert after["repack"].busy_s <= before["repack"].busy_s + 0.05
            assert after.bottleneck == "slow"
    assert after.paused_s >= before.paused_s + 0.9
    assert after["repack"].wait_in_s <= before["repack"].wait_in_s + 0.05


def test_stats_before_start_are_zero():
    seq = tq.Sequence(tq.ProcessStep(double, 2))
    stats = seq.stats()
    assert stats["double"].elements_in == 0 and stats["double"].nworkers == 2
    assert stats.bottleneck is None and stats.hint() == "no steps ran yet"  # before: "double", beside that hint
    seq.close()


def test_plot_returns_a_matplotlib_figure(tmp_path):
    matplotlib.use("Agg")
    with tq.Sequence(tq.ProcessStep(busy, 1), tq.ProcessStep(double, 1)) as seq:
        list(seq(range(20)))
        figure = seq.stats().plot()
    figure.savefig(tmp_path / "stats.png")
    assert (tmp_path / "stats.png").stat().st_size > 1000
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == ["busy", "double"]
    assert "on a CPU" in [text.get_text() for text in figure.axes[0].get_legend().get_texts()]


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


def test_the_history_leaves_the_pauses_out_as_the_figures_do():
    # before: the figures after a pause had their elapsed time without it, the history with it: the last
    # interval came out negative and the plot dropped it
    matplotlib.use("Agg")
    with tq.Sequence(tq.ProcessStep(busy, 1, name="slow")) as seq:
        list(seq(range(300)))  # about 1.2 s of work
        time.sleep(0.6)  # your loop evaluates (the workload, not a synchronisation)
        list(seq(range(10)))
        stats = seq.stats()
    assert stats.paused_s > 0.5 and all(snapshot.paused_s <= stats.paused_s for snapshot in stats.history)
    running = [snapshot.elapsed_s for snapshot in stats.history]
    assert running == sorted(running) and running[-1] <= stats.elapsed_s
    waits = [snapshot["slow"].wait_in_s for snapshot in stats.history] + [stats["slow"].wait_in_s]
    # totals only grow, the pause left out of each; within 1 ms: the worker times its waits and your
    # process the pause, each on its own clock (a CI run saw a total 19 us under the snapshot before it)
    assert all(later >= earlier - 1e-3 for earlier, later in zip(waits, waits[1:])), waits
    assert waits[-1] > waits[0]
    times = list(stats.plot().axes[1].get_lines()[0].get_xdata())
    assert times == sorted(times) and times[-1] == pytest.approx(stats.elapsed_s)


def test_history_stays_bounded_in_a_long_run():
    from torchqueue import _runtime

    seq = tq.Sequence(tq.ProcessStep(double, 1))
    list(seq(range(3)))
    runtime = seq._runtime
    for second in range(3 * _runtime.MAX_SAMPLES):  # as if the consumer read for hours
        runtime._sample(runtime._started + (second + 1) * runtime._sample_every)
    assert len(seq.stats().history) <= _runtime.MAX_SAMPLES
    seq.close()


# -- issue 18: honest figures and advice; issue 17: the cost of the hops ------------------------------


def pause(x):
    time.sleep(0.01)  # the step's work (not a synchronisation): the run lasts a few tenths of a second
    return x


def _stats(*steps: StepStats, elapsed_s: float = 10.0, wait: float = 0.0, work: float = 0.0, **figures) -> tq.Stats:
    return tq.Stats(list(steps), elapsed_s, consumer_wait_s=wait, consumer_work_s=work, **figures)


def _step(name: str, busy_s: float, nworkers: int = 1, **figures) -> StepStats:
    figures = {"elements_in": 100, "elements_out": 100, "wait_in_s": 0.0, "wait_out_s": 0.0, **figures}
    return StepStats(name=name, nworkers=nworkers, busy_s=busy_s, queue_fill=0.5, skipped=0, utilization=0.0, **figures)


def test_start_up_under_spawn_is_its_own_figure_and_not_busy_time():
    # before: a stream worker's start-up (importing torch, seconds under spawn) counted as busy
    with tq.Sequence(tq.ProcessStep(pause, 1, name="read"), tq.RepackStep(4), context="spawn") as seq:
        assert len(list(seq(range(40)))) == 10
        stats = seq.stats()
    repack = stats["RepackStep(4)"]
    assert repack.startup_s > 0 and stats["read"].startup_s > 0
    assert repack.utilization < 0.5  # it does almost nothing
    assert repack.startup_s + repack.busy_s + repack.wait_in_s + repack.wait_out_s <= stats.elapsed_s * 1.01
    assert stats.bottleneck != "RepackStep(4)" or "more workers" not in stats.hint()


def test_the_hint_never_tells_a_step_without_nworkers_to_take_more_workers():
    stats = _stats(_step("read", 2.0), _step("RepackStep(64)", 9.0, stream=True))
    assert stats.bottleneck == "RepackStep(64)"
    assert "more workers" not in stats.hint() and "no nworkers" in stats.hint()
    assert "larger elements" in stats.hint()


def test_the_hint_does_not_ask_for_more_workers_when_the_cores_are_busy(monkeypatch):
    stats = _stats(_step("read", 9.0, nworkers=2), _step("graph", 19.0, nworkers=2))  # 2.8 cores busy
    monkeypatch.setattr(_verdict, "available_cpus", lambda: 3)
    assert stats.bottleneck == "graph" and "give it more workers" not in stats.hint() and "may use 3" in stats.hint()
    monkeypatch.setattr(_verdict, "available_cpus", lambda: 16)
    assert "give it more workers (now 2" in stats.hint()


def test_more_workers_than_cpus_warn_at_construction_where_the_user_wrote_it(monkeypatch):
    monkeypatch.setattr(tq.sequence, "available_cpus", lambda: 2)
    with pytest.warns(tq.TooManyWorkersWarning, match="starts 3 worker processes") as caught:
        tq.Sequence(tq.ProcessStep(double, 1), tq.PoolStep(double, nworkers=2), tq.RepackStep(4)).close()
    assert issubclass(tq.TooManyWorkersWarning, UserWarning) and caught[0].filename == __file__
    with pytest.warns(tq.TooManyWorkersWarning):
        tq.QueueFlowDataset(range(4), [tq.ProcessStep(double, 3)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tq.Sequence(tq.ProcessStep(double, 1), tq.RepackStep(4), tq.ProcessStep(double, 1)).close()  # 2 workers
        # threads are no processes: they share this one's CPUs (and its GIL), as torchdata's threads do
        tq.Sequence(tq.ProcessStep(double, 4, backend="thread"), tq.PoolStep(double, 2, backend="thread")).close()
    with pytest.warns(tq.TooManyWorkersWarning, match=r"starts 3 worker processes \(double#2: 3\)"):
        tq.Sequence(tq.ProcessStep(double, 4, backend="thread"), tq.PoolStep(double, 3)).close()


def test_the_table_and_the_plot_say_the_same_verdict():
    matplotlib.use("Agg")
    # before: the table said "no step is busy more than half the time" and the plot "bottleneck: read"
    quiet = _stats(_step("read", 4.0), _step("collate", 1.0), wait=8.0, work=1.0)
    title = quiet.plot().axes[0].get_title()
    assert quiet.hint().startswith(title) and "half the time" in title and "input limits" in quiet.hint()
    busy = _stats(_step("read", 9.0), _step("collate", 1.0))
    assert busy.hint().startswith(busy.plot().axes[0].get_title()) and "bottleneck: read" in busy.hint()


def test_the_consumer_s_wait_and_own_work_are_figures_and_tell_who_limits():
    with tq.Sequence(tq.ProcessStep(double, 1, name="quick")) as seq:
        for _ in seq(range(40)):
            time.sleep(0.03)  # the consumer's own work (a training step)
        stats = seq.stats()
    assert stats.consumer_work_s >= 40 * 0.03 * 0.9 and stats.consumer_work_s > stats.consumer_wait_s
    assert "your loop limits" in stats.hint() and "your loop waited" in str(stats)
    with tq.Sequence(tq.ProcessStep(pause, 1, name="slowstep")) as seq:
        list(seq(range(30)))
        stats = seq.stats()
    assert stats.consumer_wait_s >= 30 * 0.01 * 0.5 and stats.consumer_wait_s > stats.consumer_work_s
    assert stats.bottleneck == "slowstep"


def test_the_first_queue_is_full_when_a_later_step_limits_as_the_tuning_guide_says():
    with tq.Sequence(tq.ProcessStep(double, 1, name="first"), tq.ProcessStep(busy, 1, name="later")) as seq:
        list(seq(range(100)))
        stats = seq.stats()
    first = stats["first"]
    # the input keeps the first queue full; the step waits for room: a later step limits
    assert first.queue_fill > 0.5 and first.wait_out_s > first.busy_s and stats.bottleneck == "later"
    guide = (Path(__file__).parents[1] / "docs" / "howto" / "tune.md").read_text()
    assert "that step cannot keep up" not in guide and "wait_out_s" in guide.split("queue_fill", 1)[1][:600]


def test_the_loader_plots_its_pipeline():
    matplotlib.use("Agg")
    loader = tq.QueueFlowLoader(torch.utils.data.TensorDataset(torch.arange(16.0)), batch_size=4, num_workers=1)
    assert len(list(loader)) == 4
    figure = loader.plot()
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == ["fetch"]
    loader.close()


def test_a_loader_with_more_workers_than_cpus_warns_once_as_dataloader_does(monkeypatch):
    # before: DataLoader's own UserWarning (where torch counts too few CPUs) and a TooManyWorkersWarning
    monkeypatch.setattr(tq.sequence, "available_cpus", lambda: 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = tq.QueueFlowLoader(torch.utils.data.TensorDataset(torch.arange(16.0)), batch_size=4, num_workers=3)
        assert len(list(loader)) == 4
    loader.close()
    assert not [w for w in caught if issubclass(w.category, tq.TooManyWorkersWarning)]
    with pytest.warns(tq.TooManyWorkersWarning, match="starts 3 worker processes"):  # the user's own steps
        tq.QueueFlowDataset(range(4), [tq.ProcessStep(double, 3)])


def tensor(i):
    return torch.full((200_000,), float(i))


def test_encoding_and_decoding_are_counted_apart_from_the_step_s_work(tmp_path):
    matplotlib.use("Agg")
    with tq.Sequence(tq.ProcessStep(tensor, 1, name="make"), tq.ProcessStep(torch.sum, 1, name="total")) as seq:
        assert len(list(seq(range(20)))) == 20
        stats = seq.stats()
    assert stats["make"].encode_s > 0 and stats["total"].decode_s > 0 and stats["total"].encode_s > 0
    assert stats["make"].sent_bytes >= 20 * 200_000 * 4 and 0 < stats["total"].sent_bytes < stats["make"].sent_bytes
    header = str(stats).splitlines()[0].split()
    assert "encode_s" in header and "decode_s" in header
    figure = stats.plot()
    assert "encoding, decoding" in [text.get_text() for text in figure.axes[0].get_legend().get_texts()]


def test_the_hint_says_when_the_hops_limit():
    stats = _stats(_step("graph", 3.0, nworkers=1, encode_s=4.0, decode_s=2.0), _step("collate", 1.0))
    assert stats.bottleneck == "graph" and "hops limit" in stats.hint() and "more workers" not in stats.hint()


def test_the_hops_advice_says_what_the_hops_cost():
    # before, for one step making 64 MiB arrays: "send fewer, larger messages (larger elements, ...), or do
    # two steps' work in one ProcessStep": larger elements copy as many bytes, and there was one step
    big = _step("make", 0.58, nworkers=2, encode_s=0.62, elements_out=30, sent_bytes=30 * 64 * 2**20)
    hint = _stats(big, elapsed_s=0.65).hint()
    assert "copying 64.0 MiB per element into shared memory" in hint and 'backend="thread"' in hint, hint
    assert "larger elements" not in hint and "two steps" not in hint
    # before, for a step feeding a RepackStep(7) lists of 2,000 ints: "send fewer, larger messages", where the
    # cost was each item pickled on its own for the RepackStep to route
    chunk = _step("chunk", 0.01, encode_s=0.76, sent_bytes=10_000_000)
    hint = _stats(chunk, _step("RepackStep(7)", 0.16, stream=True), elapsed_s=1.3).hint()
    assert "items of chunk's outputs are pickled one by one, for RepackStep(7)" in hint and "in chunk itself" in hint
    # the same where no step is busy half the time, the RepackStep's own sends beside them (a reviewer's run)
    repack = _step("RepackStep(7)", 1.42, stream=True, encode_s=1.42, decode_s=0.28, sent_bytes=5_000_000)
    chunk = _step("chunk", 0.01, encode_s=3.8, sent_bytes=10_000_000)
    hint = _stats(chunk, repack, elapsed_s=12.0, wait=11.0).hint()
    assert "the hops limit" in hint and "items of chunk's outputs are pickled one by one" in hint, hint
    small = _step("graph", 3.0, encode_s=4.0, decode_s=2.0, sent_bytes=100 * 180_000)
    hint = _stats(small, _step("collate", 1.0)).hint()
    assert "send fewer, larger messages" in hint and "two steps' work in one ProcessStep" in hint, hint


def test_the_hint_says_when_the_hops_limit_though_no_step_is_busy_half_the_time():
    # issue 17's seed shape: every step under half busy, the time gone to moving small graphs
    stats = _stats(_step("pool", 1.0, encode_s=2.0, decode_s=2.0), _step("RepackStep(64)", 2.0, stream=True), wait=9.0)
    assert "hops limit" in stats.hint() and "input or the consumer" not in stats.hint()


def nap(x):
    time.sleep(0.01)  # off the CPU, as a read from a slow disk
    return x


def count_in_python(x):
    total = 0
    for i in range(400_000):  # holds the GIL throughout, longer than its switch interval (5 ms)
        total += i % 7
    return x + total % 1


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_cpu_time_counts_a_core_busy_and_not_a_sleep(monkeypatch, backend):
    monkeypatch.setattr(_verdict, "available_cpus", lambda: 2)
    with tq.Sequence(tq.ProcessStep(nap, 2, name="nap", backend=backend)) as seq:
        assert list(seq(range(100))) == list(range(100))
        stats = seq.stats()
    step = stats["nap"]
    assert step.backend == backend and step.busy_s >= 100 * 0.01 * 0.9
    assert step.cpu_s < 0.25 * step.busy_s, (step.cpu_s, step.busy_s)
    # before: "the workers' busy time adds up to 2.0 cores and this process may use 2": but they slept
    assert stats.bottleneck == "nap" and "give it more workers (now 2): they spent" in stats.hint(), stats.hint()
    with tq.Sequence(tq.ProcessStep(busy, 1, name="spin", backend=backend)) as seq:
        list(seq(range(100)))
        step = seq.stats()["spin"]
    assert step.busy_s >= 100 * 0.004 * 0.9 and 0.5 * step.busy_s < step.cpu_s < 1.5 * step.busy_s


def _run_in_threads(fn, nworkers: int, name: str, count: int) -> tq.Stats:
    """The stats of ``fn`` over ``range(count)`` in a thread step of ``nworkers`` threads (in order)."""
    with tq.Sequence(tq.ProcessStep(fn, nworkers, name=name, backend="thread")) as seq:
        assert list(seq(range(count))) == list(range(count))
        return seq.stats()


def _no_core_was_free(stats: tq.Stats) -> bool:
    """Whether other programs kept the machine's other cores busy during the run: the hint then says
    so, and cannot tell the GIL from a wait for a core (checked apart, with figures made by hand)."""
    if stats.idle_cores is None or stats.idle_cores >= 0.5:
        return False
    assert "no core was free" in stats.hint(), str(stats)
    return True


def test_threads_that_take_turns_holding_the_gil_are_told_to_use_processes(monkeypatch):
    monkeypatch.setattr(_verdict, "available_cpus", lambda: 16)
    stats = _run_in_threads(count_in_python, 3, "python", 30)
    step = stats["python"]
    # three threads, each busy nearly all the time, share one core's worth of the GIL
    assert step.busy_s > 1.5 * step.cpu_s and step.cpu_s < 1.2 * stats.elapsed_s, (step.busy_s, step.cpu_s)
    # before: "give it more workers (now 3; 2.9 of 16 cores in use)"
    if _no_core_was_free(stats):
        return
    assert stats.hint().startswith("the GIL limits: python") and 'backend="process"' in stats.hint(), stats.hint()
    assert "more workers" not in stats.hint()


def test_the_gil_verdict_is_for_thread_steps_that_keep_their_process_at_about_one_core(monkeypatch):
    monkeypatch.setattr(_verdict, "available_cpus", lambda: 8)
    held = _step("python", 29.0, nworkers=3, cpu_s=9.0, backend="thread")
    assert _stats(held, consumer_cpu_s=10.0).hint().startswith("the GIL limits: python")
    assert "more workers" in _stats(_step("python", 29.0, nworkers=3, cpu_s=10.0), consumer_cpu_s=0.1).hint()
    asleep = _step("read", 29.0, nworkers=3, cpu_s=0.5, backend="thread")
    assert "give it more workers (now 3): they spent 29.00 s in it but 0.50 s on a CPU" in _stats(asleep).hint()
    assert "more fit on the cores (0.1 of 8" in _stats(asleep, consumer_cpu_s=1.0).hint()
    # more sleeping workers help also where other programs keep every core busy
    assert "give it more workers (now 3)" in _stats(asleep, consumer_cpu_s=1.0, idle_cores=0.0).hint()
    # their calls' own threads (BLAS, torch) keep your process at 3 cores: the GIL does not hold them
    blas = _step("matmul", 29.0, nworkers=3, cpu_s=9.0, backend="thread")
    assert "more workers" in _stats(blas, consumer_cpu_s=30.0).hint()
    # your loop, not the thread steps, takes the core
    loop = _step("python", 29.0, nworkers=3, cpu_s=3.0, backend="thread")
    assert not _stats(loop, consumer_cpu_s=10.0, work=9.0).hint().startswith("the GIL")
    assert (
        not _stats(_step("python", 2.0, nworkers=3, cpu_s=2.0, backend="thread"), consumer_cpu_s=10.0)
        .hint()
        .startswith("the GIL")
    )
    # no core was free: threads that release the GIL wait for a core as long (other programs took them)
    assert not _stats(held, consumer_cpu_s=10.0, idle_cores=0.1).hint().startswith("the GIL")
    assert _stats(held, consumer_cpu_s=10.0, idle_cores=6.5).hint().startswith("the GIL")
    one = _step("python", 9.5, nworkers=1, cpu_s=9.5, backend="thread")  # one thread: it may be releasing the GIL
    assert "give it more workers (now 1" in _stats(one, consumer_cpu_s=10.0).hint()


def test_the_cores_in_use_leave_out_the_workers_start_up(monkeypatch):
    # before: under spawn, two workers each busy all the time after a 5 s start-up were "1.0 of 2 cores"
    monkeypatch.setattr(_verdict, "available_cpus", lambda: 2)
    started_late = _step("graph", 9.8, nworkers=2, cpu_s=9.8, startup_s=10.0)
    assert "keep 2.0 cores busy" in _stats(started_late, consumer_cpu_s=0.1).hint()


def test_workers_that_compute_on_too_few_cores_are_not_said_to_wait_on_files(monkeypatch):
    # before: ten workers computing on 2 cores, each on a CPU a fifth of its busy time, read "they spent
    # 14.85 s in it but 3.05 s on a CPU (waiting on files, the network or a sleep)": more workers
    monkeypatch.setattr(_verdict, "available_cpus", lambda: 2)
    work = _step("work", 14.85, nworkers=10, cpu_s=3.05)
    hint = _stats(work, _step("tf", 0.1, cpu_s=0.1), elapsed_s=1.6, consumer_cpu_s=0.1).hint()
    assert "waiting on files" not in hint and "make work do less per element" in hint, hint
    asleep = _step("work", 14.85, nworkers=10, cpu_s=0.2)  # the same busy time, asleep: more workers do help
    assert "waiting on files" in _stats(asleep, elapsed_s=1.6, consumer_cpu_s=0.1).hint()


def test_full_cores_say_how_many_your_process_keeps_busy_and_name_a_slow_loop(monkeypatch):
    # before: "the workers keep 1.7 cores busy": one worker kept 0.85 busy, and the loop the rest
    monkeypatch.setattr(_verdict, "available_cpus", lambda: 2)
    batch = _step("batch", 8.5, cpu_s=8.5)
    slow_loop = _stats(batch, consumer_cpu_s=8.6, work=8.6, wait=1.0).hint()
    assert "the workers keep 0.8 cores busy and your process 0.9; this process may use 2" in slow_loop, slow_loop
    assert "make batch do less per element, or your loop, or run on more cores" in slow_loop
    threads = _stats(batch, consumer_cpu_s=8.6, work=0.1, wait=9.0).hint()  # a thread step's CPU, not the loop
    assert "your process 0.9" in threads and "your loop" not in threads


def test_an_input_that_computes_in_your_process_is_said_to_limit_when_no_core_is_free(monkeypatch):
    # before: a generator burning a core (in the feeder thread), another program on the other core, two
    # steps 2% busy and waiting for input, read "no core was free ... its workers waited for a core"
    monkeypatch.setattr(_verdict, "available_cpus", lambda: 2)
    steps = (_step("a", 0.08, cpu_s=0.12, wait_in_s=3.1), _step("b", 0.08, cpu_s=0.11, wait_in_s=3.06))
    figures = {"elapsed_s": 3.26, "wait": 3.23, "work": 0.01, "idle_cores": 0.0}
    hint = _stats(*steps, consumer_cpu_s=3.08, **figures).hint()
    assert "the input limits: your process kept 0.9 cores busy" in hint and "waited for a core" not in hint, hint
    assert "move its work into a first step" in hint
    idle_input = _stats(*steps, consumer_cpu_s=0.1, **figures).hint()  # the same waits, your process idle
    assert "no core was free" in idle_input, idle_input


def test_an_input_that_sleeps_is_said_to_limit_though_no_core_is_free(monkeypatch):
    # before: "no core was free: ... its workers waited for a core", for workers that used no CPU and
    # waited for an input that slept 20 ms per element, beside other programs that kept the cores busy
    monkeypatch.setattr(_verdict, "available_cpus", lambda: 2)
    quiet = _step("f", 0.01, nworkers=2, cpu_s=0.01, wait_in_s=4.25)
    figures = {"elapsed_s": 2.19, "wait": 2.1, "consumer_cpu_s": 0.05, "idle_cores": 0.0}
    hint = _stats(quiet, input_s=2.04, **figures).hint()
    assert "the input limits: the iterable you pass took 2.04 s of the 2.19 s" in hint, hint
    assert "waited for a core" not in hint
    assert "no core was free" in _stats(quiet, input_s=0.1, **figures).hint()


def hang_on_five(x):
    if x == 5:
        threading.Event().wait(30)  # a call that does not come back: the hang that stats() is asked about
    return x


@pytest.mark.parametrize("nworkers", [1, 2])
def test_stats_taken_during_a_hang_name_the_call_that_holds_it(nworkers):
    # before, with two workers: "your loop waited 0.01 s for outputs ...: the input limits: ... speed up the
    # iterable you pass", for a range: the wait going on and the call going on were not counted
    seq = tq.Sequence(tq.ProcessStep(hang_on_five, nworkers, name="work"), tq.Queue(4))
    taken = []
    stats_taken = threading.Event()

    def watch():
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # until the call has gone on long enough to be told from others
            stats = seq.stats()
            call = stats.oldest_call
            if call is not None and call.seconds >= 1.2 and call.seconds >= 0.6 * stats.elapsed_s:
                taken.append(stats)
                break
            stats_taken.wait(0.05)
        stats_taken.set()
        seq.close()

    watcher = threading.Thread(target=watch)
    try:
        with pytest.raises(RuntimeError, match="closed while it was being iterated"):
            for i, _ in enumerate(seq(range(100))):
                if i == 0:
                    watcher.start()
    finally:
        stats_taken.set()
        watcher.join(30)
        seq.close()
    (stats,) = taken
    call = stats.oldest_call
    assert (call.step, call.seq, call.epoch) == ("work", 5, 0) and call.pid is not None
    assert stats.consumer_wait_s >= 1.0  # the wait going on counts
    assert stats.bottleneck == "work"
    assert f"work holds element 5 of epoch 0: worker {call.worker} (pid {call.pid}) has been in its function" in (
        stats.hint()
    )
    assert "py-spy dump --pid" in stats.hint() and "the input limits" not in stats.hint()


def test_a_call_that_hangs_on_the_first_element_is_named():
    # before: "give it more workers (now 1): ... waiting on files, the network or a sleep": the mean call,
    # to which the hanging one was compared, counted the hanging one
    call = type("Call", (), {"step": "work", "worker": 0, "pid": 7, "seconds": 3.2, "epoch": 0, "seq": 0})()
    call.doing = "in its function"
    work = _step("work", 3.2, elements_in=1, elements_out=0, cpu_s=0.0)
    assert _stats(work, oldest_call=call, elapsed_s=5.0).hint().startswith("work holds element 0 of epoch 0")


def test_a_slow_start_does_not_hide_a_call_held_until_a_timeout_closed_the_pipeline():
    # before: "the queues limit (slow: 50% busy)": the call (1.1 s, until a 1 s timeout) was compared with
    # half the run, start-up included (the workers took 1 s to start on a loaded machine)
    call = type("Call", (), {"step": "slow", "worker": 1, "pid": None, "seconds": 1.1, "epoch": 0, "seq": 5})()
    call.doing = "in its function"
    slow = _step("slow", 1.1, nworkers=2, elements_in=6, elements_out=5, startup_s=2.0)
    hint = _stats(slow, oldest_call=call, elapsed_s=2.4, input_held_s=1.0).hint()
    assert hint.startswith("slow held element 5 of epoch 0 as the pipeline closed: worker 1 had been in its function")


def test_a_stopped_worker_is_named_in_the_figures():
    # before: left out of ``oldest_call``, and the hint said its step waited on files or a sleep
    call = type("Call", (), {"step": "w", "worker": 0, "pid": 7, "seconds": 8.0, "epoch": 0, "seq": 11})()
    call.doing = "stopped (SIGSTOP, Ctrl-Z or a debugger), in its function"
    hint = _stats(_step("w", 13.2, elements_in=11, cpu_s=0.5), oldest_call=call, elapsed_s=13.2).hint()
    assert hint.startswith("w's worker 0 is stopped: its process (pid 7) is stopped (SIGSTOP, Ctrl-Z or a debugger)")
    assert "holding element 11 of epoch 0" in hint and "SIGCONT" in hint


def test_a_long_call_like_the_steps_others_is_not_said_to_hold_the_pipeline():
    call = type("Call", (), {"step": "slow", "worker": 0, "pid": 7, "seconds": 6.0, "epoch": 0, "seq": 3})()
    call.doing = "in its function"
    slow = _step("slow", 19.0, nworkers=2, elements_in=4, cpu_s=19.0)  # 5 s a call
    assert "holds element" not in _stats(slow, oldest_call=call, elapsed_s=10.0).hint()
    stuck = _step("slow", 19.0, nworkers=2, elements_in=40, cpu_s=19.0)  # 0.5 s a call
    assert "slow holds element 3 of epoch 0" in _stats(stuck, oldest_call=call, elapsed_s=10.0).hint()


def test_cores_other_programs_keep_busy_are_not_free_for_more_workers(monkeypatch):
    # before: "give it more workers (now 2; 1.0 of 2 cores in use)" while another program used the other core
    monkeypatch.setattr(_verdict, "available_cpus", lambda: 2)
    graph = _step("graph", 19.5, nworkers=2, cpu_s=10.0)
    assert "other programs the rest" in _stats(graph, consumer_cpu_s=0.1, idle_cores=0.0).hint()
    quiet = _step("graph", 4.0, nworkers=2, cpu_s=4.0)  # 20% busy: waiting for a core, not for the input
    assert "no core was free" in _stats(quiet, consumer_cpu_s=0.1, idle_cores=0.0, wait=9.0).hint()
    assert "the input limits" in _stats(quiet, consumer_cpu_s=0.1, idle_cores=1.5, wait=9.0).hint()
    assert "give it more workers (now 2; 1.0 of 2" in _stats(graph, consumer_cpu_s=0.1, idle_cores=1.0).hint()


def test_the_stats_of_a_run_say_how_many_cores_stayed_idle():
    with tq.Sequence(tq.ProcessStep(nap, 1, name="nap")) as seq:
        list(seq(range(30)))
        stats = seq.stats()
    if stats.idle_cores is not None:  # Linux
        assert 0.0 <= stats.idle_cores <= len(os.sched_getaffinity(0)) + 0.1
        if len(os.sched_getaffinity(0)) >= 2:
            assert stats.idle_cores > 0.3  # a worker asleep leaves a core free


def quick_python(x):
    total = 0
    for i in range(20_000):  # about 1 ms: shorter than the GIL's switch interval (5 ms)
        total += i % 7
    return x + total % 1


def test_threads_that_wait_for_the_gil_between_short_calls_are_not_said_to_wait_for_input(monkeypatch):
    monkeypatch.setattr(_verdict, "available_cpus", lambda: 2)
    stats = _run_in_threads(quick_python, 3, "python", 400)
    # before: "no step is busy more than half the time (python: 43%): ... the input limits"
    if _no_core_was_free(stats):
        return
    assert stats.hint().startswith("the GIL limits: python"), str(stats)
    assert 0.6 * stats.elapsed_s < stats.consumer_cpu_s < 1.4 * stats.elapsed_s


def sort_array(x):
    np.sort(np.random.default_rng(x).random(2_000_000))  # numpy releases the GIL while it sorts
    return x


def test_threads_whose_work_releases_the_gil_are_not_said_to_be_held_by_it(monkeypatch):
    monkeypatch.setattr(_verdict, "available_cpus", lambda: 2)
    stats = _run_in_threads(sort_array, 2, "sort", 16)
    assert "GIL" not in stats.hint() and "cores busy" in stats.hint(), str(stats)


def test_a_pause_with_nothing_queued_is_not_the_pipelines_time(monkeypatch):
    # before: stats() a while after the last epoch (or after an evaluation between two epochs) counted
    # the pause as the workers' wait for input and the run's time: "the input limits: ... speed up the
    # iterable you pass" for a step busy all through its epochs, or "your loop limits: it worked 1.0 s"
    monkeypatch.setattr(_verdict, "available_cpus", lambda: 2)
    started = time.perf_counter()
    with tq.Sequence(tq.ProcessStep(nap, 1, name="read"), tq.ProcessStep(identity, 1, name="tf")) as seq:
        assert list(seq(range(30))) == list(range(30))
        time.sleep(1.0)  # your loop evaluates, not with this pipeline (the workload, not a synchronisation)
        assert list(seq(range(30))) == list(range(30))
        time.sleep(0.5)  # then saves a checkpoint
        live = seq.stats()
    closed = seq.stats()
    wall = time.perf_counter() - started
    for stats in (live, closed):
        read = stats["read"]
        assert 1.45 < stats.paused_s < 2.0 and stats.elapsed_s + stats.paused_s < wall, (stats.paused_s, wall)
        assert stats.consumer_work_s < 0.3 and read.wait_in_s < 0.5 and stats["tf"].wait_in_s < 1.5, str(stats)
        assert stats.bottleneck == "read" and "give it more workers (now 1)" in stats.hint(), stats.hint()
        assert "s paused, nothing queued" in str(stats)
    assert closed.paused_s >= live.paused_s


def test_an_epoch_queued_ahead_leaves_no_pause():
    with tq.Sequence(tq.ProcessStep(nap, 1, name="read")) as seq:
        seq.queue_iterable(range(10))
        seq.queue_iterable(range(10))
        assert list(seq) == list(range(10))
        assert seq.stats().paused_s == 0.0  # the next epoch was queued: the pipeline had work
        assert list(seq) == list(range(10))
        stats = seq.stats()
    assert stats.paused_s > 0.0  # both delivered: the pause began with the last one's end


def straggle(x):
    time.sleep(0.1 if x % 10 == 0 else 0.001)  # a slow fetch now and then (the workload, not a synchronisation)
    return x


@pytest.mark.parametrize("ordered", [True, False])
def test_elements_held_back_behind_a_slow_one_are_said_to_be_the_queues_limit(ordered):
    # before: four workers, each 10th element 100x slower, outputs in order through queues of one:
    # "give it more workers (now 4)" (eight ran no faster), or with eight "the input limits ... speed up
    # the iterable you pass" (a range); larger queues around the step ran it in half the time
    steps = (tq.Queue(1), tq.ProcessStep(straggle, 4, name="fetch"), tq.Queue(1), tq.ProcessStep(identity, 1))
    with tq.Sequence(*steps, ordered=ordered) as seq:
        out = list(seq(range(100)))
        stats = seq.stats()
    assert sorted(out) == list(range(100))
    if ordered:
        assert stats.input_held_s > 0.5 * stats.elapsed_s, (stats.input_held_s, stats.elapsed_s)
        assert stats.hint().startswith("the queues limit (fetch:"), stats.hint()
        assert "a tq.Queue(n) before and after it" in stats.hint() and "more workers" not in stats.hint()
    else:  # as ready: nothing is held back
        assert not stats.hint().startswith("the queues limit"), stats.hint()


def test_the_queues_limit_only_while_the_busiest_steps_workers_starve():
    held = {"elapsed_s": 10.0, "wait": 9.5, "work": 0.1, "consumer_cpu_s": 0.2, "input_held_s": 9.0}
    starved = _step("fetch", 20.0, nworkers=4, cpu_s=0.4, wait_in_s=19.0)
    assert _stats(starved, **held).hint().startswith("the queues limit (fetch: 50% busy)")
    fed = _step("fetch", 38.0, nworkers=4, cpu_s=0.4, wait_in_s=1.0)  # the input is held by the busy step itself
    assert not _stats(fed, **held).hint().startswith("the queues limit")
    assert not _stats(starved, **{**held, "input_held_s": 1.0}).hint().startswith("the queues limit")


def test_on_full_cores_the_steps_hops_limit_when_they_outweigh_the_work(monkeypatch):
    # before: a step making lists of 100,000 floats (59% busy) and two steps passing them on, 0.66 and
    # 0.46 s of pickling each against no work: "make make do less per element"; one step instead of the
    # two ran 15-25% faster
    monkeypatch.setattr(_verdict, "available_cpus", lambda: 2)
    make = _step("make", 0.55, cpu_s=0.67, encode_s=0.21)
    a = _step("a", 0.0, cpu_s=0.61, encode_s=0.35, decode_s=0.31)
    b = _step("b", 0.0, cpu_s=0.61, encode_s=0.22, decode_s=0.24)
    hint = _stats(make, a, b, elapsed_s=1.3, consumer_cpu_s=0.29, wait=1.2, work=0.08).hint()
    assert hint.startswith("the hops limit; bottleneck: make") and "do two steps' work in one ProcessStep" in hint
    worked = _step("make", 0.95, cpu_s=1.0, encode_s=0.05)  # the same cores, spent on the work
    assert _stats(worked, a, elapsed_s=1.3, consumer_cpu_s=0.29, wait=1.2).hint().startswith("bottleneck: make")


def test_a_step_that_waits_in_a_pools_workers_is_told_to_keep_processes_of_its_own():
    # a ProcessStep fused into the pool after it (``_premap``) that sleeps holds the pool's workers: the
    # hint had read "the queues limit ... larger queues ... ordered=False", which ran no faster
    read = _step("read", 9.0, nworkers=2, cpu_s=0.1, host="graph")
    graph = _step("graph", 8.0, nworkers=2, cpu_s=8.0)
    stats = _stats(read, graph, elapsed_s=10.0, consumer_cpu_s=0.5, wait=9.0, work=0.5)
    assert stats.hint().startswith("read waits in graph's workers")
    assert "a tq.Queue(n) between read and graph gives read processes of its own" in stats.hint()
    assert "Give read more workers (now 2), so that more of its calls wait at once" in stats.hint()  # a reviewer's
    # sleeping reader before a light pool gained nothing from the Queue alone; four readers ran 1.6x faster
    computing = _step("read", 9.0, nworkers=2, cpu_s=8.5, host="graph")  # its calls compute: no hop to pay
    assert not _stats(computing, graph, elapsed_s=10.0, consumer_cpu_s=0.5).hint().startswith("read waits")
    brief = _step("read", 1.0, nworkers=2, cpu_s=0.01, host="graph")  # waits little of the pool's time
    assert not _stats(brief, graph, elapsed_s=10.0, consumer_cpu_s=0.5).hint().startswith("read waits")


def test_a_step_run_in_a_pools_workers_names_its_host_in_its_stats():
    with tq.Sequence(tq.ProcessStep(double, 2, name="read"), tq.PoolStep(double, nworkers=2, name="graph")) as seq:
        assert list(seq([[1, 2], [3]])) == [[2, 4, 2, 4], [6, 6]]  # the lists doubled, then their items
        stats = seq.stats()
    assert stats["read"].host == "graph" and stats["graph"].host is None
    assert stats["read"].nworkers == 2 and stats["read"].elements_in == 2


def test_the_hint_says_the_busy_share_the_table_shows_and_the_messages_share_apart():
    # before: "bottleneck: graph (59% busy)" beside the table's util 54%: the hint counted the step's
    # encoding and decoding as busy, the table did not
    graph = _step("graph", 10.8, nworkers=2, cpu_s=11.0, encode_s=0.8, decode_s=0.2)
    hint = _stats(graph, elapsed_s=10.0, consumer_cpu_s=0.5, wait=9.0, work=0.5).hint()
    assert hint.startswith("bottleneck: graph (54% busy, 5% on its messages)")
    plain = _step("graph", 10.8, nworkers=2, cpu_s=11.0)
    assert _stats(plain, elapsed_s=10.0, consumer_cpu_s=0.5, wait=9.0).hint().startswith("bottleneck: graph (54% busy)")


def test_a_pool_whose_workers_also_run_the_read_counts_the_reads_in_its_share(monkeypatch):
    # before: read 45% and graph 40%, in the same two processes (``_premap``): "no step is busy more than
    # half the time ... the input limits", while those processes were 88% busy
    monkeypatch.setattr(_verdict, "available_cpus", lambda: 2)
    read = _step("read", 9.0, nworkers=2, cpu_s=8.8, host="graph")
    graph = _step("graph", 8.0, nworkers=2, cpu_s=8.0, encode_s=0.6)
    hint = _stats(read, graph, elapsed_s=10.0, consumer_cpu_s=0.5, wait=9.0, work=0.5).hint()
    assert hint.startswith("bottleneck: graph (40% busy, 3% on its messages, 45% running read)"), hint


def test_the_no_step_half_busy_hint_gives_the_busy_share_the_table_shows_and_the_messages_share_apart():
    # before: "no step is busy more than half the time (PackStep(32): 31%)" beside the table's util 18%
    pack = _step("PackStep(32)", 1.8, stream=True, encode_s=0.6, decode_s=0.7)
    hint = _stats(pack, elapsed_s=10.0, consumer_cpu_s=0.5, wait=9.0, work=0.5).hint()
    assert "no step is busy more than half the time (PackStep(32): 18% busy, 13% on its messages)" in hint, hint
