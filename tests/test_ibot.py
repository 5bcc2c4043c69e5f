"""Tests of ibot.py on CPU: hand-computed losses, masks, model layout, and tiny training runs on the bundled data."""
import json
import math
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import koleo_proto
import dino
import evaluate
import ibot
from helpers import assert_one_line_error, assert_unchanged, inject_nan, malicious_checkpoint, sha

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A configuration small enough for seconds per run: 16 tokens per global crop, 64 prototypes per head.
TINY = ["--arch", "vit_nano", "--patch_size", "7", "--local_crops_size", "14", "--local_crops_number", "2",
        "--out_dim", "64", "--patch_out_dim", "64", "--batch_size_per_gpu", "16", "--subset", "64", "--epochs", "2",
        "--num_workers", "0", "--warmup_epochs", "1"]
SEPARATE = ["--shared_head", "false", "--shared_head_teacher", "false", "--koleo", "0.1", "--epochs", "1"]  # the run of the `separate_run` fixture
SHARED = ["--saveckp_freq", "1", "--subset", "32"]  # the run of the `shared_run` fixture: 2 epochs of 2 steps


def train(output_dir, *extra):
    ibot.main(TINY + ["--output_dir", str(output_dir), *extra])
    return [json.loads(line) for line in open(os.path.join(output_dir, "log.txt"))]


def run_script(*args, cwd=ROOT):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "ibot.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def loss_inputs(seed=0, B=2, G=2, L=1, h=2, w=3, K=10, K2=12):
    """Random student/teacher outputs of G global crops (h x w patches) and L local crops of B images;
    image 0 of crop 1 has no masked token."""
    g = torch.Generator().manual_seed(seed)
    masks = [torch.rand(B, h, w, generator=g) < 0.5 for _ in range(G)]
    masks[0][0, 0, 0] = True
    masks[-1][0] = False
    teacher = (torch.randn(G * B, K, generator=g), torch.randn(G * B, h * w, K2, generator=g))
    student_local = torch.randn(L * B, K, generator=g)
    return masks, teacher, student_local


def new_loss(K=10, K2=12, G=2, L=1):
    return ibot.iBOTLoss(K, K2, G, L, 0.04, 0.04, 0.07, 0.07, 0, 1)


@pytest.fixture(scope="module")
def separate_run(tmp_path_factory):
    """One epoch with separate [CLS] and patch heads and KoLeo-Proto (shared by several tests)."""
    out = tmp_path_factory.mktemp("separate")
    return out, train(out, *SEPARATE)


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    """Two epochs with the preset's shared head, checkpoint0001.pth kept (shared by several tests)."""
    out = tmp_path_factory.mktemp("shared")
    return out, train(out, *SHARED)


