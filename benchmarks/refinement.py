"""Does progressive refinement pay? The coarse handle against every refinement variant, per task and seed.

For each task and seed the coarse stages of the task's default schedule (layer, or layer → position)
run once per signature family, and each refinement variant is appended to them:

============== ===================================================================================
variant        schedule after the coarse stages
============== ===================================================================================
``coarse``     nothing: the coarse handle itself
``coords``     ``Stage("coordinates", group_sizes=...)`` (powers of two below the site width)
``pca_bands``  ``Stage("pca", bands=8)``
``pca_prefix`` ``Stage("pca", prefixes=(1, 2, 4, 8, 16))`` (nested top-r spans, basis on fit bases)
``lib_prefix`` ``Stage("lib", prefixes=(1, 2, 4, 8, 16))`` (small models only: LIB needs a Jacobian
               of the readout, too slow for a 49k-token vocabulary here)
``flat``       no schedule: one OT search over the task's own flat candidate sites (heq's neurons)
============== ===================================================================================

Signatures: ``pair`` sweeps the task's per-pair modes (:func:`pyvene_plot.tasks.task_signatures` without
``family_mean``); ``family`` uses ``family_mean`` alone (banks with counterfactual families only).
Every choice inside a run (signature, ε, β, top-k, λ, prefix, whether a refinement replaces the
previous handle) is made on the calibration bank by the library; the test bank is read once per
run, to report. Each row records test IIA (all / sensitive / invariant / balanced) per variable, the
support width of the handle in effect, which stage's handle that is, the sites evaluated and the
whole run's wall time. With ``--full-das`` each seed also runs Full DAS (``compare``'s budget) so
PLOT's time can be read as a ratio measured in the same process.

Results go to ``benchmarks/results/refinement.json`` (atomic; a finished (task, seed, variant,
signature) is never run again, so an interrupted run resumes), plus ``refinement.md`` (mean over
seeds) and ``refinement.png``.

``python -m benchmarks.refinement --tasks binary_addition heq gpt2_lookup --seeds 0 1 2 3 4 --full-das``
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import pyvene_plot as pp
from pyvene_plot._utils import atomic_write_bytes, atomic_write_json, atomic_write_png, package_versions
from pyvene_plot.progressive import COARSE_KINDS

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("coarse", "coords", "pca_bands", "pca_prefix", "lib_prefix", "flat")
PREFIXES = (1, 2, 4, 8, 16)
SMALL_TASKS = ("heq", "planted", "binary_addition", "gpt2_lookup")
logger = logging.getLogger(__name__)


def group_sizes(width: int) -> tuple[int, ...]:
    """Coordinate group widths for a site of ``width``: powers of two below it, the four largest."""
    sizes = [k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256) if k < width]
    return tuple(sorted(sizes[-4:], reverse=True)) or (1,)


def schedule(task: pp.tasks.Task, variant: str) -> list[pp.Stage] | None:
    """The stages of ``variant`` for ``task`` (None for ``flat``, which runs one searcher on task.sites)."""
    if variant == "flat":
        return None
    coarse = [st for st in task.default_stages if st.kind in COARSE_KINDS]
    if not coarse:
        raise pp.PlotError(f"task {task.name!r} has no coarse stage in its default schedule")
    comp = coarse[0].component
    width = pp.model_spec(task.model).dim(comp)
    extra = {
        "coarse": [],
        "coords": [pp.Stage("coordinates", group_sizes=group_sizes(width), component=comp)],
        "pca_bands": [pp.Stage("pca", bands=8, component=comp)],
        "pca_prefix": [pp.Stage("pca", prefixes=PREFIXES, component=comp)],
        "lib_prefix": [pp.Stage("lib", prefixes=PREFIXES, component=comp)],
    }[variant]
    return coarse + extra


def signature_modes(task: pp.tasks.Task, signature: str) -> tuple[str, ...]:
    """``pair``: the task's per-pair modes; ``family``: ``family_mean`` (needs families on the fit bank)."""
    modes = pp.tasks.task_signatures(task)
    if signature == "pair":
        return tuple(m for m in modes if m != "family_mean")
    if task.fit.family is None:
        raise pp.PlotError(f"task {task.name!r}: its fit bank carries no families for family_mean")
    return ("family_mean",)


