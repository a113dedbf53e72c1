"""Every notebook in notebooks/ runs top to bottom in a real Jupyter kernel, and is stored stripped."""

from __future__ import annotations

from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))

# What each notebook's run must have shown, beyond running without an error (a notebook not
# listed here only has to run): texts its cells print, and the MIME types of rich outputs.
EXPECTED: dict[str, dict[str, list[str]]] = {
    "quickstart": {"text": ["elapsed"]},  # the stats table was printed
    "calorimeter": {
        "text": ["graphs per batch, per epoch:", "DataBatch(", "elapsed"],
        "mime": ["image/png"],  # stats.plot() was displayed inline
    },
    "from-dataloader": {
        "text": [
            "epoch 0: 13 batches identical to DataLoader's, tensor by tensor",
            "epoch 1: 13 batches identical to DataLoader's, tensor by tensor",
            "fork: 13 batches identical to DataLoader's",
            "rank 0 of 2 gets 50 samples",
            "the resumed run is identical to DataLoader's epochs 2 and 3",
        ]
    },
    "lightning": {"text": ["val_loss after 2 epochs:", "every epoch saw every sample once, in a different order"]},
}


def notebook_param(path: Path):
    return pytest.param(path, id=path.stem, marks=pytest.mark.timeout(180))


def code_cells(notebook) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem) for p in NOTEBOOKS])
def test_the_notebook_is_stored_stripped(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata.kernelspec.name == "python3"
    assert notebook.cells and notebook.cells[0].cell_type == "markdown"
    assert notebook.cells[0].source.startswith("# "), "opens with a title (the docs build needs one)"
    for cell in code_cells(notebook):
        assert not cell.get("outputs"), f"outputs stripped in git: {cell.source[:60]!r}"
        assert cell.get("execution_count") is None, f"execution_count null in git: {cell.source[:60]!r}"


@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem) for p in NOTEBOOKS])
def test_every_code_cell_follows_prose_saying_what_to_look_for(path):
    cells = nbformat.read(path, as_version=4).cells
    pairs = zip(cells, cells[1:])
    bare = [cell.source[:60] for before, cell in pairs if (before.cell_type, cell.cell_type) == ("code", "code")]
    assert not bare, f"code cells with no markdown cell before them: {bare}"


def test_every_expectation_names_a_notebook():
    assert set(EXPECTED) <= {p.stem for p in NOTEBOOKS}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("path", [notebook_param(p) for p in NOTEBOOKS])
def test_the_notebook_runs_in_a_jupyter_kernel(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=150, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on an error
    outputs = [o for cell in code_cells(notebook) for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    stdout = "".join(o.text for o in outputs if o.output_type == "stream" and o.name == "stdout")
    mimes = {mime for o in outputs if o.output_type in ("display_data", "execute_result") for mime in o.data}
    expected = EXPECTED.get(path.stem, {})
    for text in expected.get("text", []):
        assert text in stdout, f"{path.name} did not print {text!r}; it printed:\n{stdout}"
    for mime in expected.get("mime", []):
        assert mime in mimes, f"{path.name} displayed no {mime} output (only {sorted(mimes)})"
    assert not list(tmp_path.glob("*")), "the notebook left files in its working directory"
