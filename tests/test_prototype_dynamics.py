"""experiments/prototype_dynamics.py and experiments/slim_checkpoint.py on checkpoints of tiny
dino.py runs (DINO and DINO-vMF, ~15 s each)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import koleo_proto
import dino

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1")
TINY = ("--subset 32 --batch_size_per_gpu 16 --num_workers 0 --arch vit_nano --patch_size 7 --out_dim 64 "
        "--local_crops_number 2 --local_crops_size 14 --warmup_epochs 0 --epochs 1 --freeze_last_layer 0").split()


def run(script, *argv):
    out = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, argv)],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(scope="module", params=[False, True], ids=["dino", "dino-vmf"])
def tiny_run(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    run("dino.py", *TINY, "--output_dir", path, *(["--vmf"] if request.param else []))
    return path


def test_dynamics_of_a_tiny_run(tiny_run, tmp_path):
    out = run("experiments/prototype_dynamics.py", tiny_run / "checkpoint.pth", "--images", 32, "--batches", 2,
              "--batch_size", 8, "--output", tmp_path / "rows.json")
    assert "| checkpoint | epoch |" in out
    (row,) = json.loads((tmp_path / "rows.json").read_text())
    assert (row["epoch"], row["K"]) == (1, 64)
    assert 0 <= row["mean_resultant"] <= 1 + 1e-6 and 1 - 1e-6 <= row["participation_ratio"] <= 256
    assert 0 <= row["teacher_entropy"] <= row["marginal_entropy"] + 1e-5 <= 4.16  # ln 64 = 4.159
    assert 1 <= row["argmax_used"] <= 32 and all(1 <= u <= 64 for u in row["unique"])
    assert abs(row["snr_noise"] - (2 / 3.141592653589793) ** 0.5 / 2 ** 0.5) < 1e-9
    for key in ("snr_picked", "snr_others", "others_alignment", "koleo", "cos_prototype_mean_feature"):
        assert isinstance(row[key], float)
    assert 0 < row["adam_step_others"] < 10 and row["weight_v_norm"] > 0  # the AdamW state after 2 steps


def test_slim_checkpoint_audits_like_the_full_one(tiny_run, tmp_path):
    slim = tmp_path / "slim.pth"
    run("experiments/slim_checkpoint.py", tiny_run / "checkpoint.pth", slim)
    full = koleo_proto.safe_load(str(tiny_run / "checkpoint.pth"))  # weights_only, Namespace args allowed
    small = torch.load(slim, map_location="cpu", weights_only=True)  # plain tensors, dicts and lists only
    assert set(small) == {"teacher", "args", "epoch", "log"} and small["log"][-1]["epoch"] == 1
    assert all(k.startswith(("backbone.", "head.last_layer.")) for k in small["teacher"])
    assert torch.equal(small["teacher"]["head.last_layer.weight_v"], full["teacher"]["head.last_layer.weight_v"])
    assert slim.stat().st_size < (tiny_run / "checkpoint.pth").stat().st_size / 4
    audits = []
    for name, path in (("full", tiny_run / "checkpoint.pth"), ("slim", slim)):
        run("evaluate.py", "--checkpoint", path, "--prototypes", "--knn", "--subset", 32, "--num_workers", 0,
            "--no_cache", "--output_dir", tmp_path / name)
        (result,) = [json.loads(p.read_text()) for p in (tmp_path / name).glob("*.json")]
        audits.append((result["prototypes"]["head.last_layer"]["unique"], result["knn"]))
    assert audits[0] == audits[1]


def test_init_starts_a_new_run_from_a_whole_teacher(tiny_run, tmp_path):
    whole, part = tmp_path / "whole.pth", tmp_path / "part.pth"
    run("experiments/slim_checkpoint.py", tiny_run / "checkpoint.pth", whole, "--whole_teacher")
    run("experiments/slim_checkpoint.py", tiny_run / "checkpoint.pth", part)
    small = torch.load(whole, map_location="cpu", weights_only=True)
    assert "head.mlp.0.weight" in small["teacher"] and "center" in small["dino_loss"]
    before = json.loads((tiny_run / "summary.json").read_text())
    vmf = ["--vmf"] if before["args"]["vmf"] else []
    out = run("dino.py", *TINY, *vmf, "--init", whole, "--output_dir", tmp_path / "next")
    assert "start from the teacher of" in out and "kNN top-1 of the starting teacher" in out
    after = json.loads((tmp_path / "next" / "summary.json").read_text())
    assert after["knn_top1_init"] == before["knn_top1"]  # the same teacher, the same kNN
    log = [json.loads(line) for line in open(tmp_path / "next" / "log.txt")]
    assert [e["epoch"] for e in log] == [1]  # a new run: its own epochs and schedules
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "dino.py"), *TINY, *vmf, "--init", part,
                          "--output_dir", tmp_path / "bad"], capture_output=True, text=True, env=ENV)
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1
    assert "does not fit this model" in bad.stderr
