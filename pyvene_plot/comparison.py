"""Side-by-side comparison on one machine, in one process: PLOT, PLOT + refinement, PLOT-guided DAS,
Full DAS and the free best-single-site baseline.

Accounting (every method is charged for its whole search, with the same clock):

===================  ==========================================================================
method               runtime charged
===================  ==========================================================================
``best_site``        the first stage's full-swap sweep (signature collection), which measures it
``plot``             the coarse stages (``layer``/``position``): signatures, every ε/β solve and
                     every calibration of the sweep
``plot_refined``     every stage of the schedule (plus PCA fits)
``plot_das``         every stage + DAS on the narrowed specs (all sizes, all variables)
``plot_das_coarse``  the coarse stages + DAS on the whole vectors they kept (PLOT as a pure
                     site filter for DAS: no refinement stage)
``full_das``         DAS on every layer x position (the coarse stage's candidate positions, all
                     positions if it names none) x the same subspace-size grid
===================  ==========================================================================

Test banks are used only to report. ``n_sites_evaluated`` counts candidate sites whose
interchange was measured; ``n_trained`` counts DAS trainings (spec x size x variable).
"""


from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from ._constants import DEFAULT_SUBSPACE_SIZES
from .errors import PlotError
from .data import min_real_length
from .localize import OTAlignmentSearcher
from .models import model_spec
from .progressive import COARSE_KINDS, ProgressiveScheduler
from ._utils import atomic_write_json, package_versions
from .tasks import task_signatures

logger = logging.getLogger(__name__)



METHODS = ("plot", "plot_refined", "plot_das", "plot_das_coarse", "full_das", "best_site")


@dataclasses.dataclass
class Comparison:
    """Rows ``{"method", "variable", "iia", "runtime_s", "n_sites_evaluated", "n_trained", "ratio_to_full_das", ...}``."""

    task: str
    rows: list[dict]
    details: dict = dataclasses.field(default_factory=dict)

    def table(self) -> str:
        cols = ["method", "variable", "iia", "sensitive", "invariant", "runtime_s", "n_sites_evaluated", "n_trained",
                "ratio_to_full_das", "sites"]

        def fmt(v: Any) -> str:
            if isinstance(v, float):
                return f"{v:.3f}"
            return "" if v is None else str(v)

        lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        for r in self.rows:
            lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"task": self.task, "rows": self.rows, "details": self.details, "versions": package_versions()}

    def to_json(self, path) -> Path:
        return atomic_write_json(path, self.to_dict())

    def plot(self, path) -> Path:
        """IIA (bars, per variable) and runtime (log scale) per method."""
        import io

        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        import numpy as np

        from ._utils import atomic_write_bytes

        methods = list(dict.fromkeys(r["method"] for r in self.rows))
        variables = list(dict.fromkeys(r["variable"] for r in self.rows))
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(4 + 1.6 * len(methods), 4))
        w = 0.8 / max(1, len(variables))
        for j, v in enumerate(variables):
            vals = [next((r["iia"] for r in self.rows if r["method"] == m and r["variable"] == v), np.nan) for m in methods]
            a1.bar(np.arange(len(methods)) + j * w, vals, w, label=v)
        a1.set_xticks(np.arange(len(methods)) + 0.4 - w / 2, methods, rotation=30)
        a1.set_ylabel("test IIA")
        a1.set_ylim(0, 1.05)
        a1.legend(fontsize=7)
        rts = [max(r["runtime_s"] for r in self.rows if r["method"] == m) for m in methods]
        a2.bar(methods, rts)
        a2.set_yscale("log")
        a2.set_ylabel("runtime (s, whole search)")
        a2.tick_params(axis="x", rotation=30)
        fig.suptitle(f"{self.task}: PLOT vs Full DAS (same machine, one process)")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        return atomic_write_bytes(path, buf.getvalue())


