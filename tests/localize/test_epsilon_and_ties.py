"""Issue 12: ε scaled to the cost spread, row-contrast diagnostics, and the coupling tie-break.

* ``epsilon="auto"`` is a grid of factors times :func:`cost_spread` (pooled MAD of the row-centred
  cost): x10 on the cost gives x10 on the grid, a constant shift leaves it alone; ``"auto-range"``
  keeps the old range-scaled grid.
* On a cost with one far-off column (as the magnitude floor makes), the range-scaled grid only gives
  near-flat rows while the spread-scaled grid reaches plans whose best site holds most of the row.
* Row contrast (normalised entropy, max/median) against hand computations, and in a fitted result.
* Ties: near-equal coupling entries are ordered by the fit-bank full-swap score, then site order.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import ot
import pytest

import pyvene_plot as pp
from pyvene_plot.localize import (
    AUTO_BETA_FACTORS,
    AUTO_EPSILON_FACTORS,
    AUTO_RANGE_BETA_FACTORS,
    AUTO_RANGE_EPSILON_FACTORS,
    ROW_CONTRAST_CAP,
    cost_spread,
    rank_sites,
    row_contrast,
    solve_transport,
    truncate_row,
)
from pyvene_plot.localize._fit_steps import CostVariant
from pyvene_plot.localize._search import _warn_if_uninformative
from pyvene_plot.localize._transport import _uot_log


def _outlier_cost(seed: int = 0) -> np.ndarray:
    """2 variables x 30 sites: costs in [1, 1.05], each row's best site 0.05 lower, one column at 100."""
    rng = np.random.default_rng(seed)
    C = 1.0 + 0.05 * rng.random((2, 30))
    C[0, 3], C[1, 7] = 0.95, 0.95
    C[:, 29] = 100.0
    return C


def _variant(C: np.ndarray, floored: np.ndarray | None = None) -> CostVariant:
    S = C.shape[1]
    fl = np.zeros(S, dtype=bool) if floored is None else floored
    return CostVariant("prob_delta", False, np.ones((C.shape[0], 2)), np.ones((S, 2)), C, np.ones(S), fl)


