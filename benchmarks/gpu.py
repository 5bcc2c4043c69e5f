"""What a GPU user of dino.py and ibot.py needs to know, measured on one GPU in one command.

    python benchmarks/gpu.py                    # <= 8 minutes on one H100 / H200
    python benchmarks/gpu.py --official PATH    # also facebookresearch/dino, checked out at PATH
    python benchmarks/gpu.py --dry_run          # every part at tiny sizes on CPU (a test runs it)

Nothing is downloaded: the crops are random tensors, the images generated files. Parts:
  1. images/s of a DINO ViT-S/16 training step (dino.train_one_epoch) at 224 px: 2 x 224 + 10 x 96
     crops (the released ViT-S/16's recipe), batch 64, bf16 autocast, fused AdamW, K = 65,536, on
     synthetic crops already on the GPU; with --official, the same step of the official components
     in the same process: its VisionTransformer, DINOHead, MultiCropWrapper, DINOLoss and
     clip_gradients, and its loop's per-step loss.item(), EMA and synchronize (same autocast and
     optimizer). Then the data pipeline: DataAugmentationDINO on generated JPEGs, the loader alone
     with half and all CPU cores as workers, and the step fed by it.
  2. the step with --compile (inductor), and the iBOT ViT-S/16 step (ibot.py's recipe: shared head,
     K = 8192, block masks) without and with it.
  3. KoLeo-Proto's share of the step at K = 65,536 (--koleo 0.1 against 0, and the loss alone), and
     the per-epoch collapse statistics (prototype_stats) against an ImageNet epoch.
  4. peak GPU memory of each row.
  5. torchrun --nproc_per_node 1 dino.py (the DDP code path) on a generated CIFAR-100-sized folder
     (50,000 + 10,000 images, 32 px, 100 classes) with --precision bf16 and fp16: checkpoint, log
     and summary written, every logged loss finite.
The script keeps its own clock against --budget: a part that would not fit in what is left is
skipped, and its rows say so. The table at the end has every row. Exit status 1 if a check fails
or a part crashes (the other parts still run).
"""
import argparse
import gc
import itertools
import json
import math
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dino  # noqa: E402
import ibot  # noqa: E402
import koleo_proto  # noqa: E402

IMAGENET_TRAIN = 1_281_167


