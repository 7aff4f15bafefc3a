"""OTAlignmentSearcher on the planted network, whose variables sit in known neurons."""

from __future__ import annotations

import numpy as np
import pytest

import pyvene_plot as pp


def _searcher(method: str, **kw) -> pp.OTAlignmentSearcher:
    return pp.OTAlignmentSearcher(method=method, top_k=(1, 2, 4), lambdas=(0.5, 1.0, 2.0), progress=False, **kw)


@pytest.fixture(scope="module")
def planted_results(planted_task):
    t = planted_task
    return {m: _searcher(m).fit(t.model, t.sites, t.fit, t.calibration) for m in ("ot", "uot")}


@pytest.mark.parametrize("method", ["ot", "uot"])
def test_top_ranked_site_is_a_carrier(planted_results, planted_task, method):
    res = planted_results[method]
    carriers = planted_task.info["carriers"]
    assert res.variables == ["WX", "YZ"]
    assert res.coupling.shape == (2, len(planted_task.sites))
    for v in res.variables:
        top = res.ranking(v)[0]
        assert top in carriers[v], f"{method}: top site for {v} is {top.label}, not a carrier"
        # the ranking is a permutation of the sites sorted by coupling mass
        ranking = res.ranking(v)
        assert sorted(ranking) == sorted(planted_task.sites)
        mass = res.site_scores(v)
        assert mass.sum() == pytest.approx(1.0)
        assert mass[planted_task.sites.index(top)] == pytest.approx(mass.max())


@pytest.mark.parametrize("method", ["ot", "uot"])
def test_transport_handles_reach_high_test_iia(planted_results, planted_task, method):
    res = planted_results[method]
    iia = res.evaluate(planted_task.test)
    for v in ("WX", "YZ"):
        assert iia[v] >= 0.95, f"{method}: held-out IIA for {v} is {iia[v]:.3f}"
        # the handle only uses carrier neurons of its own variable
        other = "YZ" if v == "WX" else "WX"
        for s in res.handles[v].sites:
            assert s not in planted_task.info["carriers"][other]


def test_fit_is_deterministic(planted_task):
    t = planted_task
    a = _searcher("uot", seed=3).fit(t.model, t.sites, t.fit, t.calibration)
    b = _searcher("uot", seed=3).fit(t.model, t.sites, t.fit, t.calibration)
    assert np.array_equal(a.coupling, b.coupling)
    assert np.array_equal(a.cost, b.cost)
    for v in a.variables:
        assert a.handles[v].sites == b.handles[v].sites
        assert a.handles[v].weights == b.handles[v].weights
        assert a.handles[v].strength == b.handles[v].strength


def test_result_records_what_was_swept(planted_results):
    res = planted_results["uot"]
    d = res.diagnostics
    assert d["n_trials"] == len(res.trials) >= 1
    assert res.epsilon in d["epsilon_grid"]
    assert res.beta in d["beta_grid"]
    assert d["top_k_grid"] == [1, 2, 4]
    for v in res.variables:
        cal = res.calibration[v]
        assert cal["k"] in (1, 2, 4) and cal["strength"] in (0.5, 1.0, 2.0)
        assert cal["k"] >= len(res.handles[v].sites)
        assert sum(res.handles[v].weights) == pytest.approx(1.0)


def test_collect_site_effects_defaults_to_the_bank_readout():
    """A task bank carries its readout; collect_site_effects must use it when none is passed."""
    import torch

    import pyvene_plot as pp

    task = pp.tasks.load("binary_addition", seed=0)
    assert task.fit.readout is task.readout
    sub = task.fit.subset(range(32))
    eff = pp.collect_site_effects(task.model, task.sites[:2], sub, task.variables)
    ref = pp.collect_site_effects(task.model, task.sites[:2], sub, task.variables, readout=task.readout)
    assert eff.base_logits.shape[1] == 32  # joint 5-bit classes, not the 2-way vocabulary
    assert torch.equal(eff.preds, ref.preds)
