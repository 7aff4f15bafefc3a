"""Side-by-side comparison on one machine, in one process: PLOT, PLOT + refinement, PLOT-guided DAS,
Full DAS and the free best-single-site baseline (:func:`compare`, :class:`Comparison`).

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

The clock (``compare(..., clock=)``, default :func:`time.perf_counter`) is read around each call
:func:`compare` makes: the whole localisation and each :func:`~pyvene_plot.das.run_das`. A method
charged for part of the localisation (``best_site``: the first stage's signature sweep; ``plot``:
the coarse stages) gets that part's share of the clocked localisation time, the share measured by
the localisation's own stage timers.

Test banks are used only to report. ``n_sites_evaluated`` counts candidate sites whose
interchange was measured; ``n_trained`` counts DAS trainings (spec x size x variable).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ._constants import DEFAULT_SUBSPACE_SIZES
from ._utils import (
    atomic_write_json,
    atomic_write_png,
    package_versions,
    read_json_object,
    require_keys,
    writer_tag,
)
from .das import full_das_specs, run_das
from .data import min_real_length
from .errors import PlotError
from .localize import OTAlignmentSearcher
from .models import model_spec
from .progressive import COARSE_KINDS, ProgressiveScheduler

logger = logging.getLogger(__name__)

METHODS = ("plot", "plot_refined", "plot_das", "plot_das_coarse", "full_das", "best_site")
#: methods that need the progressive localisation
_LOCALIZED = ("plot", "plot_refined", "plot_das", "plot_das_coarse", "best_site")
#: layout of the JSON written by :meth:`Comparison.to_json` (files without the key have the same layout)
COMPARISON_FORMAT_VERSION = 1
#: the fields of every row, in the order of :meth:`Comparison.table`
ROW_KEYS = ("method", "variable", "iia", "sensitive", "invariant", "runtime_s", "n_sites_evaluated", "n_trained",
            "ratio_to_full_das", "sites")
#: row fields that are floats (JSON stores their NaN / inf as strings)
_FLOAT_KEYS = ("iia", "sensitive", "invariant", "runtime_s", "ratio_to_full_das")
_NONFINITE = ("nan", "inf", "-inf")


@dataclasses.dataclass
class Comparison:
    """The result of :func:`compare`.

    Attributes
    ----------
    task : str
        The task's name.
    rows : list of dict
        One row per method and variable, with the fields :data:`ROW_KEYS` (test ``iia``,
        ``sensitive``, ``invariant``; ``runtime_s`` of the whole search; ``n_sites_evaluated``;
        ``n_trained``; ``ratio_to_full_das``; ``sites``).
    details : dict
        The task summary, the stages, the DAS settings, the localisation and every DAS run.
    """

    task: str
    rows: list[dict]
    details: dict = dataclasses.field(default_factory=dict)

    def table(self) -> str:
        """The rows as a Markdown table (floats with three decimals)."""
        cols = list(ROW_KEYS)

        def fmt(v: Any) -> str:
            if isinstance(v, float):
                return f"{v:.3f}"
            return "" if v is None else str(v)

        lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        for r in self.rows:
            lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready payload: ``format_version``, ``writer``, ``task``, ``rows``, ``details``, ``versions``."""
        return {"format_version": COMPARISON_FORMAT_VERSION, "writer": writer_tag(), "task": self.task,
                "rows": self.rows, "details": self.details, "versions": package_versions()}

    def to_json(self, path) -> Path:
        """Write :meth:`to_dict` atomically as JSON (read back by :meth:`from_json`); returns the path."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | Path) -> Comparison:
        """Read a file written by :meth:`to_json` (or by ``pyvene-plot compare``).

        ``details`` comes back as JSON holds it (lists for tuples); the rows' non-finite floats,
        which JSON stores as strings, come back as floats.

        Raises
        ------
        PlotError
            When the file is empty, truncated or not JSON, lacks ``task`` / ``rows`` / ``details``
            or a row's field, or was written by a newer format; the message names the file.
        """
        where = f"Comparison file {str(path)!r}"
        d = read_json_object(path, "Comparison")
        require_keys(d, ("task", "rows", "details"), where)
        version = d.get("format_version", 1)
        if not isinstance(version, int) or version > COMPARISON_FORMAT_VERSION:
            raise PlotError(f"{where} has format_version {version!r}; this pyvene_plot reads up to "
                            f"{COMPARISON_FORMAT_VERSION} (upgrade pyvene_plot)")
        for key, kind in (("rows", list), ("details", dict)):
            if not isinstance(d[key], kind):
                raise PlotError(f"{where} is malformed: {key!r} is a {type(d[key]).__name__}, not a {kind.__name__}")
        rows = []
        for i, row in enumerate(d["rows"]):
            require_keys(row, ROW_KEYS, f"{where}, row {i}")
            rows.append({k: float(v) if k in _FLOAT_KEYS and v in _NONFINITE else v for k, v in row.items()})
        return cls(str(d["task"]), rows, dict(d["details"]))

    def plot(self, path) -> Path:
        """IIA (bars, per variable) and runtime (log scale) per method."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        import numpy as np

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
        return atomic_write_png(path, fig, dpi=110)


