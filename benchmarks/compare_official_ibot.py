"""Compare our ibot.py against the official iBOT reference implementation (CPU, fp32).

No official code lives in this repository. Fetch it outside the repo first, e.g.
    git clone https://github.com/bytedance/ibot /tmp/official_ibot
then run from anywhere:
    python benchmarks/compare_official_ibot.py [--official_repo /tmp/official_ibot]
The official models import timm only for a decorator and Swin layers; when timm is not installed
a stand-in is registered (the ViT and heads do not use it).

Checks (each prints PASS/FAIL with its numbers; exit status 1 if any fails):
  a) ViT-S/16 with the mask token (student) and without (teacher): the official state_dict loads
     strictly into ours and back; all output tokens match (max abs diff < 1e-4) on 224 px crops
     with random block masks, unmasked, and at 96 px (the [CLS] token, interpolated positions).
  b) iBOTHead (K 8192 / 1024, shared_head true / false, norm_last_layer true / false): strict
     load both ways, the same trainable parameters, [CLS] and patch logits match (< 1e-4); with
     patch_mask, the masked positions still match.
  c) iBOTLoss (2 global + 4 local crops, batch 8, 16 patch tokens, K = 1024, K2 = 1024 / 2048,
     teacher temps warmed up over 30 of 100 epochs, mim_start_epoch 0 and 10, lambda2 0.5):
     cls, patch and total within 1e-5 relative, grads w.r.t. both student outputs, both centres
     (< 1e-6), over 3 successive calls at epochs 0, 5, 29, 30, 99.
  d) Masks: the official ImageFolderMask and our MaskedCrops draw identical block masks from the
     same seed of Python's random (200 seeds, 14 x 14 patches, pred_ratio 0.3 and the ViT-S recipe's
     [0, 0.3] +- [0, 0.2]).
  e) Speed: student forward+backward (ViT-S/16 + iBOTHead 8192 shared, 2 x 224 masked global crops
     through both heads, 4 x 96 local crops through the [CLS] head, batch 4, iBOTLoss), identical
     weights; medians of --steps interleaved steps after 2 warm-up steps, ratio ours/official.
The official iBOTLoss all-reduces its centres, so a one-process gloo group is started.
"""
import argparse
import ast
import math
import os
import random
import statistics
import sys
import tempfile
import time
import types
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_official import load_both_ways, max_diff, randomize, report, run_checks  # noqa: E402 (the DINO comparison's helpers)


def stand_in_timm():
    """Register a minimal timm if it is missing: the official models import register_model (a
    decorator) and Swin's layers at import time only."""
    try:
        import timm  # noqa: F401 (only whether it is installed)
        return
    except ImportError:
        pass
    layers = types.ModuleType("timm.models.layers")
    layers.DropPath, layers.to_2tuple, layers.trunc_normal_ = nn.Identity, lambda x: (x, x), nn.init.trunc_normal_
    registry = types.ModuleType("timm.models.registry")
    registry.register_model = lambda f: f
    timm_models = types.ModuleType("timm.models")
    timm_models.layers, timm_models.registry = layers, registry
    package = types.ModuleType("timm")
    package.models = timm_models
    sys.modules.update({"timm": package, "timm.models": timm_models, "timm.models.layers": layers,
                        "timm.models.registry": registry})


def import_both(official_repo):
    repo = os.path.abspath(official_repo)
    missing = [f for f in ("main_ibot.py", "loader.py", "utils.py", "models/vision_transformer.py", "models/head.py")
               if not os.path.isfile(os.path.join(repo, f))]
    if missing:
        sys.exit(f"official iBOT code not found in {repo} (missing {', '.join(missing)}); run: "
                 f"git clone https://github.com/bytedance/ibot {repo}")
    sys.path.insert(0, ROOT)
    import ibot
    stand_in_timm()
    sys.path.insert(0, repo)
    import utils as outils  # official modules
    from models import vision_transformer as ovt
    from models.head import iBOTHead as OiBOTHead
    from loader import ImageFolderMask
    # main_ibot.py imports tensorboardX, sklearn, munkres, ... at the top: take only iBOTLoss from it
    tree = ast.parse(open(os.path.join(repo, "main_ibot.py")).read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "iBOTLoss")
    namespace = dict(torch=torch, nn=nn, F=F, np=np, dist=dist, utils=outils)
    exec(compile(ast.Module(body=[cls], type_ignores=[]), "main_ibot.py", "exec"), namespace)
    return ibot, ovt, outils, OiBOTHead, namespace["iBOTLoss"], ImageFolderMask


