"""Attribution patching: first-order interchange estimates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pyvene_plot as pp
from pyvene_plot.methods.attribution import attribution_scores, screen_attribution
from pyvene_plot.localize import collect_site_effects


def _exact_margin_gain(eff, bank, variable):
    """Exact change of the counterfactual margin under each site's full interchange, (S, N)."""
    cols = {c: i for i, c in enumerate(eff.label_set)}
    cf = torch.tensor([cols[int(x)] for x in bank.labels(variable)])
    bl = torch.tensor([cols[int(x)] for x in bank.base_labels])
    rows = torch.arange(len(bank))
    after = eff.logits[:, rows, cf] - eff.logits[:, rows, bl]
    before = eff.base_logits[rows, bank.labels(variable)] - eff.base_logits[rows, bank.base_labels]
    return (after - before.unsqueeze(0)).double().numpy()


def test_estimate_is_exact_to_first_order(heq_task):
    """Sources that are tiny perturbations of the bases: estimate == exact effect up to O(eps^2)."""
    t = heq_task
    base = t.fit.base[:64]
    torch.manual_seed(0)
    eps = 1e-4
    src = base + eps * torch.randn_like(base)
    labels = {v: t.fit.labels(v)[:64] for v in t.variables}
    bank = pp.PairBank(base, src, t.fit.base_labels[:64], labels, name="tiny")
    sites = t.sites[::3]
    est = attribution_scores(t.model, sites, bank, t.variables, readout=t.readout)
    eff = collect_site_effects(t.model, sites, bank, t.variables, readout=t.readout)
    for vi, v in enumerate(t.variables):
        exact = _exact_margin_gain(eff, bank, v)
        scale = np.abs(exact).max()
        assert scale > 0
        err = np.abs(est.estimates[vi] - exact)
        # ReLU kinks crossed by a perturbation break linearity for a handful of entries only
        assert (err < 0.02 * scale).mean() > 0.97
        assert np.corrcoef(est.estimates[vi].ravel(), exact.ravel())[0, 1] > 0.98
    assert est.n_backward == len(t.variables)  # one batch, one backward per variable


def _ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(float)


def test_screen_keeps_the_exact_best_heq_site(heq_task):
    """What the screen promises: the exact best site survives it, and the ranking agrees overall.

    Near-ties between the top sites make "the first-order top site equals the exact argmax" depend on
    library versions (it flipped between transformers 5.23 and 5.24), so the test asserts what the
    attribution screen is used for: the exact best site is inside the kept share, and the two
    rankings are strongly rank-correlated.
    """
    t = heq_task
    est = attribution_scores(t.model, t.sites, t.fit, t.variables, readout=t.readout)
    eff = collect_site_effects(t.model, t.sites, t.fit, t.variables, readout=t.readout)
    screen = screen_attribution(t.model, t.sites, t.fit, variables=t.variables, readout=t.readout)
    for vi, v in enumerate(t.variables):
        ch = t.fit.changed(v).numpy()
        exact = _exact_margin_gain(eff, t.fit, v)[:, ch].mean(1)
        best = int(np.argmax(exact))
        assert screen.keep_by_variable[v][best], f"{v}: the screen dropped the exact best site {best}"
        assert sum(screen.keep_by_variable[v]) < len(t.sites)  # it does drop sites
        spearman = np.corrcoef(_ranks(exact), _ranks(est.scores[vi]))[0, 1]
        assert spearman > 0.6, f"{v}: rank correlation {spearman:.2f}"
        assert np.corrcoef(exact, est.scores[vi])[0, 1] > 0.7


def test_bad_input_is_named(heq_task):
    t = heq_task
    with pytest.raises(pp.SiteError, match="at least one site"):
        attribution_scores(t.model, [], t.fit)
    with pytest.raises(pp.SiteError):
        attribution_scores(t.model, [pp.Site(layer=7, component="block_output", position=-1)], t.fit)


def test_attribution_screen_in_a_schedule_keeps_the_carrier(planted_task):
    t = planted_task
    searcher = pp.OTAlignmentSearcher(method="ot", top_k=(1, 2), lambdas=(1.0, 2.0), progress=False)
    stage = pp.Stage("coordinates", group_sizes=(1,), screen="attribution", screen_threshold=0.2)
    loc = pp.ProgressiveScheduler([stage], searcher=searcher).run(t.model, t.fit, t.calibration)
    rep = loc.screens[0]
    assert rep["screener"] == "attribution" and rep["n_dropped"] > 0
    assert rep["n_kept"] + rep["n_dropped"] == rep["n_candidates"]
    for v in ("WX", "YZ"):
        survivors = set(loc.candidates[0][v])
        assert survivors & set(t.info["carriers"][v]), f"the screen dropped every carrier of {v}"
        assert loc.final.ranking(v)[0] in t.info["carriers"][v]
    with pytest.raises(pp.PlotError, match="unknown screener"):
        pp.Stage("layer", screen="nope")