# ---------------------------------------------------------------------------------------------- loss
def test_ibot_loss_hand_computed():
    """K = K2 = 3, one image, 2 global + 1 local crop, 3 patch tokens, temperatures 1: both terms and both centres."""
    loss_fn = ibot.iBOTLoss(3, 3, 2, 1, 1.0, 1.0, 1.0, 1.0, 0, 1, student_temp=1.0, center_momentum=0.9,
                            center_momentum2=0.9, lambda1=0.5, lambda2=2.0)
    ln2, ln3, ln5 = math.log(2), math.log(3), math.log(5)
    teacher_cls = torch.tensor([[ln2, 0, 0], [0, 0, ln2]])  # softmax: (1/2, 1/4, 1/4) and (1/4, 1/4, 1/2)
    student_cls = torch.tensor([[0.0, 0, 0], [ln2, 0, 0]])  # log-softmax of row 1: (-ln2, -2ln2, -2ln2)
    student_local = torch.tensor([[0.0, 0, 0]])
    teacher_patch = torch.tensor([[[0, ln3, 0], [ln2, 0, 0], [0, 0, 0]],  # crop 0: (1/5, 3/5, 1/5), (1/2, 1/4, 1/4), ..
                                  [[0, 0, ln2], [0, 0, 0], [ln2, ln2, 0]]])
    student_patch = torch.tensor([[[ln2, ln2, 0], [0, 0, 0], [5.0, -3, 1]],  # (ln2 - ln5, ln2 - ln5, -ln5), -ln3, unmasked
                                  [[1.0, 2, 3], [0, 0, 0], [-1, 0, 1]]])  # crop 1: nothing masked
    masks = [torch.tensor([[[True, True, False]]]), torch.zeros(1, 1, 3, dtype=torch.bool)]
    out = loss_fn((student_cls, student_patch), (teacher_cls, teacher_patch), student_local, masks, 0)
    # [CLS] pairs (teacher view, student view): (0,1) = 1.5 ln2, (0,2) = (1,0) = (1,2) = ln3
    cls = (1.5 * ln2 + 3 * ln3) / 4
    # crop 0: mean of its 2 masked tokens, (ln5 - 0.8 ln2) and ln3; crop 1 (no masked token) adds 0; mean over 2 crops
    patch = ((ln5 - 0.8 * ln2 + ln3) / 2 + 0) / 2
    assert out["cls"].item() == pytest.approx(0.5 * cls, rel=1e-6)
    assert out["patch"].item() == pytest.approx(2.0 * patch, rel=1e-6)
    assert out["loss"].item() == pytest.approx(0.5 * cls + 2.0 * patch, rel=1e-6)
    cls_mean = torch.tensor([[ln2 / 2, 0, ln2 / 2]])
    patch_mean = torch.tensor([[[ln2 / 3, (ln2 + ln3) / 6, ln2 / 6]]])  # images' means over all their tokens, averaged
    assert torch.allclose(loss_fn.center, 0.1 * cls_mean, atol=1e-7)
    assert torch.allclose(loss_fn.center2, 0.1 * patch_mean, atol=1e-7)
    assert loss_fn.center2.shape == (1, 1, 3)

    # the second call centres the teacher: softmax(t - c), softmax(t2 - c2)
    out2 = loss_fn((student_cls, student_patch), (teacher_cls, teacher_patch), student_local, masks, 0)
    q = F.softmax(teacher_cls - 0.1 * cls_mean, dim=-1)
    logp = F.log_softmax(torch.cat([student_cls, student_local]), dim=-1)
    cls2 = sum(-(q[a] * logp[b]).sum().item() for a, b in [(0, 1), (0, 2), (1, 0), (1, 2)]) / 4
    q2 = F.softmax(teacher_patch[0, :2] - 0.1 * patch_mean[0], dim=-1)
    logp2 = F.log_softmax(student_patch[0, :2], dim=-1)
    patch2 = (-(q2 * logp2).sum().item() / 2) / 2
    assert out2["cls"].item() == pytest.approx(0.5 * cls2, rel=1e-6)
    assert out2["patch"].item() == pytest.approx(2.0 * patch2, rel=1e-6)
    assert torch.allclose(loss_fn.center, 0.19 * cls_mean, atol=1e-7)  # 0.9 * 0.1 m + 0.1 m
    assert torch.allclose(loss_fn.center2, 0.19 * patch_mean, atol=1e-7)


def test_patch_loss_reads_masked_tokens_only():
    """Student patch logits at unmasked positions change nothing and get exactly zero gradient."""
    masks, teacher, student_local = loss_inputs()
    pm = torch.cat(masks).flatten(1)  # (G * B, N)
    g = torch.Generator().manual_seed(1)
    cls = torch.randn(4, 10, generator=g)
    patch = torch.randn(4, 6, 12, generator=g, requires_grad=True)
    out = new_loss()((cls, patch), teacher, student_local, masks, 0)
    out["patch"].backward()
    assert torch.all(patch.grad[~pm] == 0) and patch.grad[pm].abs().sum() > 0
    changed = patch.detach().clone()
    changed[~pm] = 100 * torch.randn(int((~pm).sum()), 12, generator=g)
    out2 = new_loss()((cls, changed), teacher, student_local, masks, 0)
    assert out2["patch"].item() == out["patch"].item() and out2["cls"].item() == out["cls"].item()
    changed[pm] += torch.randn(int(pm.sum()), 12, generator=g)  # a masked position does count
    assert new_loss()((cls, changed), teacher, student_local, masks, 0)["patch"].item() != out["patch"].item()


def test_teacher_temperature_schedules():
    """Linear warm-up of both teacher temperatures; the patch one waits for mim_start_epoch."""
    loss_fn = ibot.iBOTLoss(8, 8, 2, 0, 0.04, 0.07, 0.02, 0.08, 3, 10)
    assert np.allclose(loss_fn.teacher_temp_schedule, [0.04, 0.055] + [0.07] * 8)
    assert np.allclose(loss_fn.teacher_temp2_schedule, [0.02, 0.05] + [0.08] * 8)
    delayed = ibot.iBOTLoss(8, 8, 2, 0, 0.04, 0.07, 0.02, 0.08, 3, 10, mim_start_epoch=2)
    assert np.allclose(delayed.teacher_temp_schedule, loss_fn.teacher_temp_schedule)
    assert np.allclose(delayed.teacher_temp2_schedule, [0.02, 0.02, 0.02, 0.05] + [0.08] * 6)
    assert len(ibot.iBOTLoss(8, 8, 2, 0, 0.04, 0.04, 0.04, 0.07, 0, 5).teacher_temp2_schedule) == 5


