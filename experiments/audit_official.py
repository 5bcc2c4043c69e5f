"""The paper's audit of released checkpoints, rerun: unique prototypes (eps 0.025) of each public
model of Govindarajan et al. (BMVC 2024, Sec. 4) beside the number the paper reports.

  python experiments/audit_official.py             # audits the files already in torch.hub's cache
  python experiments/audit_official.py --download  # fetches the missing ones first (official:NAME)

Each file is audited by `evaluate.py --checkpoint official:NAME --prototypes` (the teacher, every
distinct last layer; the paper's K is the one of head.last_layer, the [CLS] / view-level head).
Writes audit_official.md (the table: unique count and percent at eps 0.025, and the curve over
eps), audit_official.json and audit_official.png (unique / K against eps, the paper's point
starred) into --output_dir, and each file's evaluate.py JSON and PNG into --output_dir/NAME.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dino  # noqa: E402  (the repository's root is put on the path first)
import evaluate  # noqa: E402
import koleo_proto  # noqa: E402
import official_checkpoints  # noqa: E402

# (model, data, K, unique reported, official NAME or None, file size in GB): the sizes are our
# estimate (the releases state none): student + teacher + optimizer state, fp32, from the
# parameter counts of the backbone (README) and of the head(s) (K x 256 prototypes, 2048-wide MLP)
PAPER = [
    ("DINO ViT-S/16", "ImageNet-1K", 65536, 1078, "dino_vits16", 0.7),
    ("iBOT-vMF ViT-B/16", "ImageNet-1K", 8192, 1170, None, None),
    ("iBOT ViT-L/16", "ImageNet-22K", 8192, 969, "ibot_vitl16_in22k", 5.0),
    ("EsViT Swin-T/7", "ImageNet-1K", 65536, 1157, "esvit_swint7", 1.2),
    ("DINO ResNet-50", "ImageNet-1K", 60000, 984, "dino_resnet50", 0.6),
]
NOT_PUBLIC = "not public: the paper's own iBOT-vMF model"


def get_args_parser():
    releases = official_checkpoints.RELEASES
    files = "\n".join(f"  official:{n}  {releases[n].model}, ~{gb:g} GB\n    {releases[n].url}"
                      for *_, n, gb in PAPER if n)
    epilog = ("What --download fetches into torch.hub.get_dir()/checkpoints/ (under $TORCH_HOME);\n"
              "the releases state no file sizes, those below are our estimates from the\n"
              "parameter counts:\n" + files + "\nEsViT's blob store needs the read-only SAS of "
              "microsoft/esvit's README in $ESVIT_SAS.\n" + NOT_PUBLIC + ".")
    p = koleo_proto.OneLineParser("audit_official.py", description=__doc__, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--download", action="store_true", help="fetch the files missing from the cache")
    p.add_argument("--checkpoint_key", default="teacher", help="the network audited (or student)")
    p.add_argument("--output_dir", default=os.path.join("runs", "audit_official"),
                   help="where the results go")
    return p


def audit(name, args):
    """evaluate.py's audit of official:NAME: {layer: audit} or the one-line reason it failed."""
    argv = ["--checkpoint", official_checkpoints.PREFIX + name, "--prototypes", "--checkpoint_key",
            args.checkpoint_key, "--output_dir", os.path.join(args.output_dir, name)]
    try:
        return evaluate.main(argv)["prototypes"]
    except dino.BadInput as e:
        return str(e)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    eps = " / ".join(f"{e:g}" for e in koleo_proto.DEFAULT_EPS_GRID)
    lines = [f"| model | data | K | paper: unique | ours: unique at eps 0.025 | unique at eps "
             f"{eps} | other heads (ours) | checkpoint |", "|---|---|---|---|---|---|---|---|"]
    rows, failed = [], False
    for model, data, K, paper, name, gb in PAPER:
        row = dict(model=model, data=data, K=K, paper_unique=paper, paper_percent=100 * paper / K,
                   name=name)
        path = official_checkpoints.cache_path(name) if name else None
        if name is None:
            row["status"] = NOT_PUBLIC
        elif not os.path.isfile(path) and not args.download:
            row["status"] = (f"not in the cache: rerun with --download (~{gb:g} GB) "
                             f"or put the file at {path}")
        else:
            audits = audit(name, args)
            cls = None if isinstance(audits, str) else audits.pop("head.last_layer", None)
            if cls is None:
                row["status"] = audits if isinstance(audits, str) else "no head.last_layer"
                failed = True
            else:  # head.last_layer: the [CLS] / view-level head, the one of the paper's K
                others = {k: [a["unique"], a["prototypes"]] for k, a in audits.items()
                          if k != "usage"}
                row.update(unique=cls["unique"], percent=cls["unique_percent"],
                           ours_K=cls["prototypes"], curve=cls["curve"], other_heads=others)
        rows.append(row)
        ours = (f"{row['unique']:,} / {row['ours_K']:,} ({row['percent']:.1f}%)" if "unique" in row
                else row["status"].replace("|", "/"))
        curve = " / ".join(f"{u:,}" for _, u in row["curve"]) if "curve" in row else "-"
        others = row.get("other_heads", {})
        others = ", ".join(f"{k}: {u:,} / {n:,}" for k, (u, n) in others.items())
        paper_cell = f"{paper:,} ({row['paper_percent']:.1f}%)"
        lines.append(f"| {model} | {data} | {K:,} | {paper_cell} | {ours} | {curve} "
                     f"| {others or '-'} | {'official:' + name if name else '-'} |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(args.output_dir, "audit_official.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.output_dir, "audit_official.json"), "w") as f:
        json.dump(rows, f, indent=1)
    plot(rows, os.path.join(args.output_dir, "audit_official.png"))
    print(table + f"results: {args.output_dir}/audit_official.md, .json and .png")
    return 1 if failed else 0


def plot(rows, path):
    """Unique prototypes in percent of K against eps, one curve per audited checkpoint; the
    paper's count at eps 0.025 is a star of the same colour (every row of the paper has one)."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, r in enumerate(rows):
        colour = f"C{i}"
        if "curve" in r:
            e, u = zip(*r["curve"])
            ax.semilogx(e, [100 * x / r["ours_K"] for x in u], "o-", color=colour, ms=4,
                        label=f"{r['model']} (ours)")
        ax.semilogx([0.025], [r["paper_percent"]], "*", color=colour, ms=12,
                    label=f"{r['model']} (paper)" + ("" if "curve" in r else ", not audited here"))
    ax.axvline(0.025, color="grey", ls=":")
    ax.set(xlabel="eps (chord distance between L2-normalized prototypes)",
           ylabel="unique prototypes (% of K)", title="released checkpoints: unique prototypes")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    koleo_proto.run(lambda: sys.exit(main()), "audit_official.py")
