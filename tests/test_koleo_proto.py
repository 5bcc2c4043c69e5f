import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import koleo_proto as kp  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # the tensors here are tiny: with a busy second core, OpenMP hand-offs between threads
    # cost milliseconds per op and make these tests 10x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- brute-force references, written independently of koleo_proto -----------------------

def koleo_reference(w):
    """DINOv2's KoLeo estimator on the rows of w: full Gram, diagonal excluded, no gradient
    through the neighbour choice, ||x - y + 1e-8||, -mean(log(d + 1e-8))."""
    x = F.normalize(w.float(), p=2, dim=1, eps=1e-8)
    with torch.no_grad():
        dots = x @ x.T
        dots.fill_diagonal_(-1.0)
        nn = dots.max(dim=1).indices
    d = ((x - x[nn] + 1e-8) ** 2).sum(dim=1).sqrt()
    return -torch.log(d + 1e-8).mean()


def reference_groups(w, eps):
    """Connected components of ||a - b|| < eps between normalized rows, named by the smallest
    index: label propagation on the full distance matrix."""
    x = F.normalize(w.float(), p=2, dim=1, eps=1e-8)
    adj = (x[:, None, :] - x[None, :, :]).norm(dim=-1) < eps
    labels = torch.arange(len(x))
    while True:
        new = torch.where(adj, labels[None, :], len(x)).amin(dim=1).minimum(labels)
        if torch.equal(new, labels):
            return labels
        labels = new


def planted(n_dirs, D, noise, max_copies=6, seed=0):
    """n_dirs random directions, each repeated 1..max_copies times with noise of norm ~noise
    and random lengths, shuffled. Returns (w, direction index of each row)."""
    g = torch.Generator().manual_seed(seed)
    dirs = F.normalize(torch.randn(n_dirs, D, generator=g), dim=1)
    copies = torch.randint(1, max_copies + 1, (n_dirs,), generator=g)
    which = torch.repeat_interleave(torch.arange(n_dirs), copies)
    which = which[torch.randperm(len(which), generator=g)]
    w = dirs[which] + noise * torch.randn(len(which), D, generator=g) / math.sqrt(D)
    return w * (0.5 + torch.rand(len(which), 1, generator=g)), which


def clustered(K, D, n_centers, noise, seed):
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(n_centers, D, generator=g), dim=1)
    which = torch.randint(0, n_centers, (K,), generator=g)
    return centers[which] + noise * torch.randn(K, D, generator=g) / math.sqrt(D)


# --- KoLeo-Proto loss --------------------------------------------------------------------

@pytest.mark.parametrize("search_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K,D", [(2, 3), (10, 4), (33, 16), (64, 3)])
def test_loss_matches_dinov2_value_and_gradient(K, D, search_dtype):
    torch.manual_seed(K + D)
    w = torch.randn(K, D) * 3
    w1, w2 = w.clone().requires_grad_(), w.clone().requires_grad_()
    loss, ref = kp.koleo_proto_loss(w1, search_dtype=search_dtype), koleo_reference(w2)
    loss.backward()
    ref.backward()
    assert loss.dtype == torch.float32 and loss.ndim == 0
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-4, atol=1e-6)


def test_bf16_neighbour_search_picks_the_fp32_neighbours():
    """The K^2 D search may run in bf16 (the default on CUDA): re-ranking its 8 best candidates
    by fp32 distance gives the fp32 neighbours of spread prototypes, and among clusters of near
    copies a neighbour as near up to fp32's own resolution; the loss and gradient stay."""
    g = torch.Generator().manual_seed(5)
    centres = F.normalize(torch.randn(300, 64, generator=g), dim=1)
    copies = centres[torch.randint(0, 300, (1000,), generator=g)]
    copies = copies + 3e-3 * torch.randn(1000, 64, generator=g)
    w = torch.cat([torch.randn(700, 64, generator=g), copies])
    x = F.normalize(w, dim=1)
    fp32, bf16 = kp._nearest_neighbors(x, 256), kp._nearest_neighbors(x, 256, torch.bfloat16)
    assert torch.equal(fp32[:700], bf16[:700])  # spread: the same rows
    d32, d16 = (x - x[fp32]).norm(dim=1), (x - x[bf16]).norm(dim=1)
    assert (d16 <= d32 + 1e-4).all()  # copies: never a farther row than fp32's Gram resolves
    w1, w2 = w.clone().requires_grad_(), w.clone().requires_grad_()
    a, b = kp.koleo_proto_loss(w1), kp.koleo_proto_loss(w2, search_dtype=torch.bfloat16)
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b, rtol=1e-3, atol=0)
    moved = (fp32 != bf16).nonzero().squeeze(1)  # rows whose gradient can differ: these and
    same = torch.ones(len(w), dtype=torch.bool)  # the neighbours each picked
    same[torch.cat([moved, fp32[moved], bf16[moved]])] = False
    assert same.float().mean() > 0.9
    torch.testing.assert_close(w1.grad[same], w2.grad[same], rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1000])
