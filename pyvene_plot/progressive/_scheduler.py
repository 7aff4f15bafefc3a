"""Progressive localisation: coarse-to-fine stages of OT alignment (layers -> positions -> coordinates / PCA)."""


from __future__ import annotations


from ..errors import PlotError


# ---------------------------------------------------------------------------------------- scheduler
import logging as _logging  # noqa: E402
import time as _time  # noqa: E402
from collections.abc import Mapping as _Mapping, Sequence as _Sequence  # noqa: E402

import numpy as _np  # noqa: E402
import torch as _torch  # noqa: E402

from ..data import PairBank  # noqa: E402
from ..localize import InterchangeEngine
from ..errors import SiteError  # noqa: E402
from ..localize import AlignmentResult  # noqa: E402
from ..models import Site, coordinate_sites
from ..models import model_spec  # noqa: E402

_log = _logging.getLogger(__name__)


from ..methods.bases import fit_pca_basis  # noqa: E402  (re-exported here; lives with the other basis builders
from ._stages import COARSE_KINDS, Stage
from ._localization import Localization
from .screening import get_screener
from ..data import min_real_length




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
        from ..localize import OTAlignmentSearcher

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
        from ..methods.bases import lib_basis

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
            positions = st.positions or tuple(range(min_real_length(bank)))
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


def _site_activations(model, site: Site, bank: PairBank) -> _torch.Tensor:
    """Activations at a whole-vector site for every base and source of the bank, (2N, d)."""
    eng = InterchangeEngine(model, [(site.layer, site.component, site.position, None)])
    ru = (site.layer, site.component, site.position)
    a = eng.collect(bank.base)[ru]
    b = eng.collect(bank.source)[ru]
    return _torch.cat([a, b], 0)
