"""How much training does DAS need at the site PLOT picked, and what would Full DAS cost at that budget?

``python -m benchmarks.das_budget --task ioi --compare RUN/compare.json --task-option n_fit=40 ...``
(``--task-option`` exactly as given to that compare run; ``--epochs 2 8 24`` and ``--lrs auto 0.05`` by default)

``pyvene-plot compare`` trains guided DAS and Full DAS with one shared budget (for the SmolLM2 tasks:
k = 8, 2 epochs, batch 20 — what a 2-core CPU affords for Full DAS's 180-240 trainings). This script
asks whether that budget is what limits DAS there. For every variable it takes the layer/position
PLOT picked in a finished compare run (the ``plot`` rows of its JSON) and trains DAS on the whole
vector at that site for every (epochs, lr) in a small grid, same k, batch size and seed as the
compare run. The grid point is chosen per variable on the calibration bank; test IIA is reported for
every point (the test bank is only read to report). ``full_das_est_s`` multiplies the seconds of one
training (+ its calibration scoring) at that grid point by the number of trainings Full DAS ran in
the compare run: an *extrapolation* of what Full DAS would cost at that budget, labelled as such.

Writes ``<out>`` (JSON, atomic) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

import numpy as np

import pyvene_plot as pp
from pyvene_plot.cli import _task_options
from pyvene_plot.utils import atomic_write_json, package_versions

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


def full_das_trainings(compare_json: dict) -> int | None:
    rows = [r for r in compare_json["rows"] if r["method"] == "full_das"]
    return int(rows[0]["n_trained"]) if rows else None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", required=True, choices=pp.tasks.names())
    ap.add_argument("--compare", required=True, help="compare.json of a finished `pyvene-plot compare` run")
    ap.add_argument("--epochs", type=int, nargs="+", default=[2, 8, 24])
    ap.add_argument("--lrs", nargs="+", default=["auto", "0.05"])
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
    task_opts = _task_options(args.task_option)
    sites = plot_sites(cmp)
    n_full = full_das_trainings(cmp)
    batch = int(settings.get("batch_size", 20))

    task = pp.tasks.load(args.task, seed=args.seed, **task_opts)
    model = task.model
    rows = []
    for var, (layer, comp, pos) in sites.items():
        spec = pp.DASSpec(variable=var, layer=layer, component=comp, position=pos, subspace_sizes=sizes,
                          source="plot")
        for lr in args.lrs:
            lr_v: float | str = lr if lr == "auto" else float(lr)
            for ep in args.epochs:
                res = pp.run_das(model, [spec], task.fit, task.calibration, [var], readout=task.readout,
                                 epochs=ep, min_epochs=ep, patience=10**6, lr=lr_v, batch_size=batch,
                                 seed=args.seed, progress=False)
                h = res.best[var]
                cal = res.candidates[0]["calibration"]
                test = h.scores(task.test)
                # training + calibration scoring; source collection is shared by all of Full DAS's trainings
                per_training = (res.timings["train_s"] + res.timings["calibration_s"]) / max(1, res.n_trained)
                rows.append({
                    "variable": var, "site": spec.label, "k": h.k, "epochs": ep, "lr": lr,
                    "final_loss": res.candidates[0].get("final_loss"),
                    "calibration": cal, "test_iia": float(test["iia"]),
                    "test_sensitive": float(test.get("sensitive", np.nan)),
                    "seconds_per_training": per_training,
                    "full_das_est_s": None if n_full is None else per_training * n_full,
                })
                logger.info("%s %s lr=%s epochs=%d: test IIA %.3f, %.1f s", var, spec.label, lr, ep,
                            rows[-1]["test_iia"], per_training)
    for var in sites:
        mine = [r for r in rows if r["variable"] == var]
        best = max(mine, key=lambda r: (_cal_score(r), -r["epochs"]))  # ties: the cheaper budget
        for r in mine:
            r["selected_on_calibration"] = r is best
    out = Path(args.out or f"benchmarks/results/smollm2/{args.task}_das_budget.json")
    result = {"task": args.task, "compare": str(args.compare), "task_options": task_opts,
              "full_das_trainings": n_full, "subspace_sizes": list(sizes), "batch_size": batch,
              "rows": rows, "versions": package_versions()}
    atomic_write_json(out, result)
    print(table(result))
    return result


def _cal_score(row: dict) -> float:
    return float(row["calibration"]["balanced"])


def table(result: dict) -> str:
    head = ("| variable | site | lr | epochs | cal (balanced) | test IIA | test sensitive | s / training | "
            "Full DAS at this budget (est. s) | selected |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in result["rows"]:
        est = "—" if r["full_das_est_s"] is None else f"{r['full_das_est_s']:.0f}"
        lines.append(f"| {r['variable']} | {r['site']} | {r['lr']} | {r['epochs']} | {_cal_score(r):.3f} | "
                     f"{r['test_iia']:.3f} | {r['test_sensitive']:.3f} | {r['seconds_per_training']:.1f} | {est} | "
                     f"{'✓' if r['selected_on_calibration'] else ''} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