# -------------------------------------------------------------------------------------------- masks
def test_block_masks_cover_the_requested_ratio():
    """BEiT block masks: never more than asked, on average close to it; nothing for n = 0."""
    log_ar = (math.log(0.3), math.log(1 / 0.3))
    n = 0.3 * 196
    counts = []
    for seed in range(200):
        mask = ibot.block_mask(14, 14, n, log_ar, random.Random(seed))
        assert mask.shape == (14, 14) and mask.dtype == bool
        counts.append(int(mask.sum()))
    assert max(counts) <= n and abs(np.mean(counts) - n) < 0.1 * n, (np.mean(counts), min(counts))
    assert len(set(counts)) > 1  # random
    assert all(ibot.block_mask(14, 14, 0, log_ar, random.Random(s)).sum() == 0 for s in range(5))


class FakeCrops(torch.utils.data.Dataset):
    """2 global crops of 28 x 28 and 2 local crops of 14 x 14 per image."""

    def __len__(self):
        return 400

    def __getitem__(self, i):
        return [torch.zeros(3, 28, 28)] * 2 + [torch.zeros(3, 14, 14)] * 2, i % 3


def test_masked_crops():
    """One bool (h, w) mask per global crop; per-image ratios from pred_ratio +- var; rand shape; pred_start_epoch."""
    ds = ibot.MaskedCrops(FakeCrops(), 2, 2, [0.0, 0.3], [0.0, 0.2], (0.3, 1 / 0.3))
    random.seed(0)
    ratios = []
    for i in range(200):
        crops, target, masks = ds[i]
        assert len(crops) == 4 and target == i % 3 and len(masks) == 2
        assert all(m.shape == (14, 14) and m.dtype == torch.bool for m in masks)
        ratios += [m.float().mean().item() for m in masks]
    ratios = np.array(ratios)
    nonzero = ratios[ratios > 0]
    assert 0.3 < (ratios == 0).mean() < 0.7  # half the draws pick the ratio 0
    # ratios U(0.1, 0.5); blocks never overshoot, and undershoot a little (the first block has >= 14 patches)
    assert nonzero.min() >= 0.06 and nonzero.max() <= 0.5 and nonzero.max() - nonzero.min() > 0.2, (nonzero.min(), nonzero.max())

    rand = ibot.MaskedCrops(FakeCrops(), 2, 2, [0.0, 0.3], [0.0, 0.2], (0.3, 1 / 0.3), pred_shape="rand")
    for seed in range(20):
        random.seed(seed)
        ratio = random.choice([0.0, random.uniform(0.1, 0.5)])  # the draws of get_pred_ratio
        random.seed(seed)
        assert rand.make_mask(14, 14).sum().item() == int(ratio * 14 * 14)

    late = ibot.MaskedCrops(FakeCrops(), 2, 2, [0.3], [0.0], (0.3, 1 / 0.3), pred_start_epoch=1)
    assert all(not m.any() for i in range(5) for m in late[i][2])  # epoch 0 < pred_start_epoch
    late.set_epoch(1)
    assert all(m.any() for i in range(5) for m in late[i][2])


