"""Command line: ``pyvene-plot demo | run | compare`` (also ``python -m pyvene_plot``)."""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import sys
import time
from pathlib import Path


def _out_dir(arg: str | None, prefix: str) -> Path:
    if arg:
        p = Path(arg)
    else:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        p = Path.cwd() / "plot_runs" / f"{prefix}-{stamp}"
    p.mkdir(parents=True, exist_ok=True)
    return p


def _table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}"
        return str(v)

    widths = {c: max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols}
    head = "| " + " | ".join(c.ljust(widths[c]) for c in cols) + " |"
    sep = "|" + "|".join("-" * (widths[c] + 2) for c in cols) + "|"
    body = ["| " + " | ".join(fmt(r.get(c, "")).ljust(widths[c]) for c in cols) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def _load_task(args: argparse.Namespace):
    import pyvene_plot as pp

    from ._utils import resolve_device

    t0 = time.perf_counter()
    opts = parse_task_options(getattr(args, "task_option", None) or [])
    try:
        task = pp.tasks.load(args.task, seed=args.seed, **opts)
    except TypeError as e:
        raise SystemExit(f"task {args.task!r} does not take options {sorted(opts)}: {e}") from None
    device = resolve_device(args.device)
    task.model.to(device)
    info = task.info
    print(f"task {task.name}: {type(task.model).__name__} on {device} ready in {time.perf_counter() - t0:.1f}s"
          + (f" (trained in {info['train_seconds']:.1f}s, held-out accuracy {info['heldout_accuracy']:.4f})"
             if "train_seconds" in info and "heldout_accuracy" in info else "")
          + f"; banks fit/calibration/test = {len(task.fit)}/{len(task.calibration)}/{len(task.test)}; "
          f"{len(task.sites)} candidate sites", flush=True)
    return task


def parse_task_options(items: list[str]) -> dict:
    """``["n_fit=80", "l1=0.0"]`` -> ``{"n_fit": 80, "l1": 0.0}`` (ints, floats, true/false, else strings)."""
    out = {}
    for it in items:
        if "=" not in it:
            raise SystemExit(f"--task-option expects KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        for conv in (int, float):
            try:
                out[k] = conv(v)
                break
            except ValueError:
                continue
        else:
            out[k] = {"true": True, "false": False}.get(v.lower(), v)
    return out


def _run_methods(task, methods: list[str], out: Path, seed: int, progress: bool) -> list[dict]:
    import pyvene_plot as pp

    from ._utils import atomic_write_json

    rows = []
    payload = {"task": task.summary(), "results": {}}
    from .tasks import task_signatures

    signatures = task_signatures(task)
    for method in methods:
        searcher = pp.OTAlignmentSearcher(method=method, seed=seed, readout=task.readout, progress=progress,
                                          signature=signatures)
        res = searcher.fit(task.model, task.sites, task.fit, task.calibration)
        test = res.evaluate(task.test, detail=True)
        base = res.evaluate_baseline(task.test, detail=True)
        res.to_json(out / f"result_{method}.json")
        res.plot(out / f"coupling_{method}.png")
        payload["results"][method] = {"test": test, "baseline_test": base, "runtime_s": res.runtime_s,
                                      "json": f"result_{method}.json", "plot": f"coupling_{method}.png"}
        for v in res.variables:
            rows.append({
                "variable": v, "method": f"PLOT-{method}", "test IIA": test[v]["iia"],
                "sensitive": test[v]["sensitive"], "invariant": test[v]["invariant"],
                "runtime_s": res.runtime_s, "sites evaluated": len(res.sites),
                "handle sites": ", ".join(s.label for s in res.handles[v].sites),
            })
        if method == methods[0]:
            for v in res.variables:
                rows.append({
                    "variable": v, "method": "best single site (free)", "test IIA": base[v]["iia"],
                    "sensitive": base[v]["sensitive"], "invariant": base[v]["invariant"],
                    # measured by the signature sweep PLOT runs anyway: its cost is that sweep
                    "runtime_s": res.diagnostics["signature_runtime_s"], "sites evaluated": len(res.sites),
                    "handle sites": res.baseline[v].sites[0].label,
                })
    payload["rows"] = rows
    atomic_write_json(out / "summary.json", payload)
    return rows


_RUN_COLUMNS = ["variable", "method", "test IIA", "sensitive", "invariant", "runtime_s", "sites evaluated", "handle sites"]


def cmd_demo(args: argparse.Namespace) -> int:
    out = _out_dir(args.out, f"demo-{args.task}")
    t0 = time.perf_counter()
    task = _load_task(args)
    rows = _run_methods(task, ["uot", "ot"], out, args.seed, not args.quiet)
    print(_table(rows, _RUN_COLUMNS))
    print(f"wrote {out} (result_*.json, coupling_*.png, summary.json) in {time.perf_counter() - t0:.1f}s")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    out = _out_dir(args.out, f"run-{args.task}-{args.method}")
    task = _load_task(args)
    rows = _run_methods(task, [args.method], out, args.seed, not args.quiet)
    print(_table(rows, _RUN_COLUMNS))
    print(f"wrote {out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    import pyvene_plot as pp

    out = _out_dir(args.out, f"compare-{args.task}")
    task = _load_task(args)
    sizes = "task" if args.subspace_sizes is None else tuple(args.subspace_sizes)
    cmp = pp.compare(task, progress=not args.quiet, seed=args.seed, out=out, subspace_sizes=sizes)
    print(f"DAS trainer: {cmp.details.get('trainer', 'n/a')}; size grid {cmp.details.get('subspace_sizes')}")
    print(cmp.table())
    print(f"wrote {out}")
    return 0


def _task_names() -> list[str]:
    from . import tasks

    return tasks.names()


def build_parser() -> argparse.ArgumentParser:
    names = _task_names()
    p = argparse.ArgumentParser(
        prog="pyvene-plot",
        description="PLOT: localise causal variables with optimal transport and get pyvene interventions back.",
        epilog="built-in tasks: " + ", ".join(names) + ". Results (JSON, PNG) are written atomically into --out.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = p.add_subparsers(dest="command", required=True, metavar="{demo,run,compare}")

    def common(sp: argparse.ArgumentParser, task_default: str | None) -> None:
        if task_default is None:
            sp.add_argument("--task", required=True, choices=names, help="built-in task")
        else:
            sp.add_argument("--task", default=task_default, choices=names, help=f"built-in task (default {task_default})")
        sp.add_argument("--out", default=None, help="output folder (default: a new folder under ./plot_runs/)")
        sp.add_argument("--seed", type=int, default=0, help="task, search and DAS seed")
        sp.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")
        sp.add_argument("--task-option", action="append", metavar="KEY=VALUE",
                        help="keyword passed to the task builder, repeatable (e.g. n_fit=80 n_test=80 for the LM tasks)")

    d = sub.add_parser("demo", help="train/load a task and run PLOT (uot and ot); print a table")
    common(d, "heq")
    d.set_defaults(func=cmd_demo)
    r = sub.add_parser("run", help="run one PLOT method on a task; print a table")
    common(r, None)
    r.add_argument("--method", default="uot", choices=["uot", "ot", "gw", "fgw", "cosine", "bruteforce"])
    r.set_defaults(func=cmd_run)
    c = sub.add_parser("compare", help="PLOT, PLOT+refinement, PLOT-guided DAS, Full DAS and the best single site, side by side")
    common(c, None)
    c.add_argument("--subspace-sizes", type=int, nargs="+", metavar="K", default=None,
                   help="DAS subspace sizes shared by guided and Full DAS (default: the task's compare setting)")
    c.set_defaults(func=cmd_compare)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from .errors import PlotError

    try:
        return int(args.func(args) or 0)
    except PlotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
