"""The benchmark suite runs (figures are never asserted: only that every contender produced a line)."""

import subprocess
import sys

import pytest


def benchmarks(*args: str, timeout: float) -> subprocess.CompletedProcess:
    """``python -m benchmarks *args``, its output captured as text."""
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(600)
def test_the_quick_benchmarks_run_and_every_contender_reports():
    result = benchmarks("tiny", "cpu", "python", "--quick", "--repeat", "1", timeout=580)
    assert result.returncode == 0, result.stderr[-2000:]
    assert {line.split()[0] for line in result.stdout.splitlines()[2:]} >= {"tiny", "cpu", "python"}, result.stdout
    contenders = ("serial", "DataLoader", "torchdata.nodes process", "SPDL process pool", "torchqueue")
    contenders += ("torchqueue thread",)
    for contender in contenders:
        lines = [line for line in result.stdout.splitlines() if f" {contender} " in line]
        assert lines and all("failed" not in line for line in lines), (contender, result.stdout)


@pytest.mark.timeout(300)
def test_the_seed_shapes_run_with_the_workers_asked_for():
    result = benchmarks("seed", "--quick", "--repeat", "1", "--workers", "1", timeout=280)
    assert result.returncode == 0, result.stderr[-2000:]
    assert " 1 workers " in result.stdout.splitlines()[0]
    shapes = [line for line in result.stdout.splitlines() if line.startswith("seed ")]
    for contender in (
        "DataLoader, one batch per chunk",
        "torchqueue, read+transform fused",
        "torchqueue, one map per chunk",
    ):
        assert any(f" {contender} " in line and "events/s" in line and "failed" not in line for line in shapes), (
            contender,
            result.stdout,
        )


def test_workers_below_one_are_refused():
    result = benchmarks("seed", "--workers", "0", timeout=60)
    assert result.returncode != 0 and "--workers must be at least 1" in result.stderr


@pytest.mark.timeout(300)
def test_only_runs_the_contenders_named():
    result = benchmarks("python", "--quick", "--repeat", "1", "--only", "serial,thread", timeout=280)
    assert result.returncode == 0, result.stderr[-2000:]
    names = {line[14:62].strip() for line in result.stdout.splitlines()[2:]}
    assert names == {"serial", "torchdata.nodes thread", "torchqueue thread"}, result.stdout


def test_cpu_over_the_work_alone_is_the_median_of_each_rounds_ratio():
    """The machine's speed drifts between rounds: each run is compared with the work alone's run of the
    same round (the medians of the two columns would say -45% here, a drift and not a saving)."""
    from benchmarks._harness import Workload

    work = Workload("w", "items/s", 100, sum, cpu_per="item")
    for name in ("serial", "staged", "slow"):
        work.run(name, list)
    cpu = {
        "serial": {0: 1.0, 1: 2.0, 2: 2.0},
        "staged": {0: 1.1, 1: 1.1, 2: 2.2},  # round 1 ran while the machine was fast again
        "slow": {0: 3.0},  # took long: one round only
    }
    serial, staged, slow = work._cpu_lines(cpu)
    assert serial.note == "+0% over serial" and serial.value == pytest.approx(20.0)
    assert staged.note == "+10% over serial (-45% to +10% in 3 rounds)"
    assert staged.value == pytest.approx(11.0)
    assert slow.note == "+200% over serial" and slow.value == pytest.approx(30.0)


@pytest.mark.timeout(300)
def test_the_hops_probe_splits_each_workers_cpu():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.hops", "--rounds", "1", "--events-per-file", "100", "--epochs", "2"],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if " total " in line}
    assert {"event_to_graph#0", "event_to_graph#1", "RepackStep(64)#0"} <= set(rows), result.stdout
    assert "read_chunk#0" not in rows  # the reads run in the pool's workers (``_premap``)
    for name in ("event_to_graph#0", "RepackStep(64)#0"):  # each worker called its step and sent
        figures = rows[name].split()
        assert float(figures[figures.index("call") + 1]) > 0 and float(figures[figures.index("encode") + 1]) > 0
    assert float(rows["RepackStep(64)#0"].split("decode")[1].split()[0]) > 0  # it decoded the pool's graphs
    assert "over the work alone" in result.stdout
    assert "400 events x 2 epoch(s)" in result.stdout  # 4 files of 100 events, twice through one pipeline
    start = next(line for line in result.stdout.splitlines() if line.startswith("a pipeline's start and close"))
    assert float(start.split("no data: ")[1].split()[0]) > 0  # forking, starting and joining workers cost CPU