# --------------------------------------------------------------------------------------------- model
def test_masked_head_shortcut_matches_scoring_all_tokens():
    """iBOTHead(tokens, patch_mask) gives the same logits where it matters, and the same loss and gradients."""
    torch.manual_seed(0)
    head = ibot.iBOTHead(16, 10, patch_out_dim=12, hidden_dim=32, bottleneck_dim=8)
    masks, teacher, student_local = loss_inputs()
    pm = torch.cat(masks).flatten(1)
    tokens = torch.randn(4, 7, 16, requires_grad=True)
    full_cls, full_patch = head(tokens)
    short_cls, short_patch = head(tokens, pm)
    assert short_patch.shape == full_patch.shape == (4, 6, 12)
    assert torch.allclose(short_cls, full_cls, atol=1e-6)
    assert torch.allclose(short_patch[pm], full_patch[pm], atol=1e-6)
    assert torch.all(short_patch[~pm] == 0)
    losses, grads = [], []
    for out in ((full_cls, full_patch), (short_cls, short_patch)):
        loss = new_loss()(out, teacher, student_local, masks, 0)
        grads.append(torch.autograd.grad(loss["loss"], tokens, retain_graph=True)[0])
        losses.append(loss["loss"].item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_official_state_dict_layout():
    """The official ViT-S/16 student (mask token) and teacher, and iBOTHead keys: shared and separate last layers."""
    student = ibot.vit_small(patch_size=16, masked_im_modeling=True).state_dict()
    teacher = ibot.vit_small(patch_size=16).state_dict()
    reference = {k: v.shape for k, v in dino.vit_small(patch_size=16).state_dict().items()}
    assert student["masked_embed"].shape == (1, 384)
    assert {k: v.shape for k, v in student.items() if k != "masked_embed"} == reference
    assert {k: v.shape for k, v in teacher.items()} == reference  # no masked_embed
    assert len(reference) == 6 + 12 * 12

    shared = ibot.iBOTHead(384, 8192, patch_out_dim=8192, shared_head=True).state_dict()
    mlp = {"mlp.0.weight": (2048, 384), "mlp.0.bias": (2048,), "mlp.2.weight": (2048, 2048), "mlp.2.bias": (2048,),
           "mlp.4.weight": (256, 2048), "mlp.4.bias": (256,)}
    assert {k: tuple(v.shape) for k, v in shared.items()} == {
        **mlp, "last_layer.weight_g": (8192, 1), "last_layer.weight_v": (8192, 256),
        "last_layer2.weight_g": (8192, 1), "last_layer2.weight_v": (8192, 256)}
    assert torch.equal(shared["last_layer.weight_v"], shared["last_layer2.weight_v"])
    assert torch.equal(shared["last_layer.weight_g"], shared["last_layer2.weight_g"])

    separate = ibot.iBOTHead(384, 8192, patch_out_dim=4096, shared_head=False)
    shapes = {k: tuple(v.shape) for k, v in separate.state_dict().items()}
    assert shapes == {**mlp, "last_layer.weight_g": (8192, 1), "last_layer.weight_v": (8192, 256),
                      "last_layer2.weight_g": (4096, 1), "last_layer2.weight_v": (4096, 256)}
    assert separate.last_layer2 is not separate.last_layer
    for layer in (separate.last_layer, separate.last_layer2):  # norm_last_layer=True freezes g at 1
        assert not layer.weight_g.requires_grad and layer.weight_v.requires_grad
        assert torch.all(layer.weight_g == 1)
    free = ibot.iBOTHead(32, 10, patch_out_dim=12, hidden_dim=16, bottleneck_dim=8, norm_last_layer=False)
    assert free.last_layer.weight_g.requires_grad and free.last_layer2.weight_g.requires_grad


def test_weight_decay_last_layer_groups_both_prototype_layers():
    """--weight_decay_last_layer puts last_layer and last_layer2 (separate heads) in a third group,
    and without it the groups are the official two."""
    head = ibot.iBOTHead(128, 64, patch_out_dim=32, shared_head=False, hidden_dim=32, bottleneck_dim=16)
    groups = ibot.get_params_groups(head, 2.0)
    assert len(groups) == 3 and groups[2]["weight_decay"] == 2.0
    assert {tuple(p.shape) for p in groups[2]["params"]} == {(64, 16), (32, 16)}  # the two weight_v
    assert len(ibot.get_params_groups(head)) == 2
    assert ibot.parse_args(["--weight_decay_last_layer", "4"]).weight_decay_last_layer == 4.0


def test_mask_token_replaces_masked_patches_only():
    """The mask token replaces exactly the masked patch embeddings; an all-False mask changes nothing."""
    torch.manual_seed(0)
    vit = ibot.vit_nano(patch_size=7, img_size=28, masked_im_modeling=True).eval()
    with torch.no_grad():
        vit.masked_embed.normal_()
    x = torch.randn(2, 3, 28, 28)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, 1, 2] = mask[1, 0, 0] = mask[1, 3, 3] = True
    with torch.no_grad():
        plain, masked = vit.prepare_tokens(x), vit.prepare_tokens(x, mask)
        changed = (plain != masked).any(dim=-1)  # (B, 1 + N)
        assert torch.equal(changed, torch.cat([torch.zeros(2, 1, dtype=torch.bool), mask.flatten(1)], dim=1))
        b, i = mask.flatten(1).nonzero(as_tuple=True)
        assert torch.allclose(masked[b, 1 + i], vit.masked_embed + vit.pos_embed[0, 1 + i], atol=1e-6)
        out, out_masked = vit(x, True), vit(x, True, mask)  # all tokens (B, 1 + N, D)
        assert torch.equal(vit(x, True, torch.zeros_like(mask)), out)
        assert (out_masked - out).abs().amax(dim=-1).min() > 1e-3  # attention spreads the change to every token


# ------------------------------------------------------------------------------------------ training
def test_prototype_stats_count_the_student_apart_from_the_teacher():
    """The student's [CLS] prototypes are counted too (keys _student): they collapse before the EMA teacher's."""
    student, teacher = ibot.build_models(ibot.parse_args(TINY + SEPARATE))
    with torch.no_grad():
        student.head.last_layer.weight_v.copy_(torch.randn(1, student.head.last_layer.weight_v.shape[1]))
    stats = ibot.prototype_stats(teacher, student)
    assert stats["unique_prototypes_student"] == 1 and stats["unique_prototypes"] == stats["unique_prototypes_patch"] == 64
    assert "unique_prototypes_patch_student" not in stats


