"""The benchmark suite runs (figures are never asserted: only that every contender produced a line)."""

import subprocess
import sys

import pytest


@pytest.mark.timeout(600)
def test_the_quick_benchmarks_run_and_every_contender_reports():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "tiny", "cpu", "--quick", "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=580,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for contender in ("serial", "DataLoader", "torchdata.nodes process", "SPDL process pool", "torchqueue"):
        lines = [line for line in result.stdout.splitlines() if f" {contender} " in line]
        assert lines and all("failed" not in line for line in lines), (contender, result.stdout)
