"""Tests of dino.py on CPU: each builds tiny models and trains for a few steps on the bundled data."""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import koleo_proto
import dino
from helpers import assert_one_line_error, assert_unchanged, inject_nan, malicious_checkpoint, sha

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A configuration small enough for seconds per run: 16 tokens per global crop, 64 prototypes.
TINY = ["--arch", "vit_nano", "--patch_size", "7", "--local_crops_size", "14", "--local_crops_number", "2",
        "--out_dim", "64", "--batch_size_per_gpu", "16", "--subset", "64", "--epochs", "2", "--num_workers", "0",
        "--warmup_epochs", "1"]


def train(output_dir, *extra):
    dino.main(TINY + ["--output_dir", str(output_dir), *extra])
    return [json.loads(line) for line in open(os.path.join(output_dir, "log.txt"))]


def run_script(*args, cwd=ROOT):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "dino.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------------------------------------- loss
def test_dino_loss_hand_computed():
    """K = 3, one image, 2 global + 1 local crop, temperatures 1 so the numbers are simple."""
    loss_fn = dino.DINOLoss(3, 3, 1.0, 1.0, 0, 1, student_temp=1.0, center_momentum=0.9)
    ln2, ln3 = math.log(2), math.log(3)
    teacher = torch.tensor([[ln2, 0, 0], [0, 0, ln2]])  # softmax: (1/2, 1/4, 1/4) and (1/4, 1/4, 1/2)
    student = torch.tensor([[0.0, 0, 0], [ln2, 0, 0], [0, 0, 0]])  # log-softmax of row 1: (-ln2, -2ln2, -2ln2)
    loss = loss_fn(student, teacher, 0)
    # pairs (teacher view, student view): (0,1) = 1.5 ln2, (0,2) = (1,0) = (1,2) = ln3
    assert loss.item() == pytest.approx((1.5 * ln2 + 3 * ln3) / 4, rel=1e-6)
    expected_center = 0.1 * torch.tensor([[ln2 / 2, 0, ln2 / 2]])
    assert torch.allclose(loss_fn.center, expected_center, atol=1e-7)
    # the second call centres the teacher: softmax(t - c)
    loss2 = loss_fn(student, teacher, 0)
    q = F.softmax(teacher - expected_center, dim=-1)
    logp = F.log_softmax(student, dim=-1)
    pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]
    assert loss2.item() == pytest.approx(sum(-(q[a] * logp[b]).sum().item() for a, b in pairs) / 4, rel=1e-6)


def test_dino_loss_teacher_temperature_warmup():
    loss_fn = dino.DINOLoss(8, 4, 0.04, 0.07, 3, 10)
    assert np.allclose(loss_fn.teacher_temp_schedule[:4], [0.04, 0.055, 0.07, 0.07])
    assert len(loss_fn.teacher_temp_schedule) == 10


def test_vmf_normalizer_matches_bessel_series():
    """Differences of log C_p(kappa) between kappas (what the softmax sees) against an exact series."""
    p = 256
    nu = p / 2 - 1

    def log_bessel(x):  # log I_nu(x) = log sum_m (x/2)^(2m+nu) / (m! Gamma(m+nu+1)), in float64
        terms = [(2 * m + nu) * math.log(x / 2) - math.lgamma(m + 1) - math.lgamma(m + nu + 1) for m in range(400)]
        top = max(terms)
        return top + math.log(sum(math.exp(t - top) for t in terms))

    kappas = torch.tensor([5.0, 10.0, 25.0, 60.0, 150.0], dtype=torch.float64)
    ours = dino.vmf_log_normalizer(kappas, p).double()
    exact = torch.tensor([nu * math.log(k) - log_bessel(k) for k in kappas.tolist()], dtype=torch.float64)
    assert torch.allclose(ours - ours[0], exact - exact[0], atol=2e-3)


