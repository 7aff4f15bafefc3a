"""Where each built-in task's variables live, measured: full-vector interchange IIA at every site.

For a task and seed, every layer x position site (whole vector, weight 1, λ = 1: a plain activation
swap from source into base, run through pyvene by :class:`pyvene_plot.Handle`) is scored on a bank
for every variable: IIA on all pairs, on pairs where the variable changes the output (sensitive),
and on pairs where it does not (invariant). The table says where a variable can be found by a full
swap and how far above the floor (the invariant share) it is; it is the ground truth the task
docstrings describe, and what PLOT's coarse stage should find.

These numbers used to be typed into the task modules as ``*_VERIFICATION`` constants; they are now
measured by this script and written to ``benchmarks/results/task_verification/<task>.json``
(atomically, one file per task, every seed in it; a finished seed is not measured again).

``python -m benchmarks.task_verification --tasks binary_addition gpt2_lookup [--seeds 0 1 2]
[--bank test] [--positions task|all] [--threads 1]``
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import pyvene_plot as pp
from pyvene_plot._utils import atomic_write_json, package_versions
from pyvene_plot.data import min_real_length

RESULTS = Path(__file__).resolve().parent / "results" / "task_verification"
logger = logging.getLogger(__name__)


def verification_sites(task: pp.tasks.Task, positions: str) -> list[pp.Site]:
    """The whole-vector sites to score: the task's own candidates, or every layer x real position.

    Parameters
    ----------
    task : Task
    positions : {"task", "all"}
        ``"task"``: the task's candidate sites with ``dims`` dropped (deduplicated); ``"all"``: one
        site per layer and per position of the shortest fit example (the task's component).
    """
    whole = list(dict.fromkeys(pp.Site(s.layer, s.component, s.position) for s in task.sites))
    if positions == "task" or not pp.model_spec(task.model).has_positions:
        return whole
    component = whole[0].component
    return pp.layer_sites(task.model, component=component, positions=list(range(min_real_length(task.fit))))


def measure(task: pp.tasks.Task, bank: pp.PairBank, sites: list[pp.Site], progress: bool = True) -> dict:
    """Full-swap scores of every site for every variable.

    Returns
    -------
    dict
        ``{"sites": [label, ...], "n_pairs": N, "n_changed": {var: n}, "iia": {var: [scores per site]}}``
        where each score is the dict of :func:`pyvene_plot.localize.iia_scores` (iia, sensitive,
        invariant, balanced).
    """
    out = {"sites": [s.label for s in sites], "n_pairs": len(bank),
           "n_changed": {v: int(bank.changed(v).sum()) for v in task.variables}, "iia": {}}
    bar = tqdm(total=len(sites) * len(task.variables), desc=f"{task.name} full swaps", disable=not progress)
    for v in task.variables:
        rows = []
        for site in sites:
            handle = pp.Handle(variable=v, sites=[site], weights=[1.0], strength=1.0, readout=task.readout)
            rows.append({k: round(float(x), 4) for k, x in handle.scores(bank, task.model).items()})
            bar.update(1)
        out["iia"][v] = rows
    bar.close()
    return out


def best_sites(measured: dict) -> dict[str, str]:
    """Per variable, the site with the highest full-swap IIA (ties: the earlier site)."""
    best = {}
    for v, rows in measured["iia"].items():
        i = max(range(len(rows)), key=lambda j: (rows[j]["iia"], -j))
        best[v] = f"{measured['sites'][i]} (IIA {rows[i]['iia']:.3f})"
    return best


def run(task_name: str, seeds: list[int], bank_name: str, positions: str, options: dict, progress: bool) -> Path:
    """Measure one task over seeds, resuming from the results file; returns its path."""
    path = RESULTS / f"{task_name}.json"
    payload = json.loads(path.read_text()) if path.exists() else {}
    if payload.get("settings", {}) != {"bank": bank_name, "positions": positions, "options": options}:
        payload = {"task": task_name, "settings": {"bank": bank_name, "positions": positions, "options": options},
                   "seeds": {}}
    for seed in seeds:
        if str(seed) in payload["seeds"]:
            logger.info("%s seed %d: already measured, kept", task_name, seed)
            continue
        t0 = time.perf_counter()
        task = pp.tasks.load(task_name, seed=seed, **options)
        bank = getattr(task, bank_name)
        measured = measure(task, bank, verification_sites(task, positions), progress)
        measured["best_site"] = best_sites(measured)
        measured["seconds"] = round(time.perf_counter() - t0, 1)
        payload["seeds"][str(seed)] = measured
        payload.update(versions=package_versions(), threads=torch.get_num_threads())
        atomic_write_json(path, payload)
        print(f"{task_name} seed {seed}: best full-swap site {measured['best_site']} ({measured['seconds']}s)")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.task_verification", description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["binary_addition", "gpt2_lookup"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--bank", choices=["fit", "calibration", "test"], default="test")
    ap.add_argument("--positions", choices=["task", "all"], default="all")
    ap.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from pyvene_plot.cli import parse_task_options

    options = parse_task_options(args.task_option)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in args.tasks:
        print(f"wrote {run(name, args.seeds, args.bank, args.positions, options, not args.quiet)}")


if __name__ == "__main__":
    main()
