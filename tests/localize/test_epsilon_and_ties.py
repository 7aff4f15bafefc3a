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
import pytest

import pyvene_plot as pp
from pyvene_plot.localize import (
    AUTO_BETA_FACTORS,
    AUTO_EPSILON_FACTORS,
    AUTO_EPSILON_MIN_RANGE_RATIO,
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


def _plain_cost(seed: int = 0) -> np.ndarray:
    """2 variables x 30 sites without far-off columns: costs in [1, 1.05], each row's best site 0.02 lower."""
    rng = np.random.default_rng(seed)
    C = 1.0 + 0.05 * rng.random((2, 30))
    C[0, 3], C[1, 7] = 0.98, 0.98
    return C


def test_auto_grid_scales_with_the_cost_spread_not_its_offset():
    s = pp.OTAlignmentSearcher(method="uot")
    for C in (_plain_cost(), _outlier_cost()):
        floor = (C.max(1) - C.min(1)).max() / AUTO_EPSILON_MIN_RANGE_RATIO
        eps, beta = _grids(s, C)
        want = list(dict.fromkeys(max(f * cost_spread(C), floor) for f in AUTO_EPSILON_FACTORS))
        np.testing.assert_allclose(eps, want)
        np.testing.assert_allclose(beta, np.asarray(AUTO_BETA_FACTORS) * cost_spread(C))
        eps10, beta10 = _grids(s, 10.0 * C)
        np.testing.assert_allclose(eps10, 10.0 * eps, rtol=1e-12)
        np.testing.assert_allclose(beta10, 10.0 * beta, rtol=1e-12)
        eps_shift, beta_shift = _grids(s, C + 3.0)
        np.testing.assert_allclose(eps_shift, eps, rtol=1e-9)
        np.testing.assert_allclose(beta_shift, beta, rtol=1e-9)
        # a per-row shift (which leaves one-sided UOT plans unchanged) leaves the grid unchanged too
        np.testing.assert_allclose(_grids(s, C + np.array([[0.0], [5.0]]))[0], eps, rtol=1e-9)
    # without far-off columns the spread sets the grid; with one, the underflow floor does
    C = _plain_cost()
    assert _grids(s, C)[0][0] == pytest.approx(0.01 * cost_spread(C)) or _grids(s, C)[0][0] > 0.01 * cost_spread(C)
    C = _outlier_cost()
    assert cost_spread(C) < 0.01 * (C.max() - C.min())
    assert _grids(s, C)[0][0] == pytest.approx((C.max(1) - C.min(1)).max() / AUTO_EPSILON_MIN_RANGE_RATIO)


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
def test_spread_grid_reaches_sharper_rows_than_the_range_grid(method):
    """The new grid's smallest ε lies below the old one's, and at equal β its rows are sharper."""
    C = _plain_cost()
    old_eps, old_beta = _grids(pp.OTAlignmentSearcher(method=method, epsilon="auto-range"), C)
    new_eps, _ = _grids(pp.OTAlignmentSearcher(method=method), C)
    assert new_eps[0] < old_eps[0]
    old = row_contrast(solve_transport(C, method, old_eps[0], old_beta[0]).coupling)
    new = row_contrast(solve_transport(C, method, new_eps[0], old_beta[0]).coupling)
    assert all(n < o for n, o in zip(new["entropy"], old["entropy"]))
    # the largest ε of the new grid is smooth again (the sweep spans hard to soft plans)
    soft = row_contrast(solve_transport(C, method, new_eps[-1], old_beta[0]).coupling)
    assert all(s > n for s, n in zip(soft["entropy"], new["entropy"]))


def test_every_auto_setting_solves_on_a_cost_with_a_far_column():
    """POT's UOT scaling underflows below range/200 on far-off columns: the grid stops there, and a
    user-given ε below it fails with an error naming ε, never a silently wrong plan."""
    C = _outlier_cost()
    eps, beta = _grids(pp.OTAlignmentSearcher(method="uot"), C)
    for e in eps:
        for b in beta:
            P = solve_transport(C, "uot", e, b).coupling
            assert np.all(np.isfinite(P))
            np.testing.assert_allclose(P.sum(1), [0.5, 0.5], atol=1e-8)
    with pytest.raises(pp.TransportError, match="epsilon"):
        solve_transport(C, "uot", 1e-4, 0.1)


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
