"""Benchmark suites: PLOT vs PLOT-guided DAS vs Full DAS (and baselines), measured side by side.

``python -m benchmarks run --suite small|full [--seeds N] [--tasks ...] [--device auto]``

For every task and seed, in one process on one machine:

* ``pp.compare`` — transport-only PLOT after the coarse stage(s) (``plot``), with the refinement stage
  (``plot_refined``), PLOT-guided DAS (``plot_das``), Full DAS (``full_das``) and the free best single
  site (``best_site``), each charged for its whole search;
* single-stage searches over the task's candidate sites with ``ot``, ``uot``, ``cosine`` and
  ``bruteforce`` (transport-only, calibrated on the calibration bank).

Rows are aggregated over seeds (IIA mean ± std per variable, runtime mean) with each method's runtime
as a ratio to the Full DAS runtime measured in the same run. Output: ``benchmarks/results/<suite>.json``
(atomic), ``<suite>.md`` and ``<suite>.png`` (IIA vs runtime).
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import numpy as np
import torch

import pyvene_plot as pp
from pyvene_plot.comparison import task_signatures
from pyvene_plot._utils import atomic_write_bytes, atomic_write_png, atomic_write_json, package_versions, resolve_device

SUITES = {
    # ~15 minutes on a 2-core CPU: small DAS grid, 5 seeds of the small tasks
    "small": {"tasks": ["heq", "binary_addition", "gpt2_lookup"], "seeds": 5, "subspace_sizes": (4,),
              "das_kwargs": {"epochs": 6}, "task_options": {}},
    "full": {"tasks": ["heq", "binary_addition", "gpt2_lookup", "ioi", "country_facts"], "seeds": 5,
             "subspace_sizes": (1, 2, 4, 8), "das_kwargs": {},
             "task_options": {"ioi": {"n_fit": 40, "n_calibration": 24, "n_test": 40},
                              "country_facts": {"n_fit": 40, "n_calibration": 24, "n_test": 40}}},
}
FLAT_METHODS = ("ot", "uot", "cosine", "bruteforce")


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_task_seed(name: str, seed: int, cfg: dict, device: torch.device, progress: bool = False) -> list[dict]:
    """Every method on one task and seed; raw rows (one per method x variable)."""
    task = pp.tasks.load(name, seed=seed, **cfg["task_options"].get(name, {}))
    task.model.to(device)
    rows = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sizes = cfg["subspace_sizes"] if name not in ("ioi", "country_facts") else task.compare_options.get("subspace_sizes", (8,))
    das_kwargs = dict(cfg["das_kwargs"]) if name not in ("ioi", "country_facts") else dict(task.compare_options.get("das_kwargs", {}))
    cmp = pp.compare(task, seed=seed, subspace_sizes=sizes, das_kwargs=das_kwargs, progress=progress)
    peak = _peak_mb(device)
    full_rt = next(r["runtime_s"] for r in cmp.rows if r["method"] == "full_das")
    for r in cmp.rows:
        rows.append({**r, "task": name, "seed": seed, "peak_mem_mb": peak, "device": str(device)})
    flat = {}
    for method in FLAT_METHODS:
        searcher = pp.OTAlignmentSearcher(method=method, readout=task.readout, signature=task_signatures(task),
                                          seed=seed, progress=progress)
        res = searcher.fit(task.model, task.sites, task.fit, task.calibration)
        flat[method] = res
        test = res.evaluate(task.test, detail=True)
        for v in task.variables:
            rows.append({"task": name, "seed": seed, "method": f"flat_{method}", "variable": v, "iia": test[v]["iia"],
                         "sensitive": test[v]["sensitive"], "invariant": test[v]["invariant"],
                         "runtime_s": res.runtime_s, "n_sites_evaluated": len(res.sites), "n_trained": 0,
                         "ratio_to_full_das": res.runtime_s / full_rt, "peak_mem_mb": _peak_mb(device),
                         "device": str(device), "sites": "; ".join(s.label for s in res.handles[v].sites)})
    rows += screening_rows(task, flat["uot"], seed, device)
    return rows


def screening_rows(task, exact, seed: int, device: torch.device) -> list[dict]:
    """Attribution-patching screen vs exact signatures on the task's candidate sites.

    ``kept_exact_pick``: whether the screen (top share per variable, the default rule) keeps the site
    that PLOT with exact signatures ranks first (flat uot); ``time_ratio``: attribution time over the
    exact signature sweep's time on the same sites and fit bank.
    """
    from pyvene_plot.methods.attribution import ATTRIBUTION_KEEP_FRACTION, screen_attribution

    t0 = time.perf_counter()
    rep = screen_attribution(task.model, task.sites, task.fit, variables=task.variables, readout=task.readout)
    t_attr = time.perf_counter() - t0
    t_exact = exact.diagnostics["signature_runtime_s"]
    out = []
    for v in task.variables:
        pick = task.sites.index(exact.ranking(v)[0])
        out.append({"task": task.name, "seed": seed, "method": "attribution_screen", "variable": v,
                    "kept_exact_pick": bool(rep.keep_by_variable[v][pick]),
                    "n_kept": int(sum(rep.keep_by_variable[v])), "n_sites": len(task.sites),
                    "keep_share": ATTRIBUTION_KEEP_FRACTION, "attribution_s": t_attr, "exact_signatures_s": t_exact,
                    "time_ratio": t_attr / max(t_exact, 1e-9), "device": str(device)})
    return out


def aggregate(raw: list[dict]) -> list[dict]:
    raw = [r for r in raw if r["method"] != "attribution_screen"]
    keys = sorted({(r["task"], r["method"], r["variable"]) for r in raw}, key=lambda k: (k[0], k[1], k[2]))
    out = []
    for task, method, var in keys:
        rs = [r for r in raw if (r["task"], r["method"], r["variable"]) == (task, method, var)]
        iia = np.array([r["iia"] for r in rs])
        out.append({
            "task": task, "method": method, "variable": var, "n_seeds": len(rs),
            "iia_mean": float(iia.mean()), "iia_std": float(iia.std(ddof=1)) if len(rs) > 1 else 0.0,
            "runtime_s": float(np.mean([r["runtime_s"] for r in rs])),
            "ratio_to_full_das": float(np.mean([r["ratio_to_full_das"] for r in rs])),
            "n_sites_evaluated": int(np.mean([r["n_sites_evaluated"] for r in rs])),
            "n_trained": int(np.mean([r["n_trained"] for r in rs])),
            "peak_mem_mb": float(max(r["peak_mem_mb"] for r in rs)),
            "device": rs[0]["device"],
        })
    return out


def screening_summary(raw: list[dict]) -> list[dict]:
    """Per task: how often the attribution screen kept the exact pick, and its time next to exact signatures."""
    out = []
    for t in sorted({r["task"] for r in raw if r["method"] == "attribution_screen"}):
        rs = [r for r in raw if r["task"] == t and r["method"] == "attribution_screen"]
        out.append({"task": t, "n_cases": len(rs), "kept_exact_pick_rate": float(np.mean([r["kept_exact_pick"] for r in rs])),
                    "n_sites": rs[0]["n_sites"], "n_kept": int(np.mean([r["n_kept"] for r in rs])),
                    "attribution_s": float(np.mean([r["attribution_s"] for r in rs])),
                    "exact_signatures_s": float(np.mean([r["exact_signatures_s"] for r in rs])),
                    "time_ratio": float(np.mean([r["time_ratio"] for r in rs]))})
    return out


def screening_markdown(rows: list[dict]) -> str:
    return _md_table(rows, ["task", "n_cases", "kept_exact_pick_rate", "n_sites", "n_kept", "attribution_s",
                            "exact_signatures_s", "time_ratio"])


def _md_table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    return _md_table(rows, ["task", "method", "variable", "iia_mean", "iia_std", "runtime_s", "ratio_to_full_das",
                            "n_sites_evaluated", "n_trained", "peak_mem_mb"])


def plot(rows: list[dict], path: Path) -> None:

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 4), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        for m in sorted({r["method"] for r in rows if r["task"] == t}):
            rs = [r for r in rows if r["task"] == t and r["method"] == m]
            ax.errorbar([np.mean([r["runtime_s"] for r in rs])], [np.mean([r["iia_mean"] for r in rs])],
                        yerr=[np.mean([r["iia_std"] for r in rs])], fmt="o", label=m)
        ax.set_xscale("log")
        ax.set_xlabel("runtime (s, whole search)")
        ax.set_ylabel("test IIA (mean over variables)")
        ax.set_title(t)
        ax.legend(fontsize=6)
    fig.tight_layout()
    atomic_write_png(path, fig)


def run(suite: str = "small", seeds: int | None = None, tasks: list[str] | None = None, device: str = "auto",
        out_dir: str | Path = "benchmarks/results", progress: bool = False) -> dict:
    cfg = dict(SUITES[suite])
    device_t = resolve_device(device)
    torch.set_num_threads(1)
    n_seeds = seeds or cfg["seeds"]
    names = tasks or cfg["tasks"]
    raw = []
    t0 = time.perf_counter()
    for name in names:
        if name not in pp.tasks.names():
            print(f"skipping {name}: not registered")
            continue
        for seed in range(n_seeds):
            try:
                raw += run_task_seed(name, seed, cfg, device_t, progress)
            except pp.ModelError as exc:  # the optional LM is not installed
                print(f"skipping {name}: {exc}")
                break
            print(f"{name} seed {seed} done ({time.perf_counter() - t0:.0f}s)", flush=True)
    rows = aggregate(raw)
    screen = screening_summary(raw)
    out = Path(out_dir)
    payload = {"suite": suite, "seeds": n_seeds, "device": str(device_t), "wall_s": time.perf_counter() - t0,
               "config": json.loads(json.dumps(cfg, default=list)), "versions": package_versions(),
               "rows": rows, "screening": screen, "raw": raw}
    atomic_write_json(out / f"{suite}.json", payload)
    md = markdown(rows) + "\n\n" + screening_markdown(screen) + "\n"
    atomic_write_bytes(out / f"{suite}.md", md.encode())
    plot(rows, out / f"{suite}.png")
    return payload