def test_loss_chunked_equals_unchunked(chunk_size):
    torch.manual_seed(1)
    w = torch.randn(50, 8)
    w1, w2 = w.clone().requires_grad_(), w.clone().requires_grad_()
    a, b = kp.koleo_proto_loss(w1, chunk_size=chunk_size), kp.koleo_proto_loss(w2, chunk_size=50)
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(w1.grad, w2.grad)


def test_loss_is_fp32_under_autocast_with_bf16_weights():
    torch.manual_seed(2)
    w = torch.randn(40, 16).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = kp.koleo_proto_loss(w, chunk_size=7)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, koleo_reference(w.detach().float()), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert w.grad.dtype == torch.bfloat16 and torch.isfinite(w.grad.float()).all()


def test_loss_finite_with_identical_rows_which_pick_each_other():
    torch.manual_seed(3)
    w = torch.randn(6, 5)
    w[4] = w[1]
    w = w.requires_grad_()
    loss = kp.koleo_proto_loss(w, chunk_size=4)  # the twins fall in different chunks
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(w.grad).all()
    torch.testing.assert_close(loss, koleo_reference(w.detach()))
    nn = kp._nearest_neighbors(F.normalize(w.detach(), dim=1), 4)
    assert nn[1] == 4 and nn[4] == 1
    assert (nn != torch.arange(6)).all()
    dist = kp.nearest_neighbor_distances(w)
    assert dist[1] == 0 and dist[4] == 0 and (dist[[0, 2, 3, 5]] > 0).all()


def test_functions_do_not_modify_input_or_global_state():
    torch.manual_seed(4)
    w = torch.randn(30, 8, requires_grad=True)
    before, precision = w.detach().clone(), torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # as a trainer allowing TF32 would
    try:
        kp.koleo_proto_loss(w, chunk_size=7).backward()
        kp.count_unique_prototypes(w, eps=0.5, chunk_size=7)
        kp.prototype_groups(w, eps=0.5)
        kp.unique_prototype_curve(w, chunk_size=7)
        kp.nearest_neighbor_distances(w, chunk_size=7)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(precision)
    assert torch.equal(w.detach(), before)