def _grids(searcher: pp.OTAlignmentSearcher, C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scales = searcher._scales(_variant(C))
    return np.asarray(searcher._epsilon_grid(scales)), np.asarray(searcher._beta_grid(scales))


# ------------------------------------------------------------------------------ scale
def test_cost_spread_is_the_pooled_mad_of_row_centred_costs():
    C = np.array([[0.0, 1.0, 2.0, 10.0], [5.0, 5.0, 7.0, 9.0]])
    # row medians 1.5 and 6; |C - med| = [1.5, .5, .5, 8.5, 1, 1, 1, 3] -> median 1.0
    assert cost_spread(C) == pytest.approx(1.4826 * 1.0)
    # the far-off column is what sets the range; leaving it out (a floored site) changes the spread only
    # through the remaining entries: medians 1 and 5, deviations [1, 0, 1, 0, 0, 2] -> median 0.5
    assert cost_spread(C, exclude=np.array([False, False, False, True])) == pytest.approx(1.4826 * 0.5)
    # fallbacks: MAD 0 -> pooled within-row std; constant cost -> 1
    D = np.array([[0.0, 0.0, 0.0, 4.0]])
    assert cost_spread(D) == pytest.approx(math.sqrt(np.var(D[0])))
    assert cost_spread(np.full((2, 3), 7.0)) == 1.0


def test_auto_grid_scales_with_the_cost_spread_not_its_offset():
    C = _outlier_cost()
    s = pp.OTAlignmentSearcher(method="uot")
    eps, beta = _grids(s, C)
    np.testing.assert_allclose(eps, np.asarray(AUTO_EPSILON_FACTORS) * cost_spread(C))
    np.testing.assert_allclose(beta, np.asarray(AUTO_BETA_FACTORS) * cost_spread(C))
    eps10, beta10 = _grids(s, 10.0 * C)
    np.testing.assert_allclose(eps10, 10.0 * eps, rtol=1e-12)
    np.testing.assert_allclose(beta10, 10.0 * beta, rtol=1e-12)
    eps_shift, beta_shift = _grids(s, C + 3.0)
    np.testing.assert_allclose(eps_shift, eps, rtol=1e-9)
    np.testing.assert_allclose(beta_shift, beta, rtol=1e-9)
    # a per-row shift (which leaves one-sided UOT plans unchanged) leaves the grid unchanged too
    np.testing.assert_allclose(_grids(s, C + np.array([[0.0], [5.0]]))[0], eps, rtol=1e-9)
    # the spread is far below the range here: the outlier column sets the range
    assert cost_spread(C) < 0.01 * (C.max() - C.min())


def test_auto_range_keeps_the_old_grids():
    C = _outlier_cost()
    rng_ = C.max() - C.min()
    eps, beta = _grids(pp.OTAlignmentSearcher(method="uot", epsilon="auto-range"), C)
    np.testing.assert_allclose(eps, np.asarray(AUTO_RANGE_EPSILON_FACTORS) * rng_)
    np.testing.assert_allclose(beta, np.asarray(AUTO_RANGE_BETA_FACTORS) * rng_)  # beta="auto" follows ε
    _, beta2 = _grids(pp.OTAlignmentSearcher(method="uot", beta="auto-range"), C)
    np.testing.assert_allclose(beta2, np.asarray(AUTO_RANGE_BETA_FACTORS) * rng_)
    with pytest.raises(pp.PlotError, match="auto-range"):
        pp.OTAlignmentSearcher(epsilon="automatic")


@pytest.mark.parametrize("method", ["uot", "ot"])
def test_range_grid_gives_flat_rows_spread_grid_reaches_the_best_site(method):
    C = _outlier_cost()
    best = [3, 7]
    old_eps, old_beta = _grids(pp.OTAlignmentSearcher(method=method, epsilon="auto-range"), C)
    for e in old_eps:
        for b in old_beta:
            P = solve_transport(C, method, e, b).coupling
            assert max(row_contrast(P)["max_over_median"]) < 1.2  # transport barely informs the rows
    new_eps, new_beta = _grids(pp.OTAlignmentSearcher(method=method), C)
    P = solve_transport(C, method, new_eps[0], new_beta[0]).coupling  # smallest ε and β of the grid
    R = P / P.sum(1, keepdims=True)
    if method == "uot":  # each row gives most of its mass to its own best site
        for r, j in enumerate(best):
            assert int(np.argmax(R[r])) == j and R[r, j] > 0.5  # most of the row
    else:  # balanced OT caps each site at 1/30 of the mass, so a row fills 15 sites: best first among them
        for r, j in enumerate(best):
            assert R[r, j] == pytest.approx(R[r].max())
            assert np.sort(R[r])[-15] > 0.99 / 15 and np.sort(R[r])[-16] < 1e-3
            assert row_contrast(P)["max_over_median"][r] > 1.9
    # the largest ε of the new grid is smooth again (the sweep spans hard to soft plans)
    P_soft = solve_transport(C, method, new_eps[-1], new_beta[-1]).coupling
    hard, soft = row_contrast(P), row_contrast(P_soft)
    assert all(s > h + 0.05 for s, h in zip(soft["entropy"], hard["entropy"]))
    if method == "uot":
        assert min(soft["entropy"]) > 0.5 > max(hard["entropy"])


def test_uot_small_epsilon_is_stable_in_the_log_domain():
    C = _outlier_cost()
    C = C - C.min(1, keepdims=True)
    a, b = ot.unif(2), ot.unif(30)
    eps = 0.01 * cost_spread(C)  # exp(-100/eps) underflows: POT's own iteration stops with NaNs
    plan = solve_transport(C, "uot", eps, 0.1 * cost_spread(C))
    assert np.all(np.isfinite(plan.coupling)) and plan.converged
    np.testing.assert_allclose(plan.coupling.sum(1), a, atol=1e-9)
    # where POT is stable, the log-domain iteration reaches POT's fixed point
    for reg_m in [(float("inf"), 0.3), (0.3, 0.3)]:
        want = ot.unbalanced.sinkhorn_unbalanced(a, b, C, reg=0.5, reg_m=reg_m, reg_type="entropy",
                                                 numItermax=20000, stopThr=1e-13)
        got = _uot_log(a, b, C, 0.5, reg_m, 20000, 1e-13, None)[0]
        np.testing.assert_allclose(got, want, atol=1e-12)


# ------------------------------------------------------------------------------ contrast
def test_row_contrast_by_hand():
    P = np.array([[0.3, 0.1, 0.1], [0.2, 0.2, 0.2], [0.5, 0.0, 0.0]])
    c = row_contrast(P)
    h0 = -(0.6 * math.log(0.6) + 2 * 0.2 * math.log(0.2)) / math.log(3)
    assert c["entropy"] == pytest.approx([h0, 1.0, 0.0])
    assert c["max_over_median"] == pytest.approx([3.0, 1.0, ROW_CONTRAST_CAP])
    # per-row supports (progressive masking): row 0 over sites {0, 1} -> [0.75, 0.25]
    c = row_contrast(P, supports=[[0, 1], None, [0]])
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2)
    assert c["entropy"] == pytest.approx([h, 1.0, 0.0])
    assert c["max_over_median"] == pytest.approx([0.75 / 0.5, 1.0, 1.0])


