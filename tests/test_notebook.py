"""demo.ipynb runs top to bottom (with its training shortened), so it can never rot."""
import nbformat
from nbclient import NotebookClient

from conftest import ROOT


def test_notebook_executes(tmp_path, monkeypatch):
    notebook = nbformat.read(ROOT / "demo.ipynb", as_version=4)
    setup = next(cell for cell in notebook.cells if cell.cell_type == "code")
    assert "TRAIN_STEPS = 1200" in setup.source
    setup.source = setup.source.replace("TRAIN_STEPS = 1200", "TRAIN_STEPS = 12")
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the kernel imports celebgen from the repo
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()  # raises on any failing cell
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    text = "".join(out.get("text", "") for out in outputs)
    assert "step 12/12" in text and "attention unchanged by a uniform time rotation: True" in text
    assert "precision auto -> " in text  # the notebook trains with the default precision, chosen per machine
    assert "block(x) == x at initialisation: True" in text
    assert sum("image/png" in out.get("data", {}) for out in outputs) >= 15
    assert (tmp_path / "experiments" / "notebook" / "checkpoints" / "last.pt").is_file()
