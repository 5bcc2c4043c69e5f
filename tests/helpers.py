"""Helpers shared by the tests of the scripts (test_dino.py, test_ibot.py, test_evaluate.py)."""
import hashlib
import math

import torch


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def assert_one_line_error(result, *words):
    """A finished subprocess failed with exactly one line on stderr (progress bars aside), no traceback,
    and that line holds every one of words."""
    assert result.returncode != 0
    lines = [l for l in result.stderr.replace("\r", "\n").splitlines() if l.strip() and "%|" not in l]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for w in words:
        assert w in lines[0], lines[0]


def malicious_checkpoint(folder):
    """(path, marker): a .pth whose pickle would create the file marker when unpickled unsafely."""
    import os

    import torch

    marker = os.path.join(folder, "pwned")

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = os.path.join(folder, "evil.pth")
    torch.save({"teacher": Evil()}, path)
    return path, marker


def inject_nan(monkeypatch, module, loss_class, at_call):
    """Make the at_call-th loss (1-based, counted over the run) NaN; returns a dict that then holds
    the models and a copy of their weights and the loss's state as they were just before it."""
    seen = {"calls": 0}
    build = module.build_models
    monkeypatch.setattr(module, "build_models", lambda args: seen.setdefault("models", build(args)))
    forward = loss_class.forward

    def bad_forward(self, *a, **k):
        seen["calls"] += 1
        if seen["calls"] == at_call:
            copy = lambda module: {k: v.clone() for k, v in module.state_dict().items()}
            seen["before"] = [copy(m) for m in seen["models"]]
            seen["loss"], seen["loss_state"] = self, copy(self)
        out = forward(self, *a, **k)
        if seen["calls"] != at_call:
            return out
        nan = math.nan
        return {k: v * nan for k, v in out.items()} if isinstance(out, dict) else out * nan

    monkeypatch.setattr(loss_class, "forward", bad_forward)
    return seen


def assert_unchanged(seen):
    """The models and the loss's centres are as inject_nan copied them."""
    for model, before in zip(seen["models"], seen["before"]):
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k
    for k, v in seen["loss"].state_dict().items():
        assert torch.equal(v, seen["loss_state"][k]), k
