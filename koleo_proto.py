"""
KoLeo-Proto regularizer and prototype-collapse diagnostics.

Govindarajan et al., "On Partial Prototype Collapse in the DINO Family of Self-Supervised
Methods" (BMVC 2024, arXiv 2410.14060): in DINO, iBOT, MSN, ... many of the K prototypes
(rows of the head's last layer) become near copies of each other, only 1-15% are unique: a
shortcut to a uniform marginal over clusters that learns no finer clusters. This file has

1. koleo_proto_loss: their fix. The Kozachenko-Leonenko entropy estimator of DINOv2's KoLeo
   loss, applied to the K x D prototype matrix instead of a batch of features:
       L_KP = -(1/K) sum_k log min_{j != k} ||w_k - w_j||,   w = L2-normalized prototypes.
   Training adds lambda * L_KP, which pushes every prototype away from its nearest neighbour.
2. count_unique_prototypes, prototype_groups, unique_prototype_curve,
   nearest_neighbor_distances: measure the collapse (unique prototypes at eps = 0.025).
3. assignment_histogram, usage_stats: measure how evenly the data uses the prototypes.
4. collapse_stats, plot_training: the same figures epoch by epoch, and their plot.
   Pairwise work runs in row chunks: for K = 65536 a K x K similarity matrix would take 17 GB.
5. The program around a method that dino.py and ibot.py share and a reader of the method can skip:
   one-line errors (BadInput, run), the datasets, the loader, checkpoints and resume, the
   distributed set-up, the kNN evaluation, the run's log and summary.
"""

import argparse
import contextlib
import datetime
import functools
import gzip
import json
import math
import os
import random
import shutil
import struct
import sys
import textwrap
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torchvision import datasets, transforms
from tqdm import tqdm

DEFAULT_EPS_GRID = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)  # chord distances
SKETCH_DIM = 32  # principal directions kept for the cheap distance lower bound (grouping)


