"""AlignmentResult JSON: every field round-trips, old ``schema_version`` files still load, and empty,
truncated or incomplete files raise a PlotError that names the file and what is missing."""

from __future__ import annotations

import json

import pytest

import pyvene_plot as pp
from pyvene_plot.localize import FORMAT_VERSION
from tests.localize.result_checks import assert_broken_files_refused, assert_same_result, canonical


@pytest.fixture(scope="module")
def planted_result(planted_task):
    t = planted_task
    s = pp.OTAlignmentSearcher(method="uot", top_k=(1, 2), lambdas=(1.0, 2.0), signature=("prob_delta", "logit_delta"),
                               progress=False)
    return s.fit(t.model, t.sites, t.fit, t.calibration)


def test_every_field_round_trips(planted_result, planted_task, tmp_path):
    path = planted_result.to_json(tmp_path / "r.json")
    raw = json.loads(path.read_text())
    assert raw["format_version"] == FORMAT_VERSION
    assert raw["writer"] == f"pyvene_plot {pp.__version__}"
    loaded = pp.AlignmentResult.from_json(path, model=planted_task.model)
    assert_same_result(planted_result, loaded)
    # the loaded handles run and score like the originals
    assert loaded.evaluate(planted_task.test, detail=True) == planted_result.evaluate(planted_task.test, detail=True)
    # writing the loaded result again gives the same file (up to the writer's stamps)
    again = loaded.to_json(tmp_path / "again.json")
    assert canonical(json.loads(again.read_text())) == canonical(raw)


def test_old_schema_version_files_still_load(planted_result, tmp_path):
    d = canonical(planted_result.to_dict())
    del d["format_version"]
    d["schema_version"] = 1
    path = tmp_path / "old.json"
    path.write_text(json.dumps(d))
    assert_same_result(planted_result, pp.AlignmentResult.from_json(path))


def test_unsupported_or_missing_version_is_refused(planted_result, tmp_path):
    d = canonical(planted_result.to_dict())
    d["format_version"] = FORMAT_VERSION + 1
    path = tmp_path / "future.json"
    path.write_text(json.dumps(d))
    with pytest.raises(pp.PlotError, match="format_version"):
        pp.AlignmentResult.from_json(path)
    del d["format_version"]
    path.write_text(json.dumps(d))
    with pytest.raises(pp.PlotError, match=r"missing \['format_version'\]"):
        pp.AlignmentResult.from_json(path)


def test_empty_truncated_and_incomplete_files(planted_result, tmp_path):
    path = planted_result.to_json(tmp_path / "r.json")
    assert_broken_files_refused(path, pp.AlignmentResult, "coupling", tmp_path)
    # a handle without its sites: named, not a bare KeyError
    d = canonical(planted_result.to_dict())
    del d["handles"][planted_result.variables[0]]["sites"]
    bad = tmp_path / "handle.json"
    bad.write_text(json.dumps(d))
    with pytest.raises(pp.PlotError, match="sites") as info:
        pp.AlignmentResult.from_json(bad)
    assert str(bad) in str(info.value)
    with pytest.raises(pp.PlotError, match="cannot read"):
        pp.AlignmentResult.from_json(tmp_path / "absent.json")


def test_row_contrast_and_cost_scale_round_trip(planted_result, tmp_path):
    loaded = pp.AlignmentResult.from_json(planted_result.to_json(tmp_path / "r.json"))
    want = planted_result.diagnostics
    assert set(want["row_contrast"]) == set(planted_result.variables)
    for v in planted_result.variables:
        for key in ("entropy", "max_over_median"):
            got = loaded.diagnostics["row_contrast"][v][key]
            assert isinstance(got, float) and got == want["row_contrast"][v][key]
    assert loaded.diagnostics["cost_spread"] == want["cost_spread"] > 0
    assert loaded.diagnostics["epsilon_scale"] == "spread"
    for a, b in zip(planted_result.trials, loaded.trials):
        assert a.get("row_contrast") == b.get("row_contrast")
    # the tie-break reads the full-swap scores from the loaded diagnostics: same ranking
    for v in planted_result.variables:
        assert loaded.ranking(v) == planted_result.ranking(v)
