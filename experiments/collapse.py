"""Partial prototype collapse: a grid of training runs, their evaluation, one table and three plots.

The question of Govindarajan et al. (BMVC 2024): how many of the K prototypes of DINO, iBOT and
their vMF variants stay unique, how does that change with K, with KoLeo-Proto (--koleo) and with
long-tailed data (--long_tail RHO), and what does it do to kNN, linear, few-shot and long-tail
accuracy? Each cell of the grid methods x K x koleo x RHO x seed is one training run of dino.py or
ibot.py, then one evaluate.py run on its checkpoint.

Read top to bottom:
  1. arguments           3. collecting the results of each cell
  2. the grid and its    4. the table (seeds aggregated) and the plots
     commands            5. main: train, evaluate, collect, write
Runs:
  python experiments/collapse.py --dry_run           # the commands of the default grid, nothing runs
  python experiments/collapse.py                     # the default grid on the bundled Fashion-MNIST sample
  python experiments/collapse.py --methods dino --K 64 256 --koleo 0 --long_tail 1 --epochs 1 \\
      --extra "--subset 64 --batch_size_per_gpu 16 --num_workers 0" --eval_extra "--subset 64 --fewshot_draws 2"
  python experiments/collapse.py --table_only        # no training: the table and plots of what exists
Writes, under --output_dir (default runs/collapse):
  <cell>/            the training run (checkpoint.pth, log.txt, summary.json) and its evaluation JSON
  logs/<cell>_{train,eval}.log   the full output of each command
  results.json       one row per cell of the grid (values, or null where a run is missing)
  results.md         the command, the date, and one table row per (method, RHO, koleo, K), seeds aggregated
  unique_over_training.png, knn_vs_K.png, unique_vs_K.png
Rerunning is cheap: a cell whose summary.json exists is not retrained (unless --epochs now asks for
another length; a stopped run continues from its checkpoint, as the training scripts do when rerun),
and an evaluation newer than its checkpoint is not redone. Nothing is downloaded: the default data is the bundled sample.
"""
import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: dino.py, ibot.py, evaluate.py
SCRIPTS = {"dino": "dino.py", "dino-vmf": "dino.py", "ibot": "ibot.py", "ibot-vmf": "ibot.py"}
GROUPS = ("many", "medium", "few")  # evaluate.py's long-tail groups of classes


# ----------------------------------------------------------------------------------------------
# 1. Arguments
# ----------------------------------------------------------------------------------------------
def get_args_parser():
    p = argparse.ArgumentParser("collapse.py", description=__doc__.split("\n")[0] + " Grid: methods x K x koleo x "
                                "long_tail x seeds; the output folder is reused, so a rerun does only what is missing.")
    add = p.add_argument
    add("--methods", nargs="+", default=["dino", "dino-vmf"], choices=list(SCRIPTS),
        help="methods of the grid; -vmf adds --vmf, ibot runs ibot.py [default: dino dino-vmf]")
    add("--K", nargs="+", type=int, default=[256, 1024, 4096],
        help="numbers of prototypes (--out_dim, and --patch_out_dim for ibot) [default: 256 1024 4096]")
    add("--koleo", nargs="+", type=float, default=[0.0, 0.1],
        help="KoLeo-Proto weights (0 = off; the paper uses 0.1) [default: 0 0.1]")
    add("--long_tail", nargs="+", type=float, default=[1.0, 10.0], metavar="RHO",
        help="long-tail ratios of the training data (largest / smallest class); 1 = the uniform data [default: 1 10]")
    add("--seeds", nargs="+", type=int, default=[0], help="seeds; the table gives mean +- std over them [default: 0]")
    add("--data", default="fashion-mnist",
        help="dataset name, passed to training and evaluation (see dino.py --help) [default: fashion-mnist, the bundled sample]")
    add("--data_path", default=None, help="dataset folder, passed to training and evaluation [default: the scripts' own]")
    add("--epochs", type=int, default=None, help="training epochs [default: the preset of --data]")
    add("--extra", default="", help='more flags for every training command, one string split as a shell would, e.g. '
        '"--subset 64 --batch_size_per_gpu 16"; a single flag needs the = form: --eval_extra=--no_cache')
    add("--eval_extra", default="", help='more flags for every evaluate.py command, as --extra, e.g. "--subset 64 --fewshot_draws 2"')
    add("--output_dir", default="runs/collapse",
        help="one folder per cell, logs, results.json/.md and the plots [default: runs/collapse]")
    add("--dry_run", action="store_true", help="print the commands that would run, run nothing, write nothing")
    add("--table_only", action="store_true", help="no training or evaluation: collect what exists, write the table and plots")
    return p