def test_training_run_writes_official_checkpoint(separate_run, shared_run):
    """Checkpoint keys (official layout), log and summary keys, strict loading into build_models."""
    out, log = separate_run
    assert len(log) == 1 and all(math.isfinite(log[0][k]) for k in ("loss", "loss_cls", "loss_patch"))
    assert {"loss", "loss_cls", "loss_patch", "unique_prototypes", "unique_prototypes_patch", "koleo",
            "koleo_train", "lr", "teacher_entropy"} <= set(log[0])
    assert log[0]["loss"] == pytest.approx(log[0]["loss_cls"] + log[0]["loss_patch"], rel=1e-5)
    assert "unique_prototypes_patch_eps0.3" in log[0] and (out / "unique_prototypes.png").exists()
    ckpt = ibot.load_checkpoint(str(out / "checkpoint.pth"))
    assert {"student", "teacher", "optimizer", "epoch", "args", "ibot_loss"} <= set(ckpt)
    assert ckpt["epoch"] == 1 and ckpt["args"].shared_head is False
    assert ckpt["ibot_loss"]["center"].shape == (1, 64) and ckpt["ibot_loss"]["center2"].shape == (1, 1, 64)
    assert all(k.startswith("module.") for k in ckpt["student"]) and "module.backbone.masked_embed" in ckpt["student"]
    assert "backbone.cls_token" in ckpt["teacher"] and "backbone.masked_embed" not in ckpt["teacher"]
    assert {"head.last_layer.weight_g", "head.last_layer2.weight_v"} <= set(ckpt["teacher"])
    student, teacher = ibot.build_models(ibot.parse_args(TINY + SEPARATE))
    teacher.load_state_dict(ckpt["teacher"], strict=True)
    student.load_state_dict(koleo_proto.strip_prefix(ckpt["student"]), strict=True)
    summary = json.load(open(out / "summary.json"))
    for key in ("knn_top1", "knn_top1_init", "raw_pixel_knn_top1", "unique_prototypes", "num_prototypes", "unique_percent", "seconds",
                "unique_prototypes_patch", "num_prototypes_patch", "unique_prototypes_student"):
        assert summary[key] is not None, key
    assert summary["num_prototypes"] == 64 and summary["num_prototypes_patch"] == 64

    out, log = shared_run  # shared head: one set of prototypes, stored under both names
    assert len(log) == 2 and "unique_prototypes_patch" not in log[0] and "koleo_train" not in log[0]
    ckpt = ibot.load_checkpoint(str(out / "checkpoint.pth"))
    assert ckpt["epoch"] == 2 and ckpt["args"].shared_head is True
    for net, prefix in (("teacher", "head."), ("student", "module.head.")):
        assert torch.equal(ckpt[net][prefix + "last_layer.weight_v"], ckpt[net][prefix + "last_layer2.weight_v"])
    student, teacher = ibot.build_models(ibot.parse_args(TINY))
    teacher.load_state_dict(ckpt["teacher"], strict=True)
    student.load_state_dict(koleo_proto.strip_prefix(ckpt["student"]), strict=True)
    assert "unique_prototypes_patch" not in json.load(open(out / "summary.json"))


@pytest.mark.parametrize("workers", ["0", "1"])
def test_resume_continues_exactly(tmp_path, shared_run, workers):
    """Stopping after epoch 1 and resuming gives bit-identical networks and centres (masks drawn in workers too)."""
    if workers == "0":
        a, extra = shared_run[0], SHARED
    else:
        a, extra = tmp_path / "a", SHARED + ["--num_workers", workers]
        train(a, *extra)
    b = tmp_path / "b"
    if workers == "0":
        b.mkdir()
        shutil.copy(a / "checkpoint0001.pth", b / "checkpoint.pth")  # as if run a had stopped after epoch 1
        resume, epochs = [], [2]  # resumed, not restarted
    else:  # continued in a new output_dir: its log (so its plot) starts with run a's epoch 1
        resume, epochs = ["--resume", str(a / "checkpoint0001.pth")], [1, 2]
    assert [e["epoch"] for e in train(b, *extra, *resume)] == epochs
    final_a = ibot.load_checkpoint(str(a / "checkpoint.pth"))
    final_b = ibot.load_checkpoint(str(b / "checkpoint.pth"))
    assert final_b["epoch"] == 2
    for part in ("teacher", "student"):
        assert final_a[part].keys() == final_b[part].keys()
        for k, v in final_a[part].items():
            assert torch.equal(v, final_b[part][k]), (part, k)
    for k in ("center", "center2"):
        assert torch.equal(final_a["ibot_loss"][k], final_b["ibot_loss"][k]), k
    # the untrained teacher's kNN is measured once, before training: a resumed run reports it too
    init_a, init_b = (json.load(open(d / "summary.json"))["knn_top1_init"] for d in (a, b))
    assert init_a is not None and init_a == init_b