# ---------------------------------------------------------------------------------------- steps
@dataclasses.dataclass
class _Plan:
    """The resolved options of one :func:`compare` call."""

    methods: tuple[str, ...]
    stages: list
    searcher: OTAlignmentSearcher
    keep: int
    subspace_sizes: tuple[int, ...] | None
    das_kwargs: dict
    n_coarse: int


def n_coarse_stages(stages: Sequence) -> int:
    """Number of leading coarse (``layer`` / ``position``) stages, at least 1: what ``plot`` reports."""
    n = 0
    for st in stages:
        if st.kind not in COARSE_KINDS:
            break
        n += 1
    return max(1, n)


def _resolve_plan(task, methods, searcher, stages, keep, subspace_sizes, das_kwargs, seed, progress) -> _Plan:
    """Check the methods and resolve the size grid, the shared DAS settings, the stages and the searcher.

    ``subspace_sizes="task"`` and ``das_kwargs`` fall back on ``task.compare_options``; the DAS
    settings get the task's readout, ``seed`` and ``progress`` unless given.
    """
    from .tasks import task_signatures

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
    return _Plan(tuple(methods), stages, searcher, keep, subspace_sizes, das_kwargs, n_coarse_stages(stages))


def _method_rows(method: str, variables: Sequence[str], scores: dict, runtime: float, n_sites: int,
                 n_trained: int, sites: dict) -> list[dict]:
    """One row per variable (``ratio_to_full_das`` is filled in once Full DAS has run)."""
    rows = []
    for v in variables:
        s = scores[v]
        rows.append({"method": method, "variable": v, "iia": s["iia"], "sensitive": s["sensitive"],
                     "invariant": s["invariant"], "runtime_s": runtime, "n_sites_evaluated": n_sites,
                     "n_trained": n_trained, "ratio_to_full_das": None, "sites": sites[v]})
    return rows


def _localize(task, plan: _Plan, clock: Callable[[], float]):
    """Run the progressive schedule on the fit / calibration banks; returns ``(loc, clocked seconds)``."""
    t = clock()
    loc = ProgressiveScheduler(plan.stages, plan.searcher, keep=plan.keep).run(
        task.model, task.fit, task.calibration, list(task.variables))
    return loc, clock() - t


def _share(loc, part_s: float, loc_s: float) -> float:
    """``part_s`` (a part of the localisation, by its own timers) as a share of the clocked ``loc_s``."""
    return loc_s * (part_s / loc.runtime_s) if loc.runtime_s > 0 else 0.0


def _localization_rows(task, plan: _Plan, loc, loc_s: float) -> list[dict]:
    """Rows of ``best_site``, ``plot`` and ``plot_refined`` (transport-only handles; no DAS)."""
    variables, n, rows = list(task.variables), plan.n_coarse, []
    if "best_site" in plan.methods:
        r0 = loc.stages[0]
        rows += _method_rows("best_site", variables, r0.evaluate_baseline(task.test, detail=True),
                             _share(loc, r0.diagnostics["signature_runtime_s"], loc_s), len(r0.sites), 0,
                             {v: r0.baseline[v].sites[0].label for v in variables})
    # the handles in effect after a stage (a refinement that did not beat the stage before on
    # calibration leaves the earlier handle in effect; see ProgressiveScheduler(compete=True))
    if "plot" in plan.methods:
        handles = loc.kept_handles(n - 1)
        rows += _method_rows("plot", variables, loc.evaluate(task.test, stage=n - 1, detail=True),
                             _share(loc, loc.runtime_until(n), loc_s), sum(len(x.sites) for x in loc.stages[:n]), 0,
                             {v: "; ".join(s.label for s in handles[v].sites) for v in variables})
    if "plot_refined" in plan.methods:
        handles = loc.handles
        rows += _method_rows("plot_refined", variables, loc.evaluate(task.test, detail=True), loc_s,
                             loc.n_sites_evaluated(), 0,
                             {v: "; ".join(s.label for s in handles[v].sites) for v in variables})
    return rows


def _size_grid(loc, subspace_sizes: tuple[int, ...] | None):
    """The guided DAS specs and the size grid shared by coarse-guided and Full DAS.

    ``None`` gives Full DAS the union of the guided specs' sizes (the default grid without them).
    """
    guided_specs = loc.das_specs(subspace_sizes) if loc is not None else None
    sizes = subspace_sizes
    if sizes is None and guided_specs:
        sizes = tuple(sorted({k for sp in guided_specs for k in sp.subspace_sizes}))
    if sizes is None:
        sizes = DEFAULT_SUBSPACE_SIZES
    return guided_specs, sizes


