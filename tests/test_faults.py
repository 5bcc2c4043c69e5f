"""Faults that must lose nothing (issue 16), for dino.py and ibot.py: kill -9 in the middle of an
epoch, kill -9 while a checkpoint is written, a non-finite loss, an unwritable or full output_dir.
One Python process imports both scripts once, then forks a child per run, which applies the fault
and runs the script's main through its run() as `python dino.py ...` would."""
import json
import os
import subprocess
import sys

import pytest
import torch

import koleo_proto
import dino
from helpers import sha

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1")
# 2 epochs of 2 steps, 16 tokens per global crop, 64 prototypes: a few seconds per run
TINY = ["--arch", "vit_nano", "--patch_size", "7", "--local_crops_size", "14",
        "--local_crops_number", "2", "--out_dim", "64", "--batch_size_per_gpu", "16",
        "--subset", "32", "--epochs", "2", "--num_workers", "0", "--warmup_epochs", "1",
        "--freeze_last_layer", "0"]
EXTRA = {"dino": [], "ibot": ["--patch_out_dim", "64"]}
LOSS = {"dino": "DINOLoss", "ibot": "iBOTLoss"}

DRIVER = r"""
import builtins, errno, io, json, os, signal, sys, traceback
sys.path.insert(0, sys.argv[1])
import dino, ibot, koleo_proto
folder, results = sys.argv[2], []
for i, case in enumerate(json.loads(sys.argv[3])):
    err = os.path.join(folder, f"stderr{i}.txt")
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        module, fault = {"dino": dino, "ibot": ibot}[case["script"]], case.get("fault", {})
        loss_class = getattr(module, case["loss"])
        forward, calls = loss_class.forward, [0]
        def faulty_forward(self, *a, **k):
            calls[0] += 1
            if calls[0] == fault.get("kill_at_loss"):
                os.kill(os.getpid(), signal.SIGKILL)  # as kill -9 from outside, mid-epoch
            out = forward(self, *a, **k)
            if calls[0] == fault.get("nan_at_loss"):
                nan = float("nan")
                out = {k: v * nan for k, v in out.items()} if isinstance(out, dict) else out * nan
            return out
        loss_class.forward = faulty_forward
        save, saves = module.torch.save, [0]
        def faulty_save(obj, f):
            saves[0] += 1
            if saves[0] != fault.get("kill_in_save"):
                return save(obj, f)
            buf = io.BytesIO()
            save(obj, buf)
            f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)  # half of the checkpoint written
        module.torch.save = faulty_save
        if "open_error" in fault:  # a read-only or full file system under output_dir
            real_open, errcode = builtins.open, getattr(errno, fault["open_error"])
            def failing_open(path, mode="r", *a, **k):
                if str(path).startswith(fault["under"]) and any(c in mode for c in "wax+"):
                    raise OSError(errcode, os.strerror(errcode), str(path))
                return real_open(path, mode, *a, **k)
            builtins.open = failing_open
        if "free_bytes" in fault:
            usage = koleo_proto.shutil.disk_usage
            koleo_proto.shutil.disk_usage = lambda p: usage(p)._replace(free=fault["free_bytes"])
        train_one_epoch = module.train_one_epoch
        def counted_epoch(*a, **k):
            open(os.path.join(folder, f"trained{i}"), "w").close()
            return train_one_epoch(*a, **k)
        module.train_one_epoch = counted_epoch
        sys.argv, code = [case["script"] + ".py", *case["argv"]], 0
        try:
            koleo_proto.run(module.main, case["script"] + ".py")
        except SystemExit as e:  # the interpreter prints a string exit code and exits with 1
            if isinstance(e.code, str):
                sys.stderr.write(f"{e.code}\n")
            code = 1 if isinstance(e.code, str) else (e.code or 0)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        os._exit(code)
    status = os.waitpid(pid, 0)[1]
    trained = os.path.exists(os.path.join(folder, f"trained{i}"))
    results.append([os.waitstatus_to_exitcode(status), open(err).read(), trained])
print(json.dumps(results))
"""


