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
