"""The progressive scheduler: OT alignment stages from coarse to fine (layers -> positions -> coordinates / PCA / LIB).

:class:`ProgressiveScheduler` runs one :class:`~pyvene_plot.localize.OTAlignmentSearcher` fit per
:class:`Stage`. Each stage proposes candidate sites inside what the previous stage kept for each
variable (:meth:`ProgressiveScheduler._candidates`), optionally screens them
(:mod:`pyvene_plot.progressive.screening`), fits the coupling, and keeps the calibrated handle's
sites for the next stage. With ``compete=True`` (default) every refinement stage's handle competes
with the handle in effect on the calibration bank and is kept only if it scores higher
(:mod:`pyvene_plot.progressive._compete`). The stages' results are collected in a :class:`Localization`.
"""

from __future__ import annotations

import dataclasses
import logging as _logging
import time as _time
from collections.abc import Mapping as _Mapping
from collections.abc import Sequence as _Sequence
from typing import Any

import numpy as _np
import torch as _torch

from .._params import ParamsMixin
from ..data import PairBank, min_real_length
from ..errors import PlotError, SiteError
from ..localize import AlignmentResult, OTAlignmentSearcher
from ..models import Site, coordinate_sites, model_spec
from ._compete import InEffect, compete_stage, keep_previous, support_width
from ._localization import Localization
from ._spans import basis_key, fit_lib_at, fit_pca_at, span_sites
from ._stages import COARSE_KINDS, Stage
from .screening import get_screener

_log = _logging.getLogger(__name__)

#: stage kinds a schedule may start with
FIRST_STAGE_KINDS = ("layer", "position", "coordinates", "pca", "lib")


@dataclasses.dataclass
class _RunState:
    """What :meth:`ProgressiveScheduler.run` accumulates stage by stage (one entry per stage in each list)."""

    results: list = dataclasses.field(default_factory=list)
    kept_all: list = dataclasses.field(default_factory=list)
    reasons_all: list = dataclasses.field(default_factory=list)
    extra: list = dataclasses.field(default_factory=list)
    cands_all: list = dataclasses.field(default_factory=list)
    screens: list = dataclasses.field(default_factory=list)
    bases: dict = dataclasses.field(default_factory=dict)
    pca_info: dict = dataclasses.field(default_factory=dict)
    kept: dict | None = None
    #: per variable, the handle in effect (its stage, the handle, its calibration scores once measured)
    current: dict = dataclasses.field(default_factory=dict)
    handle_stage: list = dataclasses.field(default_factory=list)
    competition: list = dataclasses.field(default_factory=list)
    widths: list = dataclasses.field(default_factory=list)


