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
"""

import contextlib
import math

import torch
import torch.nn.functional as F

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
