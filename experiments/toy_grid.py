"""The paper's four claims on the toy, with seeds: a grid of experiments/toy.py runs and its table.

Govindarajan et al. (BMVC 2024) claim that (1) without a fix most prototypes become near copies,
(2) KoLeo-Proto keeps them apart, (3) with the prototypes used effectively more of them give a
better kNN, and (4) on long-tailed data effective use helps the rare classes. Image runs on a CPU
are too short to collapse (docs/collapse_experiment_cpu.md); the toy collapses in a minute, so it
can afford seeds. Each sweep below answers one question, every cell with and without KoLeo-Proto:

  K           K in --K (below, at and above the 32 clusters, up to 16x) at each of --K_bottlenecks
  rho         cluster sizes n_max * RHO^(-c / 31), RHO in --rho, at K --K_other      (claim 4)
  bottleneck  the bottleneck dimension in --bottlenecks, at K --K_other             (where 1-2 hold)

  python experiments/toy_grid.py                 # the whole grid: 110 runs, ~1 h on 2 cores
  python experiments/toy_grid.py --table_only    # the table and plots of the runs that exist
  python experiments/toy_grid.py --sweeps rho --seeds 2 --steps 500    # a quick look
Writes, under --output_dir (default runs/toy_grid): runs/<cell>_seed<s>.json (one run; a rerun
skips a run whose file holds the same settings), results.json, results.md (mean and 95%
interval over seeds per cell, and KoLeo-Proto's effect paired by seed), unique_vs_K.png,
knn_vs_K.png, rare_vs_rho.png. The table and plot code is experiments/collapse.py's.
"""
import argparse
import datetime
import json
import math
import multiprocessing
import os
import shlex
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import collapse  # noqa: E402  (the shared plot code; it imports nothing heavy)

SWEEPS = ("K", "rho", "bottleneck")
# 97.5% quantiles of Student's t for 1..10 degrees of freedom; beyond, a Cornish-Fisher expansion
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)
COLUMNS = (  # (header, key, digits) of the table; unique counts as % of K
    ("teacher unique %", "teacher_unique_pct", 1), ("student unique %", "student_unique_pct", 1),
    ("teacher used", "teacher_used", 0), ("kNN", "knn_top1", 1), ("kNN init", "knn_top1_init", 1),
    ("1-shot", "fewshot_1", 1), ("5-shot", "fewshot_5", 1),
    ("kNN rarest 1/4", "knn_rarest_quarter", 1), ("s", "seconds", 0))


def get_args_parser():
    p = argparse.ArgumentParser("toy_grid.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--sweeps", nargs="+", default=list(SWEEPS), choices=SWEEPS, help="which sweeps to run")
    add("--K", nargs="+", type=int, default=[16, 32, 128, 512], help="K of the K sweep")
    add("--K_bottlenecks", nargs="+", type=int, default=[3, 16], help="bottlenecks of the K sweep")
    add("--rho", nargs="+", type=float, default=[1, 10, 100], help="RHO of the rho sweep")
    add("--bottlenecks", nargs="+", type=int, default=[3, 16, 64], help="the bottleneck sweep")
    add("--K_other", type=int, default=128, help="K of the rho and bottleneck sweeps")
    add("--koleo", nargs="+", type=float, default=[0.0, 0.1], help="KoLeo-Proto weights")
    add("--seeds", type=int, default=5, help="seeds 0 .. N-1 per cell (they also draw the data)")
    add("--steps", type=int, default=2000, help="training steps of each run")
    add("--set", nargs="*", default=[], metavar="KEY=VALUE",
        help="other toy.py settings for every run, e.g. clusters=8 (see toy.py --help)")
    add("--workers", type=int, default=2,
        help="runs at once, one CPU thread each (1: in this process)")
    add("--output_dir", default="runs/toy_grid", help="runs, table and plots")
    add("--table_only", action="store_true", help="run nothing: the table and plots of what exists")
    return p


def parse_set(items):
    import toy  # here, not at the top: it imports torch
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in toy.DEFAULTS or key in ("seed", "koleo", "K", "bottleneck", "rho"):
            sys.exit(f"toy_grid.py: error: --set {item!r}: expected KEY=VALUE with KEY a toy.py "
                     "setting other than the grid's own (seed koleo K bottleneck rho)")
        out[key] = type(toy.DEFAULTS[key])(value)
    return out