def test_vmf_loss_uses_probability_centre():
    loss_fn = dino.DINOLoss(16, 4, 0.04, 0.04, 0, 1, vmf_dim=8)
    assert torch.allclose(loss_fn.center, torch.full((1, 16), 1 / 16))
    norms = torch.rand(16) + 0.5
    loss = loss_fn(torch.randn(8, 16), torch.randn(4, 16), 0, student_norms=norms, teacher_norms=norms)
    assert torch.isfinite(loss)
    assert loss_fn.center.sum().item() == pytest.approx(1.0, abs=1e-5)  # still a distribution


# --------------------------------------------------------------------------------------------- model
def test_official_state_dict_layout():
    """Keys and shapes of the official ViT-S/16 and DINOHead checkpoints (REFERENCE.md)."""
    vit = dino.vit_small(patch_size=16)
    keys = set(vit.state_dict())
    block = {f"blocks.0.{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
             for p in ("weight", "bias")}
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
            "norm.bias"} | block <= keys
    assert len(keys) == 6 + 12 * 12
    assert vit.state_dict()["pos_embed"].shape == (1, 197, 384)
    head = dino.DINOHead(384, 65536)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {"mlp.0.weight": (2048, 384), "mlp.0.bias": (2048,), "mlp.2.weight": (2048, 2048),
                      "mlp.2.bias": (2048,), "mlp.4.weight": (256, 2048), "mlp.4.bias": (256,),
                      "last_layer.weight_g": (65536, 1), "last_layer.weight_v": (65536, 256)}
    assert not head.last_layer.weight_g.requires_grad  # norm_last_layer=True freezes g at 1
    bn_head = dino.DINOHead(384, 10, use_bn=True)
    assert "mlp.1.running_mean" in bn_head.state_dict() and "mlp.6.weight" in bn_head.state_dict()


def test_weight_norm_matches_torch():
    head = dino.DINOHead(32, 50, norm_last_layer=False, bottleneck_dim=16)
    ref = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(16, 50, bias=False))
    ref.parametrizations.weight.original0.data = head.last_layer.weight_g.data * 1.7
    ref.parametrizations.weight.original1.data = head.last_layer.weight_v.data.clone()
    head.last_layer.weight_g.data *= 1.7
    x = torch.randn(4, 16)
    assert torch.allclose(head.last_layer(x), ref(x), atol=1e-6)


def test_pos_embed_interpolation_and_multicrop():
    vit = dino.vit_nano(patch_size=4, img_size=28)
    wrapper = dino.MultiCropWrapper(vit, dino.DINOHead(128, 32, bottleneck_dim=16))
    crops = [torch.randn(3, 3, 28, 28)] * 2 + [torch.randn(3, 3, 12, 12)] * 4
    out = wrapper(crops)
    assert out.shape == (6 * 3, 32)
    assert torch.allclose(out[:3], wrapper(crops[0]), atol=1e-5)  # crop-major order
    assert vit(torch.randn(2, 3, 16, 20)).shape == (2, 128)  # non-square crops work too


# ----------------------------------------------------------------------------------------------- kNN
def reference_knn(train_f, train_y, test_f, test_y, k, T, C):
    """Straightforward weighted kNN, one test sample at a time (DINO's protocol)."""
    top1 = 0
    for f, y in zip(test_f, test_y):
        sims = train_f @ f
        s, i = sims.topk(k)
        votes = torch.zeros(C).index_add_(0, train_y[i], (s / T).exp())
        top1 += int(votes.argmax() == y)
    return 100.0 * top1 / len(test_y)


def test_knn_hand_computed():
    train_f = F.normalize(torch.tensor([[1.0, 0], [0, 1], [0.6, 0.8]]), dim=1)
    train_y = torch.tensor([0, 1, 1])
    test_f, test_y = torch.tensor([[1.0, 0]]), torch.tensor([0])
    # weights exp(1/T) for class 0 against exp(0.6/T) + exp(0/T) for class 1
    assert koleo_proto.knn_classifier(train_f, train_y, test_f, test_y, k=3, T=0.07)[0] == 100.0
    assert koleo_proto.knn_classifier(train_f, train_y, test_f, test_y, k=3, T=10.0)[0] == 0.0