def random_masks(ibot, n, side, seed):
    random.seed(seed)
    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    return torch.stack([torch.from_numpy(ibot.block_mask(side, side, 0.3 * side * side, log_aspect, random))
                        for _ in range(n)])


def check_vit(ibot, ovt):
    for masked in (True, False):
        what = "student (mask token)" if masked else "teacher"
        off = ovt.vit_small(patch_size=16, return_all_tokens=True, masked_im_modeling=masked).eval()
        ours = ibot.vit_small(patch_size=16, return_all_tokens=True, masked_im_modeling=masked).eval()
        randomize(off, seed=1 + masked)
        err = load_both_ways(ours, off)
        report(f"a) vit_small/16 {what} strict load", not err, err or f"{len(off.state_dict())} tensors")
        if err:
            continue
        g = torch.Generator().manual_seed(2)
        x = torch.randn(3, 3, 224, 224, generator=g)
        mask = random_masks(ibot, 3, 14, seed=3) if masked else None
        with torch.no_grad():
            d = max_diff(ours(x, mask=mask), off(x, mask=mask))
            d_small = max_diff(ours(x[:, :, :96, :96], return_all_tokens=False, mask=None if not masked else mask[:, :6, :6]),
                               off(x[:, :, :96, :96], return_all_tokens=False, mask=None if not masked else mask[:, :6, :6]))
        report(f"a) vit_small/16 {what} outputs", max(d, d_small) < 1e-4,
               f"max|diff| all tokens @224 {d:.2e}, CLS @96 {d_small:.2e}" + (" (block masks)" if masked else ""))


def check_heads(ibot, OiBOTHead):
    g = torch.Generator().manual_seed(4)
    for K in (8192, 1024):
        for shared in (True, False):
            for norm_last in (True, False):
                name = f"b) iBOTHead K={K} shared={shared:d} norm_last={norm_last:d}"
                off = OiBOTHead(384, K, patch_out_dim=K, shared_head=shared, norm_last_layer=norm_last)
                ours = ibot.iBOTHead(384, K, patch_out_dim=K, shared_head=shared, norm_last_layer=norm_last)
                randomize(off, seed=K + 2 * shared + norm_last)
                err = load_both_ways(ours, off)
                if err:
                    report(name, False, err)
                    continue
                trainable = [{n for n, p in m.named_parameters() if p.requires_grad} for m in (ours, off)]
                tokens = torch.randn(4, 1 + 196, 384, generator=g)
                patch_mask = torch.rand(4, 196, generator=g) < 0.3
                with torch.no_grad():
                    (c1, p1), (c2, p2) = ours(tokens), off(tokens)
                    c3, p3 = ours(tokens, patch_mask)
                    d = max(max_diff(c1, c2), max_diff(p1, p2), max_diff(ours(tokens[:, 0]), off(tokens[:, 0])))
                    d_mask = max(max_diff(c3, c2), max_diff(p3[patch_mask], p2[patch_mask]))
                same = trainable[0] == trainable[1]
                report(name, same and max(d, d_mask) < 1e-4,
                       f"max|diff| {d:.2e}, with patch_mask {d_mask:.2e}" + ("" if same else "; trainable parameters differ"))


