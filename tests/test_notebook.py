"""demo.ipynb runs top to bottom (with its training shortened), so it can never rot."""
import json

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from conftest import ROOT

# the flags by which the notebook's training cell knows its own earlier run in experiments/notebook
NOTEBOOK_RUN = {"dataset": "toy", "patch_size": 8, "eval_every": 100}


def test_notebook_executes(tmp_path, monkeypatch):
    notebook = nbformat.read(ROOT / "demo.ipynb", as_version=4)
    setup = next(cell for cell in notebook.cells if cell.cell_type == "code")
    assert "TRAIN_STEPS = 1200" in setup.source
    setup.source = setup.source.replace("TRAIN_STEPS = 1200", "TRAIN_STEPS = 12")
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    earlier = tmp_path / "experiments" / "notebook"  # the notebook's own earlier run: trained afresh
    earlier.mkdir(parents=True)
    (earlier / "args.json").write_text(json.dumps(NOTEBOOK_RUN))
    (earlier / "old.txt").write_text("")
    execute(notebook, tmp_path, monkeypatch)  # raises on any failing cell
    assert not (earlier / "old.txt").exists()
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    text = "".join(out.get("text", "") for out in outputs)
    assert "step 12/12" in text and "attention unchanged by a uniform time rotation: True" in text
    assert "precision auto -> " in text  # the notebook trains with the default precision, chosen per machine
    assert "block(x) == x at initialisation: True" in text
    assert sum("image/png" in out.get("data", {}) for out in outputs) >= 15
    assert (tmp_path / "experiments" / "notebook" / "checkpoints" / "last.pt").is_file()
    saved = json.loads((earlier / "args.json").read_text())  # this run, too, is the next one's to delete
    assert {flag: saved[flag] for flag in NOTEBOOK_RUN} == NOTEBOOK_RUN


def test_the_notebook_keeps_a_run_of_yours_named_notebook(tmp_path, monkeypatch):
    """A train --exp_name notebook of the reader's own stops the notebook's training cell, intact."""
    notebook = nbformat.read(ROOT / "demo.ipynb", as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    train = next(cell for cell in code if '"--exp_name", "notebook"' in cell.source)
    code[0].source = code[0].source.replace("TRAIN_STEPS = 1200", "TRAIN_STEPS = 12")
    notebook.cells = [code[0], train]
    yours = tmp_path / "experiments" / "notebook"
    yours.mkdir(parents=True)
    (yours / "args.json").write_text(json.dumps({**NOTEBOOK_RUN, "patch_size": 4}))
    with pytest.raises(CellExecutionError, match="holds a run this notebook did not make: rename it"):
        execute(notebook, tmp_path, monkeypatch)
    assert sorted(p.name for p in yours.iterdir()) == ["args.json"]


def execute(notebook, folder, monkeypatch):
    """Run the notebook's cells in order in a fresh kernel whose working folder is `folder`."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the kernel imports celebgen from the repo
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(folder)}}).execute()