@pytest.mark.parametrize("n_test", [1, 37])
def test_knn_any_test_size(n_test):
    g = torch.Generator().manual_seed(n_test)
    train_f = F.normalize(torch.randn(200, 16, generator=g), dim=1)
    train_y = torch.randint(0, 7, (200,), generator=g)
    test_f = F.normalize(torch.randn(n_test, 16, generator=g), dim=1)
    test_y = torch.randint(0, 7, (n_test,), generator=g)
    top1, top5 = koleo_proto.knn_classifier(train_f, train_y, test_f, test_y, k=20, T=0.07, num_classes=7)
    assert top1 == pytest.approx(reference_knn(train_f, train_y, test_f, test_y, 20, 0.07, 7))
    assert top1 <= top5 <= 100.0


def test_long_tail_profile():
    targets = np.repeat(np.arange(10), 100)
    idx = koleo_proto.long_tail_indices(targets, 10, seed=0)
    counts = np.bincount(targets[idx])
    assert counts[0] == 100 and counts[-1] == 10 and np.all(np.diff(counts) <= 0)
    assert np.array_equal(idx, koleo_proto.long_tail_indices(targets, 10, seed=0))  # seeded


# ------------------------------------------------------------------------------------------ training
def test_training_steps_lower_the_loss():
    """The student learns to match a fixed teacher: the loss on a batch of real crops goes down."""
    args = dino.parse_args(TINY)
    mean, std = koleo_proto.DATASETS[args.data]
    augment = dino.DataAugmentationDINO(args.global_crops_scale, args.local_crops_scale, args.local_crops_number,
                                        args.global_crops_size, args.local_crops_size, mean, std)
    dataset = koleo_proto.build_dataset(args, True, augment)
    torch.manual_seed(0)
    batch = [torch.stack(c) for c in zip(*(dataset[i][0] for i in range(16)))]  # 4 crops of (16, 3, H, W)
    student, teacher = dino.build_models(args)
    teacher.load_state_dict(student.state_dict())
    loss_fn = dino.DINOLoss(args.out_dim, 4, 0.04, 0.04, 0, 1, center_momentum=1.0)  # fixed targets
    optimizer = torch.optim.AdamW(dino.get_params_groups(student), lr=1e-4)
    with torch.no_grad():
        targets = teacher(batch[:2])
    losses = []
    for _ in range(30):
        loss = loss_fn(student(batch), targets, 0)
        optimizer.zero_grad()
        loss.backward()
        dino.clip_gradients(student, 3.0)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses



def test_weight_decay_last_layer_is_a_separate_schedule(tmp_path):
    """--weight_decay_last_layer gives the prototypes their own group and their own cosine from
    --weight_decay; the rest keeps the official schedule."""
    train(tmp_path, "--epochs", "1", "--freeze_last_layer", "0", "--weight_decay_last_layer", "0.5")
    ckpt = dino.load_checkpoint(str(tmp_path / "checkpoint.pth"))
    groups = ckpt["optimizer"]["param_groups"]
    last_step = dino.cosine_scheduler(0.04, 0.5, 1, 4)[-1]  # 64 images / batch 16 = 4 steps
    assert len(groups) == 3 and len(groups[2]["params"]) == 1
    assert groups[2]["weight_decay"] == pytest.approx(last_step) and last_step > 0.4
    assert groups[0]["weight_decay"] == pytest.approx(dino.cosine_scheduler(0.04, 0.4, 1, 4)[-1])
    assert groups[1]["weight_decay"] == 0.0


def test_a_preset_has_its_own_output_dir():
    """--preset picks the default output_dir too, so a run never resumes another preset's checkpoint."""
    args = dino.parse_args(["--preset", "fashion-mnist-full"])
    assert (args.data, args.out_dim, args.output_dir) == ("fashion-mnist", 4096, os.path.join("runs", "dino-fashion-mnist-full"))
    assert dino.parse_args([]).output_dir == os.path.join("runs", "dino-fashion-mnist")


