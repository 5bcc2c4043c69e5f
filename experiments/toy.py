"""A toy DINO that shows partial prototype collapse in about a minute on 2 CPU cores.

DINO's own parts, imported from dino.py: DINOHead (MLP -> L2-normalized bottleneck -> K
weight-normalized prototypes), DINOLoss (centring and sharpening), MultiCropWrapper, the cosine
schedules, AdamW's parameter groups, per-tensor clipping, the frozen-prototype epochs; the EMA
teacher as dino.py's training step writes it; KoLeo-Proto and the collapse counts of
koleo_proto.py. What is a toy: the data are labelled Gaussian clusters in R^dim instead of
images, the backbone is a small MLP instead of a ViT, and the views are noisy, partly masked
copies of a point instead of crops. With a 3-dimensional bottleneck the prototypes live on a
sphere that can be drawn (tutorials/02_collapse_on_a_sphere.ipynb).

  python experiments/toy.py --steps 2000              # K 256, bottleneck 3, ~1 min: collapse
  python experiments/toy.py --steps 2000 --koleo 0.1  # the same with KoLeo-Proto
  python experiments/toy.py --rho 100 --seed 1      # long-tailed cluster sizes
Prints one JSON line: unique prototypes (teacher and student) over training, the teacher's usage,
and kNN / few-shot / per-cluster accuracy of the backbone's features (evaluate.py's protocols).
"""
import argparse
import copy
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dino  # noqa: E402
import evaluate  # noqa: E402
import koleo_proto  # noqa: E402

# With these and --steps 2000 (tutorial 2, 2 CPU cores, about 40 s a run) the teacher keeps 75 of
# its 256 prototypes unique, and with --koleo 0.1 it keeps 246.
DEFAULTS = dict(
    clusters=32, dim=32, cluster_std=0.5, n_max=500, rho=1.0, test_per_cluster=50,  # the data
    view_noise=0.5, view_mask=0.2, views=4,  # a view: a noisy copy, a share of coordinates zeroed
    hidden=128, feat_dim=64, head_hidden=128, K=256, bottleneck=3,  # the networks
    steps=3000, steps_per_epoch=100, batch=256, lr=1e-3, min_lr=1e-5, warmup_epochs=2,
    weight_decay=0.04, weight_decay_end=0.04, momentum=0.99, teacher_temp=0.04,
    warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=0, clip_grad=3.0, freeze_last_layer=0,
    koleo=0.0, seed=0, log_every=250, snapshots=(), threads=1)


def make_clusters(clusters, dim, cluster_std, n_max, rho, test_per_cluster, seed):
    """Labelled Gaussian clusters: centres on a sphere of radius 2 (so neighbouring clusters
    overlap a little at cluster_std 0.5), training sizes n_max * rho^(-c / (C - 1)) as
    koleo_proto.long_tail_indices, and a balanced test set (as the long-tail benchmarks)."""
    g = torch.Generator().manual_seed(seed)
    centres = 2 * F.normalize(torch.randn(clusters, dim, generator=g), dim=1)  # (C, dim)
    counts = [max(1, int(n_max * rho ** (-c / max(1, clusters - 1)))) for c in range(clusters)]

    def sample(sizes):
        y = torch.repeat_interleave(torch.arange(clusters), torch.tensor(sizes))  # (N,)
        return centres[y] + cluster_std * torch.randn(len(y), dim, generator=g), y

    train_x, train_y = sample(counts)
    test_x, test_y = sample([test_per_cluster] * clusters)
    return train_x, train_y, test_x, test_y, torch.tensor(counts)


def make_views(x, views, noise, mask, g):
    """`views` noisy copies of a batch (B, dim): the toy's stand-in for multi-crop. The first two
    play the global crops (the teacher sees only those), as in dino.py."""
    out = []
    for _ in range(views):
        keep = (torch.rand(x.shape, generator=g) > mask).float()
        out.append((x + noise * torch.randn(x.shape, generator=g)) * keep)
    return out