class Bench:
    """The rows of the table, the clock and the device."""

    def __init__(self, args):
        self.args, self.dry = args, args.dry_run
        self.start = time.perf_counter()
        self.device = torch.device("cpu" if self.dry else "cuda")
        self.cuda = self.device.type == "cuda"
        self.rows = {}  # key -> dict(part, what, ips, mem, seconds, note)
        self.failed = False
        self.ips = {}  # images/s of the eager steps, which other rows compare with

    def left(self):
        return self.args.budget - (time.perf_counter() - self.start)

    def declare(self, key, part, what):
        self.rows[key] = dict(part=part, what=what, ips=None, mem=None, seconds=None,
                              note="not run")

    def set(self, key, **kw):
        row = self.rows[key]
        row.update(kw)
        self.failed |= str(row["note"]).startswith("FAIL")
        print(f"[{time.perf_counter() - self.start:6.1f} s] {row['part']} {row['what']}: "
              f"{fmt(row['ips'], '.1f')} img/s, {fmt(row['mem'], '.2f')} GiB, {row['note']}",
              flush=True)

    def note(self, key, before):
        self.rows[key]["note"] = before + "; " + self.rows[key]["note"]

    def part(self, keys, estimate, fn):
        """Run fn() if its estimated seconds fit in the budget; a crash fails its rows only."""
        if self.left() < estimate:
            for k in keys:
                self.set(k, note=f"skipped: needs ~{estimate:.0f} s, {max(self.left(), 0):.0f} s "
                                 f"of the budget left (--budget {self.args.budget:.0f})")
            return
        try:
            fn()
        except Exception as e:
            traceback.print_exc()
            for k in keys:
                if self.rows[k]["note"] == "not run":
                    error = " ".join(str(e).split())[:200]
                    self.set(k, note=f"FAIL: {type(e).__name__}: {error}")

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def reset_memory(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_memory(self):
        return torch.cuda.max_memory_allocated() / 2**30 if self.cuda else "n/a on CPU"

    def table(self):
        lines = ["| part | what | images/s | peak GPU memory (GiB) | seconds | result, notes |",
                 "|---|---|---|---|---|---|"]
        for r in self.rows.values():
            lines.append(f"| {r['part']} | {r['what']} | {fmt(r['ips'], '.1f')} | "
                         f"{fmt(r['mem'], '.2f')} | {fmt(r['seconds'], '.1f')} | {r['note']} |")
        return "\n".join(lines)


def fmt(value, spec):
    if value is None:
        return ""
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


# ----------------------------------------------------------------------------------------------
# Sizes: the recipes on a GPU, tiny ones for --dry_run on CPU
# ----------------------------------------------------------------------------------------------
def sizes(dry):
    cores = os.cpu_count() or 2
    if not dry:
        return dict(dino=["--data", "imagenet", "--local_crops_number", "10",
                          "--batch_size_per_gpu", "64"],
                    ibot=["--data", "imagenet", "--batch_size_per_gpu", "64"],
                    warmup=5, steps=20, compile_warmup=6, jpegs=1024, jpeg_size=(500, 375),
                    workers=sorted({max(1, cores // 2), cores}), cifar=(100, 500, 100),
                    cifar_epochs=dict(bf16=2, fp16=1),
                    cifar_extra=["--num_workers", str(max(1, cores - 2))], backend="inductor")
    # a 2-block ViT of width 32, for this process alone: tracing for --compile takes seconds
    dino.ARCHS["vit_pico"], ibot.ARCHS["vit_pico"] = dino.vit(32, 2, 2), ibot.vit(32, 2, 2)
    tiny = ["--arch", "vit_pico", "--patch_size", "8", "--global_crops_size", "32",
            "--local_crops_size", "16", "--local_crops_number", "2", "--batch_size_per_gpu", "4",
            "--out_dim", "256", "--bottleneck_dim", "32"]
    return dict(dino=["--data", "imagenet", *tiny],
                ibot=["--data", "imagenet", *tiny, "--patch_out_dim", "256"],
                warmup=1, steps=1, compile_warmup=2, jpegs=16, jpeg_size=(64, 48), workers=[2],
                cifar=(4, 8, 4), cifar_epochs=dict(bf16=1, fp16=1),
                cifar_extra=["--arch", "vit_nano", "--patch_size", "8", "--out_dim", "64",
                             "--batch_size_per_gpu", "8", "--local_crops_number", "2",
                             "--warmup_epochs", "0", "--num_workers", "0"],
                backend="eager")  # graph capture alone: inductor takes minutes of C++ on CPU


def schedules(n, lr=1.25e-4, wd=0.04, momentum=0.996):
    """Constant lr, weight decay and teacher momentum for the iterations of epochs 0 and 1."""
    return np.full(2 * n, lr), np.full(2 * n, wd), np.full(2 * n, momentum), None


class Take:
    """The next n batches of a running iterator, as a loader with a length (for tqdm)."""

    def __init__(self, iterator, n):
        self.iterator, self.n = iterator, n

    def __len__(self):
        return self.n

    def __iter__(self):
        return itertools.islice(self.iterator, self.n)


# ----------------------------------------------------------------------------------------------
# Parts 1 to 4: training steps, ours (dino/ibot.train_one_epoch) and the official one
# ----------------------------------------------------------------------------------------------
class DinoRun:
    """Student, teacher, loss and optimizer as dino.main builds them (without DDP)."""

    def __init__(self, bench, argv, compile_backend=None):
        self.bench, self.args = bench, dino.parse_args(argv)
        a, d = self.args, bench.device
        torch.manual_seed(0)
        self.student, self.teacher = (m.to(d) for m in dino.build_models(a))
        if compile_backend:  # as dino.py --compile does
            self.student.compile(backend=compile_backend)
            self.teacher.compile(backend=compile_backend)
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad = False
        self.loss = dino.DINOLoss(a.out_dim, a.local_crops_number + 2, a.warmup_teacher_temp,
                                  a.teacher_temp, a.warmup_teacher_temp_epochs, a.epochs).to(d)
        params = dino.get_params_groups(self.student)
        self.optimizer = torch.optim.AdamW(params, fused=bench.cuda)
        self.B = a.batch_size_per_gpu

    def batch(self, seed=0):
        a, g = self.args, torch.Generator().manual_seed(seed)
        sides = [a.global_crops_size] * 2 + [a.local_crops_size] * a.local_crops_number
        crops = [torch.randn(self.B, 3, s, s, generator=g).to(self.bench.device) for s in sides]
        return crops, None

    def steps(self, loader):
        # epoch 1: past --freeze_last_layer 1, so that the prototypes (and KoLeo-Proto) get
        # gradients; rank 1 only hides the progress bar
        dino.train_one_epoch(self.student, self.teacher, self.student, self.loss, loader,
                             self.optimizer, schedules(len(loader)), 1, None, torch.bfloat16,
                             self.args, self.bench.device, 1)


class IbotRun:
    """The same for ibot.py, with block masks drawn as ibot.MaskedCrops draws them."""

    def __init__(self, bench, argv, compile_backend=None):
        self.bench, self.args = bench, ibot.parse_args(argv)
        a, d = self.args, bench.device
        torch.manual_seed(0)
        self.student, self.teacher = (m.to(d) for m in ibot.build_models(a))
        if compile_backend:  # as ibot.py --compile does
            self.student.compile(backend=compile_backend)
            self.teacher.compile(backend=compile_backend)
        student_params, teacher_params = ibot.ema_pairs(self.student, self.teacher)
        with torch.no_grad():
            torch._foreach_copy_(teacher_params, student_params)
        for p in self.teacher.parameters():
            p.requires_grad = False
        self.loss = ibot.iBOTLoss(a.out_dim, a.patch_out_dim, a.global_crops_number,
                                  a.local_crops_number, a.warmup_teacher_temp, a.teacher_temp,
                                  a.warmup_teacher_patch_temp, a.teacher_patch_temp,
                                  a.warmup_teacher_temp_epochs, a.epochs, lambda1=a.lambda1,
                                  lambda2=a.lambda2, mim_start_epoch=a.pred_start_epoch).to(d)
        self.optimizer = torch.optim.AdamW(ibot.get_params_groups(self.student), fused=bench.cuda)
        self.B = a.batch_size_per_gpu
        self.masker = ibot.MaskedCrops(None, a.patch_size, a.global_crops_number, a.pred_ratio,
                                       a.pred_ratio_var, a.pred_aspect_ratio, a.pred_shape,
                                       a.pred_start_epoch)

    def batch(self, seed=0):
        a, g = self.args, torch.Generator().manual_seed(seed)
        G = a.global_crops_number
        sides = [a.global_crops_size] * G + [a.local_crops_size] * a.local_crops_number
        crops = [torch.randn(self.B, 3, s, s, generator=g).to(self.bench.device) for s in sides]
        n = a.global_crops_size // a.patch_size
        masks = [torch.stack([self.masker.make_mask(n, n) for _ in range(self.B)])
                 for _ in range(G)]
        return crops, None, masks

    def steps(self, loader):
        ibot.train_one_epoch(self.student, self.teacher, self.student, self.loss, loader,
                             self.optimizer, schedules(len(loader)), 1, None, torch.bfloat16,
                             self.args, self.bench.device, 1)


def official_modules(path):
    repo = os.path.abspath(path)
    missing = [f for f in ("vision_transformer.py", "main_dino.py", "utils.py")
               if not os.path.isfile(os.path.join(repo, f))]
    if missing:
        sys.exit(f"gpu.py: error: --official {path}: no {', '.join(missing)} there; pass a "
                 "checkout of facebookresearch/dino")
    sys.path.insert(0, repo)
    warnings.filterwarnings("ignore", category=FutureWarning)  # its head: nn.utils.weight_norm
    try:
        import utils as outils
        import vision_transformer as ovt
        from main_dino import DINOLoss as ODINOLoss
    except Exception as e:
        sys.exit(f"gpu.py: error: --official {path}: cannot import its code "
                 f"({type(e).__name__}: {e})")
    return ovt, outils, ODINOLoss


class OfficialRun:
    """facebookresearch/dino's components, stepped as its main_dino.train_one_epoch steps them,
    with bf16 autocast instead of its fp16 scaler, and the same fused AdamW as ours."""
    batch = DinoRun.batch

    def __init__(self, bench, modules, args):
        ovt, self.outils, ODINOLoss = modules
        self.bench, self.args, d = bench, args, bench.device
        torch.manual_seed(0)
        dims = dino.ARCHS[args.arch].keywords  # embed_dim, depth, num_heads (vit_nano is ours)
        backbone = partial(ovt.VisionTransformer, patch_size=args.patch_size, mlp_ratio=4,
                           qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), **dims)
        head = partial(ovt.DINOHead, dims["embed_dim"], args.out_dim, use_bn=False,
                       hidden_dim=args.hidden_dim, bottleneck_dim=args.bottleneck_dim)
        self.student = self.outils.MultiCropWrapper(
            backbone(drop_path_rate=args.drop_path_rate),
            head(norm_last_layer=args.norm_last_layer))
        self.teacher = self.outils.MultiCropWrapper(backbone(), head())
        self.student, self.teacher = self.student.to(d), self.teacher.to(d)
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad = False
        self.loss = ODINOLoss(args.out_dim, args.local_crops_number + 2, args.warmup_teacher_temp,
                              args.teacher_temp, args.warmup_teacher_temp_epochs, args.epochs).to(d)
        params = self.outils.get_params_groups(self.student)
        self.optimizer = torch.optim.AdamW(params, fused=bench.cuda)
        self.B = args.batch_size_per_gpu

    def steps(self, loader):
        epoch, n = 1, len(loader)
        lr, wd, momentum, _ = schedules(n)
        for i, (images, _) in enumerate(loader):
            it = n * epoch + i
            for j, group in enumerate(self.optimizer.param_groups):
                group["lr"] = lr[it]
                if j == 0:
                    group["weight_decay"] = wd[it]
            images = [im.to(self.bench.device, non_blocking=True) for im in images]
            with torch.autocast(self.bench.device.type, dtype=torch.bfloat16):
                teacher_output = self.teacher(images[:2])
                student_output = self.student(images)
                loss = self.loss(student_output, teacher_output, epoch)
            if not math.isfinite(loss.item()):
                raise RuntimeError(f"official step: loss {loss.item()}")
            self.optimizer.zero_grad()
            loss.backward()
            self.outils.clip_gradients(self.student, self.args.clip_grad)
            self.outils.cancel_gradients_last_layer(epoch, self.student,
                                                    self.args.freeze_last_layer)
            self.optimizer.step()
            with torch.no_grad():
                for param_q, param_k in zip(self.student.parameters(), self.teacher.parameters()):
                    param_k.data.mul_(momentum[it]).add_((1 - momentum[it]) * param_q.detach().data)
            self.bench.sync()


def measure(bench, key, make, warmup, steps, note=""):
    """Build a run, time its steps (warm-up first: compiling, allocator, kernel choices; then
    the timed ones, cycling 4 batches), record images/s and peak memory. Returns the run."""
    bench.reset_memory()
    t0 = time.perf_counter()
    run = make()
    batches = [run.batch(i) for i in range(4 if isinstance(run, IbotRun) else 1)]
    cycle = lambda n: [batches[i % len(batches)] for i in range(n)]  # noqa: E731
    run.steps(cycle(warmup))
    bench.sync()
    t1 = time.perf_counter()
    run.steps(cycle(steps))
    bench.sync()
    run.ips = steps * run.B / (time.perf_counter() - t1)
    bench.set(key, ips=run.ips, mem=bench.peak_memory(), seconds=time.perf_counter() - t0,
              note=(note + "; " if note else "") + f"warm-up {warmup} steps {t1 - t0:.1f} s")
    return run


def part_steps(bench, cfg, official):
    """Part 1 on synthetic crops, ours and official, with peak memory (part 4)."""
    bench.ips["dino"] = measure(bench, "dino", lambda: DinoRun(bench, cfg["dino"]),
                                cfg["warmup"], cfg["steps"]).ips
    if official is None:
        bench.set("official", note="not measured: pass --official PATH (a checkout of "
                                   "facebookresearch/dino)")
        return
    args = dino.parse_args(cfg["dino"])
    ips = measure(bench, "official", lambda: OfficialRun(bench, official, args), cfg["warmup"],
                  cfg["steps"]).ips
    bench.note("official", f"ours / official = {bench.ips['dino'] / ips:.2f}")


def part_koleo(bench, cfg):
    """Part 3: KoLeo-Proto in the step and alone, and the collapse statistics of an epoch."""
    run = measure(bench, "koleo", lambda: DinoRun(bench, cfg["dino"] + ["--koleo", "0.1"]),
                  cfg["warmup"], cfg["steps"])
    t_step = run.B / run.ips
    t_plain = run.B / bench.ips["dino"] if "dino" in bench.ips else t_step  # else: not measured
    if "dino" in bench.ips:
        bench.note("koleo", f"{100 * (t_step - t_plain) / t_step:.1f}% of the step "
                            f"({1000 * (t_step - t_plain):.1f} of {1000 * t_step:.1f} ms)")
    w = run.student.head.last_layer.weight.detach().clone().requires_grad_()
    for _ in range(2):
        koleo_proto.koleo_proto_loss(w).backward()
    bench.sync()
    t0, n = time.perf_counter(), 3 if bench.dry else 10
    for _ in range(n):
        koleo_proto.koleo_proto_loss(w).backward()
    bench.sync()
    t = (time.perf_counter() - t0) / n
    K, D = w.shape
    bench.set("koleo_alone", seconds=t, note=f"K = {K}, D = {D}: {1000 * t:.1f} ms per call, "
                                             f"{100 * t / t_step:.1f}% of the step with it")
    usage = torch.ones(K, dtype=torch.long, device=bench.device)  # what dino.main computes
    dino.prototype_stats(run.teacher, run.student, usage)  # after every epoch, on rank 0
    bench.sync()
    t0 = time.perf_counter()
    dino.prototype_stats(run.teacher, run.student, usage)
    bench.sync()
    t = time.perf_counter() - t0
    epoch = lambda gpus: IMAGENET_TRAIN // (run.B * gpus) * t_plain  # noqa: E731
    bench.set("stats", seconds=t, note=f"{t:.2f} s per epoch: {100 * t / (t + epoch(1)):.3f}% of "
                                       f"an ImageNet epoch at batch {run.B} on 1 GPU, "
                                       f"{100 * t / (t + epoch(8)):.3f}% on 8")


def part_ibot(bench, cfg):
    bench.ips["ibot"] = measure(bench, "ibot", lambda: IbotRun(bench, cfg["ibot"]), cfg["warmup"],
                                cfg["steps"], "block masks drawn as ibot.MaskedCrops").ips


def part_compile(bench, cfg, method):
    """Part 2: the step of dino.py or ibot.py --compile."""
    key, cls = f"{method}_compile", DinoRun if method == "dino" else IbotRun
    note = f"backend {cfg['backend']}" + (" (graph capture alone: inductor takes minutes on CPU)"
                                          if bench.dry else "")
    run = measure(bench, key, lambda: cls(bench, cfg[method], cfg["backend"]),
                  cfg["compile_warmup"], cfg["steps"], note)
    if method in bench.ips:
        bench.note(key, f"{run.ips / bench.ips[method]:.2f} x eager")


# ----------------------------------------------------------------------------------------------
# Part 1, the data pipeline: DataAugmentationDINO on generated JPEGs
# ----------------------------------------------------------------------------------------------
def write_jpeg(job):
    """Smooth random colours plus fine noise, about as costly to decode as a photograph."""
    path, seed, width, height = job
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    pixels = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32)
    pixels = pixels + rng.normal(0, 12, (height, width, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


def make_jpegs(root, n, size, classes=8):
    """n JPEGs in class folders under root; returns their mean size in KiB."""
    jobs = []
    for i in range(n):
        folder = os.path.join(root, f"class{i % classes}")
        os.makedirs(folder, exist_ok=True)
        jobs.append((os.path.join(folder, f"{i}.jpg"), i, *size))
    with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
        pool.map(write_jpeg, jobs, chunksize=16)
    return sum(os.path.getsize(job[0]) for job in jobs) / n / 1024


def part_pipeline(bench, cfg, workdir):
    args = dino.parse_args(cfg["dino"])
    t0 = time.perf_counter()
    root = os.path.join(workdir, "jpeg")
    kib = make_jpegs(root, cfg["jpegs"], cfg["jpeg_size"])
    made = f"{cfg['jpegs']} JPEGs of {cfg['jpeg_size'][0]} x {cfg['jpeg_size'][1]} px, " \
           f"{kib:.0f} KiB on average, written in {time.perf_counter() - t0:.1f} s"
    mean, std = koleo_proto.DATASETS["imagenet"]
    augment = dino.DataAugmentationDINO(args.global_crops_scale, args.local_crops_scale,
                                        args.local_crops_number, args.global_crops_size,
                                        args.local_crops_size, mean, std)
    dataset = koleo_proto.image_folder(root, augment)
    B = args.batch_size_per_gpu

    def batches(workers, n):  # a running loader of n batches, as dino.main's
        sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=B * n)
        return iter(torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=B,
                                                num_workers=workers, pin_memory=bench.cuda,
                                                drop_last=True))

    per_worker = None
    for w in cfg["workers"]:  # the loader alone: a batch per worker to start them, then 2 each
        t0 = time.perf_counter()
        it = batches(w, 3 * w)
        for _ in range(w):
            next(it)
        t1 = time.perf_counter()
        for _ in range(2 * w):
            next(it)
        ips = 2 * w * B / (time.perf_counter() - t1)
        per_worker = ips / w
        bench.set(f"loader{w}", ips=ips, seconds=time.perf_counter() - t0,
                  note=f"{per_worker:.0f} img/s per worker; {made}")
    w = cfg["workers"][-1]
    bench.reset_memory()
    t0 = time.perf_counter()
    run = DinoRun(bench, cfg["dino"])
    it = batches(w, w + cfg["steps"])
    run.steps(Take(it, w))  # the workers started, their first batches made
    bench.sync()
    t1 = time.perf_counter()
    run.steps(Take(it, cfg["steps"]))
    bench.sync()
    ips = cfg["steps"] * B / (time.perf_counter() - t1)
    note = "no synthetic step to compare with"
    if "dino" in bench.ips:
        need, cores = math.ceil(bench.ips["dino"] / per_worker), os.cpu_count()
        note = (f"the synthetic step ({bench.ips['dino']:.0f} img/s) needs ~{need} workers at "
                f"{per_worker:.0f} img/s each (this CPU" + (f", which has {cores} cores)"
                                                             if need > cores else ")"))
    bench.set("fed", ips=ips, mem=bench.peak_memory(), seconds=time.perf_counter() - t0, note=note)


# ----------------------------------------------------------------------------------------------
# Part 5: torchrun --nproc_per_node 1 dino.py on a generated CIFAR-100-sized folder
# ----------------------------------------------------------------------------------------------
def write_png(job):
    """A 32 px image of its class: the class's colour pattern, shifted, plus noise."""
    path, label, seed = job
    rng = np.random.default_rng(seed)
    pattern = np.random.default_rng(label).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(pattern).resize((32, 32), Image.BILINEAR), np.float32)
    image = np.roll(image, tuple(rng.integers(-4, 5, 2)), axis=(0, 1))
    image = image + rng.normal(0, 20, image.shape)
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path)