def run_variant(task: pp.tasks.Task, variant: str, signature: str, seed: int) -> dict:
    """One run: localise on fit / calibration, then read the test bank once. Returns a result row."""
    searcher = pp.OTAlignmentSearcher(method="uot", signature=signature_modes(task, signature), seed=seed,
                                      readout=task.readout, progress=False)
    t0 = time.perf_counter()
    stages = schedule(task, variant)
    if stages is None:
        res = searcher.fit(task.model, task.sites, task.fit, task.calibration)
        runtime = time.perf_counter() - t0
        handles, n_sites, stage_of = res.handles, len(res.sites), {v: 0 for v in task.variables}
        widths = {v: _width(task.model, h) for v, h in handles.items()}
    else:
        loc = pp.ProgressiveScheduler(stages, searcher=searcher).run(task.model, task.fit, task.calibration)
        runtime = time.perf_counter() - t0
        handles, n_sites = loc.handles, loc.n_sites_evaluated()
        stage_of = dict(loc.handle_stage[-1])
        widths = {v: _width(task.model, h) for v, h in handles.items()}
    # calibration scores of the handles in effect: what a default schedule may be chosen on
    calib = {v: h.scores(task.calibration, task.model) for v, h in handles.items()}
    test = {v: h.scores(task.test, task.model) for v, h in handles.items()}
    return {
        "task": task.name, "seed": seed, "variant": variant, "signature": signature, "runtime_s": runtime,
        "n_sites_evaluated": n_sites,
        "variables": {v: {**{k: float(test[v][k]) for k in ("iia", "sensitive", "invariant", "balanced")},
                          "calibration_balanced": float(calib[v]["balanced"]),
                          "width": widths[v], "handle_stage": int(stage_of[v]),
                          "sites": [s.label for s in handles[v].sites]} for v in task.variables},
    }


def _width(model: torch.nn.Module, handle: pp.Handle) -> int:
    """Dimensions the handle intervenes on: coordinates, span ranks or whole vectors, summed over hooks."""
    spec = pp.model_spec(model)
    by_unit: dict[tuple, set] = defaultdict(set)
    for s in handle.sites:
        key = (s.layer, s.component, s.position, s.basis)
        dims = range(spec.dim(s.component)) if s.dims is None else s.dims
        by_unit[key].update(int(d) for d in dims)
    return int(sum(len(d) for d in by_unit.values()))


def full_das_row(task: pp.tasks.Task, seed: int) -> dict:
    """Full DAS with ``compare``'s budget for the task, timed in this process."""
    cmp = pp.compare(task, methods=("full_das",), seed=seed, progress=False)
    rows = [r for r in cmp.rows if r["method"] == "full_das"]
    return {"task": task.name, "seed": seed, "variant": "full_das", "signature": "-",
            "runtime_s": float(rows[0]["runtime_s"]), "n_sites_evaluated": int(rows[0]["n_sites_evaluated"]),
            "n_trained": int(rows[0]["n_trained"]),
            "variables": {r["variable"]: {k: float(r[k]) for k in ("iia", "sensitive", "invariant")}
                          for r in rows}}


def _key(row: dict) -> str:
    return f"{row['task']}|{row['seed']}|{row['variant']}|{row['signature']}"


def jobs(tasks: list[str], seeds: list[int], variants: list[str], signatures: list[str], full_das: bool):
    """Every (task, seed, variant, signature) to run, with the ones that do not apply left out."""
    for name in tasks:
        for seed in seeds:
            for variant in variants:
                if variant == "lib_prefix" and name not in SMALL_TASKS:
                    continue
                if variant == "flat" and name != "heq":
                    continue
                for sig in signatures:
                    yield name, seed, variant, sig
            if full_das:
                yield name, seed, "full_das", "-"


def run(tasks, seeds, variants, signatures, full_das, options, out: Path) -> dict:
    """Run every missing job, saving after each; returns the payload."""
    path = out / "refinement.json"
    payload = json.loads(path.read_text()) if path.exists() else {"rows": []}
    done = {_key(r) for r in payload["rows"]}
    todo = [j for j in jobs(tasks, seeds, variants, signatures, full_das) if "|".join(map(str, j)) not in done]
    skipped = []
    for name, seed, variant, sig in tqdm(todo, desc="refinement runs"):
        task = pp.tasks.load(name, seed=seed, **options.get(name, {}))
        if sig == "family" and task.fit.family is None:
            skipped.append(f"{name} seed {seed}: no families on the fit bank, family signature skipped")
            continue
        row = full_das_row(task, seed) if variant == "full_das" else run_variant(task, variant, sig, seed)
        payload["rows"].append(row)
        payload.update(versions=package_versions(), threads=torch.get_num_threads(), options=options)
        atomic_write_json(path, payload)
    payload["skipped"] = sorted(set(payload.get("skipped", [])) | set(skipped))
    atomic_write_json(path, payload)
    return payload