def test_prototype_stats_count_the_student_apart_from_the_teacher():
    """The log counts the student's prototypes too (keys _student): they collapse before the EMA teacher's."""
    student, teacher = dino.build_models(dino.parse_args(TINY))
    with torch.no_grad():  # the student's prototypes all one copy, the teacher's still spread
        student.head.last_layer.weight_v.copy_(torch.randn(1, student.head.last_layer.weight_v.shape[1]))
    stats = dino.prototype_stats(teacher, student, torch.ones(64))
    assert stats["unique_prototypes_student"] == stats["unique_prototypes_student_eps0.3"] == 1
    assert stats["unique_prototypes"] == 64 and stats["koleo_student"] > stats["koleo"]


def test_training_run_writes_official_checkpoint(tmp_path):
    log = train(tmp_path, "--epochs", "2", "--freeze_last_layer", "0", "--koleo", "0.1")
    assert all(math.isfinite(e["loss"]) for e in log) and len(log) == 2
    assert {"loss", "lr", "teacher_entropy", "unique_prototypes", "unique_prototypes_eps0.1", "koleo", "images_per_s"} <= set(log[0])
    assert (tmp_path / "unique_prototypes.png").exists()
    ckpt = dino.load_checkpoint(str(tmp_path / "checkpoint.pth"))
    assert {"student", "teacher", "optimizer", "epoch", "args", "dino_loss"} <= set(ckpt)
    assert ckpt["epoch"] == 2 and "center" in ckpt["dino_loss"]
    assert all(k.startswith("module.") for k in ckpt["student"])
    assert "backbone.cls_token" in ckpt["teacher"] and "head.last_layer.weight_g" in ckpt["teacher"]
    args = dino.parse_args(TINY)
    student, teacher = dino.build_models(args)
    teacher.load_state_dict(ckpt["teacher"], strict=True)
    student.load_state_dict(koleo_proto.strip_prefix(ckpt["student"]), strict=True)
    summary = json.load(open(tmp_path / "summary.json"))
    for key in ("knn_top1", "knn_top1_init", "raw_pixel_knn_top1", "unique_prototypes",
                "unique_prototypes_student", "num_prototypes", "seconds"):
        assert summary[key] is not None
    assert ckpt["knn_top1_init"] == summary["knn_top1_init"]  # kept for a resumed run
    assert summary["num_prototypes"] == 64 and "unique_prototypes_student_eps0.1" in log[0]


def test_resume_continues_exactly(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    train(a, "--saveckp_freq", "1")
    summary = json.load(open(a / "summary.json"))
    init, trained = summary["knn_top1_init"], summary["knn_top1"]
    assert f"kNN top-1: init {init:.2f}% -> trained {trained:.2f}%" in capsys.readouterr().out
    b.mkdir()
    shutil.copy(a / "checkpoint0001.pth", b / "checkpoint.pth")  # as if run a had stopped after epoch 1
    assert [e["epoch"] for e in train(b)] == [2]
    # continued in a new output_dir: same result, and the log (so the plot) starts with run a's epoch 1
    c = tmp_path / "c"
    assert [e["epoch"] for e in train(c, "--resume", str(a / "checkpoint0001.pth"))] == [1, 2]
    final_a = dino.load_checkpoint(str(a / "checkpoint.pth"))
    for final in (dino.load_checkpoint(str(b / "checkpoint.pth")), dino.load_checkpoint(str(c / "checkpoint.pth"))):
        for part in ("teacher", "student"):
            for k, v in final_a[part].items():
                assert torch.equal(v, final[part][k]), (part, k)
        assert torch.equal(final_a["dino_loss"]["center"], final["dino_loss"]["center"])
    for resumed in (b, c):  # the untrained teacher's kNN, measured by run a, is still reported
        assert json.load(open(resumed / "summary.json"))["knn_top1_init"] == init


# inductor spends minutes compiling C++ kernels on 2 cores; aot_eager traces the same graphs with
# torch.compile and runs them eagerly. DINO_TEST_INDUCTOR=1 tests inductor as well.
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.skipif(
    not os.environ.get("DINO_TEST_INDUCTOR"), reason="slow on CPU: set DINO_TEST_INDUCTOR=1"))])