def cells(args):
    """The distinct (K, bottleneck, RHO) of the sweeps asked for, each with the sweeps it is in."""
    found = {}
    if "K" in args.sweeps:
        for b in args.K_bottlenecks:
            for K in args.K:
                found.setdefault((K, b, 1.0), set()).add("K")
    if "rho" in args.sweeps:
        for rho in args.rho:
            found.setdefault((args.K_other, 3, float(rho)), set()).add("rho")
    if "bottleneck" in args.sweeps:
        for b in args.bottlenecks:
            found.setdefault((args.K_other, b, 1.0), set()).add("bottleneck")
    return found


def run_path(args, K, b, rho, lam, seed):
    name = f"K{K}_b{b}_rho{rho:g}_koleo{lam:g}_seed{seed}.json"
    return os.path.join(args.output_dir, "runs", name)


def settings(args, K, b, rho, lam, seed, extra):
    return dict(extra, K=K, bottleneck=b, rho=rho, koleo=lam, seed=seed, steps=args.steps,
                threads=1)


def one_run(job):
    """Run one toy run unless its file holds the same settings; (name, seconds or None)."""
    import toy
    path, cfg = job
    old = collapse.read_json(path)
    if old and old.get("settings") == cfg:
        return os.path.basename(path), None
    result = toy.run(**cfg)
    result.pop("snapshot_data")
    result["settings"] = cfg
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)  # a stopped grid never leaves half a file
    return os.path.basename(path), result["seconds"]


def ci95(values):
    """(mean, half-width of the 95% t-interval or None for one value, n) of the given values."""
    v = [x for x in values if x is not None and not math.isnan(x)]
    if not v:
        return None, None, 0
    mean, sd, n = collapse.mean_std(v)
    if sd is None:
        return mean, None, 1
    df, z = n - 1, 1.959964
    t = T975[df - 1] if df <= len(T975) else (z + (z ** 3 + z) / (4 * df)
                                              + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2))
    return mean, t * sd / math.sqrt(n), n


def fmt(values, digits):
    mean, half, n = ci95(values)
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + ("" if half is None else f" ± {half:.{digits}f}")


def load_rows(args, found, extra):
    rows = []
    for (K, b, rho), sweeps in found.items():
        for lam in args.koleo:
            for seed in range(args.seeds):
                r = collapse.read_json(run_path(args, K, b, rho, lam, seed))
                if r and r.get("settings") == settings(args, K, b, rho, lam, seed, extra):
                    r["teacher_unique_pct"] = 100 * r["teacher_unique"] / K
                    r["student_unique_pct"] = 100 * r["student_unique"] / K
                    r["sweeps"] = sorted(sweeps)
                    rows.append(r)
    return rows


def group(rows, sweep):
    """{(K, bottleneck, RHO, koleo): [rows over seeds]} of one sweep, sorted."""
    out = {}
    for r in rows:
        if sweep in r["sweeps"]:
            out.setdefault((r["K"], r["bottleneck"], r["rho"], r["koleo"]), []).append(r)
    order = {"K": lambda k: (k[1], k[0], k[3]), "rho": lambda k: (k[2], k[3]),
             "bottleneck": lambda k: (k[1], k[3])}[sweep]
    return dict(sorted(out.items(), key=lambda kv: order(kv[0])))


def paired(groups, key):
    """KoLeo-Proto's effect per cell: (with - without), seed by seed."""
    out = {}
    for (K, b, rho, lam), rows in groups.items():
        base = groups.get((K, b, rho, 0.0))
        if lam > 0 and base:
            by_seed = {r["seed"]: r[key] for r in base}
            out[(K, b, rho, lam)] = [r[key] - by_seed[r["seed"]] for r in rows
                                     if r["seed"] in by_seed]
    return out


