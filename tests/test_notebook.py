"""results/pareto_frontiers.ipynb runs headless on the committed quickstart results: no error
cell, every expected figure drawn as a PNG and followed by its sentence of interpretation, and
the notebook is stored without outputs.

Set MOE_SCALING_SWEEP_DIR to execute it on another sweep folder.
"""

import json

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO

NOTEBOOK = REPO / "results" / "pareto_frontiers.ipynb"
EXPECTED = {
    "loss_vs_memory", "loss_vs_flops", "training_curves", "expert_load",                # the runs
    "law_curves", "predicted_vs_observed", "residuals",                                  # the fit
    "frontier_sweep", "iso_loss_sweep", "optimum_vs_budget_sweep",                       # sweep scale
    "frontier_phone", "frontier_flops_phone", "published_models", "iso_loss_phone",      # phone scale
    "optimum_vs_budget_phone", "by_compute_phone",
    "isoflop",                                                                           # the isoflop study
    "layout_isoflop", "layout_minima",                                                   # the layout study
}


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


@pytest.fixture(scope="module")
def executed():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, kernel_name="python3", timeout=300,
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    return nb


def test_notebook_runs_and_draws_every_figure_with_its_sentence(executed):
    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, "\n".join(f"{o.ename}: {o.evalue}" for o in errors)
    stdout = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    listed = stdout.split("figures:")[-1].strip().split(", ")
    assert set(listed) == EXPECTED

    # each figure is a PNG display followed by a markdown sentence that reads it
    shown = []
    for cell in executed.cells:
        if cell.cell_type != "code":
            continue
        kinds = [("png" if "image/png" in o.get("data", {}) else
                  "md" if "text/markdown" in o.get("data", {}) else o.output_type) for o in cell.outputs]
        for i, kind in enumerate(kinds):
            if kind == "png":
                assert kinds[i + 1:i + 2] == ["md"], f"a figure without its sentence: {cell.source[:60]}"
                sentence = cell.outputs[i + 1]["data"]["text/markdown"]
                assert len(sentence) > 60 and "nan" not in sentence.lower()
                shown.append(cell.outputs[i]["data"]["image/png"])
    assert len(shown) == len(EXPECTED)
    assert len(set(shown)) == len(shown)              # no figure drawn twice


def test_notebook_reports_the_fit_it_used(executed):
    text = json.dumps([c.outputs for c in executed.cells if c.cell_type == "code"])
    assert "fitted:" in text and "heldout_rmse" in text and "held out:" in text
