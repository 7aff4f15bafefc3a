"""Site screeners for progressive stages: Δ_mean (no training) and Δ_opt (``Stage(..., screen="oa")``).

Importing this module registers both screeners (``"mean"`` and ``"oa"``) with
:func:`~pyvene_plot.register_screener`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ...data import PairBank
from ...models import Readout, Site
from ...progressive import ScreenResult, register_screener
from ._fit import optimal_ablation

#: default screening rule: a site is dropped only if its score is below BOTH this absolute level
#: (nats for the KL loss) ...
SCREEN_ABS_TOL = 1e-4
#: ... AND this fraction of the largest score among the candidates
SCREEN_REL_TOL = 1e-2


def _screen_threshold(scores: Sequence[float], threshold: float | None) -> tuple[float, str]:
    """The drop threshold and its rule: ``threshold`` if given, else ``min(SCREEN_ABS_TOL, SCREEN_REL_TOL x max)``."""
    finite = [s for s in scores if s is not None and np.isfinite(s)]
    if threshold is not None:
        return float(threshold), f"drop if score <= {float(threshold):g} (given)"
    top = max(finite) if finite else 0.0
    tau = min(SCREEN_ABS_TOL, SCREEN_REL_TOL * top)
    return float(tau), (f"drop if score <= min({SCREEN_ABS_TOL:g}, {SCREEN_REL_TOL:g} x max score "
                        f"{top:.4g}) = {tau:.4g}")


def screen_mean(
    model: torch.nn.Module,
    sites: Sequence[Site],
    bank: PairBank,
    *,
    variables: Sequence[str] | None = None,
    threshold: float | None = None,
    readout: Readout | None = None,
    bases: Mapping[str, Any] | None = None,
    seed: int = 0,
    **options: Any,
):
    """Screen sites by their mean-ablation gap Δ_mean (no training: one evaluation pass).

    Δ_mean is an upper bound of Δ_opt, so a site dropped here would also be dropped by OA; but
    Δ_mean can be large for sites that do not matter (spoofing: the mean is off-distribution), so
    this screener keeps more than :func:`screen_oa`. Returns a
    :class:`~pyvene_plot.progressive.ScreenResult`.
    """

    opts = {"steps": 0, "baselines": ("mean",), "seed": seed, **options}
    res = optimal_ablation(model, list(sites), bank, readout=readout, bases=bases, progress=False, **opts)
    scores = [float(r["delta_mean"]) for r in res.records]
    tau, rule = _screen_threshold(scores, threshold)
    keep = [s > tau for s in scores]
    return ScreenResult(scores=scores, keep=keep, threshold=tau, rule=rule,
                        info={"score": "delta_mean", "loss": res.config["loss"], "evaluated_on": res.evaluated_on,
                              "runtime_s": res.runtime_s})


def screen_oa(
    model: torch.nn.Module,
    sites: Sequence[Site],
    bank: PairBank,
    *,
    variables: Sequence[str] | None = None,
    threshold: float | None = None,
    readout: Readout | None = None,
    bases: Mapping[str, Any] | None = None,
    seed: int = 0,
    **options: Any,
):
    """Screen sites by their optimal-ablation gap Δ_opt, fitting OA only where it can matter.

    1. Δ_mean of every site (one evaluation pass, no training).
    2. Sites with Δ_mean <= the absolute tolerance (``threshold`` if given, else
       ``SCREEN_ABS_TOL``) cannot pass the threshold (Δ_opt <= Δ_mean): dropped without fitting.
    3. OA is fitted on the shortlist; the threshold is ``min(SCREEN_ABS_TOL, SCREEN_REL_TOL x
       max Δ_opt)`` unless given. Pre-screened sites whose Δ_mean exceeds that final threshold
       are fitted too (a second round), so the decision equals fitting OA everywhere.

    A site is dropped iff its score is <= the threshold. Scores are Δ_opt for fitted sites and
    Δ_mean (an upper bound) for pre-screened ones. Returns a
    :class:`~pyvene_plot.progressive.ScreenResult`.
    """

    sites = list(sites)
    base_opts = {"seed": seed, **options}
    pre = optimal_ablation(model, sites, bank, readout=readout, bases=bases, progress=False,
                           **{**base_opts, "steps": 0, "baselines": ("mean",)})
    dmean = [float(r["delta_mean"]) for r in pre.records]
    abs_tol = float(threshold) if threshold is not None else SCREEN_ABS_TOL
    scores = list(dmean)
    fitted = [False] * len(sites)
    n_fits = 0

    def fit(idx: list[int]) -> None:
        nonlocal n_fits
        if not idx:
            return
        res = optimal_ablation(model, [sites[i] for i in idx], bank, readout=readout, bases=bases, progress=False,
                               **{**base_opts, "baselines": ()})
        n_fits += len(idx)
        for i, r in zip(idx, res.records):
            scores[i] = float(r["delta_opt"])
            fitted[i] = True

    fit([i for i, s in enumerate(dmean) if s > abs_tol])
    tau, rule = _screen_threshold([s for s, f in zip(scores, fitted) if f] or scores, threshold)
    fit([i for i, s in enumerate(dmean) if not fitted[i] and s > tau])
    tau, rule = _screen_threshold([s for s, f in zip(scores, fitted) if f] or scores, threshold)
    keep = [s > tau for s in scores]
    return ScreenResult(scores=scores, keep=keep, threshold=tau, rule=rule,
                        info={"score": "delta_opt (delta_mean where not fitted)", "loss": pre.config["loss"],
                              "n_prescreened": len(sites) - n_fits, "n_fitted": n_fits,
                              "evaluated_on": pre.evaluated_on})


register_screener("oa", screen_oa, overwrite=True)
register_screener("mean", screen_mean, overwrite=True)