def parse_args(argv=None):
    p = get_args_parser()
    args = p.parse_args(argv)
    if min(args.K) < 2 or min(args.long_tail) < 1 or min(args.koleo) < 0:
        p.error("--K must be >= 2, --long_tail >= 1 and --koleo >= 0")
    if args.epochs is not None and args.epochs < 1:
        p.error("--epochs must be >= 1")
    args.extra, args.eval_extra = shlex.split(args.extra), shlex.split(args.eval_extra)
    return args


# ----------------------------------------------------------------------------------------------
# 2. The grid and its commands
# ----------------------------------------------------------------------------------------------
def grid(args):
    """Cells as dicts. Seeds outermost: a stopped experiment has whole grids of the first seeds."""
    return [dict(method=m, K=K, koleo=lam, long_tail=rho, seed=s,
                 name=f"{m}_K{K}_koleo{lam:g}_lt{rho:g}_seed{s}")
            for s in args.seeds for m in args.methods for rho in args.long_tail for lam in args.koleo for K in args.K]


def data_flags(args, cell):
    flags = ["--data", args.data] + (["--data_path", args.data_path] if args.data_path else [])
    return flags + (["--long_tail", f"{cell['long_tail']:g}"] if cell["long_tail"] > 1 else [])  # 1 = no subsampling


def train_command(args, cell):
    method, K = cell["method"], str(cell["K"])
    cmd = [sys.executable, os.path.join(ROOT, SCRIPTS[method]), "--out_dim", K, "--koleo", f"{cell['koleo']:g}",
           "--seed", str(cell["seed"]), "--output_dir", os.path.join(args.output_dir, cell["name"])]
    cmd += (["--vmf"] if method.endswith("-vmf") else []) + (["--patch_out_dim", K] if method.startswith("ibot") else [])
    cmd += data_flags(args, cell) + (["--epochs", str(args.epochs)] if args.epochs else [])
    return cmd + args.extra


def eval_command(args, cell):
    return ([sys.executable, os.path.join(ROOT, "evaluate.py"), "--checkpoint", checkpoint(args, cell),
             "--knn", "--linear", "--fewshot"] + data_flags(args, cell) + args.eval_extra)


def checkpoint(args, cell):
    return os.path.join(args.output_dir, cell["name"], "checkpoint.pth")


def eval_json(args, cell):
    """Where evaluate.py writes its results: <checkpoint stem>_eval_<data>[_lt<RHO>].json beside it."""
    lt = f"_lt{cell['long_tail']:g}" if cell["long_tail"] > 1 else ""
    return os.path.join(args.output_dir, cell["name"], f"checkpoint_eval_{args.data}{lt}.json")


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def needs_training(args, cell):
    summary = read_json(os.path.join(args.output_dir, cell["name"], "summary.json"))
    # a finished run is kept, unless --epochs now asks for a different length (it then continues)
    return summary is None or (args.epochs is not None and summary.get("args", {}).get("epochs") != args.epochs)


def needs_evaluation(args, cell):
    path, ckpt = eval_json(args, cell), checkpoint(args, cell)
    return not os.path.isfile(path) or (os.path.isfile(ckpt) and os.path.getmtime(path) < os.path.getmtime(ckpt))