def test_uninformative_plan_is_reported(caplog):
    rec = {"row_contrast": {"A": {"entropy": 0.99, "max_over_median": 1.09},
                            "B": {"entropy": 0.2, "max_over_median": 40.0}}}
    with caplog.at_level(logging.WARNING, logger="pyvene_plot.localize._search"):
        _warn_if_uninformative(rec)
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert "A (1.09)" in msg and "B" not in msg.split("for ")[1].split("(max")[0].replace("A (1.09)", "")
    assert "smaller epsilon" in msg
    caplog.clear()
    rec["row_contrast"]["A"]["max_over_median"] = 1.5
    with caplog.at_level(logging.WARNING, logger="pyvene_plot.localize._search"):
        _warn_if_uninformative(rec)
    assert not caplog.records


def test_fitted_result_records_row_contrast(planted_task):
    t = planted_task
    res = pp.OTAlignmentSearcher(method="uot", top_k=(1, 2), lambdas=(1.0,), progress=False).fit(
        t.model, t.sites, t.fit, t.calibration)
    want = row_contrast(res.coupling)
    got = res.diagnostics["row_contrast"]
    assert list(got) == res.variables
    for r, v in enumerate(res.variables):
        assert got[v]["entropy"] == pytest.approx(want["entropy"][r])
        assert got[v]["max_over_median"] == pytest.approx(want["max_over_median"][r])
    ok = [tr for tr in res.trials if "failed" not in tr]
    assert ok and all(set(tr["row_contrast"]) == set(res.variables) for tr in ok)
    floored = np.array([s.label in res.diagnostics["floored_sites"] for s in res.sites])
    assert res.diagnostics["cost_spread"] == pytest.approx(cost_spread(res.cost, exclude=floored))
    assert res.diagnostics["epsilon_scale"] == "spread"
    assert len(res.diagnostics["epsilon_grid"]) == len(AUTO_EPSILON_FACTORS)


# ------------------------------------------------------------------------------ ties
def test_rank_sites_breaks_near_ties_by_score_then_site_order():
    v = np.array([0.5, 0.2, 0.5, 0.5 * (1 + 1e-12)])
    # without scores, a 1e-12 difference does not decide: the earlier site wins
    assert rank_sites(v).tolist() == [0, 2, 3, 1]
    assert rank_sites(v, np.array([0.1, 0.9, 0.7, 0.3])).tolist() == [2, 3, 0, 1]
    # equal scores fall back to site order; NaN scores rank last within the tie
    assert rank_sites(v, np.array([0.3, 0.9, 0.3, 0.3])).tolist() == [0, 2, 3, 1]
    assert rank_sites(v, np.array([np.nan, 0.0, 0.2, 0.1])).tolist() == [2, 3, 0, 1]
    # differences above the tolerance are not ties, whatever the scores say
    w = np.array([0.5, 0.5 * (1 + 1e-6)])
    assert rank_sites(w, np.array([1.0, 0.0])).tolist() == [1, 0]


def test_truncate_row_uses_the_tie_break():
    row = np.array([0.25, 0.25, 0.25, 0.25])
    fs = np.array([0.6, 0.8, 0.8, 0.7])
    assert truncate_row(row, 1, tiebreak=fs)[0] == [1]
    assert truncate_row(row, 3, tiebreak=fs)[0] == [1, 2, 3]
    assert truncate_row(row, 2, allowed=[0, 2, 3], tiebreak=fs)[0] == [2, 3]
    assert truncate_row(row, 2)[0] == [0, 1]  # no scores: site order


def test_ranking_of_a_tied_row_follows_the_fit_full_swap_score(planted_task):
    t = planted_task
    res = pp.OTAlignmentSearcher(method="uot", top_k=(1,), lambdas=(1.0,), progress=False).fit(
        t.model, t.sites, t.fit, t.calibration)
    tied = pp.AlignmentResult.from_dict(res.to_dict())
    tied.coupling = np.full_like(res.coupling, 1.0 / res.coupling.size)
    for v in res.variables:
        fs = np.nan_to_num(np.asarray(res.diagnostics["fit_full_swap"][v]["balanced"]), nan=-np.inf)
        order = sorted(range(len(res.sites)), key=lambda i: (-fs[i], i))
        assert tied.ranking(v) == [res.sites[i] for i in order]
