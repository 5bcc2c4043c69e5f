"""experiments/toy_grid.py: a 2-cell, 2-seed grid at tiny sizes makes its table, intervals and plots,
and a rerun reuses the runs it has."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import toy_grid  # noqa: E402

TINY = ["clusters=4", "dim=8", "n_max=40", "test_per_cluster=5", "hidden=16", "feat_dim=8",
        "head_hidden=16", "steps_per_epoch=10", "batch=16", "log_every=10"]


def grid(out):
    return ["--sweeps", "bottleneck", "--bottlenecks", "3", "--K_other", "8", "--seeds", "2",
            "--steps", "20", "--workers", "1", "--output_dir", str(out), "--set"] + TINY


def test_two_cells_two_seeds(tmp_path, capsys):
    assert toy_grid.main(grid(tmp_path)) == 0
    rows = json.load(open(tmp_path / "results.json"))["rows"]
    assert sorted((r["koleo"], r["seed"]) for r in rows) == [(0.0, 0), (0.0, 1), (0.1, 0), (0.1, 1)]
    table = (tmp_path / "results.md").read_text()
    assert "| 8 | 3 | 1 | 0 | 2 |" in table and "| 8 | 3 | 1 | 0.1 | 2 |" in table
    assert "paired by seed" in table
    for name in ("unique_vs_K.png", "knn_vs_K.png", "rare_vs_rho.png"):
        assert (tmp_path / name).stat().st_size > 1000
    capsys.readouterr()
    assert toy_grid.main(grid(tmp_path)) == 0  # the rerun trains nothing
    assert capsys.readouterr().out.count("exists") == 4
    assert (tmp_path / "results.md").read_text().split("\n", 1)[1] == table.split("\n", 1)[1]


def test_interval_is_students_t():
    mean, half, n = toy_grid.ci95([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (mean, n) == (3.0, 5) and abs(half - 2.776 * (2.5 ** 0.5) / 5 ** 0.5) < 1e-9
    assert toy_grid.ci95([7.0]) == (7.0, None, 1)
    assert toy_grid.ci95([None, float("nan")]) == (None, None, 0)