@pytest.mark.parametrize("shared", ["true", "false"])
def test_vmf_trains(tmp_path, shared):
    """iBOT-vMF: finite losses, free prototype norms, probability centres."""
    log = train(tmp_path, "--vmf", "--shared_head", shared, "--shared_head_teacher", shared, "--epochs", "1", "--subset", "32")
    assert all(math.isfinite(log[-1][k]) for k in ("loss", "loss_cls", "loss_patch"))
    ckpt = ibot.load_checkpoint(str(tmp_path / "checkpoint.pth"))
    assert ckpt["args"].norm_last_layer is False and ckpt["args"].vmf is True
    assert ckpt["ibot_loss"]["center"].sum().item() == pytest.approx(1.0, abs=1e-4)
    assert ckpt["ibot_loss"]["center2"].sum().item() == pytest.approx(1.0, abs=1e-4)
    assert ("unique_prototypes_patch" in log[-1]) == (shared == "false")


def test_compile_gives_the_same_loss(tmp_path):
    """aot_eager: torch.compile's graphs (broken where the head finds the masked tokens) run
    eagerly; inductor would spend minutes compiling C++ kernels on 2 cores (see test_dino.py)."""
    one_step = [*SEPARATE, "--subset", "16"]
    plain = train(tmp_path / "plain", *one_step)
    compiled = train(tmp_path / "compiled", *one_step, "--compile", "aot_eager")
    for key in ("loss", "loss_cls", "loss_patch", "koleo_train"):
        assert compiled[0][key] == pytest.approx(plain[0][key], rel=1e-5, abs=1e-6), key
    ckpt = ibot.load_checkpoint(str(tmp_path / "compiled" / "checkpoint.pth"))
    assert not any("_orig_mod" in k for k in list(ckpt["teacher"]) + list(ckpt["student"]))


def test_torchrun_two_processes(tmp_path):
    """Two CPU processes (gloo) train one epoch and write the checkpoint and summary."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29547", os.path.join(ROOT, "ibot.py"), *TINY, "--epochs", "1", "--output_dir", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "checkpoint.pth").exists() and (tmp_path / "summary.json").exists()
    log = json.loads(open(tmp_path / "log.txt").readline())
    assert log["epoch"] == 1 and math.isfinite(log["loss"])
    assert json.load(open(tmp_path / "summary.json"))["knn_top1"] is not None


# --------------------------------------------------------------------------------------------- bad input
def assert_main_fails(capsys, argv, *words):
    """koleo_proto.run(ibot.main) in this process: one-line SystemExit message naming words, nothing else on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        koleo_proto.run(lambda: ibot.main(list(argv)), "ibot.py")
    message = e.value.code
    assert isinstance(message, str) and message.startswith("ibot.py: error:") and "\n" not in message.strip(), message
    for w in words:
        assert w in message, message
    err = [l for l in capsys.readouterr().err.replace("\r", "\n").splitlines() if l.strip() and "%|" not in l]
    assert not err, err


@pytest.mark.parametrize("args, words", [
    (["--pred_ratio", "0.3", "--pred_ratio_var", "0.5"], ["--pred_ratio_var", "0 <= r - v"]),
    (["--pred_ratio", "0.1", "0.2", "--pred_ratio_var", "0", "0", "0"], ["--pred_ratio_var", "one per --pred_ratio (2)"]),
    (["--out_dim", "1"], ["--out_dim"]),
    (["--patch_size", "5"], ["multiple of --patch_size 5"]),
    (["--data", "imagenet", "--warmup_teacher_temp_epochs", "0"], ["--data imagenet needs --data_path"]),
    (["--data", "imagenet"], ["--data imagenet needs --data_path"]),  # the preset's 30 epochs shrink
    (["--warmup_teacher_temp_epochs", "30"], ["--warmup_teacher_temp_epochs 30"]),  # asked for
    (["--batch_size_per_gpu", "100000"], ["--batch_size_per_gpu", "exceeds"]),
    (["--pred_shape", "circle"], ["--pred_shape", "invalid choice"]),
    (["--pred_aspect_ratio", "2", "1"], ["--pred_aspect_ratio"]),
    (["--warmup_teacher_temp_epochs", "2", "--pred_start_epoch", "1"], ["--pred_start_epoch 1"]),
    (["--global_crops_number", "1", "--local_crops_number", "0"], ["at least 2 crops"]),
])
def test_bad_arguments(tmp_path, capsys, args, words):
    """Each bad flag (in this process, through koleo_proto.run) is one line naming the problem."""
    assert_main_fails(capsys, TINY + ["--output_dir", str(tmp_path), *args], *words)


