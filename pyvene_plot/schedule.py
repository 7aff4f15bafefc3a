"""Progressive localisation: coarse-to-fine stages of OT alignment (layers -> positions -> coordinates / PCA)."""

from __future__ import annotations

import dataclasses
from typing import Any

from .errors import PlotError

__all__ = ["Stage", "STAGE_KINDS"]  # extended below

STAGE_KINDS = ("layer", "position", "coordinates", "pca", "lib")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of a progressive schedule.

    Parameters
    ----------
    kind : {"layer", "position", "coordinates", "pca", "lib"}
        ``layer``: one whole-vector site per layer (per timestep for recurrent models);
        ``position``: token positions inside the kept layers; ``coordinates``: contiguous
        coordinate groups inside the kept site; ``pca``: bands of a centred PCA basis fitted on the
        fit bank's activations at the kept site; ``lib``: bands of a Local Interaction Basis
        (:func:`pyvene_plot.bases.lib_basis`, output-Jacobian variant on the searcher's readout
        logits) at the kept site. LIB directions are not orthogonal: the bands are taken from
        :meth:`~pyvene_plot.bases.Basis.orthonormal_rows` (QR of the LIB encoder in importance
        order, so the union of the top bands spans exactly what the top LIB features read) and
        interchanged with PLOT's orthogonal span intervention, not LIB's oblique one.
    group_sizes : tuple of int
        Widths of the coordinate groups (``coordinates`` stages); several widths give overlapping
        candidates.
    bands : int
        Number of equal bands of the basis, most important first (``pca`` and ``lib`` stages).
    keep : int, optional
        Sites kept per variable after this stage; default the scheduler's ``keep``.
    method : str, optional
        Transport method for this stage; default one-sided ``"uot"`` for coarse stages
        (``layer``, ``position``) and the searcher's method otherwise.
    component : str
        pyvene component of the candidate sites.
    positions : tuple of int, optional
        Candidate positions for ``layer``/``position`` stages; default: last token for ``layer``,
        every position of the shortest fit example for ``position``.
    top_k, lambdas : tuple, optional
        Calibration grids for this stage. Coarse stages default to ``top_k=(1,)``, ``lambdas=(1.0,)``
        (a full swap of one site: only the choice of site matters there, as in the reference's
        Stage A); fine stages default to the searcher's grids.
    screen : str, optional
        Screener run on the stage's candidates *before* transport (see :func:`register_screener`):
        ``"oa"`` drops sites whose optimal-ablation gap Δ_opt is negligible, ``"mean"`` sites whose
        mean-ablation gap is (no training; more conservative), ``"attribution"`` keeps each
        variable's top share of sites by attribution patching (a first-order estimate of the
        interchange effect from one backward pass per variable; see
        :mod:`pyvene_plot.attribution`). Candidates a screener drops are
        never measured; what was dropped, the threshold and every score are kept in
        ``Localization.screens``. A variable whose candidates would all be dropped keeps its
        best-scoring ``keep`` sites.
    screen_threshold : float, optional
        Score at or below which a site is dropped (loss units, e.g. nats); default: the
        screener's own conservative rule (``"oa"`` / ``"mean"``: below both 1e-4 and 1 % of the
        largest score). For ``"attribution"`` it is the share of candidates kept per variable
        (default 0.25, at least 4 sites).
    """

    kind: str
    group_sizes: tuple[int, ...] = (1,)
    bands: int = 8
    keep: int | None = None
    method: str | None = None
    component: str = "block_output"
    positions: tuple[int, ...] | None = None
    top_k: tuple[int, ...] | None = None
    lambdas: tuple[float, ...] | None = None
    screen: str | None = None
    screen_threshold: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in STAGE_KINDS:
            raise PlotError(f"unknown stage kind {self.kind!r}; choose one of {STAGE_KINDS}")
        gs = tuple(int(g) for g in self.group_sizes)
        if not gs or min(gs) < 1:
            raise PlotError(f"group_sizes must be positive integers, got {self.group_sizes}")
        object.__setattr__(self, "group_sizes", gs)
        if int(self.bands) < 1:
            raise PlotError(f"bands must be >= 1, got {self.bands}")
        if self.keep is not None and int(self.keep) < 1:
            raise PlotError(f"keep must be >= 1 (sites kept per variable), got {self.keep}")
        if self.positions is not None:
            object.__setattr__(self, "positions", tuple(int(p) for p in self.positions))
        if self.screen is not None and self.screen not in screener_names():
            raise PlotError(f"unknown screener {self.screen!r}; registered: {screener_names()} (see register_screener)")
        if self.screen_threshold is not None and not float(self.screen_threshold) >= 0:
            raise PlotError(f"screen_threshold must be >= 0, got {self.screen_threshold}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------- screening
@dataclasses.dataclass
class ScreenResult:
    """What a screener returns for a stage's candidate sites.

    Attributes
    ----------
    scores : list of float
        One score per candidate (higher = more important), in candidate order.
    keep : list of bool
        Which candidates survive (for every variable).
    threshold : float or None
        The threshold applied.
    rule : str
        The rule in words (for reports).
    info : dict
        Anything else worth reporting (score definition, data used, timings).
    keep_by_variable : dict of str to list of bool, optional
        Per-variable survival (overrides ``keep`` for that variable), for screeners that score
        sites per variable.
    """

    scores: list
    keep: list
    threshold: float | None = None
    rule: str = ""
    info: dict = dataclasses.field(default_factory=dict)
    keep_by_variable: dict | None = None


#: ``name -> screener``; a screener is called as ``fn(model, sites, bank, *, variables, threshold,
#: readout, bases, seed)`` and returns a :class:`ScreenResult`
SCREENERS: dict[str, Any] = {}
_BUILTIN_SCREENERS_LOADED = False


def register_screener(name: str, fn: Any, overwrite: bool = False) -> None:
    """Register a screener for ``Stage(screen=name)``.

    Parameters
    ----------
    name : str
    fn : callable
        ``fn(model, sites, bank, *, variables, threshold, readout, bases, seed) -> ScreenResult``;
        ``sites`` are the stage's candidates (union over variables), ``bank`` the fit bank,
        ``threshold`` the stage's ``screen_threshold`` (None: the screener's default rule).
    overwrite : bool
        Replace an existing registration.
    """
    if not callable(fn):
        raise PlotError(f"screener {name!r} must be callable")
    if name in SCREENERS and not overwrite:
        raise PlotError(f"screener {name!r} is already registered; pass overwrite=True to replace it")
    SCREENERS[name] = fn


def _load_builtin_screeners() -> None:
    global _BUILTIN_SCREENERS_LOADED
    if _BUILTIN_SCREENERS_LOADED:
        return
    _BUILTIN_SCREENERS_LOADED = True
    from .ablation import screen_mean, screen_oa

    SCREENERS.setdefault("oa", screen_oa)
    SCREENERS.setdefault("mean", screen_mean)
    from .attribution import screen_attribution

    SCREENERS.setdefault("attribution", screen_attribution)


def screener_names() -> list[str]:
    """Registered screener names."""
    _load_builtin_screeners()
    return sorted(SCREENERS)


def get_screener(name: str) -> Any:
    _load_builtin_screeners()
    if name not in SCREENERS:
        raise PlotError(f"unknown screener {name!r}; registered: {sorted(SCREENERS)} (see register_screener)")
    return SCREENERS[name]


# ---------------------------------------------------------------------------------------- scheduler
import logging as _logging  # noqa: E402
import time as _time  # noqa: E402
from collections.abc import Mapping as _Mapping, Sequence as _Sequence  # noqa: E402

import numpy as _np  # noqa: E402
import torch as _torch  # noqa: E402

from .banks import PairBank  # noqa: E402
from .engine import InterchangeEngine, as_model_kwargs  # noqa: E402
from .errors import SiteError  # noqa: E402
from .results import AlignmentResult  # noqa: E402
from .sites import Site, coordinate_sites, model_spec  # noqa: E402
from .utils import atomic_write_json  # noqa: E402

_log = _logging.getLogger(__name__)

__all__ += ["ProgressiveScheduler", "Localization", "fit_pca_basis", "ScreenResult", "register_screener",
            "screener_names"]

#: stage kinds that count as coarse (default solver one-sided UOT)
COARSE_KINDS = ("layer", "position")


from .bases import fit_pca_basis  # noqa: E402  (re-exported here; lives with the other basis builders)


class Localization:
    """What :meth:`ProgressiveScheduler.run` returns.

    Attributes
    ----------
    stages : list of AlignmentResult
        One result per stage, in order, each with its own ``runtime_s``.
    kept : list of dict
        Per stage, ``variable -> list of kept Site`` (what the next stage narrows to).
    kept_reason : list of dict
        Per stage and variable, for each kept site: ``"handle"`` (a site of the calibrated handle)
        or ``"ranking"`` (fallback from the coupling ranking when the handle had fewer sites).
    bases : dict of str to ndarray
        Orthonormal bases (rows) fitted by ``pca`` and ``lib`` stages, keyed ``"pca:..."`` / ``"lib:..."``.
    runtime_s : float
        Total wall time: all stages plus PCA fits.
    """

    def __init__(self, model, variables, stages, kept, kept_reason, bases, runtime_s, stage_specs, extra_s,
                 candidates=None, pca_info=None, screens=None):
        self.model = model
        self.variables = list(variables)
        self.stages: list[AlignmentResult] = stages
        self.kept = kept
        self.kept_reason = kept_reason
        self.bases = bases
        self.runtime_s = runtime_s
        self.stage_specs: list[Stage] = stage_specs
        self.extra_s = extra_s
        #: per stage, ``variable -> list of Site`` it was allowed to use
        self.candidates: list[dict[str, list[Site]]] = candidates or []
        #: per PCA / LIB basis: number of states it was fitted on and its rank (LIB: ``kind``, importances)
        self.pca_info: dict[str, dict] = pca_info or {}
        #: per stage, None or the screening report (screener, threshold, rule, scores, dropped sites, ...)
        self.screens: list[dict | None] = screens or [None] * len(stages)

    def __repr__(self) -> str:
        kinds = "→".join(s.kind for s in self.stage_specs)
        return f"Localization({kinds}, runtime_s={self.runtime_s:.2f}, final={ {v: [s.label for s in k] for v, k in self.kept[-1].items()} })"

    @property
    def final(self) -> AlignmentResult:
        return self.stages[-1]

    def n_sites_evaluated(self) -> int:
        return int(sum(len(r.sites) for r in self.stages))

    def runtime_until(self, n_stages: int) -> float:
        """Wall time of the first ``n_stages`` stages (PCA fits and screening of those stages included)."""
        screen_s = sum((sc or {}).get("runtime_s", 0.0) for sc in self.screens[:n_stages])
        return float(sum(r.runtime_s for r in self.stages[:n_stages]) + sum(self.extra_s[:n_stages]) + screen_s)

    def evaluate(self, bank: PairBank, stage: int = -1, detail: bool = False) -> dict:
        """Transport-only IIA of a stage's handles (default: the last stage)."""
        return self.stages[stage].evaluate(bank, detail=detail)

    def das_specs(self, subspace_sizes: _Sequence[int] | None = None, stage: int = -1,
                  include_handle: bool = True, include_parent: bool = True) -> list:
        """Narrowed :class:`~pyvene_plot.das.DASSpec` menu per variable for pyvene DAS training.

        Per variable, at most three supports (deduplicated), among which :func:`~pyvene_plot.run_das`
        chooses on the calibration bank:

        1. ``kept``: the union of the sites the stage kept (after a ``coordinates`` stage the
           union of the kept coordinate groups; after ``pca`` the span of the kept bands; after
           ``layer``/``position`` the whole vector);
        2. ``handle``: the union of the sites of the stage's calibrated handle, per hook;
        3. ``parent``: the whole vector at the hook of the kept sites (the coarse site the fine
           stage refined), the reference's fallback support.

        Subspace sizes default to powers of two below the support width plus the width (at most
        8 values); pass ``subspace_sizes`` to use one grid everywhere (clipped to each width).
        """
        from .das import DASSpec

        st_i = stage if stage >= 0 else len(self.stages) + stage
        res = self.stages[st_i]
        kind = self.stage_specs[st_i].kind
        specs, seen = [], set()

        def add(v, layer, comp, pos, basis, dims, tag):
            if basis is not None:
                V = _np.asarray(res.bases[basis])
                rows = list(dims) if dims is not None else list(range(V.shape[0]))
                width = len(rows)
                spec_basis, spec_dims, key_b = V[rows], None, (basis, tuple(rows))
            else:
                full = model_spec(self.model).dim(comp)
                if dims is not None and tuple(dims) == tuple(range(full)):
                    dims = None  # a support covering every coordinate is the whole vector
                width = len(dims) if dims is not None else full
                spec_basis, spec_dims, key_b = None, (tuple(dims) if dims is not None else None), None
            key = (v, layer, comp, pos, spec_dims, key_b)
            if key in seen:
                return
            seen.add(key)
            sizes = tuple(subspace_sizes) if subspace_sizes is not None else default_sizes(width)
            sizes = tuple(k for k in sizes if k <= width) or (width,)
            specs.append(DASSpec(variable=v, layer=layer, component=comp, position=pos, dims=spec_dims,
                                 basis=spec_basis, subspace_sizes=sizes, source=f"plot:{kind}:{tag}"))

        def grouped(sites):
            by_unit: dict[tuple, list[Site]] = {}
            for s in sites:
                by_unit.setdefault((s.layer, s.component, s.position, s.basis), []).append(s)
            for unit, group in by_unit.items():
                dims = None if any(s.dims is None for s in group) else tuple(sorted({d for s in group for d in s.dims}))
                yield unit, dims

        for v in self.variables:
            kept = self.kept[st_i][v]
            for (layer, comp, pos, basis), dims in grouped(kept):
                add(v, layer, comp, pos, basis, dims, "kept")
            if include_handle:
                for (layer, comp, pos, basis), dims in grouped(res.handles[v].sites):
                    add(v, layer, comp, pos, basis, dims, "handle")
            if include_parent:
                for (layer, comp, pos, _basis), _dims in grouped(kept):
                    add(v, layer, comp, pos, None, None, "parent")
        return specs

    def to_dict(self) -> dict:
        return {
            "stages": [s.to_dict() for s in self.stage_specs],
            "results": [r.to_dict() for r in self.stages],
            "kept": [{v: [s.to_dict() for s in ks] for v, ks in k.items()} for k in self.kept],
            "kept_reason": self.kept_reason,
            "runtime_s": self.runtime_s,
            "stage_runtime_s": [r.runtime_s for r in self.stages],
            "pca_runtime_s": self.extra_s,
            "pca_info": self.pca_info,
            "n_candidates": [{v: len(c) for v, c in cs.items()} for cs in self.candidates],
            "screens": self.screens,
        }

    def to_json(self, path) -> object:
        return atomic_write_json(path, self.to_dict())

    def plot(self, folder) -> list:
        """One coupling heatmap per stage (``stage{i}_{kind}.png``); returns the paths."""
        from pathlib import Path

        out = []
        for i, (st, r) in enumerate(zip(self.stage_specs, self.stages)):
            p = Path(folder) / f"stage{i}_{st.kind}.png"
            r.plot(p)
            out.append(p)
        return out