def make_cifar_folder(root, classes, train, val):
    jobs = []
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            folder = os.path.join(root, split, f"{c:03}")
            os.makedirs(folder)
            jobs += [(os.path.join(folder, f"{i}.png"), c, len(jobs) + i) for i in range(n)]
    with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
        pool.map(write_png, jobs, chunksize=256)


def part_torchrun(bench, cfg, workdir, precision, share):
    """One dino.py run under torchrun; share: its seconds of the budget (it may take twice)."""
    key = f"ddp_{precision}"
    if precision == "fp16" and not bench.cuda:
        bench.set(key, note="n/a on CPU (fp16 autocast and its GradScaler need CUDA); the bf16 "
                            "run took the same code path")
        return
    root, made = os.path.join(workdir, "cifar"), ""
    t0 = time.perf_counter()
    if not os.path.isdir(root):
        make_cifar_folder(root, *cfg["cifar"])
        classes, train, val = cfg["cifar"]
        made = (f"; {classes} classes x ({train} + {val}) PNGs written in "
                f"{time.perf_counter() - t0:.1f} s")
    out = os.path.join(workdir, f"run-{precision}")
    epochs = cfg["cifar_epochs"][precision]
    bench.reset_memory()  # this process's cached blocks back to the GPU, for the run's
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           os.path.join(ROOT, "dino.py"), "--data", "folder", "--data_path", root,
           "--preset", "cifar100", "--epochs", str(epochs), "--warmup_epochs", "1",
           "--precision", precision, "--output_dir", out, *cfg["cifar_extra"]]
    print(" ".join(cmd), flush=True)
    timeout = max(10.0, min(bench.left(), 2 * share))
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        bench.set(key, seconds=time.perf_counter() - t0,
                  note=f"FAIL: still running after {timeout:.0f} s{made}")
        return
    problems = []
    if result.returncode != 0:
        lines = [line for line in result.stderr.replace("\r", "\n").splitlines()
                 if line.strip() and "%|" not in line]
        problems.append(f"exit status {result.returncode}: {' / '.join(lines[-3:])[:300]}")
    log_path, ckpt_path = os.path.join(out, "log.txt"), os.path.join(out, "checkpoint.pth")
    log = [json.loads(line) for line in open(log_path)] if os.path.isfile(log_path) else []
    if len(log) != epochs:
        problems.append(f"log.txt has {len(log)} of {epochs} epochs")
    if not all(math.isfinite(e["loss"]) for e in log):
        problems.append(f"non-finite loss: {[e['loss'] for e in log]}")
    ckpt = dino.load_checkpoint(ckpt_path) if os.path.isfile(ckpt_path) else {}
    if ckpt.get("epoch") != epochs or "module.backbone.cls_token" not in ckpt.get("student", {}):
        problems.append("no checkpoint.pth of the last epoch")
    summary_path = os.path.join(out, "summary.json")
    summary = json.load(open(summary_path)) if os.path.isfile(summary_path) else {}
    if summary.get("knn_top1") is None:
        problems.append("no summary.json with a kNN accuracy")
    note = "FAIL: " + "; ".join(problems) if problems else (
        f"ok: {epochs} epoch(s), loss {log[-1]['loss']:.4f}, kNN top-1 "
        f"{summary['knn_top1']:.2f}%; checkpoint, log and summary written")
    bench.set(key, ips=log[-1]["images_per_s"] if log else None,
              seconds=time.perf_counter() - t0, note=note + made)


