r"""A few-MB copy of a dino.py checkpoint for auditing: the teacher's backbone and prototypes.

A full checkpoint also holds the student, the optimizer state and the teacher's 3-layer head MLP
(100 MB for the shipped runs, most of it their 2048-wide MLP); the collapse audit needs only the
prototypes (head.last_layer), the kNN / linear / few-shot evaluation only the backbone. The copy
keeps those two, the run's arguments as a plain dict and its per-epoch log (log.txt next to the
checkpoint, when there), and is written atomically. evaluate.py reads it like any checkpoint:
  python experiments/slim_checkpoint.py runs/dino-fashion-mnist-collapsed/checkpoint0030.pth \
      checkpoints/dino-fashion-mnist-collapsed.pth
  python evaluate.py --checkpoint checkpoints/dino-fashion-mnist-collapsed.pth --prototypes
With --whole_teacher the copy keeps the whole teacher (its head MLP too) and DINOLoss's centre:
what `python dino.py --init COPY` needs to start a new run from it (tutorial 3).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import koleo_proto
import dino  # noqa: E402  (the repository's root is put on the path first)


def slim(ckpt, log=None, whole_teacher=False):
    keep = {k: v for k, v in ckpt["teacher"].items()
            if whole_teacher or k.startswith(("backbone.", "head.last_layer."))}
    args = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(ckpt["args"]).items()}
    extra = {"dino_loss": ckpt["dino_loss"]} if whole_teacher and "dino_loss" in ckpt else {}
    return {"teacher": keep, "args": args, "epoch": ckpt["epoch"], "log": log or [], **extra}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="a dino.py checkpoint (checkpoint.pth or checkpointNNNN.pth)")
    p.add_argument("output", help="where the slim copy goes")
    p.add_argument("--whole_teacher", action="store_true",
                   help="keep the whole teacher and the centre (for dino.py --init)")
    args = p.parse_args(argv)
    try:
        ckpt = dino.load_checkpoint(args.checkpoint)
        if not isinstance(ckpt, dict) or not {"teacher", "args", "epoch"} <= set(ckpt):
            raise dino.BadInput(f"{args.checkpoint} is not a dino.py checkpoint "
                                "(no teacher, args and epoch)")
        log_path = os.path.join(os.path.dirname(args.checkpoint), "log.txt")
        log = [json.loads(line) for line in open(log_path)] if os.path.isfile(log_path) else []
        log = [e for e in log if e.get("epoch", 0) <= ckpt["epoch"]]
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        koleo_proto.save_checkpoint(slim(ckpt, log, args.whole_teacher), args.output)
    except dino.BadInput as e:
        sys.exit(f"slim_checkpoint.py: error: {e}")
    print(f"{args.output}: {os.path.getsize(args.output) / 2 ** 20:.1f} MiB, epoch {ckpt['epoch']}")


if __name__ == "__main__":
    main()