def _check(w, chunk_size):
    if not isinstance(w, torch.Tensor) or w.ndim != 2 or w.shape[0] < 2 or w.shape[1] < 1:
        got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"expected a (K, D) prototype matrix with K >= 2 and D >= 1, got {got}")
    if not w.is_floating_point():
        raise ValueError(f"expected floating point prototypes, got {w.dtype}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return int(chunk_size)


@contextlib.contextmanager
def _fp32(device, exact_matmul=False):
    """fp32 maths: autocast would run the matmuls in bf16/fp16. exact_matmul also turns off
    TF32 (and oneDNN bf16) matmuls, whose ~1e-3 error exceeds the gap between similarity 1
    and the threshold 1 - eps^2 / 2 = 0.9996875 at eps = 0.025."""
    available = getattr(torch.amp, "is_autocast_available", lambda t: t in ("cpu", "cuda"))
    no_autocast = torch.autocast(device.type, enabled=False) if available(device.type) else None
    precision = torch.get_float32_matmul_precision()
    if exact_matmul:
        torch.set_float32_matmul_precision("highest")
    try:
        with no_autocast or contextlib.nullcontext():
            yield
    finally:
        torch.set_float32_matmul_precision(precision)


def _unit_rows(w):
    return F.normalize(w.float(), p=2, dim=1, eps=1e-8)  # (K, D), eps as in DINOv2


@torch.no_grad()
def _nearest_neighbors(x, chunk_size, search_dtype=torch.float32):
    """(K,) index of each row's most similar other row, by max inner product (as DINOv2).
    With a lower search_dtype (bf16), the 8 best rows of the cheap product are re-ranked by their
    fp32 distance: the answer is the nearest row unless 8 others are as near within bf16's error
    (inner products off by ~4e-3), i.e. between near ties, where any of them is a near copy."""
    nn = torch.empty(len(x), dtype=torch.long, device=x.device)
    low = x.to(search_dtype)
    for start in range(0, len(x), chunk_size):
        xc = x[start:start + chunk_size]
        sim = low[start:start + chunk_size] @ low.T  # (c, K)
        # -inf, not DINOv2's -1: a row never picks itself, even if all others are antipodal
        sim.diagonal(offset=start).fill_(-math.inf)
        if search_dtype == x.dtype:
            nn[start:start + chunk_size] = sim.argmax(dim=1)
        else:
            cand = sim.topk(min(8, len(x) - 1), dim=1).indices  # (c, 8)
            dist = (x[cand] - xc[:, None]).norm(dim=-1)  # (c, 8) fp32, no cancellation near 0
            nn[start:start + chunk_size] = cand.gather(1, dist.argmin(dim=1, keepdim=True))[:, 0]
    return nn


# -----------------------------------------------------------------------------
# 1. the KoLeo-Proto loss

def koleo_proto_loss(prototypes, chunk_size=1024, search_dtype=None):
    """KoLeo-Proto loss of a (K, D) prototype matrix, a differentiable fp32 scalar.

    Same value and gradient as DINOv2's KoLeoLoss applied to the prototypes: the neighbour is
    chosen without gradient, and the gradient flows through both w_k and its neighbour. Two
    identical rows are 1e-8 * sqrt(D) apart: a large but finite loss. The neighbour search, K^2 D
    multiply-adds (1.1e12 at K = 65536), only chooses the neighbour: it runs in search_dtype
    (default bf16 on CUDA, whose tensor cores make it cheap, else fp32: bf16 is slower on most
    CPUs) and then re-ranks exactly (_nearest_neighbors), so it can only change the choice between
    near-tied neighbours; the distance and its gradient are fp32. Memory is O(chunk_size * K).
    """
    chunk_size = _check(prototypes, chunk_size)
    if search_dtype is None:
        search_dtype = torch.bfloat16 if prototypes.is_cuda else torch.float32
    with _fp32(prototypes.device):
        x = _unit_rows(prototypes)  # (K, D) fp32, also for bf16/fp16 weights
        nn = _nearest_neighbors(x.detach(), chunk_size, search_dtype)  # (K,)
        dist = F.pairwise_distance(x, x[nn], p=2, eps=1e-8)  # (K,) as DINOv2's PairwiseDistance
        return -torch.log(dist + 1e-8).mean()


# -----------------------------------------------------------------------------
# 2. how many prototypes are unique

def _sim(dist):
    """Inner product of two unit vectors `dist` apart: ||a - b||^2 = 2 - 2 a.b."""
    return 1.0 - dist * dist / 2.0


def _union(parent, a, b):
    """Merge the groups of a[i] and b[i] for all i in the union-find `parent`: hook larger roots
    under smaller ones (a root is its group's smallest index), then jump pointers to roots."""
    while True:
        ra, rb = parent[a], parent[b]
        cross = ra != rb
        if not cross.any():
            return
        ra, rb, a, b = ra[cross], rb[cross], a[cross], b[cross]
        parent.scatter_reduce_(0, torch.maximum(ra, rb), torch.minimum(ra, rb), reduce="amin")
        while not torch.equal(parent[parent], parent):
            parent.copy_(parent[parent])


def _union_close(parent, x, rows, cols, sim, eps, tol):
    """Union rows[i] and cols[j] wherever ||x_i - x_j|| < eps, given sim = x[rows] @ x[cols].T.
    The fp32 Gram is off by up to tol, a lot next to eps^2 / 2 for small eps, so pairs within
    tol of the threshold are settled by recomputing their block in float64."""
    c, none = _sim(eps), len(parent)
    if sim.numel() == 0 or sim.max() <= c - tol:
        return
    edge = sim > c - tol  # (c, n)
    unsure = edge & (sim < c + tol) & (parent[rows][:, None] != parent[cols][None, :])
    if unsure.any():
        ii, j = unsure.any(dim=1).nonzero(), unsure.any(dim=0).nonzero().squeeze(1)  # (p, 1), (q,)
        b = x[cols[j]].double()  # (q, D)
        step = max(1, 2 ** 22 // len(j))  # rows per float64 block: at most 32 MB of distances
        for i in ii.split(step):
            a = x[rows[i[:, 0]]].double()  # (step, D)
            d2 = (a * a).sum(1, keepdim=True) + (b * b).sum(1) - 2 * a @ b.T  # (step, q)
            edge[i, j] = torch.where(unsure[i, j], d2 < eps * eps, edge[i, j])
    # rather than listing up to c * n edges, each round links every row (column) to the
    # smallest group among its neighbours, until no edge joins two groups
    while True:
        gr, gc = parent[rows], parent[cols]
        edge &= gr[:, None] != gc[None, :]
        if not edge.any():
            return
        to_r = torch.where(edge, gc[None, :], none).amin(dim=1)  # (c,)
        to_c = torch.where(edge, gr[:, None], none).amin(dim=0)  # (n,)
        hr, hc = to_r < none, to_c < none
        _union(parent, torch.cat([rows[hr], cols[hc]]), torch.cat([to_r[hr], to_c[hc]]))


@torch.no_grad()
def _sorted_sketch(x):
    """Sort the unit rows along their top principal direction and sketch them: projected onto
    the top SKETCH_DIM principal directions, distances can only shrink. Returns the order, the
    sorted rows, and factors for the squared sketch distances as one matmul,
    |a|^2 + |b|^2 - 2 a.b = [a, |a|^2, 1] . [-2 b, 1, |b|^2]."""
    basis = torch.linalg.eigh((x.T @ x).double()).eigenvectors.flip(1)[:, :SKETCH_DIM]  # (D, m)
    y = x @ basis.float()  # (K, m)
    order = y[:, 0].argsort()  # (K,)
    x, y = x[order], y[order]
    yy, one = (y * y).sum(dim=1, keepdim=True), torch.ones(len(x), 1, device=x.device)
    return order, x, torch.cat([y, yy, one], dim=1), torch.cat([-2 * y, one, yy], dim=1)


@torch.no_grad()
def _single_linkage(x, y_row, y_col, eps, chunk_size):
    """Union-find array (K,) of the groups at threshold eps of the sorted unit rows x.

    Rows are visited chunk by chunk. A visited row joins the ball of a leader (an earlier row)
    closer than eps, or leads a new ball; balls are stars around their leader, so connected.
    A new row m can be closer than eps to a member b of ball q only if ||m - leader_q|| <
    2 eps (triangle inequality), so m is compared with the leaders, and with the members of a
    ball only when that ball is within 2 eps but m has not joined its group yet: near copies
    cost one comparison per ball, not per copy. Most leaders out of reach are skipped cheaply:
    by binary search on the first sketch coordinate (rows and leaders are sorted by it), then
    by the sketch distance.
    """
    K, D = x.shape
    dev = x.device
    tol = 4 * D * 2.0 ** -24  # bound on the fp32 error of an inner product of unit vectors
    parent = torch.arange(K, device=dev)  # union-find
    leader_of = torch.arange(K, device=dev)  # (K,) filled in for visited rows
    leaders = torch.empty(0, dtype=torch.long, device=dev)  # (M,) in visiting order
    for start in range(0, K, chunk_size):
        rows = torch.arange(start, min(start + chunk_size, K), device=dev)  # (c,)
        xc = x[rows]  # (c, D)
        # leaders within reach 2 eps of some row of the chunk
        cand = leaders[int(torch.searchsorted(y_row[leaders, 0], y_row[start, 0] - 2 * eps - tol)):]
        lower = (y_col[cand] @ y_row[rows].T).amin(dim=1)  # (M',) min over the chunk
        near = cand[lower < 4 * eps ** 2 + 4 * tol]  # (M'',)
        s = xc @ x[near].T  # (c, M'')
        _union_close(parent, x, rows, near, s, eps, tol)
        # balls within reach whose group a row has not joined: compare with their members
        apart = parent[rows][:, None] != parent[near][None, :]
        check = ((s > _sim(2 * eps) - tol) & apart).any(dim=0)  # (M'',)
        if check.any():
            ball = leader_of[:start]  # (start,) the leaders themselves were compared above
            member = torch.isin(ball, near[check]) & (ball != torch.arange(start, device=dev))
            members = member.nonzero().squeeze(1)  # (n,)
            _union_close(parent, x, rows, members, xc @ x[members].T, eps, tol)
        # pairs inside the chunk
        sc = xc @ xc.T  # (c, c)
        sc.fill_diagonal_(-2.0)
        _union_close(parent, x, rows, rows, sc, eps, tol)
        # join the nearest old ball if it is closer than eps (checked exactly) ...
        lead = rows.clone()  # (c,)
        free = torch.ones(len(rows), dtype=torch.bool, device=dev)
        if len(near):
            best_s, best = s.max(dim=1)
            lead = near[best]
            free = ~((best_s > _sim(eps) - tol) & ((xc - x[lead]).norm(dim=1) < eps))
        # ... else follow the first new leader of this chunk closer than eps, else lead
        close = (sc > _sim(eps) - tol) & free[:, None] & free[None, :]  # (c, c) maybe < eps
        first = free & ~close.tril(-1).any(dim=1)  # no earlier free row nearby: must lead
        cover = close & first[None, :]
        pick = cover.to(torch.uint8).argmax(dim=1)  # (c,) first such leader
        follow = free & ~first & cover.any(dim=1) & ((xc - xc[pick]).norm(dim=1) < eps)
        new = free & ~follow
        lead = torch.where(follow, rows[pick], torch.where(new, rows, lead))
        leader_of[rows] = lead
        leaders = torch.cat([leaders, rows[new]])
        _union(parent, rows, lead)  # a genuine link: closer than eps
    return parent


def _groups(prototypes, eps_values, chunk_size):
    """Group ids (K,) for each eps, each group named by its smallest prototype index."""
    chunk_size = _check(prototypes, chunk_size)
    eps_values = [float(e) for e in eps_values]
    if not eps_values or not all(0 < e < math.inf for e in eps_values):
        raise ValueError(f"eps values must be positive and finite, got {eps_values}")
    with _fp32(prototypes.device, exact_matmul=True):
        order, x, y_row, y_col = _sorted_sketch(_unit_rows(prototypes.detach()))
        ids = []
        for eps in eps_values:
            root = _single_linkage(x, y_row, y_col, eps, chunk_size)  # in sorted order
            name = torch.full_like(order, len(x)).scatter_reduce_(0, root, order, reduce="amin")
            ids.append(torch.empty_like(order).index_put_((order,), name[root]))
        return ids


@torch.no_grad()
def prototype_groups(prototypes, eps=0.025, chunk_size=1024):
    """(K,) int64 group id of each prototype, grouped as in count_unique_prototypes. The id is
    the smallest prototype index in the group: group sizes are torch.bincount(ids, minlength=K)."""
    return _groups(prototypes, [eps], chunk_size)[0]


@torch.no_grad()
def count_unique_prototypes(prototypes, eps=0.025, chunk_size=1024):
    """Number of distinct prototypes when near copies are counted once.

    Prototypes are L2-normalized; two are linked when the Euclidean (chord) distance between
    them is < eps (eps = 0.025: inner product > 0.9996875, angle < 1.43 degrees). A group is
    a connected component of the links (single linkage, transitive: a chain a-b-c of links is
    one group even if a and c are further apart than eps). eps = 0.025 is the threshold quoted
    for the paper's counts (e.g. by arXiv 2510.20108); we found no statement of how near
    copies are grouped (or of chord vs angle, equal to 0.01% here). When the copies form tight
    clusters far apart from each other, any sensible rule gives the same count; single linkage
    depends neither on the order of the prototypes nor on a choice of cluster centres. Exact:
    no sampling, no TF32, and pairs the fp32 Gram cannot decide are recomputed in float64.
    """
    return len(prototype_groups(prototypes, eps, chunk_size).unique())


@torch.no_grad()
def unique_prototype_curve(prototypes, eps_values=DEFAULT_EPS_GRID, chunk_size=1024):
    """[(eps, count_unique_prototypes(prototypes, eps)), ...], sharing the normalization, sort
    and sketch between the eps values. The work per eps grows with eps: for well-spread
    prototypes (D = 256) the sketch rarely rules a pair out above eps ~ 0.1, and such an eps
    costs about one brute-force pass."""
    groups = _groups(prototypes, eps_values, chunk_size)
    return [(float(e), len(g.unique())) for e, g in zip(eps_values, groups)]


@torch.no_grad()
def nearest_neighbor_distances(prototypes, chunk_size=1024):
    """(K,) Euclidean distance from each L2-normalized prototype to its nearest other one (the
    neighbour of koleo_proto_loss), e.g. for a histogram. A brute-force K^2 D pass."""
    chunk_size = _check(prototypes, chunk_size)
    with _fp32(prototypes.device, exact_matmul=True):
        x = _unit_rows(prototypes.detach())  # (K, D)
        return (x - x[_nearest_neighbors(x, chunk_size)]).norm(dim=1)


# -----------------------------------------------------------------------------
# 3. how the data uses the prototypes

@torch.no_grad()
def assignment_histogram(logits):
    """(K,) int64 count of how often each prototype is the argmax of (..., K) teacher logits.

    Stays on the logits' device without a host sync (torch.bincount on CUDA reads the largest
    index back to size its output), so a training loop can do `hist += ...` every step and
    look at usage_stats(hist) now and then.
    """
    if not isinstance(logits, torch.Tensor) or logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError("expected logits of shape (..., K) with K >= 1")
    idx = logits.reshape(-1, logits.shape[-1]).argmax(dim=1)  # (N,)
    hist = torch.zeros(logits.shape[-1], dtype=torch.long, device=logits.device)
    return hist.scatter_add_(0, idx, torch.ones_like(idx))


@torch.no_grad()
def usage_stats(histogram):
    """Summary of a (K,) assignment histogram, as plain Python numbers:
    used: prototypes that were the argmax at least once;
    entropy: of the normalized histogram, in nats (log K when usage is uniform);
    perplexity: exp(entropy), the effective number of prototypes in use;
    top1pct_mass: share of all assignments taken by the max(1, K // 100) most used ones.
    """
    if not isinstance(histogram, torch.Tensor) or histogram.ndim != 1 or len(histogram) < 1:
        raise ValueError("expected a 1-D histogram of shape (K,)")
    h = histogram.detach().double()
    if (h < 0).any() or h.sum() <= 0:
        raise ValueError("histogram must be non-negative with at least one assignment")
    p = h[h > 0] / h.sum()
    entropy = float(-(p * p.log()).sum())
    top = h.topk(max(1, len(h) // 100)).values.sum() / h.sum()
    return {"used": int((h > 0).sum()), "entropy": entropy,
            "perplexity": math.exp(entropy), "top1pct_mass": float(top)}


# -----------------------------------------------------------------------------
# 4. collapse over training

TRAINING_EPS = (0.025, 0.1, 0.3)  # the paper's eps, and two looser ones that show the drift first


@torch.no_grad()
def collapse_stats(prototypes, suffix=""):
    """Per-epoch collapse figures of a (K, D) prototype matrix for a training log: unique
    prototypes at eps = 0.025 (key 'unique_prototypes'), at 0.1 and 0.3 (prototypes moving
    together show there before they are counted as copies), and the KoLeo value. At 0.1 and 0.3
    the single-linkage groups are chains of prototypes closer than eps: they measure how
    connected the prototypes are, not how many are copies."""
    curve = dict(unique_prototype_curve(prototypes, TRAINING_EPS))
    stats = {"unique_prototypes" + suffix: curve[0.025],
             "koleo" + suffix: koleo_proto_loss(prototypes).item()}
    stats.update({f"unique_prototypes{suffix}_eps{e}": curve[e] for e in TRAINING_EPS[1:]})
    return stats


def plot_training(log, num_prototypes, path, title=""):
    """PNG of the collapse over training from a list of per-epoch log dicts (log.txt lines):
    unique prototypes at each eps of TRAINING_EPS (and of a patch head, keys ending in _patch),
    those of the student's head (keys ending in _student, dotted) where logged, and how many
    prototypes the teacher's argmax used on the training data."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    epochs = [e["epoch"] for e in log]
    fig, ax = plt.subplots(1, 2, figsize=(9.5, 3.6))
    names = {"": "teacher head", "_patch": "teacher patch head", "_student": "student head"}
    for suffix, style in (("", "-"), ("_patch", "--"), ("_student", ":")):
        for eps, marker, color in zip(TRAINING_EPS, "os^", ("C0", "C1", "C2")):  # a colour per eps
            key = "unique_prototypes" + suffix + ("" if eps == TRAINING_EPS[0] else f"_eps{eps}")
            if key in log[-1]:
                kind = " (groups)" if eps > 0.05 else ""
                ax[0].plot(epochs, [e.get(key) for e in log], style + marker, color=color, ms=4,
                           label=f"{names[suffix]}, eps {eps}{kind}")
    ax[0].set_ylim(0, 1.05 * num_prototypes)  # collapse shows as a drop from K
    ax[0].set(xlabel="epoch", ylabel="unique prototypes (groups at eps >= 0.1)",
              title=f"unique prototypes (K = {num_prototypes})")
    ax[0].legend(fontsize=7)
    if "usage_used" in log[-1]:
        for key, marker, label in (("usage_used", "o-", "used (argmax at least once)"),
                                   ("usage_perplexity", "s-", "perplexity of the usage")):
            ax[1].plot(epochs, [e[key] for e in log], marker, ms=4, label=label)
        ax[1].set_yscale("log")
        ax[1].legend(fontsize=7)
    ax[1].set(xlabel="epoch", ylabel="prototypes", title="teacher's use of the prototypes")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ==============================================================================================
# 5. The program around a method, shared by dino.py and ibot.py: none of it is the method, so a
# reader of either file can leave it unread. One-line errors, the datasets, the training loader,
# checkpoints (written atomically, loaded with weights_only), resume, the distributed set-up, the
# kNN evaluation and the run's files.
# ==============================================================================================
class BadInput(Exception):
    """A problem with what the user asked for: reported as one line, no traceback."""


def run(entry, prog):
    """Run entry(); bad input ends the program with one line and a non-zero status, no traceback."""
    try:
        entry()
    except BadInput as e:  # raised in a data-loading worker, it arrives wrapped with a traceback
        message = str(e).strip().splitlines()[-1].split("BadInput: ", 1)[-1]
        sys.exit(f"{prog}: error: {message}")
    except KeyboardInterrupt:
        sys.exit(f"{prog}: interrupted (a training run continues from its last checkpoint when "
                 "rerun)")


# ---- flags
def bool_flag(s):
    if s.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        return s.lower() in ("true", "1", "yes", "on")
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints the whole usage first; one line is enough
        sys.exit(f"{self.prog}: error: {message} (see python {self.prog} --help)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # preset flags say their defaults themselves
        return action.help if action.default is None else super()._get_help_string(action)


class OneLineHelp(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """One line of at most 100 characters per flag; the epilog keeps its own line breaks."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=34, width=100)


def show(value):  # a default as it is typed on the command line
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def presets_text(presets):
    """One wrapped entry per preset: the values it sets over the official ones."""
    return "\n".join(textwrap.fill(f"{k}: " + (" ".join(f"{n}={show(v)}" for n, v in d.items())
                                               or "the official values"), 98,
                                   initial_indent="  ", subsequent_indent="    ")
                     for k, d in presets.items())


def method_parser(prog, title, official_script, archs, presets):
    """The parser of a training script, one line per flag: [X; official Y] gives the default of
    `python prog` and the official one; the epilog names the choices and lists the presets."""
    return OneLineParser(
        prog, usage=f"python {prog} [--flag VALUE ...]", formatter_class=OneLineHelp,
        description=f"{title}. [X; official Y]: X is what `python {prog}` uses, Y "
                    f"{official_script}'s\nvalue where it differs; another --data or --preset "
                    "changes X (see the end).",
        epilog=f"--arch: {', '.join(archs)}\n--data: {', '.join(DATASETS)}\n--preset: "
               f"{', '.join(presets)}\n--precision auto: bf16 on a GPU that has it, else fp32 "
               f"(replaces the official --use_fp16)\npresets (over the official values):\n"
               f"{presets_text(presets)}")


def add_run_flags(p, presets):
    """The flags of a run that are not the method's hyperparameters, the same in both scripts."""
    add, name = p.add_argument, p.prog.removesuffix(".py")
    add("--data", default="fashion-mnist", metavar="NAME", choices=list(DATASETS),
        help="dataset (names at the end)")
    add("--data_path", metavar="DIR", help="dataset folder (imagenet/folder: train/ and val/)")
    add("--preset", metavar="NAME", choices=list(presets), help="preset (default: that of --data)")
    add("--long_tail", type=float, metavar="RHO", help="subsample classes to an exponential "
        "profile, largest/smallest RHO")
    add("--koleo", type=float, default=0.0, metavar="LAMBDA", help="KoLeo-Proto weight (0 = off)")
    add("--precision", default="auto", metavar="P", choices=["auto", "bf16", "fp16", "fp32"],
        help="autocast dtype: auto, bf16, fp16, fp32")
    add("--compile", nargs="?", const="inductor", metavar="BACKEND",
        help="torch.compile both networks (alone: inductor; default: off)")
    add("--output_dir", metavar="DIR", help=f"checkpoints and logs (default: runs/{name}-<preset>)")
    add("--resume", metavar="PATH", help="checkpoint to continue (default: --output_dir's)")
    add("--subset", type=int, metavar="N", help="N training and N test images, class shares kept")
    add("--seed", type=int, default=0, metavar="N", help="random seed")
    add("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by old launchers


def fill_defaults(args, official, presets, name, room):
    """A flag left unset takes the preset of --preset (else of --data), then the official value;
    a warm-up the user did not ask for is shortened to fit: room maps its flag to the epochs
    available to it."""
    preset = presets.get(args.preset or args.data, {})
    unset = [flag for flag in official if getattr(args, flag) is None]
    for flag in unset:
        setattr(args, flag, preset.get(flag, official[flag]))
    for flag, most in room(args).items():
        if flag in unset and getattr(args, flag) > most >= 0:
            if os.environ.get("RANK", "0") == "0":
                print(f"--{flag} {getattr(args, flag)} of the preset shortened to {most} to fit "
                      f"--epochs {args.epochs}")
            setattr(args, flag, most)
    if args.vmf:
        args.norm_last_layer = False  # vMF components need free norms: kappa_k = ||w_k|| / tau
    args.output_dir = args.output_dir or os.path.join("runs", f"{name}-{args.preset or args.data}")


def check_run_args(a, problems):
    """Raise the first of the method's problems, else of the checks both scripts share."""
    problems = problems + [
        (a.bottleneck_dim < 2, "--bottleneck_dim must be at least 2"),
        (a.hidden_dim < 1, "--hidden_dim must be at least 1"),
        (a.batch_size_per_gpu < 1, f"--batch_size_per_gpu {a.batch_size_per_gpu}: must be >= 1"),
        (a.epochs < 1, "--epochs must be at least 1"),
        (not 0 <= a.warmup_epochs <= a.epochs,
         f"--warmup_epochs {a.warmup_epochs} must lie in [0, --epochs {a.epochs}]"),
        (a.local_crops_number < 0, "--local_crops_number cannot be negative"),
        (a.long_tail is not None and a.long_tail < 1,
         "--long_tail RHO must be >= 1 (RHO = largest / smallest class)"),
        (a.koleo < 0, "--koleo must be >= 0"),
        (a.subset is not None and a.subset < 1, "--subset must be at least 1"),
    ] + [(a.arch.startswith("vit") and (size < a.patch_size or size % a.patch_size),
          f"--{flag} {size} is not a multiple of --patch_size {a.patch_size}")
         for flag, size in (("global_crops_size", a.global_crops_size),
                            ("local_crops_size", a.local_crops_size))]
    for bad, message in problems:
        if bad:
            raise BadInput(message)


# ---- datasets: each split of --data with .targets, one int label per image
HERE = os.path.dirname(os.path.abspath(__file__))
# name: (mean, std) of the pixels, used to normalize them.
DATASETS = {
    "fashion-mnist": ((0.2860,) * 3, (0.3530,) * 3),
    "fashion-mnist-full": ((0.2860,) * 3, (0.3530,) * 3),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "folder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def read_idx(path):
    """Read an IDX file (the MNIST format), gzipped or not, into a uint8 array."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


class ArrayDataset(torch.utils.data.Dataset):
    """Grey images held in memory as a uint8 array (N, H, W)."""

    def __init__(self, images, targets, transform):
        self.images, self.targets, self.transform = images, [int(t) for t in targets], transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i]).convert("RGB")), self.targets[i]


def pil_loader(path):
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, ValueError) as e:
        raise BadInput(f"cannot read image {path} ({e.__class__.__name__}): remove or replace it"
                       ) from None


def fashion_mnist(folder, train, transform):
    split = "train" if train else "t10k"
    files = [os.path.join(folder, f"{split}-{kind}-ubyte.gz")
             for kind in ("images-idx3", "labels-idx1")]
    files = [f if os.path.exists(f) else f[:-3] for f in files]  # gzipped or not
    if not all(os.path.exists(f) for f in files):
        raise BadInput(f"no Fashion-MNIST files ({split}-images-idx3-ubyte[.gz]) in {folder}: "
                       "pass the folder that holds them with --data_path")
    return ArrayDataset(read_idx(files[0]), read_idx(files[1]), transform)


def image_folder(root, transform):
    if not os.path.isdir(root):
        raise BadInput(f"{root} is not a folder: --data_path needs train/ and val/ with one "
                       "subfolder per class")
    try:
        return datasets.ImageFolder(root, transform, loader=pil_loader)
    except (FileNotFoundError, RuntimeError) as e:
        raise BadInput(f"no images in {root} ({e}): expected one subfolder of images per class"
                       ) from None


def build_dataset(args, train, transform):
    """The train or test split of --data (None: a folder without val/)."""
    name, path = args.data, args.data_path
    if name == "fashion-mnist":
        return fashion_mnist(path or os.path.join(HERE, "data", "fashion-mnist-sample"), train,
                             transform)
    if name == "fashion-mnist-full":
        debian = "/usr/share/datasets/fashion-mnist"  # apt-get install dataset-fashion-mnist
        if path is None and os.path.isdir(debian):
            return fashion_mnist(debian, train, transform)
        ds = datasets.FashionMNIST(path or "data", train=train, download=True)
        return ArrayDataset(ds.data.numpy(), ds.targets.tolist(), transform)
    if name in ("cifar10", "cifar100"):
        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        return cls(path or "data", train=train, transform=transform, download=True)
    if path is None:
        raise BadInput(f"--data {name} needs --data_path (a folder with train/ and val/, one "
                       "subfolder per class)")
    if name == "folder" and not os.path.isdir(os.path.join(path, "train")):
        return image_folder(path, transform) if train else None  # a single tree: train only
    return image_folder(os.path.join(path, "train" if train else "val"), transform)


def long_tail_indices(targets, rho, seed):
    """Exponential class profile of CIFAR-10-LT (Cao et al., 2019): the i-th class keeps
    n_max * rho^(-i / (C - 1)) images, so the largest class has rho times the smallest."""
    targets = np.asarray(targets)
    classes, counts = np.unique(targets, return_counts=True)
    rng = np.random.default_rng(seed)
    keep = [rng.choice(np.flatnonzero(targets == c),
                       max(1, int(counts.min() * rho ** (-i / max(1, len(classes) - 1)))),
                       replace=False) for i, c in enumerate(classes)]
    return np.sort(np.concatenate(keep))


def balanced_subset(indices, targets, n, seed):
    """n of the indices drawn at random (seeded), each class keeping its share of them (largest
    remainder): the first n would be a few classes of a folder tree, which is sorted by class."""
    indices = np.asarray(indices)
    if n is None or n >= len(indices):
        return indices
    labels = np.asarray(targets)[indices]
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n / len(indices)
    take = np.floor(quota).astype(int)
    take[np.argsort(take - quota, kind="stable")[:n - take.sum()]] += 1
    rng = np.random.default_rng(seed)
    keep = [rng.choice(indices[labels == c], k, replace=False) for c, k in zip(classes, take)]
    return np.sort(np.concatenate(keep))


def training_indices(args, targets):
    """Which training images are used: --long_tail subsampling, then --subset."""
    indices = np.arange(len(targets))
    if args.long_tail:
        indices = long_tail_indices(targets, args.long_tail, args.seed)
    return balanced_subset(indices, targets, args.subset, args.seed)


def train_loader(args, dataset, targets, indices, world, device, say):
    """Shuffled batches of dataset (the images `indices` of the training set, as crops), in the same
    order for a resumed run: reseed(loader, ...) seeds the sampler and the workers every epoch."""
    if len(dataset) // (args.batch_size_per_gpu * world) == 0:
        raise BadInput(f"--batch_size_per_gpu {args.batch_size_per_gpu} x {world} processes "
                       f"exceeds the {len(dataset)} training images: lower it")
    counts = np.bincount(np.asarray(targets)[indices])
    say(f"data: {args.data}, {len(indices)} training images, {len(counts)} classes"
        + (f" (--subset: drawn with --seed {args.seed}, class shares kept)" if args.subset else "")
        + (f", long-tailed RHO={args.long_tail}: largest class {counts.max()}, smallest "
           f"{counts.min()}" if args.long_tail else ""))
    if world > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(dataset, shuffle=True,
                                                                  seed=args.seed, drop_last=True)
    else:
        sampler = torch.utils.data.RandomSampler(dataset, generator=torch.Generator())
    return torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=args.batch_size_per_gpu, num_workers=args.num_workers,
        drop_last=True, pin_memory=device.type == "cuda", generator=torch.Generator())


def seed_everything(seed):  # Python's random too: ibot.py draws its masks with it
    random.seed(seed), torch.manual_seed(seed), np.random.seed(seed % 2**32)


def reseed(args, loader, epoch, rank):
    """Seeds from (seed, epoch, rank): a resumed run draws the same batches, crops, drop paths."""
    seed_everything(args.seed + 1000 * epoch + rank)
    loader.generator.manual_seed(args.seed + 1000 * epoch + rank)  # the workers' augmentations
    if isinstance(loader.sampler, torch.utils.data.distributed.DistributedSampler):
        loader.sampler.set_epoch(epoch)
    else:
        loader.sampler.generator.manual_seed(args.seed + epoch)


# ---- checkpoints: written atomically, loaded with weights_only, checked against the flags
def save_checkpoint(state, path):
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # e.g. the disk filled up during the run
        if os.path.exists(tmp):
            os.remove(tmp)
        raise BadInput(f"cannot write {path} ({e.strerror or e}): free space there and rerun; "
                       "the previous checkpoint is intact") from None


def check_output_dir(path, checkpoint_bytes):
    """Fail before the first step, not after an epoch, where no checkpoint can be written."""
    probe = os.path.join(path, ".write_test")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(bytes(4096))
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
        free = shutil.disk_usage(path).free
    except OSError as e:
        raise BadInput(f"cannot write to --output_dir {path} ({e.strerror or e}): "
                       "pass a writable folder") from None
    if free < checkpoint_bytes:
        raise BadInput(f"--output_dir {path} has {free / 2**20:.0f} MB free, a checkpoint needs "
                       f"~{checkpoint_bytes / 2**20:.0f} MB: free space or pass another folder")


def safe_load(path):
    """torch.load with weights_only=True (a pickle cannot run code); argparse.Namespace is allowed
    because the official checkpoints store their arguments as one."""
    if not os.path.isfile(path):
        raise BadInput(f"no checkpoint at {path}")
    allow = torch.serialization.safe_globals([argparse.Namespace]) \
        if hasattr(torch.serialization, "safe_globals") else contextlib.nullcontext()  # torch 2.4
    with warnings.catch_warnings(record=True) as caught:  # held back: a failed load is one line
        warnings.simplefilter("always")
        try:
            with allow:
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise BadInput(f"{path} is not a checkpoint torch can load safely "
                           f"({e.__class__.__name__}): pass a .pth written by dino.py, ibot.py "
                           "or the official code") from None
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return ckpt


def saved_args(ckpt):
    """The arguments a checkpoint was trained with, as a dict ({} if it has none)."""
    saved = ckpt.get("args")
    return vars(saved) if isinstance(saved, argparse.Namespace) else (saved or {})


def load_checkpoint(path, method, hidden_dim):
    """A training checkpoint of `method`: a dict with at least 'teacher' (the official layout).
    One written before --hidden_dim existed (ours or official) has the official width."""
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict) or "teacher" not in ckpt:
        raise BadInput(f"{path} holds no 'teacher' entry: not a training checkpoint of {method}")
    if isinstance(ckpt.get("args"), (argparse.Namespace, dict)):
        saved_args(ckpt).setdefault("hidden_dim", hidden_dim)
    return ckpt


def strip_prefix(state_dict, prefix="module."):
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def restore(ckpt, path, args, shape_flags, student, teacher, optimizer, states):
    """Load a training checkpoint into the models, the optimizer and `states` (key in the checkpoint
    -> object with load_state_dict, or None); a checkpoint whose shape_flags differ from this run's
    (or, with its optimizer, the groups') is one clear line, not a dump of mismatched keys."""
    saved = saved_args(ckpt)
    for key in shape_flags + (("optimizer", "weight_decay_last_layer") if "optimizer" in ckpt
                              else ()):
        if key in saved and saved[key] != getattr(args, key):
            raise BadInput(f"{path} was trained with --{key} {saved[key]}, this run has "
                           f"{getattr(args, key)}: pass the same --{key} or use another "
                           "--output_dir")
    try:
        student.load_state_dict(strip_prefix(ckpt["student"]))
        teacher.load_state_dict(strip_prefix(ckpt["teacher"]))
        if "optimizer" in ckpt:
            optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0]
        raise BadInput(f"{path} does not fit this model ({first[:200]}): check "
                       "--arch/--patch_size/--out_dim") from None
    for key, obj in states.items():
        if obj is not None and key in ckpt:
            obj.load_state_dict(ckpt[key])
    return int(ckpt.get("epoch", 0)), float(ckpt.get("seconds", 0.0))


def resume_run(args, rank, load, shape_flags, student, teacher, optimizer, states, say):
    """Where the run starts: {epoch, seconds, knn_top1_init, resumed (the checkpoint's path or
    None)}. It continues an explicit --resume, else the run already in --output_dir (nothing is
    overwritten): load(path) reads it, restore() puts it in the models, the optimizer and states.
    On rank 0 it then checks that --output_dir has room for a checkpoint (four copies of the
    weights: student, teacher, AdamW's two moments) and gives a run continued in a new
    --output_dir its checkpoint's history (log.txt, so the plot too)."""
    path = os.path.join(args.output_dir, "checkpoint.pth")
    path = args.resume or (path if os.path.isfile(path) else None)
    state = dict(epoch=0, seconds=0.0, knn_top1_init=None, resumed=path)
    if path is not None:
        ckpt = load(path)
        state["epoch"], state["seconds"] = restore(ckpt, path, args, shape_flags, student, teacher,
                                                   optimizer, states)
        state["knn_top1_init"] = ckpt.get("knn_top1_init")  # None in official checkpoints
        say(f"resumed from {path} at epoch {state['epoch']}")
    if rank == 0:
        check_output_dir(args.output_dir, 4 * sum(p.numel() * p.element_size()
                                                  for p in student.parameters()))
        log_path, old_log = (os.path.join(folder, "log.txt")
                             for folder in (args.output_dir, os.path.dirname(path or "")))
        if path is not None and not os.path.exists(log_path) and os.path.isfile(old_log):
            with open(old_log) as f:
                history = [line for line in f
                           if line.strip() and json.loads(line)["epoch"] <= state["epoch"]]
            with open(log_path, "w") as f:
                f.writelines(history)
    return state


def ddp(model, device):
    """The model wrapped by DistributedDataParallel under torchrun, else itself."""
    if not dist.is_initialized():
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


def training_state(args, run_state, student, teacher, optimizer, scaler, **losses):
    """A checkpoint in the official layout (the student's keys with DDP's module. prefix, the
    losses' state under their names), with the run's seconds and its knn_top1_init."""
    state = {"student": {"module." + k: v for k, v in student.state_dict().items()},
             "teacher": teacher.state_dict(), "optimizer": optimizer.state_dict(),
             "epoch": run_state["epoch"], "args": args, "seconds": run_state["seconds"],
             "knn_top1_init": run_state["knn_top1_init"]}
    state.update({name: loss.state_dict() for name, loss in losses.items()})
    if scaler is not None:
        state["fp16_scaler"] = scaler.state_dict()
    return state


def save_epoch(args, state, stats, title):
    """Rank 0 after each epoch: the checkpoint (and every --saveckp_freq epochs a copy that is
    kept), one line of log.txt, and the plot of the whole run's collapse (resumed parts too)."""
    epoch = state["epoch"]
    save_checkpoint(state, os.path.join(args.output_dir, "checkpoint.pth"))
    if args.saveckp_freq and epoch % args.saveckp_freq == 0:
        save_checkpoint(state, os.path.join(args.output_dir, f"checkpoint{epoch:04}.pth"))
    log_path = os.path.join(args.output_dir, "log.txt")
    with open(log_path, "a") as f:
        f.write(json.dumps(stats) + "\n")
    with open(log_path) as f:
        plot_training([json.loads(line) for line in f], args.out_dim,
                      os.path.join(args.output_dir, "unique_prototypes.png"),
                      title + (f" --koleo {args.koleo}" if args.koleo else ""))


# ---- devices: processes, precision, compilation
def init_distributed():
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is a single process. Under
    torchrun a single process takes the DDP path too (a one-process group), so that it tests it."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def amp_dtype(precision, device):
    """The autocast dtype of --precision (None: fp32); auto is bf16 on a GPU that has it."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def compile_models(args, student, teacher, say):
    """--compile: in place, so that state dicts keep their keys (no _orig_mod. prefix)."""
    if args.compile and not torch._dynamo.is_dynamo_supported():
        say(f"--compile: no torch.compile with torch {torch.__version__} on Python "
            f"{sys.version.split()[0]}: training uncompiled")
    elif args.compile:
        try:
            student.compile(backend=args.compile), teacher.compile(backend=args.compile)
        except Exception as e:  # an unknown backend fails here, before any compiling
            raise BadInput(f"--compile {args.compile}: {str(e).splitlines()[0]}") from None


def all_finite(loss):
    """A device tensor: is the loss finite on every process (no host sync)."""
    finite = torch.isfinite(loss.detach()).float()
    if dist.is_initialized():  # gradients are averaged: one process's NaN would reach all
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return finite.bool()


def diverged(value, epoch, step):
    return BadInput(f"the loss became {value} at epoch {epoch + 1}, step {step}: training diverged."
                    " Try a lower --lr, a smaller --clip_grad, --precision bf16 or fp32 instead of "
                    "fp16, or a longer --warmup_teacher_temp_epochs; the last checkpoint in "
                    "--output_dir is intact")


# ---- evaluation: weighted kNN on L2-normalized teacher features (Wu et al., 2018; DINO's protocol)
def eval_transform(args, mean, std):
    """Deterministic view for kNN: the official Resize(256) + CenterCrop(224), scaled to size."""
    size = args.global_crops_size
    return transforms.Compose([
        transforms.Resize(size * 256 // 224, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size), transforms.ToTensor(), transforms.Normalize(mean, std)])


def eval_datasets(args):
    """The training and test splits of --data in the deterministic view (test None: none)."""
    transform = eval_transform(args, *DATASETS[args.data])
    return build_dataset(args, True, transform), build_dataset(args, False, transform)


@torch.no_grad()
def knn_predict(train_features, train_labels, test_features, k=20, T=0.07, num_classes=None):
    """(N, min(5, C)) most voted classes of each test sample, best first. Each test sample takes its
    k most cosine-similar training samples; each votes for its class with weight exp(similarity/T).
    Features must be L2-normalized. Chunked over test samples: the similarities stay < ~256 MB."""
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, len(train_labels))
    chunk = max(1, 2**26 // len(train_labels))
    top = []
    for feats in test_features.split(chunk):
        sims, idx = (feats @ train_features.T).topk(k, dim=1)  # (b, k)
        votes = torch.zeros(len(feats), num_classes, device=feats.device)
        votes.scatter_add_(1, train_labels[idx], (sims / T).exp())  # (b, C)
        top.append(votes.topk(min(5, num_classes), dim=1).indices)
    return torch.cat(top)


@torch.no_grad()
def knn_classifier(train_features, train_labels, test_features, test_labels, k=20, T=0.07,
                   num_classes=None):
    """Top-1 and top-5 accuracy (percent) of knn_predict, for any number of test samples."""
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    hits = knn_predict(train_features, train_labels, test_features, k, T, num_classes) \
        == test_labels[:, None]
    n = len(test_labels)
    return 100.0 * hits[:, 0].sum().item() / n, 100.0 * hits.any(dim=1).sum().item() / n


@torch.no_grad()
def extract_features(model, dataset, args, device, amp_dtype, with_pixels=True):
    """Features model(x) (B, D) of a dataset, in fp32, and its L2-normalized raw pixels (pooled to
    at most 32 x 32). With several processes each takes every world-th image, then all gather."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(shard, batch_size=256, num_workers=args.num_workers)
    feats, pixels = [], []
    quiet = {"disable": True} if rank else {}  # left unset on rank 0, so TQDM_DISABLE=1 applies
    for x, _ in tqdm(loader, desc="features", leave=False, **quiet):
        x = x.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            feats.append(model(x).float())
        if with_pixels:
            pooled = F.adaptive_avg_pool2d(x, (min(32, x.shape[-2]), min(32, x.shape[-1])))
            pixels.append(F.normalize(pooled.flatten(1), dim=1))
    out = [torch.cat(feats)] + ([torch.cat(pixels)] if with_pixels else [])
    if world > 1:  # shards differ by at most one image: pad, gather, interleave back
        n = math.ceil(len(dataset) / world)
        for i, t in enumerate(out):
            padded = torch.cat([t, t.new_zeros(n - len(t), t.shape[1])])
            parts = [torch.empty_like(padded) for _ in range(world)]
            dist.all_gather(parts, padded)
            out[i] = torch.stack(parts, dim=1).reshape(n * world, -1)[:len(dataset)]
    return out


def knn_eval(args, teacher, eval_sets, indices, device, amp_dtype, pixels=True, **backbone_kw):
    """{knn_top1, knn_top5, raw_pixel_knn_top1}: kNN (k = 20, T = 0.07) of the teacher's CLS
    features, from the run's training images to the test split (--subset of it), and the same of
    the raw pixels with pixels. All None without a test split."""
    train_eval, test_eval = eval_sets
    if test_eval is None:
        return dict(knn_top1=None, knn_top5=None, raw_pixel_knn_top1=None)
    was_training = teacher.training
    teacher.eval()
    backbone = functools.partial(teacher.backbone, **backbone_kw)
    test_indices = balanced_subset(range(len(test_eval)), test_eval.targets, args.subset, args.seed)
    pixels = pixels and len(indices) <= 200_000  # raw pixels of ImageNet would not fit in memory
    train_feats, *train_pixels = extract_features(
        backbone, torch.utils.data.Subset(train_eval, indices), args, device, amp_dtype, pixels)
    test_feats, *test_pixels = extract_features(
        backbone, torch.utils.data.Subset(test_eval, test_indices), args, device, amp_dtype, pixels)
    teacher.train(was_training)
    train_labels = torch.as_tensor(np.asarray(train_eval.targets)[indices], device=device)
    test_labels = torch.as_tensor(np.asarray(test_eval.targets)[test_indices], device=device)
    knn = functools.partial(knn_classifier, k=20, T=0.07,
                            num_classes=int(max(train_labels.max(), test_labels.max())) + 1)
    top1, top5 = knn(F.normalize(train_feats, dim=1), train_labels, F.normalize(test_feats, dim=1),
                     test_labels)
    raw1 = knn(*train_pixels, train_labels, *test_pixels, test_labels)[0] if pixels else None
    return dict(knn_top1=top1, knn_top5=top5, raw_pixel_knn_top1=raw1)


def write_summary(args, summary, run_state, n_train, final, say):
    """Print the kNN before and after training, and write summary.json: the kNN figures, the
    unique prototypes of `final` (collapse_stats of the teacher, and of the student with keys
    ending in _student), the training time and the arguments."""
    percent = (lambda v: "unknown" if v is None else f"{v:.2f}%")
    if summary["knn_top1"] is None:
        say("kNN: skipped (no val/ split under --data_path)")
    else:
        say(f"kNN top-1 (k=20, T=0.07, teacher CLS): {summary['knn_top1']:.2f}%  (top-5 "
            f"{summary['knn_top5']:.2f}%)")
        say("raw-pixel kNN top-1 on the same split: " + ("skipped (over 200k images)"
            if summary["raw_pixel_knn_top1"] is None else percent(summary["raw_pixel_knn_top1"])))
        say(f"kNN top-1: init {percent(run_state['knn_top1_init'])} -> trained "
            f"{percent(summary['knn_top1'])}")
    unique = final["unique_prototypes"]
    summary.update(knn_top1_init=run_state["knn_top1_init"], unique_prototypes=unique,
                   num_prototypes=args.out_dim,
                   unique_prototypes_student=final["unique_prototypes_student"],
                   unique_percent=100.0 * unique / args.out_dim, seconds=run_state["seconds"],
                   train_images=n_train, args=vars(args))
    line = f"unique prototypes (eps 0.025): {unique} / {args.out_dim} " \
        f"({summary['unique_percent']:.1f}%)"
    if "unique_prototypes_patch" in final:  # iBOT's separate patch head
        summary.update(unique_prototypes_patch=final["unique_prototypes_patch"],
                       num_prototypes_patch=args.patch_out_dim)
        line += f"; patch head {final['unique_prototypes_patch']} / {args.patch_out_dim}"
    path = os.path.join(args.output_dir, "summary.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1, default=str)
    say(line)
    say(f"training time: {datetime.timedelta(seconds=round(run_state['seconds']))}; summary in "
        f"{path}")