def check_loss(ibot, OiBOTLoss):
    G, L, B, N, K = 2, 4, 8, 16, 1024
    for K2, mim_start in ((1024, 0), (2048, 10)):
        cfg = (K, K2, G, L, 0.04, 0.07, 0.04, 0.07, 30, 100)
        kw = dict(lambda2=0.5, mim_start_epoch=mim_start)
        off, ours = OiBOTLoss(*cfg, **kw), ibot.iBOTLoss(*cfg, **kw)
        g = torch.Generator().manual_seed(5 + K2)
        shift, shift2 = 2 * torch.randn(K, generator=g), 2 * torch.randn(K2, generator=g)
        worst = dict(loss=0.0, grad=0.0, center=0.0)
        for epoch in (0, 5, 29, 30, 99):
            for _ in range(3):
                s_cls, s_patch = 3 * torch.randn(G * B, K, generator=g), 3 * torch.randn(G * B, N, K2, generator=g)
                s_local = 3 * torch.randn(L * B, K, generator=g)
                t_cls, t_patch = 3 * torch.randn(G * B, K, generator=g) + shift, 3 * torch.randn(G * B, N, K2, generator=g) + shift2
                masks = [torch.rand(B, 4, 4, generator=g) < 0.4 for _ in range(G)]
                masks[0][0] = False  # an image without masked tokens
                outs, grads = [], []
                for loss_fn in (ours, off):
                    leaves = [t.clone().requires_grad_() for t in (s_cls, s_patch, s_local)]
                    out = loss_fn((leaves[0], leaves[1]), (t_cls.clone(), t_patch.clone()), leaves[2], masks, epoch)
                    out["loss"].backward()
                    outs.append({k: v.item() for k, v in out.items()})
                    grads.append([t.grad for t in leaves])
                worst["loss"] = max([worst["loss"]] + [abs(outs[0][k] - outs[1][k]) / abs(outs[1][k]) for k in ("cls", "patch", "loss")])
                worst["grad"] = max([worst["grad"]] + [max_diff(a, b) / b.abs().max().item() for a, b in zip(*grads)])
                worst["center"] = max(worst["center"], max_diff(ours.center, off.center), max_diff(ours.center2, off.center2))
        shapes = (tuple(ours.center.shape), tuple(ours.center2.shape)) == (tuple(off.center.shape), tuple(off.center2.shape))
        tag = f"K2={K2} mim_start={mim_start}"
        report(f"c) iBOTLoss cls/patch/total (rel) {tag}", worst["loss"] < 1e-5, f"worst rel diff {worst['loss']:.2e} over 15 calls")
        report(f"c) iBOTLoss grads (rel) {tag}", worst["grad"] < 1e-5, f"worst rel diff {worst['grad']:.2e}")
        report(f"c) iBOTLoss centres {tag}", shapes and worst["center"] < 1e-6,
               f"worst max|diff| {worst['center']:.2e}; shapes {tuple(ours.center.shape)} {tuple(ours.center2.shape)}")


def check_masks(ibot, ImageFolderMask):
    from PIL import Image
    with tempfile.TemporaryDirectory() as root:
        os.makedirs(os.path.join(root, "a"))
        Image.new("RGB", (8, 8)).save(os.path.join(root, "a", "0.png"))
        crops = lambda img: [torch.zeros(3, 224, 224)] * 2  # two global crops, no random draws
        for ratio, var in (([0.3], [0.0]), ([0.0, 0.3], [0.0, 0.2])):
            off = ImageFolderMask(root, transform=crops, patch_size=16, pred_ratio=ratio if len(ratio) > 1 else ratio[0],
                                  pred_ratio_var=var if len(var) > 1 else var[0], pred_aspect_ratio=(0.3, 1 / 0.3))
            ours = ibot.MaskedCrops(ibot.koleo_proto.ArrayDataset(np.zeros((1, 8, 8), np.uint8), [0], crops), 16, 2, ratio, var,
                                    (0.3, 1 / 0.3))
            same, masked = 0, []
            for seed in range(200):
                random.seed(seed)
                theirs = off[0][-1]
                random.seed(seed)
                mine = ours[0][-1]
                same += all(np.array_equal(a, b.numpy()) for a, b in zip(theirs, mine))
                masked += [m.float().mean().item() for m in mine]
            report(f"d) block masks pred_ratio {ratio} var {var}", same == 200,
                   f"{same}/200 seeds identical; mean masked fraction {np.mean(masked):.3f}")