def markdown(args, rows):
    lines = []
    for sweep in args.sweeps:
        groups = group(rows, sweep)
        lines += [f"### Sweep: {sweep}", "",
                  "| K | bottleneck | RHO | KoLeo | seeds | "
                  + " | ".join(c[0] for c in COLUMNS) + " |",
                  "|---" * (5 + len(COLUMNS)) + "|"]
        for (K, b, rho, lam), g in groups.items():
            lines.append(f"| {K} | {b} | {rho:g} | {lam:g} | {len(g)} | "
                         + " | ".join(fmt([r.get(k) for r in g], d) for _, k, d in COLUMNS) + " |")
        effects = [(name, paired(groups, key)) for name, key in
                   (("teacher unique %", "teacher_unique_pct"), ("kNN", "knn_top1"),
                    ("kNN rarest 1/4", "knn_rarest_quarter"))]
        if effects[0][1]:
            lines += ["", "KoLeo-Proto minus none, paired by seed (mean ± 95% interval):", "",
                      "| K | bottleneck | RHO | KoLeo | "
                      + " | ".join(n for n, _ in effects) + " |",
                      "|---" * (4 + len(effects)) + "|"]
            for cell in effects[0][1]:
                K, b, rho, lam = cell
                lines.append(f"| {K} | {b} | {rho:g} | {lam:g} | "
                             + " | ".join(fmt(e[cell], 1) for _, e in effects) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(args, rows):
    """unique-vs-K and kNN-vs-K (one line per bottleneck and KoLeo weight), rare vs RHO."""
    ns = argparse.Namespace(K=args.K, data="toy")
    figures = (("teacher_unique_pct", "teacher unique prototypes (% of K)", "unique_vs_K.png", 105),
               ("knn_top1", "kNN top-1 of the backbone (%)", "knn_vs_K.png", None))
    for key, ylabel, name, ymax in figures:
        series = {}
        for (K, b, rho, lam), g in group(rows, "K").items():
            mean, half, n = ci95([r[key] for r in g])
            xs, ys, errs, _, _ = series.setdefault(f"bottleneck {b}, KoLeo {lam:g}",
                                                   ([], [], [], lam > 0, b))
            xs.append(K), ys.append(mean), errs.append(half)
        collapse.plot_curves(ns, series, ylabel, ymax, os.path.join(args.output_dir, name),
                             log_x=True)
    series = {}
    for (K, b, rho, lam), g in group(rows, "rho").items():
        for key, label in (("knn_rarest_quarter", "rarest 1/4 of clusters"), ("knn_top1", "all")):
            mean, half, n = ci95([r[key] for r in g])
            xs, ys, errs, _, _ = series.setdefault(f"kNN {label}, KoLeo {lam:g}",
                                                   ([], [], [], lam > 0, label))
            xs.append(rho), ys.append(mean), errs.append(half)
    collapse.plot_curves(ns, series, "kNN top-1 (%)", None,
                         os.path.join(args.output_dir, "rare_vs_rho.png"), log_x=True,
                         xlabel="RHO (largest / smallest cluster)", xticks=args.rho)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    extra = parse_set(args.set)
    found = cells(args)
    os.makedirs(os.path.join(args.output_dir, "runs"), exist_ok=True)
    jobs = [(run_path(args, K, b, rho, lam, s), settings(args, K, b, rho, lam, s, extra))
            for s in range(args.seeds) for (K, b, rho) in found for lam in args.koleo]
    start = time.time()
    if not args.table_only:
        # spawn: each worker starts its own torch with one thread (threads=1 in the settings)
        pool = multiprocessing.get_context("spawn").Pool(args.workers) if args.workers > 1 else None
        results = pool.imap_unordered(one_run, jobs) if pool else map(one_run, jobs)
        for i, (name, seconds) in enumerate(results, 1):
            done = "exists" if seconds is None else f"{seconds:.0f} s"
            print(f"[{i}/{len(jobs)}] {name}  {done}  ({time.time() - start:.0f} s)", flush=True)
        if pool:
            pool.close()
            pool.join()
    rows = load_rows(args, found, extra)
    command = "python " + shlex.join(["experiments/toy_grid.py"] + (argv or sys.argv[1:]))
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    table = markdown(args, rows)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(dict(command=command, date=date, rows=rows), f)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(f"`{command}` ({date}; {len(rows)} of {len(jobs)} runs)\n\n{table}\n"
                "Mean ± 95% t-interval over seeds (each seed also draws the data). unique = "
                "prototypes more than eps 0.025 apart (koleo_proto.count_unique_prototypes); "
                "used = "
                "prototypes that were some batch item's argmax over the last 250 steps; kNN k=20 "
                "T=0.07 on the teacher backbone; rarest 1/4: mean kNN of the quarter of the "
                "clusters "
                "with the fewest training points; "
                "s: seconds of one run on one thread.\n")
    plot(args, rows)
    print(table)
    print(f"{len(rows)}/{len(jobs)} runs; {os.path.join(args.output_dir, 'results.md')}")
    return 0 if len(rows) == len(jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
