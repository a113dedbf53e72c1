"""The Sphinx site builds with warnings as errors: broken references and missing docstrings fail."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sphinx")  # the docs toolchain (the dev extra): absent on machines that only run the library
pytest.importorskip("myst_nb")

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(300)


def sphinx_build(src: Path, out: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "-d", str(out / ".doctrees")]
    return subprocess.run([*cmd, *extra, str(src), str(out)], capture_output=True, text=True, timeout=280, env=env)


def test_docs_build_without_warnings_and_document_the_api(tmp_path):
    out = tmp_path / "html"
    result = sphinx_build(ROOT / "docs", out)
    assert result.returncode == 0, f"sphinx-build -W failed:\n{result.stdout}\n{result.stderr}"
    api = (out / "api.html").read_text()
    for name in ("Sequence", "RepackStep", "QueueFlowLoader", "WorkerDiedError", "get_worker_info"):
        assert f'id="torchqueue.{name}"' in api, name
    for name in ("H5Chunks", "read_h5_chunk", "read_h5_events", "collate_graphs"):
        assert f'id="torchqueue.sources.{name}"' in api, name
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        assert (out / "notebooks" / "generated" / f"{notebook.stem}.html").is_file(), notebook.name


def test_an_undocumented_public_object_fails_the_build(tmp_path):
    (tmp_path / "torchqueue_undocumented.py").write_text(
        '"""A module."""\n\n\nclass Documented:\n    """Has a docstring."""\n\n    def method(self):\n        pass\n'
    )
    src = tmp_path / "src"
    src.mkdir()
    (src / "index.md").write_text("# t\n\n```{eval-rst}\n.. autoclass:: torchqueue_undocumented.Documented\n```\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    result = sphinx_build(src, tmp_path / "html", "-c", str(ROOT / "docs"), env=env)
    assert result.returncode != 0
    assert "torchqueue_undocumented.Documented.method has no docstring" in result.stderr


def _sections(page: str) -> list[str]:
    return [line for line in (ROOT / "docs" / page).read_text().splitlines() if line.startswith("## ")]


def test_the_internals_live_on_the_design_page_and_concepts_keeps_what_a_user_needs():
    index = (ROOT / "docs" / "index.md").read_text()
    assert "\ndesign\n" in index.split("```{toctree}")[1]
    concepts, design = ((ROOT / "docs" / p).read_text() for p in ("concepts.md", "design.md"))
    for internal in ("pwritev", "write lease", "1.5 GB/s", "are reused", "stacked into one block"):
        assert internal in design and internal not in concepts, internal
    for kept in ("## Stage boundaries", "is_shared()", ".clone()", "torch.save"):
        assert kept in concepts, kept


def test_the_migration_page_lists_the_differences_first():
    sections = _sections("from-dataloader.md")
    assert sections[0] == "## What differs, in short", sections
    first = (ROOT / "docs" / "from-dataloader.md").read_text().split("## What stays the same")[0]
    assert "nothing else changes" not in first and "keeps the whole batch's memory" in first