def check_speed(ibot, ovt, outils, OiBOTHead, OiBOTLoss, steps):
    torch.manual_seed(6)
    off = outils.MultiCropWrapper(ovt.vit_small(patch_size=16, drop_path_rate=0.1, return_all_tokens=True, masked_im_modeling=True),
                                  OiBOTHead(384, 8192, patch_out_dim=8192, shared_head=True))
    ours = ibot.MultiCropWrapper(ibot.vit_small(patch_size=16, drop_path_rate=0.1, return_all_tokens=True, masked_im_modeling=True),
                                 ibot.iBOTHead(384, 8192, patch_out_dim=8192, shared_head=True))
    err = load_both_ways(ours, off)
    report("e) MultiCropWrapper strict load", not err, err or "identical weights")
    if err:
        return
    g = torch.Generator().manual_seed(7)
    globals_ = [torch.randn(4, 3, 224, 224, generator=g) for _ in range(2)]
    locals_ = [torch.randn(4, 3, 96, 96, generator=g) for _ in range(4)]
    masks = [random_masks(ibot, 4, 14, seed=8 + i) for i in range(2)]
    teacher = (torch.randn(8, 8192, generator=g), torch.randn(8, 196, 8192, generator=g))
    losses = {"ours": ibot.iBOTLoss(8192, 8192, 2, 4, 0.04, 0.07, 0.04, 0.07, 0, 1),
              "official": OiBOTLoss(8192, 8192, 2, 4, 0.04, 0.07, 0.04, 0.07, 0, 1)}

    def step(name):
        model = ours if name == "ours" else off
        model.train().zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        if name == "ours":  # as ibot.py trains: only masked patch tokens through the head
            out = model(globals_, mask=masks, patch_mask=masks)
            local = model(locals_, return_all_tokens=False)
        else:  # as main_ibot.py trains
            out = model(globals_, mask=masks)
            model.backbone.masked_im_modeling = False
            local = model(locals_)[0]
            model.backbone.masked_im_modeling = True
        losses[name](out, teacher, local, masks, 0)["loss"].backward()
        return time.perf_counter() - t0

    for _ in range(2):  # warm-up
        step("ours"), step("official")
    times = {"ours": [], "official": []}
    for i in range(steps):  # interleaved, alternating who goes first
        for name in (("ours", "official") if i % 2 == 0 else ("official", "ours")):
            times[name].append(step(name))
    t_ours, t_off = statistics.median(times["ours"]), statistics.median(times["official"])
    report("e) speed student step ViT-S/16 + iBOTHead 8192", t_ours <= t_off * 1.05,
           f"median ours {t_ours:.3f}s  official {t_off:.3f}s  ratio {t_ours / t_off:.2f} ({torch.get_num_threads()} threads)")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--official_repo", default="/tmp/official_ibot", help="checkout of bytedance/ibot")
    p.add_argument("--steps", type=int, default=5, help="timed steps per implementation")
    args = p.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # official uses nn.utils.weight_norm
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=SyntaxWarning)  # in the official Swin code, imported by models
    ibot, ovt, outils, OiBOTHead, OiBOTLoss, ImageFolderMask = import_both(args.official_repo)
    run_checks([lambda: check_vit(ibot, ovt), lambda: check_heads(ibot, OiBOTHead), lambda: check_loss(ibot, OiBOTLoss),
                lambda: check_masks(ibot, ImageFolderMask),
                lambda: check_speed(ibot, ovt, outils, OiBOTHead, OiBOTLoss, args.steps)], args.official_repo)


if __name__ == "__main__":
    main()
