"""Compare our dino.py against the official DINO reference implementation (CPU, fp32).

No official code lives in this repository. Fetch it outside the repo first, e.g.
    git clone https://github.com/facebookresearch/dino /tmp/official_dino
then run from anywhere:
    python benchmarks/compare_official.py [--official_repo /tmp/official_dino]

Checks (each prints PASS/FAIL with its numbers; exit status 1 if any fails):
  a) ViT-Ti/S/B-16: official state_dict loads strictly into ours and back; eval outputs on
     seeded random input match (max abs diff < 1e-4) at 224 px, and for ViT-S also at 96 px and
     160x224 px (positional-embedding interpolation, square and not).
  b) DINOHead (out_dim 65536 / 1024, norm_last_layer True / False, use_bn False / True):
     strict load both ways, same trainable parameters, outputs match (< 1e-4).
  c) DINOLoss (10 crops, batch 8, out_dim 4096, teacher temp 0.04 -> 0.07 over 30 epochs):
     loss within 1e-5 relative, grad w.r.t. student output and centre (< 1e-6) after each
     of 3 successive calls per epoch, epochs inside and after the warm-up.
  d) Speed: student forward+backward of ViT-S/16 + DINOHead(65536) in MultiCropWrapper on
     2x224 + 4x96 crops, batch 4 per crop, identical weights; 2 warm-up steps each, then
     --steps timed steps each, interleaved (who goes first alternates); median seconds and
     ratio ours/official (fails above --max_speed_ratio, a margin for this machine's noise).
  e) kNN (eval_knn.knn_classifier): same top-1 / top-5 (within 0.01 points) on clustered random
     features, 20,000 train / 1,000 test, 100 classes, k = 10, 20, 100, 200, T = 0.07; ours
     also runs on 37 test samples, where the official one divides by zero.
The official DINOLoss all-reduces its centre, so a one-process gloo group is started.
"""
import argparse
import os
import socket
import statistics
import sys
import time
import warnings

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = []


def report(name, ok, detail):
    RESULTS.append(ok)
    print(f"{'PASS' if ok else 'FAIL':4}  {name:40s} {detail}", flush=True)


def import_both(official_repo):
    repo = os.path.abspath(official_repo)
    missing = [f for f in ("vision_transformer.py", "main_dino.py", "utils.py")
               if not os.path.isfile(os.path.join(repo, f))]
    if missing:
        sys.exit(f"official DINO code not found in {repo} (missing {', '.join(missing)}); run: "
                 f"git clone https://github.com/facebookresearch/dino {repo}")
    sys.path.insert(0, ROOT)
    import dino
    import koleo_proto
    sys.path.insert(0, repo)
    import vision_transformer as ovt  # official modules (utils, vision_transformer, main_dino)
    import utils as outils
    from main_dino import DINOLoss as ODINOLoss
    return dino, ovt, outils, ODINOLoss