class ProgressiveScheduler(ParamsMixin):
    """Run OT alignment stages from coarse to fine, narrowing the candidates per variable.

    Parameters
    ----------
    stages : list of Stage
        Stored as given (a dict is turned into a :class:`Stage` when the schedule runs).
    searcher : OTAlignmentSearcher, optional
        Used for every stage (cloned per stage with the stage's method). Coarse stages (``layer``,
        ``position``) default to one-sided ``"uot"`` unless the stage sets ``method``. Default:
        ``OTAlignmentSearcher()``.
    keep : int, default 1
        Sites kept per variable after each stage (overridden by ``Stage.keep``). Kept sites are
        the calibrated handle's sites by weight; if the handle has fewer, the remaining slots are
        filled from the coupling ranking (recorded as a fallback).
    compete : bool, default True
        After every stage but the first, each variable's refined handle competes with the handle in
        effect (the previous stage's, or an earlier one's) on the calibration bank, by the
        searcher's selection rule; ties keep the previous, coarser handle. Where the refinement
        does not win, the previous handle stays in effect and the next stage narrows to the
        previous stage's kept sites. :attr:`Localization.competition` records each decision with
        both handles' scores; :attr:`Localization.handles` and :meth:`Localization.das_specs` use
        the handles in effect. ``False``: every stage's own handle is in effect (earlier behaviour).
    """

    def __init__(self, stages: _Sequence[Stage], searcher: OTAlignmentSearcher | None = None, keep: int = 1,
                 compete: bool = True) -> None:
        self.stages = stages
        self.searcher = searcher
        self.keep = keep
        self.compete = compete
        self._validate()

    # ------------------------------------------------------------------------------------ params
    # get_params / set_params: ParamsMixin (derived from the __init__ signature)
    def _validate(self) -> None:
        stages = self._stage_list()
        if int(self.keep) < 1:
            raise PlotError(f"keep must be >= 1 (sites kept per variable), got {self.keep}")
        if stages[0].kind not in FIRST_STAGE_KINDS:
            raise PlotError(f"unknown first stage {stages[0].kind!r}")
        if not isinstance(self.compete, (bool, _np.bool_)):
            raise PlotError(f"compete must be True or False, got {self.compete!r}")

    def _stage_list(self) -> list[Stage]:
        """The stages as :class:`Stage` objects (dicts converted)."""
        if not self.stages:
            raise PlotError("a schedule needs at least one stage")
        return [s if isinstance(s, Stage) else Stage(**s) for s in self.stages]

    def _searcher(self) -> OTAlignmentSearcher:
        """The searcher every stage clones (a default one when none was given)."""
        return self.searcher if self.searcher is not None else OTAlignmentSearcher()

    # ------------------------------------------------------------------------------------ run
    def run(
        self,
        model: _torch.nn.Module,
        fit_bank: PairBank,
        calibration_bank: PairBank,
        variables: _Sequence[str] | None = None,
    ) -> Localization:
        """Run every stage; each stage's candidates for a variable lie inside what the previous stage kept.

        Parameters
        ----------
        model : torch.nn.Module
        fit_bank, calibration_bank : PairBank
            Signatures (and PCA / LIB bases, screening) on the fit bank; every selection on the
            calibration bank.
        variables : list of str, optional
            Default: every variable of the fit bank.

        Returns
        -------
        Localization
        """
        t0 = _time.perf_counter()
        variables = list(variables) if variables is not None else list(fit_bank.variables)
        spec = model_spec(model)
        stages = self._stage_list()
        searcher = self._searcher()
        _check_stages_fit_model(stages, spec)
        state = _RunState()
        for i, st in enumerate(stages):
            self._run_stage(i, st, searcher, model, spec, fit_bank, calibration_bank, variables, state)
        runtime = _time.perf_counter() - t0
        return Localization(model, variables, state.results, state.kept_all, state.reasons_all, state.bases, runtime,
                            stages, state.extra, candidates=state.cands_all, pca_info=dict(state.pca_info),
                            screens=state.screens, handle_stage=state.handle_stage, competition=state.competition,
                            support_width=state.widths, compete=bool(self.compete))

    def _run_stage(self, i: int, st: Stage, searcher: OTAlignmentSearcher, model, spec, fit_bank: PairBank,
                   calibration_bank: PairBank, variables: list[str], state: _RunState) -> None:
        """One stage: candidates (and PCA / LIB bases), screening, the fit, the sites kept; appended to ``state``."""
        t_extra = _time.perf_counter()
        cands, allowed, stage_bases = self._candidates(st, model, spec, fit_bank, state.kept, variables, searcher,
                                                       state.pca_info)
        state.bases.update(stage_bases)
        screen_info = None
        if st.screen is not None:
            cands, allowed, screen_info = self._screen(st, searcher, model, cands, allowed, fit_bank, state.bases,
                                                       variables)
        state.screens.append(screen_info)
        state.cands_all.append({v: [cands[j] for j in allowed[v]] for v in variables})
        state.extra.append(_time.perf_counter() - t_extra if st.kind in ("pca", "lib") else 0.0)
        stage_searcher = _stage_searcher(searcher, st, allowed)
        _log.info("stage %d (%s): %d candidate sites, method %s", i, st.kind, len(cands), stage_searcher.method)
        res = stage_searcher.fit(model, cands, fit_bank, calibration_bank, variables,
                                 bases={k: v for k, v in state.bases.items() if any(c.basis == k for c in cands)},
                                 allowed=allowed)
        kept, reasons = self._select(res, allowed, st.keep or int(self.keep))
        self._compete(i, res, spec, model, calibration_bank, searcher.selection, kept, reasons, state)
        state.kept = kept
        state.results.append(res)
        state.kept_all.append(kept)
        state.reasons_all.append(reasons)

    def _compete(self, i: int, res: AlignmentResult, spec, model, calibration_bank: PairBank, rule: str, kept: dict,
                 reasons: dict, state: _RunState) -> None:
        """Stage ``i``'s handles against the handles in effect (``compete``); record widths and decisions."""
        record = None
        if i == 0 or not self.compete:
            state.current = {v: InEffect(i, h) for v, h in res.handles.items()}
        else:
            record = compete_stage(i, res.handles, state.current, calibration_bank, model, rule)
            keep_previous(kept, reasons, state.kept, record)
        state.competition.append(record)
        state.handle_stage.append({v: e.stage for v, e in state.current.items()})
        state.widths.append({v: {"refined": support_width(res.handles[v], spec),
                                 "kept": support_width(e.handle, spec)} for v, e in state.current.items()})

    # ------------------------------------------------------------------------------------
    def _screen(self, st: Stage, searcher: OTAlignmentSearcher, model, cands, allowed, bank: PairBank, bases,
                variables):
        """Run the stage's screener and drop candidates; returns (cands, allowed, report)."""
        t0 = _time.perf_counter()
        fn = get_screener(st.screen)
        readout = getattr(searcher, "readout", None) or getattr(bank, "readout", None)
        stage_bases = {k: v for k, v in bases.items() if any(c.basis == k for c in cands)}
        rep = fn(model, list(cands), bank, variables=list(variables), threshold=st.screen_threshold,
                 readout=readout, bases=stage_bases, seed=int(getattr(searcher, "seed", 0) or 0))
        if len(rep.scores) != len(cands) or len(rep.keep) != len(cands):
            raise PlotError(f"screener {st.screen!r} returned {len(rep.keep)} decisions for {len(cands)} candidates")
        keep = st.keep or int(self.keep)
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
        """Per variable, the ``keep`` sites the next stage narrows to, and why each was kept."""
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

    def _candidates(self, st: Stage, model, spec, bank: PairBank, kept, variables, searcher: OTAlignmentSearcher,
                    pca_info: dict):
        """Candidate sites (union over variables) and, per variable, the indices it may use."""
        stage_bases: dict[str, _np.ndarray] = {}
        if st.kind == "layer":
            per_var = _layer_candidates(st, spec, kept, variables)
        elif st.kind == "position":
            per_var = _position_candidates(st, spec, bank, kept, variables)
        elif st.kind == "coordinates":
            per_var = _coordinate_candidates(st, spec, kept, variables)
        else:  # pca / lib: bands or prefixes of a basis fitted at each kept site
            readout = searcher.readout or getattr(bank, "readout", None)
            per_var = {}
            for v in variables:
                parents = kept[v] if kept is not None else [Site(l, st.component, -1) for l in range(spec.n_layers)]
                sites = []
                for par in parents:
                    key = basis_key(st, par)
                    if key not in stage_bases and st.kind == "lib":
                        stage_bases[key] = fit_lib_at(key, st, readout, model, par, bank, pca_info)
                    if key not in stage_bases:
                        stage_bases[key] = fit_pca_at(key, st, model, par, bank, pca_info)
                    sites.extend(span_sites(st, par, key, stage_bases[key].shape[0]))
                per_var[v] = sites
        union = list(dict.fromkeys(s for v in variables for s in per_var[v]))
        index = {s: i for i, s in enumerate(union)}
        allowed = {v: [index[s] for s in per_var[v]] for v in variables}
        for v in variables:
            if not allowed[v]:
                raise SiteError(f"empty support for variable {v!r} at stage {st.kind!r}")
        return union, allowed, stage_bases


