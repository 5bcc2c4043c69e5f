"""Tests of experiments/collapse.py: the table's aggregation over seeds on hand-made rows, the
commands of a dry run, and a real 2-cell grid (tiny runs, ~30 s on one CPU thread) that is then
rerun without retraining anything."""
import json
import os
import re
import subprocess
import sys

from experiments import collapse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "collapse.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1")
TINY_TRAIN = ("--subset 32 --batch_size_per_gpu 16 --num_workers 0 --arch vit_nano --patch_size 7 "
              "--local_crops_number 2 --local_crops_size 14 --warmup_epochs 0")
TINY_EVAL = "--subset 32 --fewshot_draws 2 --fewshot_shots 1 --linear_steps 20 --num_workers 0 --no_cache"


def run_script(*argv):
    return subprocess.run([sys.executable, SCRIPT, *argv], capture_output=True, text=True, env=ENV, timeout=120)


def row(seed, knn, unique, method="dino", K=64, koleo=0.0, rho=1.0):
    return dict(method=method, K=K, koleo=koleo, long_tail=rho, seed=seed, cell=f"c{seed}", trained=True,
                unique_prototypes=unique, unique_percent=100 * unique / K, knn_top1=knn, linear_top1=None, train_seconds=1.0)


def test_table_aggregates_seeds():
    rows = [row(0, 60.0, 10), row(1, 62.0, 12), row(2, 64.0, 14),    # one group of 3 seeds
            row(0, 50.0, 40, koleo=0.1),                             # one seed: no ± in its cells
            row(0, 70.0, 5, method="dino-vmf", rho=10.0, K=16),
            dict(row(0, None, 0, K=128), trained=False)]             # not trained: no table row
    table = collapse.markdown_table(rows, ["dino", "dino-vmf"]).splitlines()
    assert len(table) == 2 + 3
    header = [c.strip() for c in table[0].strip("|").split("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    first = dict(zip(header, cells[0]))
    assert (first["method"], first["KoLeo"], first["K"], first["seeds"]) == ("dino", "0", "64", "3")
    assert first["kNN top-1"] == "62.00 ± 2.00"           # sample std of 60, 62, 64
    assert first["unique"] == "12 ± 2"
    assert first["linear top-1"] == "-"                   # missing everywhere
    second = dict(zip(header, cells[1]))
    assert (second["KoLeo"], second["seeds"], second["kNN top-1"], second["unique %"]) == ("0.1", "1", "50.00", "62.5")
    assert dict(zip(header, cells[2]))["method"] == "dino-vmf"   # the order of --methods
    mean, std, n = collapse.mean_std([1.0, None, 3.0])
    assert (mean, n) == (2.0, 2) and abs(std - 2 ** 0.5) < 1e-12


def test_dry_run_ibot_vmf(tmp_path):
    out = run_script("--methods", "ibot-vmf", "--K", "64", "--koleo", "0.1", "--long_tail", "10", "--dry_run",
                     "--output_dir", str(tmp_path), "--extra", "--subset 64 --num_workers 0")
    assert out.returncode == 0, out.stderr
    train = next(line for line in out.stdout.splitlines() if "ibot.py" in line)
    for flag in ("--vmf", "--patch_out_dim 64", "--out_dim 64", "--koleo 0.1", "--long_tail 10", "--seed 0",
                 "--subset 64", os.path.join(str(tmp_path), "ibot-vmf_K64_koleo0.1_lt10_seed0")):
        assert flag in train
    assert "evaluate.py" in out.stdout and "--long_tail 10" in out.stdout.splitlines()[-1]
    assert os.listdir(tmp_path) == []                        # a dry run writes nothing


def test_two_cell_grid_then_rerun(tmp_path):
    argv = ["--methods", "dino", "--K", "16", "32", "--koleo", "0", "--long_tail", "1", "--epochs", "1",
            "--extra", TINY_TRAIN, "--eval_extra", TINY_EVAL, "--output_dir", str(tmp_path)]
    first = run_script(*argv)
    assert first.returncode == 0, first.stdout + first.stderr
    assert len(first.stdout.splitlines()) == 5              # one line per step, one at the end
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["K"] for r in results["rows"]] == [16, 32] and all(r["knn_top1"] is not None for r in results["rows"])
    md = (tmp_path / "results.md").read_text()
    assert "experiments/collapse.py" in md and "--K 16 32" in md
    data = [line for line in md.splitlines() if re.match(r"\| dino \| 1 \| 0 \| (16|32) \| 1 \|", line)]
    assert len(data) == 2 and all(re.search(r"\| \d+\.\d\d \|", line) for line in data)
    for png in ("unique_over_training.png", "knn_vs_K.png", "unique_vs_K.png"):
        assert (tmp_path / png).stat().st_size > 1000
    summaries = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/summary.json")}
    assert len(summaries) == 2

    second = run_script(*argv)                              # nothing to train or evaluate again
    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stdout.count("done, skipped") == 4
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/summary.json")} == summaries