def randomize(module, seed):
    """Perturb every float tensor so that swapped / misnamed weights cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in module.state_dict().items():
        if v.is_floating_point():
            noise = 0.02 * torch.randn(v.shape, generator=g)
            v = v + (noise.abs() if "running_var" in k else noise)
        sd[k] = v.clone()
    module.load_state_dict(sd, strict=True)


def load_both_ways(ours, off):
    """Returns '' if official -> ours and ours -> official both load with strict=True."""
    for src, dst, what in ((off, ours, "official->ours"), (ours, off, "ours->official")):
        try:
            dst.load_state_dict(src.state_dict(), strict=True)
        except RuntimeError as e:
            return f"{what}: " + " ".join(str(e).split())[:400]
    return ""


def max_diff(a, b):
    return (a - b).abs().max().item()


def check_vit(dino, ovt, arch, sizes):
    off = getattr(ovt, arch)(patch_size=16).eval()
    ours = getattr(dino, arch)(patch_size=16, drop_path_rate=0.0).eval()
    randomize(off, seed=1)
    err = load_both_ways(ours, off)
    report(f"a) {arch}/16 strict load (both ways)", not err, err or f"{len(off.state_dict())} tensors")
    if err:
        return
    g = torch.Generator().manual_seed(2)
    for h, w in sizes:
        x = torch.randn(2, 3, h, w, generator=g)
        with torch.no_grad():
            d = max_diff(ours(x), off(x))
        report(f"a) {arch}/16 output @ {h}x{w}px", d < 1e-4, f"max|diff| = {d:.2e}")


def check_heads(dino, ovt):
    g = torch.Generator().manual_seed(3)
    for out_dim in (65536, 1024):
        for norm_last in (True, False):
            for bn in (False, True):
                name = f"b) head K={out_dim} norm_last={norm_last:d} bn={bn:d}"
                off = ovt.DINOHead(384, out_dim, use_bn=bn, norm_last_layer=norm_last)
                ours = dino.DINOHead(384, out_dim, use_bn=bn, norm_last_layer=norm_last)
                randomize(off, seed=out_dim + 2 * norm_last + bn)
                err = load_both_ways(ours, off)
                if err:
                    report(name, False, err)
                    continue
                trainable = [{n for n, p in m.named_parameters() if p.requires_grad} for m in (ours, off)]
                x = torch.randn(16, 384, generator=g)
                with torch.no_grad():
                    d = max_diff(ours.eval()(x), off.eval()(x))
                    d_train = max_diff(ours.train()(x), off.train()(x))  # BN batch statistics
                same = trainable[0] == trainable[1]
                detail = f"max|diff| eval {d:.2e} train {d_train:.2e}"
                if not same:
                    detail += f"; trainable differ: ours-only {sorted(trainable[0] - trainable[1])} official-only {sorted(trainable[1] - trainable[0])}"
                report(name, same and max(d, d_train) < 1e-4, detail)


def check_loss(dino, ODINOLoss):
    ncrops, bs, K = 10, 8, 4096
    cfg = (K, ncrops, 0.04, 0.07, 30, 100)  # warm-up teacher temp 0.04 -> 0.07 over 30 of 100 epochs
    off, ours = ODINOLoss(*cfg), dino.DINOLoss(*cfg)
    g = torch.Generator().manual_seed(4)
    shift = 2 * torch.randn(K, generator=g)  # a per-prototype offset so centring matters
    worst = {"loss": 0.0, "grad": 0.0, "center": 0.0}
    for epoch in (0, 1, 15, 29, 30, 99):
        for _ in range(3):
            s = 3 * torch.randn(ncrops * bs, K, generator=g)
            t = 3 * torch.randn(2 * bs, K, generator=g) + shift
            s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
            l1, l2 = ours(s1, t.clone(), epoch), off(s2, t.clone(), epoch)
            l1.backward(), l2.backward()
            worst["loss"] = max(worst["loss"], abs(l1.item() - l2.item()) / abs(l2.item()))
            worst["grad"] = max(worst["grad"], max_diff(s1.grad, s2.grad) / s2.grad.abs().max().item())
            worst["center"] = max(worst["center"], max_diff(ours.center, off.center))
    shape_ok = tuple(ours.center.shape) == (1, K) and "center" in ours.state_dict()
    report("c) DINOLoss value (rel)", worst["loss"] < 1e-5, f"worst rel diff {worst['loss']:.2e} over 18 calls")
    report("c) DINOLoss grad wrt student (rel)", worst["grad"] < 1e-5, f"worst rel diff {worst['grad']:.2e}")
    report("c) DINOLoss centre buffer", shape_ok and worst["center"] < 1e-6,
           f"worst max|diff| {worst['center']:.2e}; shape {tuple(ours.center.shape)}; in state_dict {'center' in ours.state_dict()}")


def check_speed(dino, ovt, outils, steps, max_ratio):
    torch.manual_seed(5)
    off = outils.MultiCropWrapper(ovt.vit_small(patch_size=16, drop_path_rate=0.1), ovt.DINOHead(384, 65536))
    ours = dino.MultiCropWrapper(dino.vit_small(patch_size=16, drop_path_rate=0.1), dino.DINOHead(384, 65536))
    err = load_both_ways(ours, off)
    report("d) MultiCropWrapper strict load", not err, err or "identical weights")
    if err:
        return
    g = torch.Generator().manual_seed(6)
    crops = [torch.randn(4, 3, 224, 224, generator=g) for _ in range(2)]
    crops += [torch.randn(4, 3, 96, 96, generator=g) for _ in range(4)]
    with torch.no_grad():
        d = max_diff(ours.eval()(crops), off.eval()(crops))
    report("d) MultiCropWrapper output (eval)", d < 1e-4, f"max|diff| = {d:.2e}, 2x224 + 4x96, batch 4")

    def step(model):
        model.train().zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        model(crops).logsumexp(dim=-1).mean().backward()
        return time.perf_counter() - t0

    for _ in range(2):  # warm-up: the allocator and thread pool settle during the first steps
        step(ours), step(off)
    times = {"ours": [], "official": []}
    for i in range(steps):  # alternate, and alternate who goes first
        for name, model in ((("ours", ours), ("official", off)) if i % 2 == 0 else (("official", off), ("ours", ours))):
            times[name].append(step(model))
    t_ours, t_off = statistics.median(times["ours"]), statistics.median(times["official"])
    report("d) speed fwd+bwd ViT-S/16 + head 65536", t_ours / t_off <= max_ratio,
           f"median ours {t_ours:.3f}s  official {t_off:.3f}s  ratio {t_ours / t_off:.2f} "
           f"(limit {max_ratio}; {torch.get_num_threads()} threads)")


def check_knn(dino, official_repo):
    sys.path.insert(0, official_repo)
    from eval_knn import knn_classifier as official_knn
    import koleo_proto
    g = torch.Generator().manual_seed(7)
    centres = torch.randn(100, 64, generator=g)
    def sample(n):
        y = torch.randint(0, 100, (n,), generator=g)
        return torch.nn.functional.normalize(centres[y] + 3.0 * torch.randn(n, 64, generator=g), dim=1), y
    (train_f, train_y), (test_f, test_y) = sample(20000), sample(1000)
    worst = 0.0
    for k in (10, 20, 100, 200):
        ours = koleo_proto.knn_classifier(train_f, train_y, test_f, test_y, k, 0.07, 100)
        off = official_knn(train_f, train_y, test_f, test_y, k, 0.07, 100)
        worst = max(worst, abs(ours[0] - off[0]), abs(ours[1] - off[1]))
    report("e) kNN top-1/top-5 vs eval_knn", worst <= 0.01, f"worst difference {worst:.3f} points over k = 10, 20, 100, 200 "
           f"(k=20: ours {koleo_proto.knn_classifier(train_f, train_y, test_f, test_y, 20, 0.07, 100)[0]:.2f}%)")
    top1, _ = koleo_proto.knn_classifier(train_f, train_y, test_f[:37], test_y[:37], 20, 0.07, 100)
    report("e) kNN on 37 test samples", 0 <= top1 <= 100, f"ours {top1:.2f}% (the official one needs >= 100)")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--official_repo", default="/tmp/official_dino", help="checkout of facebookresearch/dino")
    p.add_argument("--steps", type=int, default=5, help="timed steps per implementation")
    p.add_argument("--max_speed_ratio", type=float, default=1.05, help="fail if ours/official exceeds this (noise margin)")
    args = p.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # official uses nn.utils.weight_norm
    dino, ovt, outils, ODINOLoss = import_both(args.official_repo)
    run_checks([lambda: check_vit(dino, ovt, "vit_small", ((224, 224), (96, 96), (160, 224))),
                lambda: check_vit(dino, ovt, "vit_base", ((224, 224),)),
                lambda: check_vit(dino, ovt, "vit_tiny", ((224, 224),)),
                lambda: check_heads(dino, ovt),
                lambda: check_loss(dino, ODINOLoss),
                lambda: check_knn(dino, os.path.abspath(args.official_repo)),
                lambda: check_speed(dino, ovt, outils, args.steps, args.max_speed_ratio)], args.official_repo)


def run_checks(checks, official_repo):
    """Run each check in a one-process gloo group (the official losses all-reduce their centres);
    a crash in one is reported and the others still run. Exits 1 unless every check passed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, official code: {os.path.abspath(official_repo)}")
    for i, check in enumerate(checks):
        try:
            check()
        except Exception as e:
            report(f"check #{i + 1} crashed", False, f"{type(e).__name__}: {' '.join(str(e).split())[:400]}")
    dist.destroy_process_group()
    print(f"{sum(RESULTS)}/{len(RESULTS)} checks passed")
    sys.exit(0 if RESULTS and all(RESULTS) else 1)


if __name__ == "__main__":
    main()