def test_compile_gives_the_same_loss(tmp_path, backend):
    plain = train(tmp_path / "plain", "--subset", "32", "--epochs", "1")
    compiled = train(tmp_path / "compiled", "--subset", "32", "--epochs", "1", "--compile", backend)
    assert compiled[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-5, abs=1e-6)
    ckpt = dino.load_checkpoint(str(tmp_path / "compiled" / "checkpoint.pth"))
    assert not any("_orig_mod" in k for k in list(ckpt["teacher"]) + list(ckpt["student"]))


def test_vmf_trains(tmp_path):
    log = train(tmp_path, "--vmf", "--epochs", "1")
    assert math.isfinite(log[-1]["loss"])
    ckpt = dino.load_checkpoint(str(tmp_path / "checkpoint.pth"))
    assert ckpt["args"].norm_last_layer is False


def test_torchrun_two_processes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29531", os.path.join(ROOT, "dino.py"), *TINY, "--epochs", "1", "--output_dir", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "checkpoint.pth").exists() and (tmp_path / "summary.json").exists()
    assert json.loads(open(tmp_path / "log.txt").readline())["epoch"] == 1


# --------------------------------------------------------------------------------------------- bad input
def make_folder(root, corrupt=False):
    from PIL import Image
    for split in ("train", "val"):
        for c in ("a", "b"):
            os.makedirs(root / split / c)
            for i in range(3):
                Image.fromarray(np.full((28, 28, 3), 60 * i, np.uint8)).save(root / split / c / f"{i}.png")
    if corrupt:
        (root / "train" / "b" / "broken.png").write_bytes(b"not an image")


TINY_FOLDER = ["--data", "folder", "--global_crops_size", "28", "--batch_size_per_gpu", "7", "--subset", "7"]


@pytest.mark.parametrize("args, words", [
    (["--data", "mnist"], ["--data", "invalid choice"]),
    (["--data", "imagenet"], ["--data_path"]),
    (["--data", "imagenet", "--data_path", "/nonexistent"], ["/nonexistent"]),
    (["--out_dim", "1"], ["--out_dim"]),
    (["--batch_size_per_gpu", "0"], ["--batch_size_per_gpu"]),
    (["--batch_size_per_gpu", "100000"], ["--batch_size_per_gpu", "exceeds"]),
    (["--patch_size", "5"], ["multiple of --patch_size"]),
])
def test_bad_arguments(tmp_path, args, words):
    assert_one_line_error(run_script(*TINY, "--output_dir", str(tmp_path), *args), *words)