# ---------------------------------------------------------------------------------------- stage steps
def _check_stages_fit_model(stages: _Sequence[Stage], spec) -> None:
    """Refuse a ``position`` stage on a model without token positions."""
    for st in stages:
        if st.kind == "position" and not spec.has_positions:
            raise PlotError(
                f"stage kind 'position' needs a model with token positions; {spec.model_type.__name__} has none "
                "(use 'layer' then 'coordinates' or 'pca')"
            )


def _stage_searcher(searcher: OTAlignmentSearcher, st: Stage, allowed: _Mapping[str, _Sequence[int]]):
    """The searcher of one stage: the stage's method and grids, top-k clipped to the smallest support."""
    method = st.method or ("uot" if st.kind in COARSE_KINDS else searcher.method)
    overrides: dict[str, Any] = {"method": method}
    if st.kind in COARSE_KINDS:
        overrides.update(top_k=(1,), lambdas=(1.0,))
    if st.prefixes is not None:  # nested spans are alternatives: one prefix per variable
        overrides["top_k"] = (1,)
    if st.top_k is not None:
        overrides["top_k"] = tuple(st.top_k)
    if st.lambdas is not None:
        overrides["lambdas"] = tuple(st.lambdas)
    out = searcher.clone(**overrides)
    if out.top_k is not None:
        n_support = min(len(a) for a in allowed.values())
        ks = (out.top_k,) if _np.isscalar(out.top_k) else tuple(out.top_k)
        out.top_k = tuple(k for k in ks if k <= n_support) or (1,)
    return out


