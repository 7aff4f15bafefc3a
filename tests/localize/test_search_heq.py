"""HEQ end to end: transport-only PLOT on the trained MLP, result serialisation and plotting."""

from __future__ import annotations

import numpy as np
import pytest

import pyvene_plot as pp
from tests.localize.result_checks import assert_same_result

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def heq_result(heq_task):
    t = heq_task
    searcher = pp.OTAlignmentSearcher(
        method="uot", signature=("prob_delta", "margin_delta"), lambdas=(0.5, 1, 2, 4, 8), progress=False
    )
    return searcher.fit(t.model, t.sites, t.fit, t.calibration)


@pytest.fixture(scope="module")
def heq_test_detail(heq_result, heq_task):
    return heq_result.evaluate(heq_task.test, detail=True)


def test_heq_transport_only_reaches_test_iia(heq_result, heq_test_detail):
    for v in ("WX", "YZ"):
        assert heq_test_detail[v]["iia"] >= 0.90, f"test IIA for {v}: {heq_test_detail[v]['iia']:.3f}"
    # hyper-parameters were chosen inside fit, on the calibration bank, from the swept grid
    assert heq_result.signature in ("prob_delta", "margin_delta")
    swept = {(t["signature"], t["epsilon"], t["beta"]) for t in heq_result.trials}
    assert {s for s, _, _ in swept} == {"prob_delta", "margin_delta"}
    assert (heq_result.signature, heq_result.epsilon, heq_result.beta) in swept
    assert heq_result.diagnostics["lambda_grid"] == [1.0, 0.5, 2.0, 4.0, 8.0]  # tie-break order
    for v in heq_result.variables:
        assert heq_result.handles[v].strength in (0.5, 1.0, 2.0, 4.0, 8.0)


def test_heq_evaluate_detail_keys(heq_result, heq_test_detail, heq_task):
    for v in ("WX", "YZ"):
        d = heq_test_detail[v]
        assert {"iia", "sensitive", "invariant", "balanced", "n", "n_changed"} <= set(d)
        assert d["n"] == len(heq_task.test)
        assert d["n_changed"] == int(heq_task.test.changed(v).sum())
        # iia is the changed/unchanged mixture of sensitive and invariant accuracy
        frac = d["n_changed"] / d["n"]
        assert d["iia"] == pytest.approx(frac * d["sensitive"] + (1 - frac) * d["invariant"], abs=1e-6)
    plain = heq_result.evaluate(heq_task.test)
    assert plain == {v: heq_test_detail[v]["iia"] for v in ("WX", "YZ")}


def test_heq_result_metadata(heq_result, heq_task):
    d = heq_result.diagnostics
    # the total covers its parts: signatures, every solve and every calibration of the sweep
    parts = d["signature_runtime_s"] + d["solve_runtime_s"] + d["calibration_runtime_s"]
    assert heq_result.runtime_s >= parts
    assert d["signature_per_site_s"] == pytest.approx(d["signature_runtime_s"] / len(heq_task.sites))
    assert heq_result.variables == ["WX", "YZ"]
    assert heq_result.sites == heq_task.sites
    effects = pp.collect_site_effects(heq_task.model, heq_task.sites, heq_task.test, heq_result.variables,
                                      heq_task.readout, progress=False)
    test_full_swap = effects.full_swap_scores(heq_task.test, heq_result.variables)
    for v in heq_result.variables:
        base = heq_result.baseline[v]
        assert isinstance(base, pp.Handle) and base.variable == v
        assert len(base.sites) == 1 and base.strength == 1.0
        # the baseline is the site with the best full-swap score on the fit bank (first one on ties)
        fit_scores = np.nan_to_num(np.asarray(d["fit_full_swap"][v]["balanced"]), nan=-1)
        assert base.sites[0] == heq_task.sites[int(np.argmax(fit_scores))]
        # its test IIA (handle path) is that site's full-swap IIA measured by the engine
        i = heq_task.sites.index(base.sites[0])
        assert heq_result.evaluate_baseline(heq_task.test)[v] == pytest.approx(test_full_swap[v]["iia"][i], abs=1e-12)


def test_heq_json_round_trip(heq_result, heq_test_detail, heq_task, tmp_path):
    path = tmp_path / "res" / "heq.json"
    written = heq_result.to_json(path)
    assert written == path
    loaded = pp.AlignmentResult.from_json(path, model=heq_task.model)
    assert_same_result(heq_result, loaded)
    for v in heq_result.variables:
        assert loaded.ranking(v) == heq_result.ranking(v)
    assert loaded.evaluate(heq_task.test, detail=True) == heq_test_detail
    # without a model the handles cannot run, and say so
    bare = pp.AlignmentResult.from_json(path)
    with pytest.raises(pp.PlotError, match="model"):
        bare.evaluate(heq_task.test)


def test_heq_plot_writes_png(heq_result, tmp_path):
    path = tmp_path / "plots" / "coupling.png"
    heq_result.plot(path)
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC)
    with pytest.raises(pp.PlotError, match="normalize"):
        heq_result.plot(tmp_path / "x.png", normalize="columns")
