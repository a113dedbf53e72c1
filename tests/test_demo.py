"""The seed example: graph building, the generated HDF5 data, and the demo end to end."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import torchqueue as tq
from torchqueue.demo import calorimeter as calo
from torchqueue.sources import H5Chunks

pytestmark = pytest.mark.timeout(180)


def test_event_to_graph_links_touching_hits_only():
    image = np.zeros(calo.SHAPE, dtype=np.float32)
    image[0, 0, 0] = 1.0
    image[1, 1, 1] = 2.0  # touches (0, 0, 0) diagonally
    image[5, 5, 5] = 3.0  # alone
    graph = calo.event_to_graph((image, 42.0))
    assert graph.num_nodes == 3
    assert torch.equal(graph.x[:, 0], torch.tensor([1.0, 2.0, 3.0]))
    assert sorted(map(tuple, graph.edge_index.T.tolist())) == [(0, 1), (1, 0)]
    assert graph.y.item() == 42.0
    assert torch.allclose(graph.pos[1], torch.tensor([1 / 50, 1 / 50, 1 / 24]))


def test_generated_events_are_sparse_showers_and_regeneration_is_skipped(tmp_path):
    paths = calo.generate_dataset(tmp_path, n_files=2, events_per_file=5)
    events = calo.read_chunk((paths[0], 0, 5))
    assert len(events) == 5
    fractions = [np.count_nonzero(image) / image.size for image, _ in events]
    assert all(0.005 < f < 0.05 for f in fractions), fractions
    assert all(10.0 <= energy <= 100.0 for _, energy in events)
    mtimes = [os.stat(p).st_mtime_ns for p in paths]
    calo.generate_dataset(tmp_path, n_files=2, events_per_file=5)
    assert mtimes == [os.stat(p).st_mtime_ns for p in paths]


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_the_pipeline_yields_the_same_graphs_as_a_dataloader(tmp_path, context, no_leaks):
    paths = calo.generate_dataset(tmp_path, n_files=2, events_per_file=10)
    chunks = H5Chunks(paths, length_key="energy", chunk_size=4, shuffle=False)()
    with tq.Sequence(
        tq.ProcessStep(calo.read_chunk, 2),
        tq.PoolStep(calo.event_to_graph, nworkers=2),
        tq.RepackStep(6),
        tq.ProcessStep(calo.collate),
        context=context,
    ) as seq:
        batches = list(seq(chunks))
    loader = DataLoader(calo.EventDataset(paths), batch_size=6, num_workers=0, collate_fn=calo.collate)
    expected = list(loader)
    assert [b.num_graphs for b in batches] == [6, 6, 6, 2]
    for got, want in zip(batches, expected):
        assert torch.equal(got.x, want.x) and torch.equal(got.edge_index, want.edge_index)
        assert torch.equal(got.y, want.y) and torch.equal(got.batch, want.batch)


def test_the_demo_command_runs_and_prints_rates_and_stats(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torchqueue.demo",
            "--data",
            str(tmp_path),
            "--files",
            "2",
            "--events",
            "40",
            "--chunk-size",
            "10",
            "--batch-size",
            "16",
        ],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert result.returncode == 0, result.stderr
    assert "torchqueue Sequence:" in result.stdout and "DataLoader, one event per item:" in result.stdout
    assert "DataLoader, one batch per chunk:" in result.stdout  # DataLoader's fastest way, shown too
    assert "elapsed" in result.stdout and "graph" in result.stdout  # the stats table


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_installs_only_the_library_and_the_extras_it_uses_in_an_environment_of_its_own():
    root = Path(__file__).resolve().parent.parent
    # --no-print-directory: under `make test` (CI) this make is a sub-make, which prints "Leaving directory"
    plan = subprocess.run(
        ["make", "--no-print-directory", "-n", "-B", "demo"], cwd=root, capture_output=True, text=True, timeout=30
    )
    assert plan.returncode == 0, plan.stderr
    installs = [line for line in plan.stdout.splitlines() if "pip install" in line]
    assert len(installs) == 1 and installs[0].startswith(".venv-demo/bin/pip install"), plan.stdout
    assert '-c constraints.txt -e ".[hdf5,pyg]"' in installs[0]  # torch and the rest pinned as for the tests
    assert "-m torchqueue.demo" in plan.stdout.splitlines()[-1] and ".venv/" not in plan.stdout