def test_shape_validation():
    with pytest.raises(ValueError, match="K >= 2"):
        kp.koleo_proto_loss(torch.randn(1, 4))
    with pytest.raises(ValueError, match="K >= 2"):
        kp.count_unique_prototypes(torch.randn(8))
    with pytest.raises(ValueError, match="eps"):
        kp.count_unique_prototypes(torch.randn(8, 3), eps=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        kp.nearest_neighbor_distances(torch.randn(8, 3), chunk_size=0)
    with pytest.raises(ValueError):
        kp.usage_stats(torch.zeros(10, dtype=torch.long))


# --- unique prototypes -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_planted_duplicates_are_counted_once(dtype):
    w, which = planted(37, 32, noise=0.002)  # copies ~0.003 apart, << eps = 0.025
    w = w.to(dtype)
    assert kp.count_unique_prototypes(w) == 37
    groups = kp.prototype_groups(w, chunk_size=16)
    assert groups.dtype == torch.long and groups.shape == (len(w),)
    same_dir = which[:, None] == which[None, :]
    assert torch.equal(groups[:, None] == groups[None, :], same_dir)
    # ids name the smallest member, so sizes come from bincount
    first = torch.tensor([int((which == which[i]).nonzero()[0]) for i in range(len(w))])
    assert torch.equal(groups, first)
    assert torch.bincount(groups, minlength=len(w)).max() == torch.bincount(which).max()


def test_copies_further_apart_than_eps_stay_separate():
    g = torch.Generator().manual_seed(5)
    D = 32
    dirs = F.normalize(torch.randn(37, D, generator=g), dim=1)
    offsets = torch.randn(37, 4, D, generator=g)
    offsets -= (offsets * dirs[:, None]).sum(-1, keepdim=True) * dirs[:, None]  # orthogonal
    w = (dirs[:, None] + 0.06 * F.normalize(offsets, dim=-1)).reshape(-1, D)  # copies > 0.05 apart
    assert kp.count_unique_prototypes(w, eps=0.025) == len(w)
    assert kp.count_unique_prototypes(w, eps=0.2) == 37


def test_chains_are_one_group_single_linkage():
    # 10 points on a great circle: neighbours 0.8 eps apart, ends ~7 eps apart
    eps = 0.025
    for step, expected in [(0.8 * eps, 1), (1.2 * eps, 10)]:
        angles = torch.arange(10) * 2 * math.asin(step / 2)  # chord length = step
        w = torch.zeros(10, 6)
        w[:, 0], w[:, 1] = angles.cos(), angles.sin()
        assert kp.count_unique_prototypes(w[torch.randperm(10)], eps=eps) == expected


def test_curve_is_monotone_and_matches_single_counts():
    w = clustered(300, 16, 20, noise=0.03, seed=6)
    curve = kp.unique_prototype_curve(w, chunk_size=64)
    assert [e for e, _ in curve] == list(kp.DEFAULT_EPS_GRID) and 0.025 in kp.DEFAULT_EPS_GRID
    counts = [c for _, c in curve]
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    assert counts[0] > counts[-1]  # the grid spans the interesting range here
    for eps, count in curve:
        assert count == kp.count_unique_prototypes(w, eps=eps)
    eps_values = (0.3, 0.025, 0.01)  # any order
    assert kp.unique_prototype_curve(w, eps_values) == [(e, kp.count_unique_prototypes(w, e))
                                                         for e in eps_values]


@pytest.mark.parametrize("D", [3, 8, 48])
@pytest.mark.parametrize("noise", [1e-4, 0.01, 0.05])
def test_groups_equal_brute_force(D, noise):
    w = clustered(200, D, 15, noise=noise, seed=D)
    for eps in (0.001, 0.025, 0.1):
        ref = reference_groups(w, eps)
        for chunk_size in (3, 64, 1000):
            assert torch.equal(kp.prototype_groups(w, eps, chunk_size=chunk_size), ref)
        curve = kp.unique_prototype_curve(w, (eps, 2 * eps), chunk_size=37)
        assert curve[0][1] == int((ref == torch.arange(len(w))).sum())


def test_fully_collapsed_and_exact_duplicates():
    w = clustered(500, 64, 1, noise=1e-3, seed=7)  # one group of near copies
    w[100:110] = w[3]  # and exact copies
    assert kp.count_unique_prototypes(w, chunk_size=64) == 1
    assert torch.equal(kp.prototype_groups(w, eps=0.025), torch.zeros(500, dtype=torch.long))
    assert kp.unique_prototype_curve(w, (0.025, 0.5)) == [(0.025, 1), (0.5, 1)]
    assert torch.equal(kp.prototype_groups(w, eps=1e-4), reference_groups(w, 1e-4))


def test_nearest_neighbor_distances_match_brute_force():
    w = clustered(100, 8, 10, noise=0.05, seed=8)
    x = F.normalize(w, dim=1)
    d = (x[:, None] - x[None]).norm(dim=-1)
    d.fill_diagonal_(math.inf)
    torch.testing.assert_close(kp.nearest_neighbor_distances(w, chunk_size=7), d.min(dim=1).values)


# --- prototype usage ---------------------------------------------------------------------

def test_assignment_histogram_accumulates():
    logits = torch.full((2, 3, 5), -1.0)
    logits[0, 0, 2] = logits[0, 1, 2] = logits[0, 2, 4] = 1.0
    logits[1, 0, 0] = logits[1, 1, 2] = logits[1, 2, 4] = 1.0
    hist = torch.zeros(5, dtype=torch.long)
    hist += kp.assignment_histogram(logits)
    hist += kp.assignment_histogram(logits[0])
    assert hist.tolist() == [1, 0, 5, 0, 3]


def test_usage_stats_on_planted_histogram():
    hist = torch.zeros(250, dtype=torch.long)
    hist[7], hist[100], hist[200] = 10, 5, 5  # p = 1/2, 1/4, 1/4
    stats = kp.usage_stats(hist)
    assert stats["used"] == 3
    assert stats["entropy"] == pytest.approx(1.5 * math.log(2))
    assert stats["perplexity"] == pytest.approx(2 ** 1.5)
    assert stats["top1pct_mass"] == pytest.approx(15 / 20)  # top 2 of 250 prototypes
    assert all(type(v) in (int, float) for v in stats.values())
    uniform = kp.usage_stats(torch.ones(50))
    assert uniform["entropy"] == pytest.approx(math.log(50))
    assert uniform["top1pct_mass"] == pytest.approx(1 / 50)  # at least one prototype


def test_collapse_stats_and_training_plot(tmp_path):
    """Per-epoch figures see 10 planted directions at every eps; the plot of a short log is written."""
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(10, 32, generator=g), dim=1)
    w = centres.repeat(6, 1) + 1e-4 * torch.randn(60, 32, generator=g)
    stats = kp.collapse_stats(w, "_patch")
    assert stats["unique_prototypes_patch"] == stats["unique_prototypes_patch_eps0.1"] == 10
    assert stats["unique_prototypes_patch_eps0.3"] == 10 and math.isfinite(stats["koleo_patch"])
    log = [dict(epoch=e, usage_used=5, usage_perplexity=3.0, **kp.collapse_stats(w)) for e in (1, 2)]
    kp.plot_training(log, 60, str(tmp_path / "u.png"), "title")
    assert (tmp_path / "u.png").stat().st_size > 1000