def _balanced(scores: dict) -> float:
    """Mean of sensitive and invariant IIA (Full DAS rows from ``compare`` carry those two, not the mean)."""
    if "balanced" in scores:
        return scores["balanced"]
    return 0.5 * (scores["sensitive"] + scores["invariant"])


def summary(rows: list[dict]) -> list[dict]:
    """Mean over seeds per (task, variant, signature): balanced test IIA per variable, width, runtime."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["task"], r["variant"], r["signature"])].append(r)
    out = []
    for (task, variant, sig), rs in sorted(groups.items()):
        variables = sorted(rs[0]["variables"])
        out.append({
            "task": task, "variant": variant, "signature": sig, "n_seeds": len(rs),
            "mean_balanced": float(np.mean([np.mean([_balanced(r["variables"][v]) for v in variables]) for r in rs])),
            "per_variable": {v: float(np.mean([_balanced(r["variables"][v]) for r in rs])) for v in variables},
            "min_per_variable": {v: float(np.min([_balanced(r["variables"][v]) for r in rs])) for v in variables},
            "width": {v: float(np.mean([r["variables"][v].get("width", np.nan) for r in rs])) for v in variables},
            "calibration_balanced": float(np.mean([np.mean([r["variables"][v].get("calibration_balanced", np.nan)
                                                            for v in variables]) for r in rs])),
            "runtime_s": float(np.mean([r["runtime_s"] for r in rs])),
            "n_sites_evaluated": float(np.mean([r["n_sites_evaluated"] for r in rs])),
        })
    return out


def markdown(summ: list[dict]) -> str:
    """One table: task, variant, signature, mean balanced test IIA (per variable), width, runtime."""
    lines = ["| task | variant | signature | seeds | mean balanced calibration | mean balanced test IIA "
             "| per variable (min over seeds) | support width | runtime (s) | sites evaluated |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summ:
        per = ", ".join(f"{v} {x:.3f} ({s['min_per_variable'][v]:.3f})" for v, x in s["per_variable"].items())
        width = ", ".join(f"{w:.0f}" for w in s["width"].values() if w == w) or "-"
        cal = f"{s['calibration_balanced']:.3f}" if s["calibration_balanced"] == s["calibration_balanced"] else "-"
        lines.append(f"| {s['task']} | {s['variant']} | {s['signature']} | {s['n_seeds']} | {cal} | {s['mean_balanced']:.3f} "
                     f"| {per} | {width} | {s['runtime_s']:.1f} | {s['n_sites_evaluated']:.0f} |")
    return "\n".join(lines)


def plot(summ: list[dict], path: Path) -> None:
    """Mean balanced test IIA against runtime, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({s["task"] for s in summ})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        for s in (s for s in summ if s["task"] == t):
            ax.scatter(s["runtime_s"], s["mean_balanced"], label=f"{s['variant']} ({s['signature']})")
        ax.set_xscale("log")
        ax.set_title(t)
        ax.set_xlabel("runtime (s, whole run)")
        ax.set_ylabel("mean balanced test IIA")
        ax.legend(fontsize=6)
    fig.tight_layout()
    atomic_write_png(path, fig)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.refinement", description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["binary_addition", "heq", "gpt2_lookup"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--signatures", nargs="+", choices=["pair", "family"], default=["pair", "family"])
    ap.add_argument("--full-das", action="store_true", help="also time Full DAS per seed (compare's budget)")
    ap.add_argument("--task-option", action="append", default=[], metavar="TASK:KEY=VALUE",
                    help="option for one task's builder, e.g. ioi:n_fit=40")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from pyvene_plot.cli import parse_task_options

    options: dict[str, dict] = defaultdict(dict)
    for item in args.task_option:
        name, _, kv = item.partition(":")
        options[name].update(parse_task_options([kv]))
    out = Path(args.out)
    payload = run(args.tasks, args.seeds, args.variants, args.signatures, args.full_das, dict(options), out)
    summ = summary(payload["rows"])
    md = markdown(summ)
    atomic_write_bytes(out / "refinement.md", (md + "\n").encode())
    plot(summ, out / "refinement.png")
    print(md)
    for s in payload.get("skipped", []):
        print("skipped:", s)


if __name__ == "__main__":
    main()