def mlp(dim, hidden, feat_dim):
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                         nn.Linear(hidden, feat_dim))


def build(cfg):
    """Student and teacher MultiCropWrapper(MLP, DINOHead): the teacher starts as a copy."""
    head = dino.DINOHead(cfg["feat_dim"], cfg["K"], hidden_dim=cfg["head_hidden"],
                         bottleneck_dim=cfg["bottleneck"])
    student = dino.MultiCropWrapper(mlp(cfg["dim"], cfg["hidden"], cfg["feat_dim"]), head)
    teacher = copy.deepcopy(student).requires_grad_(False)
    return student, teacher


@torch.no_grad()
def features(model, x):
    return model.backbone(x)  # (N, feat_dim): the backbone's output, as evaluate.py measures


@torch.no_grad()
def accuracy(teacher, data, seed):
    """kNN (k = 20, T = 0.07), nearest-centroid few-shot (1 and 5 per cluster) and many/medium/
    few-shot cluster groups of the teacher backbone's features, as evaluate.py computes them, and
    the kNN accuracy of the rarest quarter of the clusters."""
    train_x, train_y, test_x, test_y, counts = data
    C = len(counts)
    ftr, fte = features(teacher, train_x), features(teacher, test_x)
    (top1, _), = evaluate.knn_eval(ftr, train_y, fte, test_y, (20,), 0.07, C).values()
    (raw, _), = evaluate.knn_eval(train_x, train_y, test_x, test_y, (20,), 0.07, C).values()
    shots = evaluate.few_shot(ftr, train_y, fte, test_y, (1, 5), 5, seed, "centroid", C, 0)
    per_cluster = evaluate.knn_per_class(ftr, train_y, fte, test_y, 20, 0.07, C)
    groups = evaluate.shot_groups(per_cluster, counts)
    out = dict(knn_top1=top1, knn_top1_raw_input=raw,
               fewshot_1=shots[1]["mean"], fewshot_5=shots[5]["mean"])
    out.update({f"knn_{name}": g["accuracy"] for name, g in groups.items()})
    # the quarter of the clusters with the fewest training points: defined at every RHO (at RHO 10
    # no cluster has under 20 points, so evaluate.py's few-shot group is empty there)
    rarest = torch.argsort(counts, stable=True)[:max(1, C // 4)]
    out["knn_rarest_quarter"] = float(per_cluster[rarest].nanmean())
    return out


def run(**overrides):
    """One toy run; returns a dict of plain numbers (and `snapshots`: teacher prototypes and
    usage at the steps asked for, for drawing)."""
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown toy settings {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    cfg = dict(DEFAULTS, **overrides)
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    start = time.time()
    torch.manual_seed(cfg["seed"])
    data = make_clusters(cfg["clusters"], cfg["dim"], cfg["cluster_std"], cfg["n_max"], cfg["rho"],
                         cfg["test_per_cluster"], cfg["seed"])
    train_x = data[0]
    student, teacher = build(cfg)
    init = accuracy(teacher, data, cfg["seed"])["knn_top1"]

    steps, per_epoch = cfg["steps"], cfg["steps_per_epoch"]
    epochs = math.ceil(steps / per_epoch)
    loss_fn = dino.DINOLoss(cfg["K"], cfg["views"], cfg["warmup_teacher_temp"], cfg["teacher_temp"],
                            cfg["warmup_teacher_temp_epochs"], epochs)
    optimizer = torch.optim.AdamW(dino.get_params_groups(student))
    lr = dino.cosine_scheduler(cfg["lr"], cfg["min_lr"], epochs, per_epoch, cfg["warmup_epochs"])
    wd = dino.cosine_scheduler(cfg["weight_decay"], cfg["weight_decay_end"], epochs, per_epoch)
    momentum = dino.cosine_scheduler(cfg["momentum"], 1.0, epochs, per_epoch)
    student_params = [p.detach() for p in student.parameters()]
    teacher_params = list(teacher.parameters())
    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    usage = torch.zeros(cfg["K"], dtype=torch.long)
    history, snapshots = [], {}
    snap_at = set(cfg["snapshots"])
    probe = torch.randperm(len(train_x), generator=g)[:512]  # points whose embeddings we watch

    @torch.no_grad()
    def record(step):
        w_t = teacher.head.last_layer.weight.detach()  # (K, bottleneck): the prototypes
        y = F.normalize(teacher.head.mlp(teacher.backbone(train_x[probe])), dim=-1)  # (512, b)
        cos = F.normalize(w_t, dim=1) @ F.normalize(y.mean(0), dim=0)  # (K,) to the data's mean
        used = usage > 0
        row = dict(step=step, teacher_unique=koleo_proto.count_unique_prototypes(w_t),
                   student_unique=koleo_proto.count_unique_prototypes(
                       student.head.last_layer.weight.detach()),
                   teacher_used=int(used.sum()), koleo=koleo_proto.koleo_proto_loss(w_t).item(),
                   mean_embedding_norm=y.mean(0).norm().item(),  # 1: all data at one point
                   cos_to_data_mean=cos.mean().item(), cos_to_data_std=cos.std().item())
        history.append(row)
        if step in snap_at:
            snapshots[step] = dict(prototypes=w_t.clone(), usage=usage.clone(), embeddings=y,
                                   labels=data[1][probe])

    record(0)
    for it in range(steps):
        epoch = it // per_epoch
        for j, group in enumerate(optimizer.param_groups):
            group["lr"] = float(lr[it])
            group["weight_decay"] = float(wd[it]) if j == 0 else 0.0
        idx = torch.randint(len(train_x), (cfg["batch"],), generator=g)
        crops = make_views(train_x[idx], cfg["views"], cfg["view_noise"], cfg["view_mask"], g)
        loss = loss_fn(student(crops), teacher(crops[:2]), epoch)  # (views * B, K), (2 * B, K)
        if cfg["koleo"] > 0:
            w = student.head.last_layer.weight  # (K, bottleneck): the student's prototypes
            loss = loss + cfg["koleo"] * koleo_proto.koleo_proto_loss(w)
        if not math.isfinite(loss.item()):  # before the update: a NaN never reaches the weights
            raise RuntimeError(f"toy loss became {loss.item()} at step {it + 1}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg["clip_grad"]:
            dino.clip_gradients(student, cfg["clip_grad"])
        dino.cancel_gradients_last_layer(epoch, student, cfg["freeze_last_layer"])
        optimizer.step()
        with torch.no_grad():  # the EMA teacher, as in dino.train_one_epoch
            m = float(momentum[it])
            torch._foreach_mul_(teacher_params, m)  # teacher <- m * teacher + (1 - m) * student
            torch._foreach_add_(teacher_params, student_params, alpha=1 - m)
            usage += koleo_proto.assignment_histogram(loss_fn.teacher_probs)
        if (it + 1) % cfg["log_every"] == 0 or it + 1 == steps or it + 1 in snap_at:
            record(it + 1)
            usage.zero_()  # usage is counted per logging window
    final = history[-1]
    out = dict(cfg, snapshots=sorted(snap_at), num_prototypes=cfg["K"],
               teacher_unique=final["teacher_unique"], student_unique=final["student_unique"],
               teacher_used=final["teacher_used"], knn_top1_init=init)
    out.update(accuracy(teacher, data, cfg["seed"]))
    out.update(history=history, seconds=time.time() - start)
    out["snapshot_data"] = snapshots
    return out


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name, value in DEFAULTS.items():
        if name == "snapshots":
            continue
        p.add_argument(f"--{name}", type=type(value), default=value)
    p.add_argument("--output", default=None, help="also write the JSON to this file")
    return p


def main(argv=None):
    args = vars(get_args_parser().parse_args(argv))
    output = args.pop("output")
    result = run(**args)
    result.pop("snapshot_data")
    line = json.dumps(result)
    print(line)
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
