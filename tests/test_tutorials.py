"""Every tutorial runs top to bottom (at the small budget TUTORIAL_FAST=1 selects) and ends with
its JSON line. The committed outputs come from full runs: tutorials/README.md has the command."""
import glob
import json
import os

import nbclient
import nbformat
import pytest

TUTORIALS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tutorials")
NOTEBOOKS = sorted(glob.glob(os.path.join(TUTORIALS, "*.ipynb")))


def test_there_are_five_tutorials_with_figures():
    assert [os.path.basename(p)[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05"]
    for path in NOTEBOOKS:  # committed with outputs, so that they render without running
        outputs = [o for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"
                   for o in c.get("outputs", [])]
        assert any("image/png" in o.get("data", {}) for o in outputs), path


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_tutorial_runs(path, monkeypatch):
    monkeypatch.setenv("TUTORIAL_FAST", "1")
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": TUTORIALS}}).execute()
    last = nb.cells[-1]
    text = "".join(o.get("text", "") for o in last.outputs if o.output_type == "stream")
    summary = json.loads(text.strip().splitlines()[-1])
    assert summary["seconds"] > 0