def _timed_das(task, specs, das_kwargs: dict, clock: Callable[[], float]):
    """:func:`~pyvene_plot.das.run_das` on the fit / calibration banks; returns ``(result, clocked seconds)``."""
    t = clock()
    res = run_das(task.model, specs, task.fit, task.calibration, list(task.variables), **das_kwargs)
    return res, clock() - t


def _das_rows(method: str, task, das, runtime: float, n_sites: int) -> list[dict]:
    """Rows of a DAS method: each variable's calibration-selected handle scored on the test bank."""
    variables = list(task.variables)
    return _method_rows(method, variables, {v: das.best[v].scores(task.test) for v in variables}, runtime, n_sites,
                        das.n_trained, {v: das.best[v].describe() for v in variables})


def _guided_das(task, plan: _Plan, loc, loc_s: float, guided_specs, sizes, details: dict,
                clock: Callable[[], float]) -> list[dict]:
    """``plot_das`` (every stage + DAS on the narrowed specs) and ``plot_das_coarse`` (coarse stages + DAS)."""
    rows = []
    if "plot_das" in plan.methods:
        das, das_s = _timed_das(task, guided_specs, plan.das_kwargs, clock)
        details["plot_das"] = das.to_dict()
        details["trainer"] = das.trainer
        rows += _das_rows("plot_das", task, das, loc_s + das_s, loc.n_sites_evaluated())
    if "plot_das_coarse" in plan.methods:
        n = plan.n_coarse
        cspecs = loc.das_specs(sizes, stage=n - 1)
        das_c, das_c_s = _timed_das(task, cspecs, plan.das_kwargs, clock)
        details["plot_das_coarse"] = das_c.to_dict()
        rows += _das_rows("plot_das_coarse", task, das_c, _share(loc, loc.runtime_until(n), loc_s) + das_c_s,
                          sum(len(x.sites) for x in loc.stages[:n]))
    return rows


def _full_das(task, plan: _Plan, sizes, details: dict, clock: Callable[[], float]):
    """Full DAS on every layer x position of the first stage's component; returns ``(rows, clocked seconds)``."""
    model, stages = task.model, plan.stages
    positions = None
    if model_spec(model).has_positions:
        # the same layer x position candidates as PLOT's coarse stage (all positions if it names none)
        positions = stages[0].positions or tuple(range(min_real_length(task.fit)))
    fspecs = full_das_specs(model, component=stages[0].component, positions=positions, subspace_sizes=sizes)
    details["full_das_n_specs"] = len(fspecs)
    full, full_s = _timed_das(task, fspecs, plan.das_kwargs, clock)
    details["full_das"] = full.to_dict()
    return _das_rows("full_das", task, full, full_s, len({(s.layer, s.position) for s in fspecs})), full_s


def _write_outputs(cmp: Comparison, loc, out: str | Path) -> None:
    """``compare.json``, ``compare.png`` and the localisation's plots into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cmp.to_json(out / "compare.json")
    cmp.plot(out / "compare.png")
    if loc is not None:
        loc.plot(out)


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
    clock: Callable[[], float] = time.perf_counter,
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
        Passed to every :func:`~pyvene_plot.das.run_das` call (epochs, lr, batch size, ...), so
        guided and Full DAS use the same trainer settings; merged over ``task.compare_options["das_kwargs"]``.
    seed : int
        Seed of the default searcher and of DAS (unless ``das_kwargs`` sets one).
    progress : bool
        Progress bars.
    out : path, optional
        Folder for JSON and plots.
    clock : callable, default time.perf_counter
        Seconds counter read around the localisation and each DAS run: every ``runtime_s`` in the
        rows (and ``details["wall_s"]``) comes from it (see the module docstring).

    Returns
    -------
    Comparison
    """
    plan = _resolve_plan(task, methods, searcher, stages, keep, subspace_sizes, das_kwargs, seed, progress)
    details: dict[str, Any] = {"task": task.summary(), "stages": [s.to_dict() for s in plan.stages],
                               "das_kwargs": {k: v for k, v in plan.das_kwargs.items() if k != "readout"}}
    t0 = clock()
    loc, loc_s, rows = None, 0.0, []
    if any(m in plan.methods for m in _LOCALIZED):
        loc, loc_s = _localize(task, plan, clock)
        details["localization"] = loc.to_dict()
        rows += _localization_rows(task, plan, loc, loc_s)
    guided_specs, sizes = _size_grid(loc, plan.subspace_sizes)
    details["subspace_sizes"] = list(sizes)
    rows += _guided_das(task, plan, loc, loc_s, guided_specs, sizes, details, clock)
    if "full_das" in plan.methods:
        full_rows, full_s = _full_das(task, plan, sizes, details, clock)
        rows += full_rows
        for r in rows:
            r["ratio_to_full_das"] = r["runtime_s"] / full_s if full_s > 0 else None
    details["wall_s"] = clock() - t0
    cmp = Comparison(task.name, rows, details)
    if out is not None:
        _write_outputs(cmp, loc, out)
    return cmp