def test_bad_resume_files_leave_checkpoint_intact(tmp_path, capsys, separate_run):
    """Junk, missing and mismatched checkpoints are refused in one line; the run's checkpoint is untouched."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(separate_run[0] / "checkpoint.pth", out / "checkpoint.pth")
    before = sha(out / "checkpoint.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x80\xa5" + bytes(range(256)) * 4)  # a pickle of "protocol 165": torch warns, then fails
    argv = TINY + SEPARATE + ["--output_dir", str(out)]
    assert_main_fails(capsys, argv + ["--resume", str(junk)], "junk.pth", "not a checkpoint")
    assert_main_fails(capsys, argv + ["--resume", str(tmp_path / "missing.pth")], "no checkpoint")
    # output_dir holds an ibot run with another --out_dim: refused, not overwritten
    assert_main_fails(capsys, argv + ["--out_dim", "32"], "--out_dim 64")
    assert_main_fails(capsys, TINY + ["--output_dir", str(out), "--epochs", "1"], "--shared_head False")
    assert sha(out / "checkpoint.pth") == before and not (out / "log.txt").exists()


def test_malicious_pickle_is_refused(tmp_path):
    """A checkpoint whose pickle would run os.system is refused by load_checkpoint before anything runs."""
    path, marker = malicious_checkpoint(tmp_path)
    with pytest.raises(ibot.BadInput):
        ibot.load_checkpoint(str(path))
    assert not os.path.exists(marker)


def test_cli_errors_are_one_line(tmp_path):
    """The real command line, two cases side by side: non-zero exit, exactly one stderr line, no traceback."""
    # each process spends seconds importing torch: test_bad_arguments covers the other cases in this process
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x80\xa5" + bytes(range(256)) * 4)  # a pickle of "protocol 165": torch warns, then fails
    cases = [(["--pred_ratio", "0.3", "--pred_ratio_var", "0.5"], ["--pred_ratio_var"]),  # refused by check_args
             (["--resume", str(junk)], ["junk.pth"])]  # refused after the data and models are built
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "ibot.py"), *TINY, "--output_dir", str(tmp_path / "out"),
                               *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for args, _ in cases]
    for proc, (_, words) in zip(procs, cases):
        stdout, stderr = proc.communicate(timeout=300)
        assert_one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), *words)


# ------------------------------------------------------------------------------------------ evaluate.py
def test_evaluate_audits_ibot_checkpoints(tmp_path, capsys, separate_run, shared_run):
    """evaluate.py reads our checkpoints: both last layers audited when separate, one when shared; kNN runs."""
    path = str(separate_run[0] / "checkpoint.pth")
    results = evaluate.main(["--checkpoint", path, "--prototypes", "--output_dir", str(tmp_path / "sep")])
    printed = capsys.readouterr().out
    assert {"head.last_layer", "head.last_layer2"} <= set(results["prototypes"])
    for name in ("head.last_layer", "head.last_layer2"):
        unique = results["prototypes"][name]["unique"]
        assert 1 <= unique <= 64 and f"prototypes {name}" in printed and f"{unique} / 64 unique" in printed
    results = evaluate.main(["--checkpoint", str(shared_run[0] / "checkpoint.pth"), "--prototypes", "--knn",
                             "--subset", "32", "--nb_knn", "5", "--num_workers", "0", "--no_cache",
                             "--output_dir", str(tmp_path / "shared")])
    printed = capsys.readouterr().out
    assert "head.last_layer" in results["prototypes"] and "head.last_layer2" not in results["prototypes"]
    assert f"{results['prototypes']['head.last_layer']['unique']} / 64 unique" in printed
    assert 0 <= results["knn"]["5"]["top1"] <= 100 and results["arch"] == "vit_nano/7"


# ------------------------------------------------------------------------- defects of issue 16
@pytest.mark.parametrize("fused", [False, True])  # True: the device-side skip a GPU takes
def test_nan_guard_acts_before_the_update(tmp_path, monkeypatch, fused):
    """As dino.py's: a NaN loss at epoch 2 changes no weight, neither centre, nor the checkpoint."""
    if fused:
        adamw = torch.optim.AdamW
        monkeypatch.setattr(torch.optim, "AdamW", lambda params, fused: adamw(params, fused=True))
    step = 2 if fused else 1  # of 2 per epoch
    seen = inject_nan(monkeypatch, ibot, ibot.iBOTLoss, 2 + step)
    with pytest.raises(ibot.BadInput, match=f"loss became nan at epoch 2, step {step}: training"):
        train(tmp_path, *SHARED, "--freeze_last_layer", "0")
    assert_unchanged(seen)
    assert sha(tmp_path / "checkpoint.pth") == sha(tmp_path / "checkpoint0001.pth")