# ----------------------------------------------------------------------------------------------
def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry_run", action="store_true",
                   help="every part at tiny sizes on CPU (the numbers mean nothing)")
    p.add_argument("--official", default=None, metavar="PATH",
                   help="checkout of facebookresearch/dino to time as well (default: none)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole run (default 480 on a GPU, 110 with --dry_run)")
    p.add_argument("--workdir", default=None,
                   help="where the generated images go, kept (default: a temporary folder)")
    args = p.parse_args()
    args.budget = args.budget or (110.0 if args.dry_run else 480.0)
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu.py: error: no CUDA GPU here: run it on a GPU machine, or pass --dry_run")
    official = official_modules(args.official) if args.official else None
    bench, cfg, dry = Bench(args), sizes(args.dry_run), args.dry_run
    name = "CPU, dry run (tiny sizes: the numbers mean nothing)" if dry else \
        torch.cuda.get_device_name()
    print(f"gpu.py on {name}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"{os.cpu_count()} CPU cores; {time.strftime('%Y-%m-%d %H:%M %Z')}; "
          f"budget {args.budget:.0f} s", flush=True)
    a = dino.parse_args(cfg["dino"])
    bench.declare("dino", "1", f"DINO step, synthetic crops, ours ({a.arch}/{a.patch_size}, "
                               f"2 x {a.global_crops_size} + {a.local_crops_number} x "
                               f"{a.local_crops_size} px, batch {a.batch_size_per_gpu}, "
                               f"K {a.out_dim}, bf16)")
    bench.declare("official", "1", "the same step, official components")
    for w in cfg["workers"]:
        bench.declare(f"loader{w}", "1", f"data pipeline: loader alone, {w} workers")
    bench.declare("fed", "1", f"DINO step fed by the loader, {cfg['workers'][-1]} workers")
    bench.declare("dino_compile", "2", "DINO step, --compile")
    b = ibot.parse_args(cfg["ibot"])
    bench.declare("ibot", "2", f"iBOT step, synthetic crops (ibot.py's recipe: {b.arch}/"
                               f"{b.patch_size}, {b.local_crops_number} local crops, "
                               f"K {b.out_dim})")
    bench.declare("ibot_compile", "2", "iBOT step, --compile")
    bench.declare("koleo", "3", f"DINO step with KoLeo-Proto (lambda 0.1, K {a.out_dim})")
    bench.declare("koleo_alone", "3", "koleo_proto_loss forward + backward alone")
    bench.declare("stats", "3", "collapse statistics after each epoch (prototype_stats)")
    bench.declare("ddp_bf16", "5", "torchrun, 1 process: dino.py --precision bf16")
    bench.declare("ddp_fp16", "5", "torchrun, 1 process: dino.py --precision fp16")

    # The official DINOLoss all-reduces its centre: a one-process group (ours then does as well).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if bench.cuda:
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if bench.cuda else "gloo", rank=0, world_size=1,
                            init_method=f"tcp://127.0.0.1:{port}")
    workdir = args.workdir or tempfile.mkdtemp(prefix="gpu_bench_")
    os.makedirs(workdir, exist_ok=True)
    try:  # the most telling first; estimates in seconds on an H100 / H200, or on CPU (dry run)
        bench.part(["dino", "official"], 12 if dry else 30,
                   lambda: part_steps(bench, cfg, official))
        bench.part(["koleo", "koleo_alone", "stats"], 8 if dry else 30,
                   lambda: part_koleo(bench, cfg))
        bench.part(["ibot"], 6 if dry else 20, lambda: part_ibot(bench, cfg))
        bench.part([f"loader{w}" for w in cfg["workers"]] + ["fed"], 10 if dry else 60,
                   lambda: part_pipeline(bench, cfg, workdir))
        bench.part(["ddp_bf16"], 20 if dry else 100,
                   lambda: part_torchrun(bench, cfg, workdir, "bf16", 100))
        bench.part(["ddp_fp16"], 1 if dry else 70,
                   lambda: part_torchrun(bench, cfg, workdir, "fp16", 70))
        bench.part(["dino_compile"], 15 if dry else 90, lambda: part_compile(bench, cfg, "dino"))
        bench.part(["ibot_compile"], 15 if dry else 120, lambda: part_compile(bench, cfg, "ibot"))
    finally:
        dist.destroy_process_group()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n{name}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}; "
          f"{time.perf_counter() - bench.start:.0f} s in all (budget {args.budget:.0f} s)")
    print(bench.table())
    sys.exit(1 if bench.failed else 0)


if __name__ == "__main__":
    main()
