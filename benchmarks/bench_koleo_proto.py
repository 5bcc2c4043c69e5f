"""Time and memory of koleo_proto at the paper's scale, K = 65536 prototypes of dimension D = 256.

    python benchmarks/bench_koleo_proto.py [--K 65536] [--D 256] [--repeats 3]

Each measurement runs in a fresh subprocess so that its peak resident memory (ru_maxrss) minus the
memory after building the input is the extra memory of that call alone. Cases:
  loss       koleo_proto_loss forward + backward on random prototypes
  spread     count_unique_prototypes(eps=0.025) on random prototypes (all unique)
  collapsed  the same on 1000 random directions, each repeated ~65 times with noise of norm 1e-3
Prints a markdown table with the median over --repeats runs (the README quotes it).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(case, K, D):
    """Runs in the subprocess: one timed call, returns seconds, extra MB and the result."""
    import torch
    sys.path.insert(0, ROOT)
    import koleo_proto
    g = torch.Generator().manual_seed(0)
    if case == "collapsed":
        centres = torch.nn.functional.normalize(torch.randn(1000, D, generator=g), dim=1)
        w = centres[torch.randint(0, 1000, (K,), generator=g)]
        w = w + 1e-3 * torch.nn.functional.normalize(torch.randn(K, D, generator=g), dim=1)
    else:
        w = torch.randn(K, D, generator=g)
    w.requires_grad_(case == "loss")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if case == "loss":
        loss = koleo_proto.koleo_proto_loss(w)
        loss.backward()
        result = round(loss.item(), 4)
    else:
        result = koleo_proto.count_unique_prototypes(w, eps=0.025)
    seconds = time.perf_counter() - t0
    extra_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024  # ru_maxrss: KB
    return dict(seconds=seconds, extra_mb=extra_mb, result=result)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--K", type=int, default=65536)
    p.add_argument("--D", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--case", help=argparse.SUPPRESS)  # set in the subprocess
    args = p.parse_args()
    if args.case:
        print(json.dumps(measure(args.case, args.K, args.D)))
        return
    import torch
    print(f"K={args.K}, D={args.D}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} runs, each in a fresh process\n")
    print("| case | seconds | extra memory (MB) | result |\n|---|---|---|---|")
    for case in ("loss", "spread", "collapsed"):
        cmd = [sys.executable, __file__, "--case", case, "--K", str(args.K), "--D", str(args.D)]
        runs = [json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
                for _ in range(args.repeats)]
        print(f"| {case} | {statistics.median(r['seconds'] for r in runs):.1f} | "
              f"{statistics.median(r['extra_mb'] for r in runs):.0f} | {runs[0]['result']} |",
              flush=True)


if __name__ == "__main__":
    main()