def test_vmf_centring_never_turns_into_nan():
    """As dino.py's, for both centres: prototype 0 of either head is never picked."""
    K = 4
    loss_fn = ibot.iBOTLoss(K, K, 2, 0, 0.04, 0.04, 0.04, 0.04, 0, 1, vmf_dim=256)
    norms = dict(s1=torch.ones(K), s2=torch.ones(K), t1=torch.ones(K), t2=torch.ones(K))
    masks = [torch.ones(2, 2, 2, dtype=torch.bool)] * 2
    cls, patch = torch.zeros(4, K), torch.zeros(4, 4, K)
    cls[:, 0], patch[..., 0] = -1e3, -1e3
    torch.set_flush_denormal(True)
    try:
        for _ in range(1000):
            loss_fn((torch.randn(4, K), torch.randn(4, 4, K)), (cls, patch), None, masks, 0, norms)
        student = torch.randn(4, K), torch.randn(4, 4, K)
        out = loss_fn(student, (cls * 0, patch * 0), None, masks, 0, norms)
    finally:
        torch.set_flush_denormal(False)
    assert all(torch.isfinite(v) for v in out.values()), out


def test_warmup_left_unset_shrinks_to_fit_epochs(capsys):
    """ibot's official teacher warm-up is 30 epochs: --epochs 5 shortens both warm-ups to fit."""
    args = ibot.parse_args(["--data", "imagenet", "--epochs", "5"])
    assert (args.warmup_epochs, args.warmup_teacher_temp_epochs) == (5, 5)
    args = ibot.parse_args(["--data", "imagenet", "--epochs", "5", "--pred_start_epoch", "2"])
    assert args.warmup_teacher_temp_epochs == 3
    assert "--warmup_teacher_temp_epochs 30 of the preset shortened to 3" in capsys.readouterr().out
    with pytest.raises(ibot.BadInput, match="--warmup_teacher_temp_epochs 6"):
        ibot.parse_args(["--epochs", "5", "--warmup_teacher_temp_epochs", "6"])


@pytest.mark.parametrize("flag, saved, now", [("--norm_last_layer", "true", "false"),
                                              ("--global_crops_size", "14", "28"),
                                              ("--hidden_dim", "64", "2048")])
def test_resume_checks_every_architecture_argument(flag, saved, now):
    """As dino.py's: the flag that differs is named."""
    def built(value):
        args = ibot.parse_args(TINY + [flag, value])
        student, teacher = ibot.build_models(args)
        return args, student, teacher, torch.optim.AdamW(ibot.get_params_groups(student))
    args, student, teacher, optimizer = built(saved)
    ckpt = {"args": args, "student": student.state_dict(), "teacher": teacher.state_dict(),
            "optimizer": optimizer.state_dict()}
    args, student, teacher, optimizer = built(now)
    with pytest.raises(ibot.BadInput, match=f"was trained with {flag} .* pass the same {flag} "):
        koleo_proto.restore(ckpt, "ckpt.pth", args, ibot.SHAPE_FLAGS, student, teacher, optimizer,
                            {"ibot_loss": new_loss(64, 64)})


def test_shared_teacher_head_starts_as_official_and_separate_one_follows():
    """Student separate, teacher shared: main_ibot.py's load_state_dict(strict=False) fills the
    teacher's shared layer from the student's last_layer2 (loaded last), and its EMA follows the
    student's last_layer. Student shared, teacher separate: ours EMA-updates the teacher's
    last_layer2 from the shared layer, which main_ibot.py never updates (documented departure)."""
    def built(student_shared):
        args = ibot.parse_args(TINY + ["--shared_head", str(student_shared),
                                       "--shared_head_teacher", str(not student_shared)])
        student, teacher = ibot.build_models(args)
        ibot.init_teacher(student, teacher)
        s, t = ibot.ema_pairs(student, teacher)
        return student.head, teacher.head, {b.data_ptr(): a.data_ptr() for a, b in zip(s, t)}

    student, teacher, follows = built(False)
    assert torch.equal(teacher.last_layer.weight_v, student.last_layer2.weight_v)
    assert follows[teacher.last_layer.weight_v.data_ptr()] == student.last_layer.weight_v.data_ptr()
    student, teacher, follows = built(True)
    assert torch.equal(teacher.last_layer2.weight_v, student.last_layer.weight_v)
    t2, s1 = teacher.last_layer2.weight_v, student.last_layer.weight_v
    assert follows[t2.data_ptr()] == s1.data_ptr()


def test_subset_on_a_folder_keeps_the_classes():
    """As dino.py's: --subset is a seeded sample with each class's share, not the first N."""
    targets = np.repeat(np.arange(10), 50)  # sorted by class, as an image folder
    args = ibot.parse_args(TINY + ["--subset", "25"])
    counts = np.bincount(targets[koleo_proto.training_indices(args, targets)], minlength=10)
    assert counts.sum() == 25 and counts.min() == 2 and counts.max() == 3
