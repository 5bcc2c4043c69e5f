"""experiments/toy.py: the toy DINO runs, reports its figures, and repeats itself exactly."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import toy  # noqa: E402

TINY = dict(clusters=4, dim=8, n_max=40, rho=10.0, test_per_cluster=5, hidden=16, feat_dim=8,
            head_hidden=16, K=16, steps=30, steps_per_epoch=10, batch=16, log_every=10)


def test_a_tiny_run_reports_everything_and_repeats():
    a = toy.run(snapshots=(10,), **TINY)
    for key in ("num_prototypes", "teacher_unique", "student_unique", "teacher_used", "knn_top1",
                "knn_top1_init", "fewshot_1", "fewshot_5", "knn_many", "knn_medium", "knn_few",
                "knn_rarest_quarter"):
        assert key in a, key
    assert [h["step"] for h in a["history"]] == [0, 10, 20, 30]
    assert a["snapshot_data"][10]["prototypes"].shape == (16, 3)
    b = toy.run(snapshots=(10,), **TINY)
    unique = [h["teacher_unique"] for h in a["history"]]
    assert unique == [h["teacher_unique"] for h in b["history"]]
    assert a["knn_top1"] == b["knn_top1"]


def test_long_tailed_cluster_sizes():
    *_, counts = toy.make_clusters(clusters=5, dim=4, cluster_std=0.5, n_max=100, rho=100.0,
                                   test_per_cluster=3, seed=0)
    assert counts.tolist() == [100, 31, 10, 3, 1]


def test_unknown_setting_is_refused():
    with pytest.raises(ValueError, match="unknown toy settings"):
        toy.run(bottleneck_dim=3)