def _layer_candidates(st: Stage, spec, kept, variables) -> dict[str, list[Site]]:
    """``layer`` stage: one site per layer (the previous layers only after a layer stage) and position."""
    positions = st.positions or (-1,)
    layers = range(spec.n_layers)
    if kept is not None:  # a later layer stage: keep the previous layers only
        layers = sorted({s.layer for ks in kept.values() for s in ks})
    base = [Site(l, st.component, p) for l in layers for p in positions]
    return {v: list(base) for v in variables}


def _position_candidates(st: Stage, spec, bank: PairBank, kept, variables) -> dict[str, list[Site]]:
    """``position`` stage: every position (default: of the shortest fit example) inside the kept layers."""
    positions = st.positions or tuple(range(min_real_length(bank)))
    per_var = {}
    for v in variables:
        layers = sorted({s.layer for s in kept[v]}) if kept is not None else range(spec.n_layers)
        per_var[v] = [Site(l, st.component, p) for l in layers for p in positions]
    return per_var


def _coordinate_candidates(st: Stage, spec, kept, variables) -> dict[str, list[Site]]:
    """``coordinates`` stage: contiguous coordinate groups of each width inside each kept site.

    After a previous stage, each kept site itself (the whole kept vector, or the kept coordinates)
    is one more candidate, listed after the groups: a stage whose best candidate is the whole
    vector reproduces the previous stage's handle. A group that covers a whole kept vector is that
    vector (one candidate, not two). A first stage offers the groups only.
    """
    per_var = {}
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
                    whole = kept is not None and g == len(dims)
                    sites.append(par if whole else grp.with_(dims=tuple(dims[j] for j in grp.dims)))
        if not sites:
            raise SiteError(f"coordinates stage produced no candidates for {v!r} (group sizes {st.group_sizes} exceed the support)")
        if kept is not None:
            sites.extend(parents)
        per_var[v] = list(dict.fromkeys(sites))
    return per_var