def run_step(cmd, log_path):
    """Run one command, its output into log_path only; (ok, seconds, last line of its stderr)."""
    t = time.time()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")
    with open(log_path, "w") as f:
        f.write(f"$ {shlex.join(cmd)}\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
    last = next((line.strip() for line in reversed(proc.stderr.splitlines()) if line.strip()), f"exit status {proc.returncode}")
    return proc.returncode == 0, time.time() - t, last  # splitlines also splits tqdm's \r updates


# ----------------------------------------------------------------------------------------------
# 3. Collecting the results of each cell
# ----------------------------------------------------------------------------------------------
def collect(args, cell):
    """One flat row: the cell, the training summary and the evaluation; None where missing."""
    row = {k: cell[k] for k in ("method", "K", "koleo", "long_tail", "seed")}
    row["cell"] = cell["name"]
    summary = read_json(os.path.join(args.output_dir, cell["name"], "summary.json")) or {}
    for key in ("unique_prototypes", "unique_percent", "unique_prototypes_patch", "num_prototypes_patch"):
        row[key] = summary.get(key)
    row["train_seconds"] = summary.get("seconds")
    res = read_json(eval_json(args, cell)) or {}
    knn = res.get("knn", {})
    row["knn_top1"] = knn.get(str(knn.get("headline_k")), {}).get("top1")
    row["linear_top1"] = res.get("linear", {}).get("top1")
    for n, shot in res.get("fewshot", {}).items():
        if n.isdigit():  # the other keys are the classifier and the number of draws
            row[f"fewshot_{n}"] = shot["mean"]
    for how, groups in res.get("long_tail_groups", {}).items():  # {"knn"|"linear": {"many": {"accuracy", "classes"}}}
        for g in GROUPS:
            row[f"{how}_{g}"] = groups.get(g, {}).get("accuracy")
    row["trained"], row["evaluated"] = bool(summary), bool(res)
    return row


def training_curve(args, row):
    """(epochs, unique prototypes / K) from the cell's log.txt, one JSON line per epoch."""
    try:
        with open(os.path.join(args.output_dir, row["cell"], "log.txt")) as f:
            log = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return [], []
    log = [e for e in log if "unique_prototypes" in e]
    return [e["epoch"] for e in log], [e["unique_prototypes"] / row["K"] for e in log]


# ----------------------------------------------------------------------------------------------
# 4. The table (seeds aggregated) and the plots
# ----------------------------------------------------------------------------------------------
def aggregate(rows, methods=None):
    """Rows of trained cells grouped by (method, RHO, koleo, K), in that order: (key, rows) pairs."""
    order = {m: i for i, m in enumerate(methods or sorted({r["method"] for r in rows}))}
    groups = {}
    for r in rows:
        if r.get("trained", True):
            groups.setdefault((r["method"], r["long_tail"], r["koleo"], r["K"]), []).append(r)
    return sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], len(order)),) + kv[0][1:])


def mean_std(values):
    """(mean, sample std or None for a single value, n) of the values that exist."""
    v = [x for x in values if x is not None]
    if not v:
        return None, None, 0
    return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else None), len(v)


def fmt(values, digits=2):
    """'mean ± std' over seeds, 'mean' for one value, '-' for none; '(n=...)' when some seeds have no value."""
    m, s, n = mean_std(values)
    if m is None:
        return "-"
    text = f"{m:.{digits}f}" if s is None else f"{m:.{digits}f} ± {s:.{digits}f}"
    return text + (f" (n={n})" if n < len(values) else "")


