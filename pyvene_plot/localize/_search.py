"""The OT alignment searcher: PLOT's core.

PLOT in one screen
------------------
For every abstract variable ``Z`` (rows) and every candidate site ``S`` (columns) build an *effect
signature* on the fit bank: how interchanging ``Z`` in the causal model, or fully interchanging
``S`` in the network, changes the output over the same (base, source) pairs
(:mod:`pyvene_plot.localize`). The cost ``C[Z, S]`` is the mean squared distance between the two
signatures. An optimal-transport coupling between variables and sites is fitted with POT
(:mod:`pyvene_plot.localize`): one-sided unbalanced OT by default, so each variable's mass goes to
the sites that behave like it. Each coupling row is then *calibrated* into an intervention handle
(top-k sites, strength λ) on a separate calibration bank (:mod:`pyvene_plot.localize`); every
ε / β of the sweep is judged the same way, on calibration only. The test bank is never touched here.

Every result also carries the free baseline — the single site whose full swap best reproduces the
variable on the fit bank, which the signature sweep measures anyway — so the contribution of the
transport step is always visible next to it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .._constants import DEFAULT_TOP_K
from .._params import ParamsMixin
from .._utils import seed_everything
from ..data import PairBank
from ..errors import BankError, PlotError, TransportError
from ..models import Readout, Site
from ._calibration import BankCache, lambda_order
from ._engine import InterchangeEngine
from ._fit_steps import (
    CostVariant,
    FitSetup,
    SweepOutcome,
    baseline_handles,
    calibrate_plan,
    calibrated_handles,
    check_allowed,
    check_banks_localisable,
    check_label_range,
    collect_effects,
    cost_variants,
    fit_diagnostics,
    prepare_sites,
)
from ._metrics import SELECTION_RULES
from ._results import AlignmentResult
from ._signatures import SIGNATURE_MODES, SiteEffects
from ._transport import METHODS, cost_spread, row_contrast, solve_transport

logger = logging.getLogger(__name__)


DEFAULT_LAMBDAS = (0.5, 1.0, 2.0, 4.0, 8.0)
#: ε = factor x (cost spread, :func:`cost_spread`) when epsilon="auto" (ot / uot): from nearly
#: hard assignments (each row's best sites take the mass) to smooth plans
AUTO_EPSILON_FACTORS = (0.01, 0.1, 1.0)
#: β = factor x (the same scale as ε) when beta="auto" (uot): from free site marginals (each row
#: keeps its own best sites) to nearly balanced ones (rows spread over many sites, as distributed
#: variables such as HEQ's need)
AUTO_BETA_FACTORS = (1.0, 100.0)
#: ``epsilon="auto"`` never goes below ``(largest within-row cost range) / this``, where POT's kernel
#: ``exp(-C/ε)`` underflows for far-off columns and its scaling iterations stop
AUTO_EPSILON_MIN_RANGE_RATIO = 200.0
#: the grids of epsilon="auto-range" / beta="auto-range": factor x cost range (the default before
#: issue 12, kept so that old numbers can be reproduced)
AUTO_RANGE_EPSILON_FACTORS = (0.01, 0.03, 0.1)
AUTO_RANGE_BETA_FACTORS = (0.1, 1.0)
#: absolute ε for methods whose cost is already on a fixed scale
AUTO_EPSILON_FIXED = {"gw": (0.005, 0.02, 0.05), "fgw": (0.005, 0.02, 0.05), "cosine": (0.05,), "bruteforce": (0.05,)}
#: a selected plan whose rows all have max/median weight below this is reported as uninformative
UNINFORMATIVE_ROW_CONTRAST = 1.2
_AUTO_MODES = ("auto", "auto-range")


def _grid(value: Any, name: str) -> tuple[float, ...] | str:
    if isinstance(value, str):
        if value not in _AUTO_MODES:
            raise PlotError(f"{name} must be a positive number, a list of them, 'auto' or 'auto-range'; got {value!r}")
        return value
    vals = (value,) if np.isscalar(value) else tuple(value)
    if not vals:
        raise PlotError(f"{name} grid is empty")
    out = []
    for v in vals:
        try:
            f = float(v)
        except (TypeError, ValueError) as exc:
            raise PlotError(f"{name} must be numeric, got {v!r}") from exc
        if not np.isfinite(f) or f <= 0:
            raise PlotError(f"{name} must be > 0, got {v!r}")
        out.append(f)
    return tuple(out)


#: the parameters an :class:`AlignmentResult` records in ``config`` (with ``readout`` as a dict)
_RECORDED_PARAMS = ("method", "epsilon", "beta", "signature", "top_k", "lambdas", "seed", "sided", "normalize",
                    "min_effect", "weight_norm", "selection", "alpha", "batch_size", "max_iter", "tol")


class OTAlignmentSearcher(ParamsMixin):
    """Localise abstract variables among candidate sites with optimal transport.

    Parameters
    ----------
    method : {"uot", "ot", "gw", "fgw", "cosine", "bruteforce"}, default "uot"
        Transport solver (see :mod:`pyvene_plot.localize`); ``cosine`` and ``bruteforce`` are baselines.
    epsilon : float, list of float, "auto" or "auto-range"
        Entropic regularisation. ``"auto"`` (ot/uot) sweeps ``(0.01, 0.1, 1) x`` the cost
        *spread* (:func:`cost_spread`: pooled MAD of the row-centred cost over the sites above the
        magnitude floor), so the sweep reaches plans whose rows put most of their mass on their best
        sites whatever the units of the cost; ``"auto-range"`` sweeps ``(0.01, 0.03, 0.1) x`` the cost
        range (the old default). gw/fgw/baselines use a fixed grid. Every value of a sweep is judged
        on the calibration bank.
    beta : float, list of float, "auto" or "auto-range"
        UOT marginal relaxation; ``"auto"`` sweeps ``(1, 10, 100) x`` the same scale as ε (the spread,
        or the range when ``epsilon="auto-range"``); ``"auto-range"``: ``(0.1, 1.0) x`` the range.
    signature : {"prob_delta", "logit_delta", "margin_delta"} or tuple of them
        How effects are summarised (:mod:`pyvene_plot.localize`); a tuple is swept and chosen
        on the calibration bank like ε.
    top_k : tuple of int, optional
        Calibration grid of sites kept per variable; default ``(1, 2, 4, 8)`` clipped to the number
        of sites. An explicit value larger than the number of sites is an error.
    lambdas : tuple of float
        Calibration grid of strengths λ.
    seed : int
        Seeds torch/NumPy before the search (recorded in the result).
    sided : {"one", "two"}
        UOT: relax only the sites' marginal (default) or both.
    normalize : bool or tuple of bool
        L2-normalise signatures before the cost (direction only); a tuple is swept on calibration.
    min_effect : float
        Magnitude floor on a site's RMS effect per pair; sites below it get the worst cost.
    weight_norm : {"sum", "max"}
        How kept coupling weights are renormalised (see :mod:`pyvene_plot.localize`).
    selection : {"balanced", "iia", "sensitive"}
        Calibration criterion: mean of sensitive and invariant IIA (default), IIA over all pairs,
        or sensitive IIA only.

    Notes
    -----
    Ties. When coupling entries of a row tie (equal within a relative 1e-9), the site with the
    better full-swap score on the fit bank under ``selection`` (the score the free baseline ranks
    sites by) is kept first, then the earlier site in the candidate list; the same order is used
    by :meth:`AlignmentResult.ranking`. The free baseline takes the best full-swap score, exact
    ties going to the earlier site. Every result records each plan's row contrast (normalised
    entropy, max/median weight) in its trials and ``diagnostics["row_contrast"]``.
    alpha : float
        FGW trade-off.
    readout : Readout, optional
        Output -> class logits; default :class:`Readout()`.
    batch_size : int or "auto"
        Rows per forward pass (``"auto"``: sized from a memory budget, see :class:`InterchangeEngine`).
    progress : bool
        Show tqdm progress bars.
    """

    def __init__(
        self,
        method: str = "uot",
        epsilon: float | Sequence[float] | str = "auto",
        beta: float | Sequence[float] | str = "auto",
        signature: str = "prob_delta",
        top_k: Sequence[int] | None = None,
        lambdas: Sequence[float] = DEFAULT_LAMBDAS,
        seed: int = 0,
        sided: str = "one",
        normalize: bool = False,
        min_effect: float = 1e-3,
        weight_norm: str = "sum",
        selection: str = "balanced",
        alpha: float = 0.5,
        readout: Readout | None = None,
        batch_size: int | str = "auto",
        max_iter: int = 5000,
        tol: float = 1e-9,
        progress: bool = True,
    ) -> None:
        self.method = method
        self.epsilon = epsilon
        self.beta = beta
        self.signature = signature
        self.top_k = top_k
        self.lambdas = lambdas
        self.seed = seed
        self.sided = sided
        self.normalize = normalize
        self.min_effect = min_effect
        self.weight_norm = weight_norm
        self.selection = selection
        self.alpha = alpha
        self.readout = readout
        self.batch_size = batch_size
        self.max_iter = max_iter
        self.tol = tol
        self.progress = progress
        self._validate()

    # ------------------------------------------------------------------ params
    # get_params / set_params: ParamsMixin (derived from the __init__ signature)
    def params_dict(self) -> dict[str, Any]:
        """The parameters as recorded in :attr:`AlignmentResult.config`: JSON-ready, ``progress`` left out,
        the readout as :meth:`Readout.to_dict` (the default readout when none was given)."""
        p = {k: getattr(self, k) for k in _RECORDED_PARAMS}
        p["readout"] = (self.readout or Readout()).to_dict()
        return p

    def clone(self, **params: Any) -> "OTAlignmentSearcher":
        """A new searcher with these parameters and the others copied from this one."""
        return OTAlignmentSearcher(**{**self.get_params(), **params})

    def __repr__(self) -> str:
        return f"OTAlignmentSearcher(method={self.method!r}, epsilon={self.epsilon!r}, signature={self.signature!r})"

    def _validate(self) -> None:
        if self.method not in METHODS:
            raise PlotError(f"unknown method {self.method!r}; choose one of {METHODS}")
        for sig in self._signatures():
            if sig not in SIGNATURE_MODES:
                raise PlotError(f"unknown signature {sig!r}; choose one of {SIGNATURE_MODES}")
        for nz in self._normalizations():
            if not isinstance(nz, (bool, np.bool_)):
                raise PlotError(f"normalize must be a bool or a tuple of bools, got {self.normalize!r}")
        _grid(self.epsilon, "epsilon")
        if self.method == "uot":
            _grid(self.beta, "beta")
        if self.top_k is not None:
            ks = (self.top_k,) if np.isscalar(self.top_k) else tuple(self.top_k)
            if not ks or any(int(k) != k or k < 1 for k in ks):
                raise PlotError(f"top_k must be positive integers, got {self.top_k!r}")
        lam = _grid(self.lambdas, "lambdas")
        if isinstance(lam, str):
            raise PlotError("lambdas must be numbers")
        if self.selection not in SELECTION_RULES:
            raise PlotError(f"selection must be one of {SELECTION_RULES}, got {self.selection!r}")
        if self.weight_norm not in ("sum", "max"):
            raise PlotError(f"weight_norm must be 'sum' or 'max', got {self.weight_norm!r}")
        if self.sided not in ("one", "two"):
            raise PlotError(f"sided must be 'one' or 'two', got {self.sided!r}")
        if self.min_effect < 0:
            raise PlotError(f"min_effect must be >= 0, got {self.min_effect}")

    def _signatures(self) -> tuple[str, ...]:
        return (self.signature,) if isinstance(self.signature, str) else tuple(self.signature)

    def _normalizations(self) -> tuple[bool, ...]:
        return (self.normalize,) if isinstance(self.normalize, (bool, np.bool_)) else tuple(self.normalize)

    def _k_grid(self, n_sites: int) -> tuple[int, ...]:
        if self.top_k is None:
            return tuple(k for k in DEFAULT_TOP_K if k <= n_sites) or (1,)
        ks = (int(self.top_k),) if np.isscalar(self.top_k) else tuple(int(k) for k in self.top_k)
        if max(ks) > n_sites:
            raise PlotError(
                f"top-k {max(ks)} is larger than the number of candidate sites ({n_sites}); "
                f"use top_k values <= {n_sites}"
            )
        return ks

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        model: torch.nn.Module,
        sites: Sequence[Site],
        fit_bank: PairBank,
        calibration_bank: PairBank,
        variables: Sequence[str] | None = None,
        *,
        bases: Mapping[str, Any] | None = None,
        allowed: Mapping[str, Sequence[int]] | None = None,
        effects: SiteEffects | None = None,
    ) -> AlignmentResult:
        """Fit the coupling and calibrate one handle per variable.

        Parameters
        ----------
        model : torch.nn.Module
            A model pyvene can hook.
        sites : list of Site
            Candidate sites (columns).
        fit_bank : PairBank
            Signatures are measured here.
        calibration_bank : PairBank
            ε, β, top-k and λ are chosen here. Must be disjoint from any bank you report on.
        variables : list of str, optional
            Default: every variable of the fit bank.
        bases : dict, optional
            ``basis_id -> V`` (r, d) for span sites.
        allowed : dict of str to list of int, optional
            Per variable, the site indices it may use (progressive narrowing); the coupling is
            solved over all sites and each row is masked before calibration.
        effects : SiteEffects, optional
            Reuse a full-swap sweep of these sites on ``fit_bank`` (its runtime is charged again
            to this result so that timings stay honest).

        Returns
        -------
        AlignmentResult
        """
        t0 = time.perf_counter()
        self._validate()
        seed_everything(int(self.seed))
        setup = self._prepare_fit(model, sites, fit_bank, calibration_bank, variables, bases, allowed)
        sites, variables, bases_t, readout = setup.sites, setup.variables, setup.bases, setup.readout
        engine = InterchangeEngine(model, [s.unit for s in sites], readout, bases=bases_t, batch_size=self.batch_size)
        # ---- effects and signatures on the fit bank
        effects, sig_time = collect_effects(model, sites, fit_bank, variables, readout, bases_t, self.batch_size,
                                            self.progress, engine, effects)
        variants = cost_variants(fit_bank, variables, effects, self._signatures(), self._normalizations(),
                                 self.min_effect)
        fs = effects.full_swap_scores(fit_bank, variables)
        check_label_range(calibration_bank, effects)
        baseline = baseline_handles(model, sites, variables, fs, allowed, self.selection, readout, bases_t)
        # ---- sweep over (signature, normalize, epsilon, beta), judged on calibration only
        sweep = self._sweep(setup, variants, fs, engine, calibration_bank)
        return self._build_result(model, setup, effects, variants, fs, baseline, sweep, fit_bank, calibration_bank,
                                  timings={"t0": t0, "signature_runtime_s": sig_time})

    def _prepare_fit(self, model, sites, fit_bank, calibration_bank, variables, bases, allowed) -> FitSetup:
        """Validate the fit's inputs and resolve variables, bases, grids and readout (step 1 of :meth:`fit`)."""
        sites = list(sites)
        variables = list(variables) if variables is not None else list(fit_bank.variables)
        if not variables:
            raise BankError("no variables to localise")
        check_banks_localisable(fit_bank, calibration_bank, variables)
        sites, bases_t = prepare_sites(model, sites, bases)
        n_support = check_allowed(allowed, variables, len(sites))
        k_grid = self._k_grid(len(sites))
        if self.top_k is not None and allowed and max(k_grid) > n_support:
            raise PlotError(f"top-k {max(k_grid)} is larger than the {n_support} sites a variable may use")
        lambdas = lambda_order(_grid(self.lambdas, "lambdas"))
        readout = self.readout or getattr(fit_bank, "readout", None) or Readout()
        return FitSetup(sites, variables, bases_t, allowed, k_grid, lambdas, readout)

    def _sweep(self, setup: FitSetup, variants: list[CostVariant], fs: dict, engine: InterchangeEngine,
               calibration_bank: PairBank) -> SweepOutcome:
        """Solve the transport for every (signature, normalize, ε, β) and calibrate each plan.

        Every setting is judged by its mean calibration score; the first best one (ties within
        1e-12 keep the earlier setting) is selected. A failed solve is recorded, not fatal, unless
        every setting fails.
        """
        from tqdm.auto import tqdm

        variables = setup.variables
        cache = BankCache(engine, calibration_bank)
        sweep = SweepOutcome([], None, 0.0, 0.0)
        bf_scores = np.stack([np.nan_to_num(fs[v]["balanced"], nan=0.0) for v in variables])
        tiebreak = {v: np.asarray(fs[v][self.selection], dtype=np.float64) for v in variables}
        supports = None if not setup.allowed else [setup.allowed.get(v) for v in variables]
        configs = []
        for vi, var in enumerate(variants):
            scales = self._scales(var)
            configs += [(vi, e, b, scales) for e in self._epsilon_grid(scales) for b in self._beta_grid(scales)]
        bar = tqdm(configs, desc=f"PLOT {self.method}", leave=False, disable=not self.progress)
        for vi, eps, beta, scales in bar:
            var = variants[vi]
            rec: dict[str, Any] = {"signature": var.signature, "normalize": var.normalize, "epsilon": eps,
                                   "beta": beta, **scales}
            ts = time.perf_counter()
            try:
                plan = solve_transport(
                    var.C, self.method, eps, beta, sided=self.sided, max_iter=self.max_iter, tol=self.tol,
                    A_sig=var.A, N_sig=var.N, scores=bf_scores, alpha=self.alpha,
                )
            except TransportError as exc:
                rec["failed"] = str(exc)
                sweep.solve_s += time.perf_counter() - ts
                sweep.trials.append(rec)
                logger.info("trial %s eps=%.3g beta=%s failed: %s", var.signature, eps, beta, exc)
                continue
            sweep.solve_s += time.perf_counter() - ts
            rec.update(plan.diagnostics())
            contrast = row_contrast(plan.coupling, supports)
            rec["row_contrast"] = {v: {k: contrast[k][r] for k in contrast} for r, v in enumerate(variables)}
            tc = time.perf_counter()
            chosen, all_cands = calibrate_plan(plan.coupling, setup, engine, cache, self.weight_norm, self.selection,
                                               tiebreak)
            sweep.calibration_s += time.perf_counter() - tc
            rec["calibration"] = {v: {"k": c.k, "strength": c.strength, **c.scores} for v, c in chosen.items()}
            rec["score"] = float(np.mean([chosen[v].scores[self.selection] for v in variables]))
            sweep.trials.append(rec)
            if sweep.best is None or rec["score"] > sweep.best[0]["score"] + 1e-12:
                sweep.best = (rec, plan, chosen, all_cands, vi)
        bar.close()
        if sweep.best is None:
            reasons = "; ".join(t.get("failed", "") for t in sweep.trials[:3])
            raise TransportError(
                f"every transport configuration failed ({len(sweep.trials)} tried). First reasons: {reasons}"
            )
        return sweep

    def _build_result(self, model, setup: FitSetup, effects: SiteEffects, variants: list[CostVariant], fs: dict,
                      baseline: dict, sweep: SweepOutcome, fit_bank: PairBank, calibration_bank: PairBank,
                      timings: dict) -> AlignmentResult:
        """Handles of the selected setting, diagnostics and the :class:`AlignmentResult` (last step of :meth:`fit`)."""
        rec, plan, chosen, all_cands, vi = sweep.best
        var = variants[vi]
        scales = {k: rec[k] for k in ("cost_range", "cost_spread", "row_range")}
        _warn_if_uninformative(rec)
        sites, variables, bases_t = setup.sites, setup.variables, setup.bases
        handles, calib = calibrated_handles(model, sites, variables, chosen, all_cands, setup.readout, bases_t)
        runtime = time.perf_counter() - timings["t0"]
        grids = {
            "signature_grid": list(self._signatures()),
            "normalize_grid": list(self._normalizations()),
            "epsilon_grid": list(self._epsilon_grid(scales)),
            "beta_grid": list(self._beta_grid(scales)),
            "top_k_grid": list(setup.k_grid),
            "lambda_grid": list(setup.lambdas),
        }
        diagnostics = fit_diagnostics(
            effects=effects, sites=sites, variables=variables, variant=var, full_swap=fs, grids=grids,
            timings={"signature_runtime_s": timings["signature_runtime_s"], "solve_runtime_s": sweep.solve_s,
                     "calibration_runtime_s": sweep.calibration_s},
            fit_bank=fit_bank, calibration_bank=calibration_bank, trials=sweep.trials, selected=rec,
        )
        result = AlignmentResult(
            variables=variables, sites=sites, coupling=plan.coupling, cost=var.C, handles=handles, baseline=baseline,
            runtime_s=runtime, method=self.method, epsilon=plan.epsilon, beta=plan.beta, signature=var.signature,
            trials=sweep.trials, calibration=calib, diagnostics=diagnostics, config=self.params_dict(),
            bases={k: v.numpy() for k, v in bases_t.items()}, model=model,
        )
        logger.info("%r", result)
        return result

    def _scales(self, variant: CostVariant) -> dict[str, Any]:
        """The cost's range and spread (floored sites left out of the spread) and which one ε uses."""
        C = variant.C
        return {"cost_range": float(C.max() - C.min()), "cost_spread": cost_spread(C, exclude=variant.floored),
                "row_range": float((C.max(1) - C.min(1)).max()),
                "epsilon_scale": "range" if self.epsilon == "auto-range" else "spread"}

    def _epsilon_grid(self, scales: Mapping[str, Any]) -> tuple[float, ...]:
        g = _grid(self.epsilon, "epsilon")
        if g not in _AUTO_MODES:
            return g
        if self.method in AUTO_EPSILON_FIXED:
            return AUTO_EPSILON_FIXED[self.method]
        if g == "auto-range":
            return tuple(f * _positive(scales["cost_range"]) for f in AUTO_RANGE_EPSILON_FACTORS)
        # never below (largest within-row range) / AUTO_EPSILON_MIN_RANGE_RATIO: there POT's kernel
        # exp(-C/ε) underflows for far-off columns and its scaling iterations stop
        floor = _positive(scales["row_range"]) / AUTO_EPSILON_MIN_RANGE_RATIO
        grid = (max(f * _positive(scales["cost_spread"]), floor) for f in AUTO_EPSILON_FACTORS)
        return tuple(dict.fromkeys(grid))

    def _beta_grid(self, scales: Mapping[str, Any]) -> tuple:
        if self.method != "uot":
            return (None,)
        g = _grid(self.beta, "beta")
        if g not in _AUTO_MODES:
            return g
        if g == "auto-range" or self.epsilon == "auto-range":
            return tuple(f * _positive(scales["cost_range"]) for f in AUTO_RANGE_BETA_FACTORS)
        return tuple(f * _positive(scales["cost_spread"]) for f in AUTO_BETA_FACTORS)


def _positive(scale: float) -> float:
    return scale if scale > 0 else 1.0


def _warn_if_uninformative(rec: Mapping[str, Any]) -> None:
    """Log a warning naming the rows of the selected plan that are nearly flat (max/median < 1.2)."""
    contrast = rec.get("row_contrast") or {}
    flat = {v: c["max_over_median"] for v, c in contrast.items() if c["max_over_median"] < UNINFORMATIVE_ROW_CONTRAST}
    if flat:
        logger.warning(
            "the selected transport plan is nearly uniform for %s (max/median row weight < %.1f): transport "
            "barely informs these handles, which then rest on calibration alone. Try a smaller epsilon "
            "(epsilon='auto' scales it to the cost spread), a smaller beta for uot, normalize=(False, True) "
            "or another signature (e.g. a tuple of modes, swept on calibration)",
            ", ".join(f"{v} ({r:.3g})" for v, r in flat.items()), UNINFORMATIVE_ROW_CONTRAST,
        )