def default_sizes(width: int) -> tuple[int, ...]:
    """Powers of two below ``width`` plus ``width`` (at most 8 values, largest kept)."""
    sizes = [k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if k < width] + [width]
    return tuple(sizes[-8:])


class ProgressiveScheduler:
    """Run OT alignment stages from coarse to fine, narrowing the candidates per variable.

    Parameters
    ----------
    stages : list of Stage
    searcher : OTAlignmentSearcher
        Used for every stage (cloned per stage with the stage's method). Coarse stages (``layer``,
        ``position``) default to one-sided ``"uot"`` unless the stage sets ``method``.
    keep : int, default 1
        Sites kept per variable after each stage (overridden by ``Stage.keep``). Kept sites are
        the calibrated handle's sites by weight; if the handle has fewer, the remaining slots are
        filled from the coupling ranking (recorded as a fallback).
    """

    def __init__(self, stages: _Sequence[Stage], searcher=None, keep: int = 1) -> None:
        from .search import OTAlignmentSearcher

        if not stages:
            raise PlotError("a schedule needs at least one stage")
        self.stages = [s if isinstance(s, Stage) else Stage(**s) for s in stages]
        if int(keep) < 1:
            raise PlotError(f"keep must be >= 1 (sites kept per variable), got {keep}")
        self.keep = int(keep)
        self.searcher = searcher if searcher is not None else OTAlignmentSearcher()
        for i, st in enumerate(self.stages):
            if i == 0 and st.kind not in ("layer", "position", "coordinates", "pca", "lib"):
                raise PlotError(f"unknown first stage {st.kind!r}")

    def run(
        self,
        model: _torch.nn.Module,
        fit_bank: PairBank,
        calibration_bank: PairBank,
        variables: _Sequence[str] | None = None,
    ) -> Localization:
        """Run every stage; each stage's candidates for a variable lie inside what the previous stage kept."""
        t0 = _time.perf_counter()
        variables = list(variables) if variables is not None else list(fit_bank.variables)
        spec = model_spec(model)
        for st in self.stages:
            if st.kind == "position" and not spec.has_positions:
                raise PlotError(
                    f"stage kind 'position' needs a model with token positions; {spec.model_type.__name__} has none "
                    "(use 'layer' then 'coordinates' or 'pca')"
                )
        results, kept_all, reasons_all, extra, cands_all, screens = [], [], [], [], [], []
        bases: dict[str, _np.ndarray] = {}
        self._pca_info: dict[str, dict] = {}
        kept: dict[str, list[Site]] | None = None
        for i, st in enumerate(self.stages):
            t_extra = _time.perf_counter()
            cands, allowed, stage_bases = self._candidates(st, model, spec, fit_bank, kept, variables)
            bases.update(stage_bases)
            screen_info = None
            if st.screen is not None:
                cands, allowed, screen_info = self._screen(st, model, cands, allowed, fit_bank, bases, variables)
            screens.append(screen_info)
            cands_all.append({v: [cands[j] for j in allowed[v]] for v in variables})
            extra.append(_time.perf_counter() - t_extra if st.kind in ("pca", "lib") else 0.0)
            method = st.method or ("uot" if st.kind in COARSE_KINDS else self.searcher.method)
            overrides = {"method": method}
            if st.kind in COARSE_KINDS:
                overrides.update(top_k=(1,), lambdas=(1.0,))
            if st.top_k is not None:
                overrides["top_k"] = tuple(st.top_k)
            if st.lambdas is not None:
                overrides["lambdas"] = tuple(st.lambdas)
            searcher = self.searcher.clone(**overrides)
            if searcher.top_k is not None:
                n_support = min(len(a) for a in allowed.values())
                ks = (searcher.top_k,) if _np.isscalar(searcher.top_k) else tuple(searcher.top_k)
                searcher.top_k = tuple(k for k in ks if k <= n_support) or (1,)
            _log.info("stage %d (%s): %d candidate sites, method %s", i, st.kind, len(cands), method)
            res = searcher.fit(model, cands, fit_bank, calibration_bank, variables,
                               bases={k: v for k, v in bases.items() if any(c.basis == k for c in cands)},
                               allowed=allowed)
            keep = st.keep or self.keep
            kept, reasons = self._select(res, allowed, keep)
            results.append(res)
            kept_all.append(kept)
            reasons_all.append(reasons)
        runtime = _time.perf_counter() - t0
        return Localization(model, variables, results, kept_all, reasons_all, bases, runtime, self.stages, extra,
                            candidates=cands_all, pca_info=dict(self._pca_info), screens=screens)

    # ------------------------------------------------------------------------------------
    def _screen(self, st: Stage, model, cands, allowed, bank: PairBank, bases, variables):
        """Run the stage's screener and drop candidates; returns (cands, allowed, report)."""
        t0 = _time.perf_counter()
        fn = get_screener(st.screen)
        readout = getattr(self.searcher, "readout", None) or getattr(bank, "readout", None)
        stage_bases = {k: v for k, v in bases.items() if any(c.basis == k for c in cands)}
        rep = fn(model, list(cands), bank, variables=list(variables), threshold=st.screen_threshold,
                 readout=readout, bases=stage_bases, seed=int(getattr(self.searcher, "seed", 0) or 0))
        if len(rep.scores) != len(cands) or len(rep.keep) != len(cands):
            raise PlotError(f"screener {st.screen!r} returned {len(rep.keep)} decisions for {len(cands)} candidates")
        keep = st.keep or self.keep
        by_var = {v: list((rep.keep_by_variable or {}).get(v, rep.keep)) for v in variables}
        rescued = {}
        for v in variables:
            if not any(by_var[v][j] for j in allowed[v]):  # never leave a variable without candidates
                best = sorted(allowed[v], key=lambda j: -float(rep.scores[j]))[:keep]
                for j in best:
                    by_var[v][j] = True
                rescued[v] = [cands[j].label for j in best]
        allowed_sets = {v: set(allowed[v]) for v in variables}
        survive = [j for j in range(len(cands)) if any(by_var[v][j] and j in allowed_sets[v] for v in variables)]
        index = {j: n for n, j in enumerate(survive)}
        new_cands = [cands[j] for j in survive]
        new_allowed = {v: [index[j] for j in allowed[v] if by_var[v][j]] for v in variables}
        dropped = [cands[j].label for j in range(len(cands)) if j not in index]
        report = {
            "screener": st.screen,
            "threshold": rep.threshold,
            "rule": rep.rule,
            "n_candidates": len(cands),
            "n_kept": len(new_cands),
            "n_dropped": len(dropped),
            "dropped": dropped,
            "scores": {c.label: float(sc) for c, sc in zip(cands, rep.scores)},
            "rescued": rescued,
            "info": dict(rep.info),
            "runtime_s": _time.perf_counter() - t0,
        }
        _log.info("stage %s: screener %r dropped %d of %d candidates (%s)", st.kind, st.screen, len(dropped),
                  len(cands), rep.rule)
        return new_cands, new_allowed, report

    @staticmethod
    def _select(res: AlignmentResult, allowed: _Mapping[str, _Sequence[int]], keep: int):
        kept, reasons = {}, {}
        for v in res.variables:
            h = res.handles[v]
            order = sorted(range(len(h.sites)), key=lambda j: -h.weights[j])  # stable: ties keep handle order
            ks = [h.sites[j] for j in order][:keep]
            rs = ["handle"] * len(ks)
            if len(ks) < keep:
                allowed_sites = {res.sites[j] for j in allowed[v]}
                for s in res.ranking(v):
                    if len(ks) >= keep:
                        break
                    if s in allowed_sites and s not in ks:
                        ks.append(s)
                        rs.append("ranking")
            kept[v] = ks
            reasons[v] = rs
        return kept, reasons

    def _fit_lib(self, key: str, model, par: Site, bank: PairBank) -> _np.ndarray:
        """LIB basis (output Jacobian of the searcher's readout) at a kept site; orthonormal rows for the engine."""
        from .bases import lib_basis

        readout = self.searcher.readout or getattr(bank, "readout", None)
        basis = lib_basis(model, Site(par.layer, par.component, par.position), bank, readout=readout)
        self._pca_info[key] = {"kind": "lib", "n_states": int(basis.info["n_states"]), "rank": basis.rank,
                               "importances": basis.importances.tolist(),
                               "jacobian_target": basis.info.get("jacobian_target"),
                               "orthonormalisation": "nested QR of the LIB encoder rows in importance order",
                               "states": "fit-bank bases and sources at the kept site"}
        _log.info("LIB basis %s built on %d states (rank %d)", key, basis.info["n_states"], basis.rank)
        return basis.orthonormal_rows().astype(_np.float32)

    def _candidates(self, st: Stage, model, spec, bank: PairBank, kept, variables):
        """Candidate sites (union over variables) and, per variable, the indices it may use."""
        per_var: dict[str, list[Site]] = {}
        stage_bases: dict[str, _np.ndarray] = {}
        if st.kind == "layer":
            positions = st.positions or (-1,)
            layers = range(spec.n_layers)
            if kept is not None:  # a later layer stage: keep the previous layers only
                layers = sorted({s.layer for ks in kept.values() for s in ks})
            base = [Site(l, st.component, p) for l in layers for p in positions]
            per_var = {v: list(base) for v in variables}
        elif st.kind == "position":
            positions = st.positions or tuple(range(_min_real_length(bank)))
            for v in variables:
                layers = sorted({s.layer for s in kept[v]}) if kept is not None else range(spec.n_layers)
                per_var[v] = [Site(l, st.component, p) for l in layers for p in positions]
        elif st.kind == "coordinates":
            for v in variables:
                parents = kept[v] if kept is not None else [Site(l, st.component, -1) for l in range(spec.n_layers)]
                sites = []
                for par in parents:
                    if par.basis is not None:
                        raise PlotError("a coordinates stage cannot follow a pca/lib stage (coordinates are native)")
                    dims = list(par.dims) if par.dims is not None else list(range(spec.dim(par.component)))
                    for g in st.group_sizes:
                        if g > len(dims):
                            continue
                        for grp in coordinate_sites(par.layer, len(dims), g, par.component, par.position):
                            sites.append(grp.with_(dims=tuple(dims[j] for j in grp.dims)))
                if not sites:
                    raise SiteError(f"coordinates stage produced no candidates for {v!r} (group sizes {st.group_sizes} exceed the support)")
                per_var[v] = list(dict.fromkeys(sites))
        else:  # pca / lib: bands of a basis fitted at each kept site
            for v in variables:
                parents = kept[v] if kept is not None else [Site(l, st.component, -1) for l in range(spec.n_layers)]
                sites = []
                for par in parents:
                    key = f"{st.kind}:L{par.layer}:{par.component}@{par.position}"
                    if key not in stage_bases and st.kind == "lib":
                        stage_bases[key] = self._fit_lib(key, model, par, bank)
                    if key not in stage_bases:
                        acts = _site_activations(model, par, bank)
                        V, _mean, _var = fit_pca_basis(acts)
                        stage_bases[key] = V
                        self._pca_info[key] = {"n_states": int(acts.shape[0]), "rank": int(V.shape[0]),
                                               "states": "fit-bank bases and sources at the kept site"}
                        _log.info("PCA basis %s fitted on %d states (rank %d)", key, acts.shape[0], V.shape[0])
                    r = stage_bases[key].shape[0]
                    nb = min(st.bands, r)
                    edges = _np.linspace(0, r, nb + 1).round().astype(int)
                    for a, b in zip(edges[:-1], edges[1:]):
                        if b > a:
                            sites.append(Site(par.layer, par.component, par.position, dims=tuple(range(a, b)), basis=key))
                per_var[v] = sites
        union = list(dict.fromkeys(s for v in variables for s in per_var[v]))
        index = {s: i for i, s in enumerate(union)}
        allowed = {v: [index[s] for s in per_var[v]] for v in variables}
        for v in variables:
            if not allowed[v]:
                raise SiteError(f"empty support for variable {v!r} at stage {st.kind!r}")
        return union, allowed, stage_bases


def _min_real_length(bank: PairBank) -> int:
    kw = as_model_kwargs(bank.base)
    if "attention_mask" in kw:
        return int(kw["attention_mask"].sum(1).min())
    t = kw.get("input_ids", kw.get("inputs_embeds"))
    return int(t.shape[1])


def _site_activations(model, site: Site, bank: PairBank) -> _torch.Tensor:
    """Activations at a whole-vector site for every base and source of the bank, (2N, d)."""
    eng = InterchangeEngine(model, [(site.layer, site.component, site.position, None)])
    ru = (site.layer, site.component, site.position)
    a = eng.collect(bank.base)[ru]
    b = eng.collect(bank.source)[ru]
    return _torch.cat([a, b], 0)