def markdown_table(rows, methods=None):
    """The results table: columns appear only when some cell has them (patch head, few-shot, long tail)."""
    keys = {k for r in rows for k in r if r.get(k) is not None}
    shots = sorted((k for k in keys if k.startswith("fewshot_")), key=lambda k: int(k.split("_")[1]))
    cols = [("unique", "unique_prototypes", 0), ("unique %", "unique_percent", 1)]
    cols += [("unique (patch)", "unique_prototypes_patch", 0)] if "unique_prototypes_patch" in keys else []
    cols += [("kNN top-1", "knn_top1", 2), ("linear top-1", "linear_top1", 2)]
    cols += [(f"{k.split('_')[1]}-shot", k, 2) for k in shots]
    cols += [(f"{how} {g}", f"{how}_{g}", 2) for how in ("knn", "linear") for g in GROUPS if f"{how}_{g}" in keys]
    cols += [("train s", "train_seconds", 0)]
    lines = ["| method | RHO | KoLeo | K | seeds | " + " | ".join(c[0] for c in cols) + " |",
             "|---" * (5 + len(cols)) + "|"]
    for (method, rho, lam, K), group in aggregate(rows, methods):
        cells = [fmt([r.get(key) for r in group], digits) for _, key, digits in cols]
        lines.append(f"| {method} | {rho:g} | {lam:g} | {K} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(args, series, ylabel, ymax, path, log_x=False, xlabel="K (prototypes)", xticks=None):
    """One line per series (label -> (xs, ys, errs, dashed, pair)), error bars where errs has values; a
    figure with a note when there is no series yet, so that every plot always exists. Series with
    the same pair (the cell but for KoLeo) share a colour, so a run and its KoLeo twin read as one.
    A log x axis has its ticks at xticks (default: the K of the grid); experiments/toy_grid.py
    draws its figures with this too."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator, ScalarFormatter
    columns = 1 + max(0, len(series) - 1) // 24  # 24 legend entries fit beside the axes
    fig, ax = plt.subplots(figsize=(7.5 + 2.5 * (columns - 1), 4.2))
    pairs = list(dict.fromkeys(v[4] for v in series.values()))
    colours = plt.get_cmap("tab10" if len(pairs) <= 10 else "tab20").colors
    for label, (xs, ys, errs, dashed, pair) in series.items():
        line, = ax.plot(xs, ys, "o" + ("--" if dashed else "-"), ms=3, label=label,  # plot, not errorbar: true legend
                        color=colours[pairs.index(pair) % len(colours)])
        if any(e is not None for e in errs):
            ax.errorbar(xs, ys, yerr=[e or 0 for e in errs], fmt="none", ecolor=line.get_color(), capsize=3)
    if not series:
        ax.text(0.5, 0.5, "no results yet", ha="center", va="center", transform=ax.transAxes)
    if log_x:  # ticks at the K of the grid, written out
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(sorted(xticks or args.K)))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(ScalarFormatter())
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs
        ax.set_xlim(left=0)
    if ymax:  # a share: collapse shows as a drop from the top, so the axis starts at 0
        ax.set_ylim(0, ymax)
    ax.set(ylabel=ylabel, xlabel=xlabel if log_x else "epoch", title=f"{args.data}: {ylabel}")
    if series:
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5), ncol=columns)  # beside the axes
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the legend beside the axes included
    plt.close(fig)


def plot_all(args, rows):
    trained = [r for r in rows if r["trained"]]
    curves = {}
    for r in trained:  # unique fraction per epoch, one line per cell, KoLeo dashed
        epochs, fractions = training_curve(args, r)
        if epochs:
            curves[r["cell"]] = (epochs, fractions, [None] * len(epochs), r["koleo"] > 0,
                                 (r["method"], r["K"], r["long_tail"], r["seed"]))
    plot_curves(args, curves, "unique prototypes / K", 1.05, os.path.join(args.output_dir, "unique_over_training.png"))
    for key, ylabel, name in (("knn_top1", "kNN top-1 (%)", "knn_vs_K.png"),
                              ("unique_percent", "unique prototypes (%)", "unique_vs_K.png")):
        series = {}
        for (method, rho, lam, K), group in aggregate(trained, args.methods):
            m, s, n = mean_std([r.get(key) for r in group])
            if n:  # seeds averaged; the error bar is their std
                xs, ys, errs, _, _ = series.setdefault(f"{method}, KoLeo {lam:g}, RHO {rho:g}",
                                                       ([], [], [], lam > 0, (method, rho)))
                xs.append(K), ys.append(m), errs.append(s)
        ymax = 105 if key == "unique_percent" else None  # accuracy: zoom on the differences
        plot_curves(args, series, ylabel, ymax, os.path.join(args.output_dir, name), log_x=True)


def write_results(args, rows):
    command = "python " + shlex.join(sys.argv)  # the exact command, so that the table can be redone
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(dict(command=command, date=date, rows=rows), f, indent=1)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(f"`{command}` ({date})\n\n{markdown_table(rows, args.methods)}\n\n"
                "Accuracies in %, mean ± std over seeds where there are several; unique = unique prototypes at "
                "eps 0.025 (of K); kNN at evaluate.py's headline k (20 by default); few-shot = mean over draws; "
                "knn/linear many/medium/few = mean class accuracy of the long-tail groups (>100, 20-100, <20 "
                "training images); (n=...) = fewer seeds than the row has gave a value.\n")
    plot_all(args, rows)


# ----------------------------------------------------------------------------------------------
# 5. Main
# ----------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    cells = grid(args)
    if args.dry_run:
        for cell in cells:
            print(f"# {cell['name']}")
            for what, cmd, todo in (("train", train_command(args, cell), needs_training(args, cell)),
                                    ("eval", eval_command(args, cell), needs_training(args, cell) or needs_evaluation(args, cell))):
                print(shlex.join(cmd) if todo else f"# {what}: done, skipped")
        return 0
    os.makedirs(os.path.join(args.output_dir, "logs"), exist_ok=True)
    failed = []
    for i, cell in enumerate([] if args.table_only else cells, 1):
        for what, cmd, todo in (("train", train_command, needs_training), ("eval", eval_command, needs_evaluation)):
            tag = f"[{i}/{len(cells)}] {cell['name']}  {what}"
            if not todo(args, cell):
                print(f"{tag}  done, skipped", flush=True)
                continue
            log = os.path.join(args.output_dir, "logs", f"{cell['name']}_{what}.log")
            ok, seconds, last = run_step(cmd(args, cell), log)
            print(f"{tag}  {'ok' if ok else 'FAILED'}  {seconds:.0f} s" + ("" if ok else f"  {last}  (log: {log})"), flush=True)
            if not ok:  # no evaluation without a model; go on with the next cell
                failed.append(cell["name"])
                break
    rows = [collect(args, cell) for cell in cells]
    write_results(args, rows)
    print(f"{sum(r['trained'] for r in rows)}/{len(rows)} cells trained, {sum(r['evaluated'] for r in rows)} evaluated; "
          f"table: {os.path.join(args.output_dir, 'results.md')}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the running command got the signal too and stopped cleanly
        sys.exit("collapse.py: interrupted; rerun the same command to go on where it stopped")