def compare(
    task,
    methods: tuple[str, ...] = METHODS,
    *,
    searcher: OTAlignmentSearcher | None = None,
    stages: list | None = None,
    keep: int = 1,
    subspace_sizes: tuple[int, ...] | None | str = "task",
    das_kwargs: dict | None = None,
    seed: int = 0,
    progress: bool = True,
    out: str | Path | None = None,
) -> Comparison:
    """Run the requested methods on ``task`` side by side and report test IIA, runtime and sites.

    Parameters
    ----------
    task : pyvene_plot.tasks.Task
    methods : tuple of str
        Any of ``plot``, ``plot_refined``, ``plot_das``, ``plot_das_coarse``, ``full_das``, ``best_site``.
    searcher : OTAlignmentSearcher, optional
        Default: balanced ``ot`` for fine stages (coarse stages use one-sided ``uot``), the task's
        readout, and a signature sweep chosen on calibration.
    stages : list of Stage, optional
        Default ``task.default_stages``.
    keep : int
        Sites kept per variable per stage.
    subspace_sizes : tuple of int, None or "task"
        DAS size grid shared by guided and Full DAS (clipped to each support width). ``"task"``
        (default) uses ``task.compare_options["subspace_sizes"]`` or ``(1, 2, 4, 8)``; ``None``
        derives the guided sizes from the support widths and gives Full DAS the union of them.
    das_kwargs : dict, optional
        Passed to both :func:`~pyvene_plot.das.run_das` calls (epochs, lr, batch size, ...), so
        both sides use the same trainer settings; merged over ``task.compare_options["das_kwargs"]``.
    out : path, optional
        Folder for JSON and plots.
    """
    from .das._run import full_das_specs, run_das

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise PlotError(f"unknown compare method(s) {unknown}; choose from {METHODS}")
    topts = dict(getattr(task, "compare_options", {}) or {})
    if isinstance(subspace_sizes, str):
        if subspace_sizes != "task":
            raise PlotError(f"subspace_sizes must be a tuple, None or 'task', got {subspace_sizes!r}")
        subspace_sizes = tuple(topts.get("subspace_sizes", DEFAULT_SUBSPACE_SIZES))
    das_kwargs = {**dict(topts.get("das_kwargs", {})), **dict(das_kwargs or {})}
    das_kwargs.setdefault("readout", task.readout)
    das_kwargs.setdefault("seed", seed)
    das_kwargs.setdefault("progress", progress)
    stages = list(stages or task.default_stages)
    searcher = searcher or OTAlignmentSearcher(method="ot", readout=task.readout, signature=task_signatures(task),
                                               seed=seed, progress=progress)
    model, variables = task.model, list(task.variables)
    rows: list[dict] = []
    details: dict[str, Any] = {"task": task.summary(), "stages": [s.to_dict() for s in stages],
                               "das_kwargs": {k: v for k, v in das_kwargs.items() if k != "readout"}}
    t0 = time.perf_counter()

    need_loc = any(m in methods for m in ("plot", "plot_refined", "plot_das", "plot_das_coarse", "best_site"))
    loc = None
    if need_loc:
        loc = ProgressiveScheduler(stages, searcher, keep=keep).run(model, task.fit, task.calibration, variables)
        details["localization"] = loc.to_dict()
    n_coarse = 0
    for st in stages:
        if st.kind in COARSE_KINDS:
            n_coarse += 1
        else:
            break
    n_coarse = max(1, n_coarse)

    def add_rows(method, scores, runtime, n_sites, n_trained, sites):
        for v in variables:
            s = scores[v]
            rows.append({"method": method, "variable": v, "iia": s["iia"], "sensitive": s["sensitive"],
                         "invariant": s["invariant"], "runtime_s": runtime, "n_sites_evaluated": n_sites,
                         "n_trained": n_trained, "ratio_to_full_das": None, "sites": sites[v]})

    if "best_site" in methods:
        r0 = loc.stages[0]
        add_rows("best_site", r0.evaluate_baseline(task.test, detail=True), r0.diagnostics["signature_runtime_s"],
                 len(r0.sites), 0, {v: r0.baseline[v].sites[0].label for v in variables})
    if "plot" in methods:
        r = loc.stages[n_coarse - 1]
        add_rows("plot", r.evaluate(task.test, detail=True), loc.runtime_until(n_coarse),
                 sum(len(x.sites) for x in loc.stages[:n_coarse]), 0,
                 {v: "; ".join(s.label for s in r.handles[v].sites) for v in variables})
    if "plot_refined" in methods:
        r = loc.final
        add_rows("plot_refined", r.evaluate(task.test, detail=True), loc.runtime_s, loc.n_sites_evaluated(), 0,
                 {v: "; ".join(s.label for s in r.handles[v].sites) for v in variables})
    guided_specs = loc.das_specs(subspace_sizes) if loc is not None else None
    sizes = subspace_sizes
    if sizes is None and guided_specs:
        sizes = tuple(sorted({k for sp in guided_specs for k in sp.subspace_sizes}))
    if sizes is None:
        sizes = DEFAULT_SUBSPACE_SIZES
    details["subspace_sizes"] = list(sizes)
    if "plot_das" in methods:
        das = run_das(model, guided_specs, task.fit, task.calibration, variables, **das_kwargs)
        details["plot_das"] = das.to_dict()
        details["trainer"] = das.trainer
        add_rows("plot_das", {v: das.best[v].scores(task.test) for v in variables}, loc.runtime_s + das.runtime_s,
                 loc.n_sites_evaluated(), das.n_trained, {v: das.best[v].describe() for v in variables})
    if "plot_das_coarse" in methods:
        cspecs = loc.das_specs(sizes, stage=n_coarse - 1)
        das_c = run_das(model, cspecs, task.fit, task.calibration, variables, **das_kwargs)
        details["plot_das_coarse"] = das_c.to_dict()
        add_rows("plot_das_coarse", {v: das_c.best[v].scores(task.test) for v in variables},
                 loc.runtime_until(n_coarse) + das_c.runtime_s,
                 sum(len(x.sites) for x in loc.stages[:n_coarse]), das_c.n_trained,
                 {v: das_c.best[v].describe() for v in variables})
    if "full_das" in methods:
        spec = model_spec(model)
        positions = None
        if spec.has_positions:
            # the same layer x position candidates as PLOT's coarse stage (all positions if it names none)
            positions = stages[0].positions or tuple(range(min_real_length(task.fit)))
        fspecs = full_das_specs(model, component=stages[0].component, positions=positions, subspace_sizes=sizes)
        details["full_das_n_specs"] = len(fspecs)
        full = run_das(model, fspecs, task.fit, task.calibration, variables, **das_kwargs)
        details["full_das"] = full.to_dict()
        add_rows("full_das", {v: full.best[v].scores(task.test) for v in variables}, full.runtime_s,
                 len({(s.layer, s.position) for s in fspecs}), full.n_trained,
                 {v: full.best[v].describe() for v in variables})
        for r in rows:
            r["ratio_to_full_das"] = r["runtime_s"] / full.runtime_s if full.runtime_s > 0 else None
    details["wall_s"] = time.perf_counter() - t0
    cmp = Comparison(task.name, rows, details)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        cmp.to_json(out / "compare.json")
        cmp.plot(out / "compare.png")
        if loc is not None:
            loc.plot(out)
    return cmp
