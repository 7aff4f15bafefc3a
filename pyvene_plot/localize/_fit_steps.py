"""Named steps of :meth:`OTAlignmentSearcher.fit`: check the inputs, collect effects and costs, the
free baseline, the calibrated handles and the diagnostics of the selected configuration.

The searcher (:mod:`pyvene_plot.localize`) runs them in this order::

    check_banks_localisable -> prepare_sites -> check_allowed          (validate)
    collect_effects -> cost_variants -> check_label_range               (effects and signatures)
    baseline_handles                                                    (free single-site baseline)
    [sweep: solve_transport + calibration per (signature, normalize, ε, β)]
    calibrated_handles -> fit_diagnostics                               (build the result)

Every function here is pure bookkeeping around the engine, signature and transport modules; none
draws random numbers, so the order of the searcher's RNG draws is the one of the steps it calls.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from ..data import PairBank
from ..errors import BankError, PlotError, SiteError
from ..models import Readout, Site, validate_sites
from ._calibration import BankCache, score_candidates, truncate_row
from ._engine import InterchangeEngine
from ._handles import Handle
from ._metrics import Candidate, select
from ._signatures import (
    SiteEffects,
    abstract_signatures,
    collect_site_effects,
    cost_matrix,
    neural_signatures,
)


class CostVariant(NamedTuple):
    """One (signature mode, normalisation) setting of the sweep and the cost it gives.

    Attributes
    ----------
    signature : str
    normalize : bool
    A : ndarray, shape (V, N * K)
        Abstract signatures.
    N : ndarray, shape (S, N * K)
        Neural signatures.
    C : ndarray, shape (V, S)
        Cost matrix.
    magnitude : ndarray, shape (S,)
        RMS effect per pair of each site.
    floored : ndarray of bool, shape (S,)
        Sites below the magnitude floor (given the worst cost).
    """

    signature: str
    normalize: bool
    A: np.ndarray
    N: np.ndarray
    C: np.ndarray
    magnitude: np.ndarray
    floored: np.ndarray


@dataclasses.dataclass
class FitSetup:
    """Validated inputs of one :meth:`OTAlignmentSearcher.fit` call.

    Attributes
    ----------
    sites : list of Site
        Candidate sites (columns).
    variables : list of str
        Variables to localise (rows).
    bases : dict of str to Tensor, shape (r, d)
        Span bases, float32.
    allowed : dict of str to list of int, optional
        Per-variable supports.
    k_grid : tuple of int
        Calibration grid of sites kept per variable.
    lambdas : list of float
        Calibration grid of strengths, in tie-break order.
    readout : Readout
    """

    sites: list[Site]
    variables: list[str]
    bases: dict[str, torch.Tensor]
    allowed: Mapping[str, Sequence[int]] | None
    k_grid: tuple[int, ...]
    lambdas: list[float]
    readout: Readout


@dataclasses.dataclass
class SweepOutcome:
    """What the (signature, normalize, ε, β) sweep of :meth:`OTAlignmentSearcher.fit` produced.

    Attributes
    ----------
    trials : list of dict
        One record per setting tried (failed ones carry ``"failed"``).
    best : tuple or None
        ``(trial record, TransportPlan, chosen candidates, all candidates, variant index)`` of the
        selected setting.
    solve_s, calibration_s : float
        Wall time spent in transport solves and in calibration.
    """

    trials: list[dict]
    best: tuple | None
    solve_s: float
    calibration_s: float


def check_banks_localisable(fit_bank: PairBank, calibration_bank: PairBank, variables: Sequence[str]) -> None:
    """Raise :class:`BankError` unless both banks hold every variable with at least one changed pair."""
    for bank in (fit_bank, calibration_bank):
        bank.check_variables(variables)
        for v in variables:
            if not bool(bank.changed(v).any()):
                raise BankError(
                    f"bank {bank.name!r} has no pair where interchanging {v!r} changes the output; "
                    "the variable cannot be localised or calibrated on it — add such pairs (e.g. "
                    "PairBank.from_causal_model(..., balance=True))"
                )


def prepare_sites(
    model: torch.nn.Module, sites: Sequence[Site], bases: Mapping[str, Any] | None
) -> tuple[list[Site], dict[str, torch.Tensor]]:
    """Validate the candidate sites against the model and turn the span bases into float32 tensors.

    Returns
    -------
    sites : list of Site
    bases : dict of str to Tensor, shape (r, d)
    """
    sites = list(sites)
    bases_t = {k: torch.as_tensor(np.asarray(v), dtype=torch.float32) for k, v in (bases or {}).items()}
    validate_sites(model, sites, {k: int(v.shape[0]) for k, v in bases_t.items()})
    if len(set(sites)) != len(sites):
        raise SiteError("candidate sites contain duplicates")
    return sites, bases_t


def check_allowed(allowed: Mapping[str, Sequence[int]] | None, variables: Sequence[str], n_sites: int) -> int:
    """Validate the per-variable supports; return the smallest support size (``n_sites`` if None)."""
    if allowed is not None:
        for v, idx in allowed.items():
            if v not in variables:
                raise PlotError(f"allowed names unknown variable {v!r}")
            if len(idx) == 0:
                raise SiteError(f"empty support for variable {v!r}: no allowed sites")
            if min(idx) < 0 or max(idx) >= n_sites:
                raise SiteError(f"allowed site index out of range for {v!r}")
    return min(len(allowed[v]) for v in variables) if allowed else n_sites


def collect_effects(
    model: torch.nn.Module,
    sites: list[Site],
    fit_bank: PairBank,
    variables: list[str],
    readout: Readout,
    bases: dict[str, torch.Tensor],
    batch_size: int | str,
    progress: bool,
    engine: InterchangeEngine,
    effects: SiteEffects | None,
) -> tuple[SiteEffects, float]:
    """Full-swap effects of every site on the fit bank (or the given ``effects``) and their runtime.

    A reused ``effects`` must be for the same sites; its own runtime is charged again.
    """
    t_sig = time.perf_counter()
    if effects is None:
        effects = collect_site_effects(model, sites, fit_bank, variables, readout, bases, batch_size,
                                       progress, engine=engine)
        return effects, time.perf_counter() - t_sig
    if [s for s in effects.sites] != sites:
        raise PlotError("effects were collected for different sites")
    return effects, effects.runtime_s


def cost_variants(
    fit_bank: PairBank,
    variables: list[str],
    effects: SiteEffects,
    signatures: Sequence[str],
    normalizations: Sequence[bool],
    min_effect: float,
) -> list[CostVariant]:
    """One :class:`CostVariant` per (signature, normalize), signatures outermost."""
    variants = []
    for sig in signatures:
        A = abstract_signatures(fit_bank, variables, effects.label_set, sig)
        Ns = neural_signatures(effects, sig)
        for nz in normalizations:
            C, magnitude, floored = cost_matrix(A, Ns, len(fit_bank), bool(nz), min_effect)
            variants.append(CostVariant(sig, bool(nz), A, Ns, C, magnitude, floored))
    return variants


def check_label_range(calibration_bank: PairBank, effects: SiteEffects) -> None:
    """Raise :class:`BankError` if the calibration bank holds a label the readout cannot produce."""
    n_classes = int(effects.base_logits.shape[1])
    if calibration_bank.max_label() >= n_classes:
        raise BankError(
            f"bank {calibration_bank.name!r} holds label {calibration_bank.max_label()} but the readout "
            f"gives {n_classes} classes; labels must index the model's output classes"
        )


def bases_np(bases: Mapping[str, torch.Tensor], sites: Sequence[Site]) -> dict[str, np.ndarray]:
    """The bases the span sites among ``sites`` use, as NumPy arrays (what a :class:`Handle` stores)."""
    return {s.basis: bases[s.basis].numpy() for s in sites if s.basis is not None}


def baseline_handles(
    model: torch.nn.Module,
    sites: list[Site],
    variables: list[str],
    full_swap: Mapping[str, Mapping[str, np.ndarray]],
    allowed: Mapping[str, Sequence[int]] | None,
    selection: str,
    readout: Readout,
    bases: Mapping[str, torch.Tensor],
) -> dict[str, Handle]:
    """The free baseline: per variable, the allowed site with the best full-swap score on the fit bank.

    ``full_swap[v][rule]`` holds one score per site (shape (S,)); NaN scores count as -1. Exact ties
    go to the earlier site (the first maximum).
    """
    baseline = {}
    for v in variables:
        cand = np.arange(len(sites)) if not allowed else np.asarray(sorted(allowed[v]))
        sc = np.nan_to_num(full_swap[v][selection if selection != "sensitive" else "sensitive"][cand], nan=-1)
        best = int(cand[int(np.argmax(sc))])
        baseline[v] = Handle(v, [sites[best]], [1.0], 1.0, readout, bases_np(bases, [sites[best]]),
                             meta={"fit_full_swap": {k: float(full_swap[v][k][best]) for k in full_swap[v]}},
                             model=model)
    return baseline


def calibrated_handles(
    model: torch.nn.Module,
    sites: list[Site],
    variables: list[str],
    chosen: Mapping[str, Candidate],
    all_cands: Mapping[str, list[Candidate]],
    readout: Readout,
    bases: Mapping[str, torch.Tensor],
) -> tuple[dict[str, Handle], dict[str, dict]]:
    """The selected candidate of every variable as a :class:`Handle`, and its calibration record."""
    handles = {}
    calib = {}
    for v in variables:
        c = chosen[v]
        hs = [sites[i] for i in c.indices]
        handles[v] = Handle(v, hs, c.weights, c.strength, readout, bases_np(bases, hs),
                            meta={"k": c.k, "calibration": c.scores}, model=model)
        calib[v] = {
            "k": c.k, "strength": c.strength, "sites": [s.label for s in hs], "weights": c.weights,
            "scores": c.scores,
            "candidates": [{"k": a.k, "strength": a.strength, **a.scores} for a in all_cands[v]],
        }
    return handles, calib


def fit_diagnostics(
    *,
    effects: SiteEffects,
    sites: list[Site],
    variables: list[str],
    variant: CostVariant,
    full_swap: Mapping[str, Mapping[str, np.ndarray]],
    grids: Mapping[str, list],
    timings: Mapping[str, float],
    fit_bank: PairBank,
    calibration_bank: PairBank,
    trials: list[dict],
    selected: dict,
) -> dict:
    """The ``diagnostics`` dict of an :class:`AlignmentResult` (keys in their historical order).

    ``grids`` holds ``signature_grid, normalize_grid, epsilon_grid, beta_grid, top_k_grid,
    lambda_grid``; ``timings`` holds ``signature_runtime_s, solve_runtime_s, calibration_runtime_s``.
    """
    sig_time = timings["signature_runtime_s"]
    return {
        "label_set": effects.label_set,
        "n_sites": len(sites),
        "n_sites_evaluated": len(sites),
        "signature_runtime_s": sig_time,
        "signature_per_site_s": sig_time / max(1, len(sites)),
        "solve_runtime_s": timings["solve_runtime_s"],
        "calibration_runtime_s": timings["calibration_runtime_s"],
        "cost_range": selected["cost_range"],
        "cost_spread": selected.get("cost_spread"),
        "epsilon_scale": selected.get("epsilon_scale"),
        "row_contrast": selected.get("row_contrast"),
        **{k: grids[k] for k in ("signature_grid", "normalize_grid", "epsilon_grid", "beta_grid", "top_k_grid",
                                 "lambda_grid")},
        "site_magnitude": variant.magnitude.tolist(),
        "floored_sites": [sites[i].label for i in np.flatnonzero(variant.floored)],
        "fit_full_swap": {v: {k: np.asarray(a).tolist() for k, a in full_swap[v].items()} for v in variables},
        "banks": {"fit": fit_bank.summary(), "calibration": calibration_bank.summary()},
        "n_trials": len(trials),
        "n_failed_trials": sum(1 for t in trials if "failed" in t),
        "selected_trial": selected,
    }


def calibrate_plan(
    P: np.ndarray,
    setup: FitSetup,
    engine: InterchangeEngine,
    cache: BankCache,
    weight_norm: str,
    selection: str,
    tiebreak: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict[str, Candidate], dict[str, list[Candidate]]]:
    """Score every (top-k, λ) truncation of each coupling row on the calibration bank and select one.

    Parameters
    ----------
    P : ndarray, shape (V, S)
        Coupling, rows in ``setup.variables`` order.
    setup : FitSetup
        Sites, variables, supports and the k / λ grids.
    engine, cache
        Interchange engine and the calibration bank's cached activations.
    weight_norm : {"sum", "max"}
    selection : str
        Rule of :func:`select`.
    tiebreak : dict of str to ndarray, shape (S,), optional
        Per variable, the score that orders (near-)tied coupling entries (higher first; then the
        earlier site), see :func:`truncate_row`. The searcher passes the fit-bank full-swap score.

    Returns
    -------
    chosen : dict of str to Candidate
    candidates : dict of str to list of Candidate
        Every distinct truncation x λ per variable, in grid order.
    """
    allowed = setup.allowed
    cands: dict[str, list[Candidate]] = {}
    flat: list[Candidate] = []
    for r, v in enumerate(setup.variables):
        seen = set()
        lst = []
        for k in setup.k_grid:
            idx, w = truncate_row(P[r], k, weight_norm, None if allowed is None else allowed.get(v),
                                  None if tiebreak is None else tiebreak[v])
            key = (tuple(idx), tuple(np.round(w, 12)))
            if key in seen:
                continue
            seen.add(key)
            for lam in setup.lambdas:
                lst.append(Candidate(v, len(idx), lam, idx, w))
        cands[v] = lst
        flat.extend(lst)
    score_candidates(engine, cache, setup.sites, flat)
    chosen = {v: select(cands[v], selection) for v in setup.variables}
    return chosen, cands