def test_empty_data_folder(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    assert_one_line_error(run_script(*TINY, "--data", "folder", "--data_path", str(tmp_path)), "no images")


@pytest.mark.parametrize("workers", ["0", "1"])
def test_corrupt_image(tmp_path, workers):
    make_folder(tmp_path / "d", corrupt=True)
    result = run_script(*TINY, *TINY_FOLDER, "--data_path", str(tmp_path / "d"), "--num_workers", workers,
                        "--output_dir", str(tmp_path / "out"))
    assert_one_line_error(result, "broken.png")


def test_bad_resume_files_leave_checkpoint_intact(tmp_path):
    out = tmp_path / "run"
    train(out, "--epochs", "1")
    before = sha(out / "checkpoint.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x80\xa5" + bytes(range(256)) * 4)  # a pickle of "protocol 165": torch warns, then fails
    assert_one_line_error(run_script(*TINY, "--output_dir", str(out), "--resume", str(junk)), "junk.pth")
    assert_one_line_error(run_script(*TINY, "--output_dir", str(out), "--resume", str(tmp_path / "missing.pth")),
                          "no checkpoint")
    # output_dir holds a run of another architecture: refused, not overwritten
    assert_one_line_error(run_script(*TINY, "--output_dir", str(out), "--out_dim", "32"), "--out_dim 64")
    assert sha(out / "checkpoint.pth") == before


def test_malicious_pickle_is_refused(tmp_path):
    path, marker = malicious_checkpoint(tmp_path)
    with pytest.raises(dino.BadInput):
        dino.load_checkpoint(str(path))
    assert not os.path.exists(marker)


# ------------------------------------------------------------------------- defects of issue 16
@pytest.mark.parametrize("fused", [False, True])  # True: the device-side skip a GPU takes
def test_nan_guard_acts_before_the_update(tmp_path, monkeypatch, fused):
    """A NaN loss at epoch 2 changes no weight, no centre and not the checkpoint of epoch 1; the
    run stops with the step. Fused: the update is skipped on the device, read at the epoch's end."""
    if fused:
        adamw = torch.optim.AdamW
        monkeypatch.setattr(torch.optim, "AdamW", lambda params, fused: adamw(params, fused=True))
    step = 2 if fused else 1  # of 2 per epoch
    seen = inject_nan(monkeypatch, dino, dino.DINOLoss, 2 + step)
    with pytest.raises(dino.BadInput, match=f"loss became nan at epoch 2, step {step}: training"):
        train(tmp_path, "--freeze_last_layer", "0", "--saveckp_freq", "1", "--subset", "32")
    assert_unchanged(seen)
    first = dino.load_checkpoint(str(tmp_path / "checkpoint0001.pth"))
    assert sha(tmp_path / "checkpoint.pth") == sha(tmp_path / "checkpoint0001.pth")
    assert first["epoch"] == 1


def test_vmf_centring_never_turns_into_nan():
    """A prototype the teacher never picks: its probability centre shrinks by 0.9 per step. Where
    denormals are flushed to zero (many accelerators) it reached 0 and the targets NaN."""
    loss_fn = dino.DINOLoss(4, 4, 0.04, 0.04, 0, 1, vmf_dim=256)
    teacher, norms = torch.zeros(4, 4), torch.ones(4)
    teacher[:, 0] = -1e3  # probability exactly 0 after / 0.04
    flushed = torch.set_flush_denormal(True)
    try:
        for _ in range(1000):
            loss_fn(torch.randn(8, 4), teacher, 0, student_norms=norms, teacher_norms=norms)
        assert loss_fn.center[0, 0] > 0 or not flushed
        loss = loss_fn(torch.randn(8, 4), teacher * 0, 0, student_norms=norms, teacher_norms=norms)
    finally:
        torch.set_flush_denormal(False)
    assert torch.isfinite(loss) and torch.isfinite(loss_fn.teacher_probs).all()
    assert loss_fn.teacher_probs[:, 0].min() > 0.99  # the rare prototype is boosted, as q / c says


def test_warmup_left_unset_shrinks_to_fit_epochs(tmp_path, capsys):
    """--epochs below the preset's warm-up: a warm-up the user never set shrinks (and says so);
    an explicit impossible one is still an error; the imagenet run then reaches its data check."""
    args = dino.parse_args(["--data", "imagenet", "--epochs", "1"])
    assert (args.warmup_epochs, args.epochs) == (1, 1)
    assert "--warmup_epochs 10 of the preset shortened to 1 to fit --epochs 1" in capsys.readouterr().out
    with pytest.raises(dino.BadInput, match="--warmup_epochs 3 must lie"):
        dino.parse_args(["--epochs", "2", "--warmup_epochs", "3"])
    result = run_script("--data", "imagenet", "--data_path", "/nonexistent", "--epochs", "1",
                        "--output_dir", str(tmp_path))
    assert_one_line_error(result, "/nonexistent")


@pytest.mark.parametrize("flag, saved, now", [("--norm_last_layer", "false", "true"),
                                              ("--global_crops_size", "14", "28"),
                                              ("--weight_decay_last_layer", "0.5", None),
                                              ("--hidden_dim", "2048", None)])
def test_resume_checks_every_architecture_argument(tmp_path, flag, saved, now):
    """A checkpoint of another head, crop size or optimizer layout is refused naming that flag,
    not with a hint about --arch/--patch_size/--out_dim."""
    def built(value):
        args = dino.parse_args(TINY + ([flag, value] if value else []))
        student, teacher = dino.build_models(args)
        groups = dino.get_params_groups(student, args.weight_decay_last_layer)
        return args, student, teacher, torch.optim.AdamW(groups)
    args, student, teacher, optimizer = built(saved)
    ckpt = {"args": args, "student": student.state_dict(), "teacher": teacher.state_dict(),
            "optimizer": optimizer.state_dict()}
    args, student, teacher, optimizer = built(now)
    loss = dino.DINOLoss(64, 4, 0.04, 0.04, 0, 2)
    with pytest.raises(dino.BadInput, match=f"was trained with {flag} .* pass the same {flag} "):
        koleo_proto.restore(ckpt, "ckpt.pth", args, dino.SHAPE_FLAGS, student, teacher, optimizer, {"dino_loss": loss})


def test_a_checkpoint_from_before_hidden_dim_has_the_official_width(tmp_path):
    """Checkpoints written before --hidden_dim existed (ours and the official ones) have 2048-wide
    heads: load_checkpoint fills that in, so restore and build_models see the right width."""
    args = dino.parse_args(TINY)
    del args.hidden_dim
    torch.save({"args": args, "teacher": {}}, tmp_path / "old.pth")
    torch.save({"args": vars(args), "teacher": {}}, tmp_path / "slim.pth")
    assert dino.load_checkpoint(str(tmp_path / "old.pth"))["args"].hidden_dim == 2048
    assert dino.load_checkpoint(str(tmp_path / "slim.pth"))["args"]["hidden_dim"] == 2048


def test_subset_on_a_folder_keeps_the_classes(tmp_path, capsys):
    """--subset N on a folder tree (sorted by class) is a seeded sample with each class's share,
    for the training and the test split, not the first N images (one class)."""
    targets = np.repeat(np.arange(10), 50)
    idx = koleo_proto.balanced_subset(np.arange(500), targets, 25, seed=0)
    counts = np.bincount(targets[idx], minlength=10)
    assert len(idx) == 25 and counts.min() == 2 and counts.max() == 3
    assert np.array_equal(idx, koleo_proto.balanced_subset(np.arange(500), targets, 25, seed=0))
    lt = koleo_proto.long_tail_indices(targets, 10, seed=0)  # a long tail keeps its profile
    sub = np.bincount(targets[koleo_proto.balanced_subset(lt, targets, len(lt) // 2, seed=0)])
    assert np.abs(sub - np.bincount(targets[lt]) / 2).max() <= 1
    from PIL import Image
    for split in ("train", "val"):
        for c in range(10):
            os.makedirs(tmp_path / "d" / split / f"c{c}")
            for i in range(3):
                image = Image.fromarray(np.full((28, 28, 3), 20 * c + i, np.uint8))
                image.save(tmp_path / "d" / split / f"c{c}" / f"{i}.png")
    dino.main(TINY + TINY_FOLDER + ["--data_path", str(tmp_path / "d"), "--subset", "10",
                                    "--epochs", "1", "--output_dir", str(tmp_path / "out")])
    assert "10 training images, 10 classes (--subset: drawn with --seed 0" in capsys.readouterr()[0]
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    assert summary["train_images"] == 10


@pytest.mark.parametrize("module", ["dino", "ibot"])
def test_help_gives_every_flag_one_line(module):
    """`python dino.py --help` (and ibot.py's): one line per flag, with its default, none wrapped
    (dino.py's within 100 characters)."""
    text = __import__(module).get_args_parser().format_help()
    options = text.split("options:")[1].split("\n\n")[0].splitlines()[1:]
    assert len(options) > 40 and all(line.startswith("  -") for line in options), options
    assert module == "ibot" or all(len(line) <= 100 for line in text.splitlines())
