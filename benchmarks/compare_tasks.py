"""PLOT vs Full DAS, measured side by side in one process (the numbers quoted in the README/issues).

Usage::

    python benchmarks/compare_tasks.py [--tasks binary_addition gpt2_lookup heq] [--seeds 0] [--out DIR]

For every task and seed it runs :func:`pyvene_plot.comparison` (transport-only PLOT, PLOT with its
refinement stage, PLOT-guided DAS, Full DAS and the free best-single-site baseline; every method
charged for its whole search on the same clock) and prints the Markdown table with the runtime
ratio to Full DAS and the number of sites evaluated / trainings run. Results are written atomically
to ``DIR/<task>_seed<k>/compare.json`` with plots.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import pyvene_plot as pp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["binary_addition", "gpt2_lookup", "heq"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--out", default="plot_runs/benchmarks")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 is fastest)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.tasks:
        for seed in args.seeds:
            t0 = time.perf_counter()
            task = pp.tasks.load(name, seed=seed)
            out = Path(args.out) / f"{name}_seed{seed}"
            cmp = pp.compare(task, seed=seed, out=out, progress=False)
            print(f"\n## {name} (seed {seed}; wall {time.perf_counter() - t0:.0f}s incl. task training)\n")
            print(cmp.table())
            print(f"\n(json and plots: {out})")


if __name__ == "__main__":
    main()
