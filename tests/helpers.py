"""Helpers shared by the tests of the scripts (test_dino.py, test_ibot.py, test_evaluate.py)."""
import hashlib


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