def run_cases(tmp_path, cases):
    """[(exit code, stderr, whether a training epoch started)] of each case, run in order."""
    folder = tmp_path / "driver"
    folder.mkdir(exist_ok=True)
    out = subprocess.run([sys.executable, "-c", DRIVER, ROOT, str(folder), json.dumps(cases)],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def case(script, output_dir, fault=None, *extra):
    return dict(script=script, loss=LOSS[script], fault=fault or {},
                argv=TINY + EXTRA[script] + ["--output_dir", str(output_dir), *extra])


def one_line(stderr):
    lines = [l for l in stderr.replace("\r", "\n").splitlines() if l.strip() and "%|" not in l]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    return lines[0]


def assert_same_run(a, b):
    """Two training checkpoints hold the same state (the seconds spent aside)."""
    a, b = koleo_proto.safe_load(str(a)), koleo_proto.safe_load(str(b))
    assert a["epoch"] == b["epoch"]
    for part in ("student", "teacher", "dino_loss" if "dino_loss" in a else "ibot_loss"):
        assert a[part].keys() == b[part].keys()
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), (part, k)
    for (i, s), (j, t) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items()):
        assert i == j and all(torch.equal(s[k], t[k]) for k in s), i


@pytest.mark.parametrize("script", ["dino", "ibot"])
def test_kill_mid_epoch_then_rerun_ends_as_uninterrupted(tmp_path, script):
    """kill -9 at step 1 of epoch 2, then the same command: it continues from epoch 1 and ends with
    the checkpoint of a run that was never interrupted."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    results = run_cases(tmp_path, [case(script, whole), case(script, killed, {"kill_at_loss": 3}),
                                   case(script, killed)])
    assert [r[0] for r in results] == [0, -9, 0], results
    assert koleo_proto.safe_load(str(killed / "checkpoint.pth"))["epoch"] == 2
    assert_same_run(whole / "checkpoint.pth", killed / "checkpoint.pth")
    assert [json.loads(l)["epoch"] for l in open(killed / "log.txt")] == [1, 2]


@pytest.mark.parametrize("script", ["dino", "ibot"])
def test_kill_during_checkpoint_write_keeps_the_previous(tmp_path, script):
    """kill -9 half-way through writing epoch 2's checkpoint: epoch 1's is intact and loads, and
    the same command then finishes the run."""
    out = tmp_path / "run"
    first, = run_cases(tmp_path, [case(script, out, {"kill_in_save": 2}, "--saveckp_freq", "0")])
    assert first[0] == -9
    ckpt = koleo_proto.safe_load(str(out / "checkpoint.pth"))
    assert ckpt["epoch"] == 1 and (out / "checkpoint.pth.tmp").exists()  # the half-written one
    before = sha(out / "checkpoint.pth")
    second, = run_cases(tmp_path, [case(script, out, {}, "--saveckp_freq", "0")])
    assert second[0] == 0 and koleo_proto.safe_load(str(out / "checkpoint.pth"))["epoch"] == 2
    assert sha(out / "checkpoint.pth") != before and not (out / "checkpoint.pth.tmp").exists()


@pytest.mark.parametrize("script", ["dino", "ibot"])
def test_nonfinite_loss_is_one_line_and_loses_nothing(tmp_path, script):
    """A NaN loss at step 1 of epoch 2: one line that says what happened and what to try; the
    checkpoint of epoch 1 is intact (the weights' side: test_nan_guard_acts_before_the_update)."""
    out = tmp_path / "run"
    (code, stderr, _), = run_cases(tmp_path, [case(script, out, {"nan_at_loss": 3},
                                                   "--saveckp_freq", "1")])
    line = one_line(stderr)
    assert code == 1 and "became nan at epoch 2, step 1: training diverged. Try a lower" in line
    assert "the last checkpoint in --output_dir is intact" in line
    assert sha(out / "checkpoint.pth") == sha(out / "checkpoint0001.pth")


@pytest.mark.parametrize("script", ["dino", "ibot"])
def test_unwritable_or_full_output_dir_is_one_line_before_training(tmp_path, script):
    """Read-only, full, not a folder, or too little room for a checkpoint: one line, and no
    training epoch starts."""
    (tmp_path / "file").write_text("")
    ro, full, small = tmp_path / "ro", tmp_path / "full", tmp_path / "small"
    cases = [case(script, ro, {"open_error": "EROFS", "under": str(ro)}),
             case(script, full, {"open_error": "ENOSPC", "under": str(full)}),
             case(script, tmp_path / "file" / "out"),
             case(script, small, {"free_bytes": 10**6})]
    words = [["cannot write to --output_dir", "Read-only file system"],
             ["cannot write to --output_dir", "No space left on device"],
             ["cannot write to --output_dir", "Not a directory"],
             ["has 1 MB free, a checkpoint needs ~", "free space or pass another folder"]]
    for (code, stderr, trained), w in zip(run_cases(tmp_path, cases), words):
        line = one_line(stderr)
        assert code == 1 and not trained and all(x in line for x in w), line
