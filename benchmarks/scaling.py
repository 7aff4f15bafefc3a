"""Scaling study: how PLOT's wall time grows with the number of candidate sites and the bank size.

Three parts of one search are timed separately (from the searcher's own diagnostics):
signature collection, transport solves (the whole ε/β/signature sweep), and calibration. The sites
are single coordinates of the tiny GPT-2 task (2 layers x 7 positions x 64 coordinates = 896
candidates); banks are prefixes of its fit bank. A log-log slope near 1 means linear growth.

A second sweep solves transport alone on random cost matrices (2 variables x S sites, S up to
10^5) to find the size at which transport itself starts to matter next to signature collection.

``python -m benchmarks.scaling [--threads 2] [--quick]`` writes ``benchmarks/results/scaling.json``
(atomic) and ``scaling.png``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import pyvene_plot as pp
from pyvene_plot._utils import atomic_write_png, atomic_write_json, package_versions

RESULTS = Path(__file__).resolve().parent / "results"


def _slope(x, y) -> float:
    x, y = np.log(np.asarray(x, float)), np.log(np.maximum(np.asarray(y, float), 1e-9))
    return float(np.polyfit(x, y, 1)[0])


def _search(task, sites, fit, cal) -> dict:
    s = pp.OTAlignmentSearcher(method="ot", readout=task.readout, top_k=(1, 2), lambdas=(1.0, 2.0),
                               signature="prob_delta", seed=0, progress=False)
    t0 = time.perf_counter()
    res = s.fit(task.model, sites, fit, cal)
    d = res.diagnostics
    return {"total_s": time.perf_counter() - t0, "signature_s": d["signature_runtime_s"],
            "transport_s": d["solve_runtime_s"], "calibration_s": d["calibration_runtime_s"]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smaller grids (a smoke run)")
    ap.add_argument("--out", default=str(RESULTS / "scaling.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    task = pp.tasks.load("gpt2_lookup", seed=0)
    d = pp.model_spec(task.model).dim("block_output")
    positions = sorted({s.position for s in task.sites})
    all_sites = [pp.Site(l, "block_output", p, dims=(j,)) for l in range(2) for p in positions for j in range(d)]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(all_sites))
    cal = task.calibration.subset(range(min(200, len(task.calibration))))
    site_grid = [32, 64, 128, 256] if a.quick else [56, 112, 224, 448, 896]
    bank_grid = [100, 200, 400] if a.quick else [125, 250, 500, 1000]
    n_fixed = 200
    s_fixed = 64
    by_sites, by_bank = [], []
    for S in site_grid:
        sites = [all_sites[i] for i in sorted(order[:S])]
        r = _search(task, sites, task.fit.subset(range(n_fixed)), cal)
        by_sites.append({"n_sites": S, "n_pairs": n_fixed, **r})
        print(f"sites {S:5d} pairs {n_fixed:5d}: " + "  ".join(f"{k} {v:.3f}" for k, v in r.items()), flush=True)
    for N in bank_grid:
        sites = [all_sites[i] for i in sorted(order[:s_fixed])]
        r = _search(task, sites, task.fit.subset(range(N)), cal)
        by_bank.append({"n_sites": s_fixed, "n_pairs": N, **r})
        print(f"sites {s_fixed:5d} pairs {N:5d}: " + "  ".join(f"{k} {v:.3f}" for k, v in r.items()), flush=True)
    # transport alone on random costs
    solo = []
    for S in ([100, 1000, 10000] if a.quick else [100, 1000, 10000, 30000, 100000]):
        C = rng.random((2, S))
        t0 = time.perf_counter()
        pp.solve_transport(C, method="ot", epsilon=0.05)
        t_ot = time.perf_counter() - t0
        t0 = time.perf_counter()
        pp.solve_transport(C, method="uot", epsilon=0.05, beta=0.1)
        t_uot = time.perf_counter() - t0
        solo.append({"n_sites": S, "ot_s": t_ot, "uot_s": t_uot})
        print(f"transport alone, {S:6d} sites: ot {t_ot:.3f}s uot {t_uot:.3f}s", flush=True)
    per_site_sig = float(np.median([r["signature_s"] / r["n_sites"] for r in by_sites]))
    crossover = None
    for r in solo:
        if r["uot_s"] > 0.1 * per_site_sig * r["n_sites"]:
            crossover = r["n_sites"]
            break
    summary = {
        "slope_sites": {k: _slope([r["n_sites"] for r in by_sites], [r[k] for r in by_sites])
                        for k in ("signature_s", "transport_s", "calibration_s", "total_s")},
        "slope_pairs": {k: _slope([r["n_pairs"] for r in by_bank], [r[k] for r in by_bank])
                        for k in ("signature_s", "transport_s", "calibration_s", "total_s")},
        "slope_transport_alone": {k: _slope([r["n_sites"] for r in solo], [r[k] for r in solo]) for k in ("ot_s", "uot_s")},
        "signature_s_per_site": per_site_sig,
        "transport_matters_from_n_sites": crossover,
        "note": ("transport 'matters' once one uot solve costs more than 10% of collecting the signatures of "
                 "that many sites (200 pairs, tiny GPT-2); None: not within the grid"),
    }
    print("log-log slopes vs sites:", {k: round(v, 2) for k, v in summary["slope_sites"].items()})
    print("log-log slopes vs pairs:", {k: round(v, 2) for k, v in summary["slope_pairs"].items()})
    print("transport alone slopes:", {k: round(v, 2) for k, v in summary["slope_transport_alone"].items()},
          "| transport matters from", crossover, "sites")
    payload = {"by_sites": by_sites, "by_bank": by_bank, "transport_alone": solo, "summary": summary,
               "threads": a.threads, "device": "cpu", "versions": package_versions()}
    atomic_write_json(a.out, payload)
    _plot(payload, Path(a.out).with_suffix(".png"))
    return payload


def _plot(payload: dict, path: Path) -> None:

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, rows, xl in ((axes[0], "n_sites", payload["by_sites"], "candidate sites"),
                              (axes[1], "n_pairs", payload["by_bank"], "fit pairs")):
        x = [r[key] for r in rows]
        for k in ("signature_s", "transport_s", "calibration_s", "total_s"):
            ax.loglog(x, [max(r[k], 1e-4) for r in rows], marker="o", label=k.replace("_s", ""))
        ax.set_xlabel(xl)
        ax.set_ylabel("seconds")
        ax.legend(fontsize=8)
    solo = payload["transport_alone"]
    axes[2].loglog([r["n_sites"] for r in solo], [r["ot_s"] for r in solo], marker="o", label="ot")
    axes[2].loglog([r["n_sites"] for r in solo], [r["uot_s"] for r in solo], marker="o", label="uot")
    axes[2].set_xlabel("sites (2 variables, random cost)")
    axes[2].set_ylabel("seconds per solve")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    atomic_write_png(path, fig)


if __name__ == "__main__":
    main()
