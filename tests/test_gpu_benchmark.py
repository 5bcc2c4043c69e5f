"""benchmarks/gpu.py works before it meets a GPU: its dry run (every part at tiny sizes on CPU)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu.py")


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, "--dry_run", *args], capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))


def table(stdout):
    """{what: (images/s, memory, seconds, note)} of the table that ends the output."""
    lines = stdout[stdout.index("| part |"):].strip().splitlines()[2:]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return {c[1]: c[2:] for c in cells}


def test_dry_run_runs_every_part():
    """A budget no CPU exhausts, so that every row has run (the default budget may skip some)."""
    result = run("--budget", "600")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = table(result.stdout)
    assert len(rows) == 12, list(rows)
    for what, (ips, mem, seconds, note) in rows.items():
        assert not note.startswith(("FAIL", "skipped", "not run")), (what, note)
    steps = [r for w, r in rows.items() if "step" in w and "official" not in w]
    assert len(steps) == 6 and all(float(r[0]) > 0 and r[1] == "n/a on CPU" for r in steps)
    assert rows["the same step, official components"][3].startswith("not measured: pass --official")
    assert "n/a on CPU" in rows["torchrun, 1 process: dino.py --precision fp16"][3]
    assert rows["torchrun, 1 process: dino.py --precision bf16"][3].startswith("ok: 1 epoch(s)")


def test_a_part_that_does_not_fit_is_skipped_and_said():
    result = run("--budget", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = table(result.stdout)
    assert len(rows) == 12
    skipped = [r[3] for r in rows.values() if r[3].startswith("skipped: needs ~")]
    assert len(skipped) >= 11 and "of the budget left (--budget 1)" in skipped[0]
