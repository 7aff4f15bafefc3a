"""How much training does DAS need at the site PLOT picked, and what would Full DAS cost at that budget?

``python -m benchmarks.das_budget --task ioi --compare RUN/compare.json --task-option n_fit=40 ...``
(``--task-option`` exactly as given to that compare run; grid defaults: ``--epochs 2 8 24``,
``--lrs auto``, ``--sizes`` = the compare run's subspace sizes)

``pyvene-plot compare`` trains guided DAS and Full DAS with one shared budget (for the SmolLM2 tasks:
one size, 2 epochs, batch 20 — what a 2-core CPU affords for Full DAS's 180-240 trainings; the size,
now k = 64, was chosen with this script on the calibration bank). This script asks whether that
budget is what limits DAS there. For every variable it takes the layer/position
PLOT picked in a finished compare run (the ``plot`` rows of its JSON) and trains DAS on the whole
vector at that site for every (k, lr, epochs) in a small grid, with the compare run's batch size and
seed; the compare run's own budget is always on the grid (the *anchor*). The grid point is chosen per
variable on the calibration bank; test IIA is reported for every point (the test bank is only read to
report). ``full_das_est_s`` is an *extrapolation*, labelled as such, of what Full DAS (the compare
run's grid of sites, one size) would cost at a grid point: the measured Full-DAS runtime of the compare
run times (seconds of one training + its calibration scoring at that point) / (the same at the anchor,
measured here in the same process).

Writes ``<out>`` (JSON, atomic) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

import pyvene_plot as pp
from pyvene_plot.cli import parse_task_options
from pyvene_plot._utils import atomic_write_json, package_versions

logger = logging.getLogger(__name__)

_SITE = re.compile(r"^L(\d+)\.([A-Za-z_]+)@(-?\d+)$")


def plot_sites(compare_json: dict) -> dict[str, tuple[int, str, int]]:
    """``{variable: (layer, component, position)}`` from the ``plot`` rows of a compare JSON."""
    out = {}
    for row in compare_json["rows"]:
        if row["method"] != "plot":
            continue
        m = _SITE.match(str(row.get("sites", "")))
        if m is None:
            raise ValueError(f"cannot parse PLOT's site {row.get('sites')!r} for {row['variable']} "
                             "(expected e.g. 'L29.block_output@13')")
        out[row["variable"]] = (int(m.group(1)), m.group(2), int(m.group(3)))
    if not out:
        raise ValueError("the compare JSON has no 'plot' rows; run `pyvene-plot compare` first")
    return out


def full_das_row(compare_json: dict) -> dict | None:
    """The compare run's first ``full_das`` row (runtime and trainings are shared by its variables)."""
    return next((r for r in compare_json["rows"] if r["method"] == "full_das"), None)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", required=True, choices=pp.tasks.names())
    ap.add_argument("--compare", required=True, help="compare.json of a finished `pyvene-plot compare` run")
    ap.add_argument("--epochs", type=int, nargs="+", default=[2, 8, 24])
    ap.add_argument("--lrs", nargs="+", default=["auto"], help="'auto' and/or floats")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="subspace sizes k (default: the compare's)")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/smollm2/<task>_das_budget.json")
    ap.add_argument("--seed", type=int, default=0, help="the compare run's seed")
    ap.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                    help="the compare run's task options (repeatable)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    cmp = json.loads(Path(args.compare).read_text())
    if cmp.get("task") != args.task:
        raise ValueError(f"{args.compare} is a compare run of task {cmp.get('task')!r}, not {args.task!r}")
    settings = cmp["details"].get("das_kwargs", {})
    sizes = tuple(cmp["details"].get("subspace_sizes") or (8,))
    task_opts = parse_task_options(args.task_option)
    sites = plot_sites(cmp)
    full = full_das_row(cmp)
    n_full = None if full is None else int(full["n_trained"])
    full_runtime = None if full is None else float(full["runtime_s"])
    batch = int(settings.get("batch_size", 20))
    anchor = (sizes[0], str(settings.get("lr", "auto")), int(settings.get("epochs", 10)))
    grid = [(k, lr, ep) for k in (args.sizes or sizes) for lr in args.lrs for ep in args.epochs]
    if anchor not in grid:
        grid.insert(0, anchor)

    task = pp.tasks.load(args.task, seed=args.seed, **task_opts)
    model = task.model
    rows = []
    for var, (layer, comp, pos) in sites.items():
        for k, lr, ep in grid:
            spec = pp.DASSpec(variable=var, layer=layer, component=comp, position=pos, subspace_sizes=(k,),
                              source="plot")
            res = pp.run_das(model, [spec], task.fit, task.calibration, [var], readout=task.readout,
                             epochs=ep, min_epochs=ep, patience=10**6, lr=lr if lr == "auto" else float(lr),
                             batch_size=batch, seed=args.seed, progress=False)
            test = res.best[var].scores(task.test)
            # training + calibration scoring; source collection is shared by all of Full DAS's trainings
            per_training = (res.timings["train_s"] + res.timings["calibration_s"]) / max(1, res.n_trained)
            rows.append({
                "variable": var, "site": spec.label, "k": int(k), "epochs": ep, "lr": lr,
                "anchor": (k, lr, ep) == anchor, "final_loss": res.candidates[0]["final_loss"],
                "calibration": res.candidates[0]["calibration"], "test_iia": float(test["iia"]),
                "test_sensitive": float(test["sensitive"]), "seconds_per_training": per_training,
            })
            logger.info("%s %s k=%d lr=%s epochs=%d: test IIA %.3f, %.1f s", var, spec.label, k, lr, ep,
                        rows[-1]["test_iia"], per_training)
        base = next(r for r in rows if r["variable"] == var and r["anchor"])
        for r in rows:
            if r["variable"] == var:
                r["full_das_est_s"] = (None if full_runtime is None
                                       else full_runtime * r["seconds_per_training"] / base["seconds_per_training"])
    for var in sites:
        mine = [r for r in rows if r["variable"] == var]
        best = max(mine, key=lambda r: (_cal_score(r), -r["epochs"]))  # ties: the cheaper budget
        for r in mine:
            r["selected_on_calibration"] = r is best
    out = Path(args.out or f"benchmarks/results/smollm2/{args.task}_das_budget.json")
    result = {"task": args.task, "compare": str(args.compare), "task_options": task_opts,
              "full_das_trainings": n_full, "full_das_runtime_s": full_runtime, "anchor": list(anchor),
              "subspace_sizes": list(sizes), "batch_size": batch,
              "rows": rows, "versions": package_versions()}
    atomic_write_json(out, result)
    print(table(result))
    return result


def _cal_score(row: dict) -> float:
    return float(row["calibration"]["balanced"])


def table(result: dict) -> str:
    head = ("| variable | site | k | lr | epochs | cal (balanced) | test IIA | test sensitive | s / training | "
            "Full DAS at this budget (est. s) | selected |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in result["rows"]:
        est = "—" if r["full_das_est_s"] is None else f"{r['full_das_est_s']:.0f}"
        tag = " (compare's)" if r["anchor"] else ""
        lines.append(f"| {r['variable']} | {r['site']} | {r['k']} | {r['lr']} | {r['epochs']}{tag} | {_cal_score(r):.3f} | "
                     f"{r['test_iia']:.3f} | {r['test_sensitive']:.3f} | {r['seconds_per_training']:.1f} | {est} | "
                     f"{'✓' if r['selected_on_calibration'] else ''} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
