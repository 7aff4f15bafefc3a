"""Localization JSON: every field (stages, results, kept sites, candidates, bases, screens, the
competition between stages, handles in effect, support widths) round-trips, version-1 files are still
read, and empty, truncated or incomplete files raise a PlotError that names the file and what is missing."""

from __future__ import annotations

import json

import numpy as np
import pytest

import pyvene_plot as pp
from tests.localize.result_checks import assert_broken_files_refused, assert_same_result, canonical


@pytest.fixture(scope="module")
def pca_loc(binary_task):
    searcher = pp.OTAlignmentSearcher(method="ot", readout=binary_task.readout, progress=False, epsilon=[0.05],
                                      top_k=(1, 2), lambdas=(1.0,))
    stages = [pp.Stage("layer", screen="mean"), pp.Stage("pca", bands=4, keep=2)]
    return pp.ProgressiveScheduler(stages, searcher).run(binary_task.model, binary_task.fit, binary_task.calibration)


def test_every_field_round_trips(pca_loc, binary_task, tmp_path):
    loc = pca_loc
    assert loc.bases and loc.pca_info and loc.screens[0] is not None  # the fixture exercises every field
    path = loc.to_json(tmp_path / "loc.json")
    raw = json.loads(path.read_text())
    assert raw["format_version"] == 2 and raw["writer"] == f"pyvene_plot {pp.__version__}"
    back = pp.Localization.from_json(path, model=binary_task.model)
    assert back.model is binary_task.model
    assert back.variables == loc.variables
    assert back.stage_specs == loc.stage_specs and all(isinstance(s, pp.Stage) for s in back.stage_specs)
    assert len(back.stages) == len(loc.stages)
    for a, b in zip(loc.stages, back.stages):
        assert_same_result(a, b)
        assert all(h.model is binary_task.model for h in b.handles.values())
    assert back.kept == loc.kept and back.kept_reason == loc.kept_reason
    assert back.candidates == loc.candidates
    assert all(isinstance(s, pp.Site) for cs in back.candidates for sites in cs.values() for s in sites)
    assert set(back.bases) == set(loc.bases)
    for k, V in loc.bases.items():
        assert back.bases[k].dtype == V.dtype and np.array_equal(back.bases[k], V)
    assert (back.runtime_s, back.extra_s) == (loc.runtime_s, loc.extra_s)
    assert canonical(back.pca_info) == canonical(loc.pca_info)
    assert canonical(back.screens) == canonical(loc.screens)
    # the competition between stages: who was kept, both scores, the handles in effect, support widths
    assert back.compete is loc.compete is True
    assert back.handle_stage == loc.handle_stage and back.support_width == loc.support_width
    assert canonical(back.competition) == canonical(loc.competition)
    assert loc.competition[0] is None and set(loc.competition[1]["variables"]) == set(loc.variables)
    for v in loc.variables:
        assert back.handles[v].sites == loc.handles[v].sites and back.handles[v].weights == loc.handles[v].weights
    assert canonical(back.to_dict()) == canonical(loc.to_dict())
    # what a loaded localisation is for: the same DAS menu and the same IIA
    assert [repr(s) for s in back.das_specs()] == [repr(s) for s in loc.das_specs()]
    assert back.evaluate(binary_task.test) == loc.evaluate(binary_task.test)
    assert back.runtime_until(1) == loc.runtime_until(1)


def test_version_1_files_are_read_with_each_stage_handle_in_effect(pca_loc, binary_task, tmp_path):
    d = pca_loc.to_dict()
    for k in ("compete", "handle_stage", "competition", "support_width"):
        del d[k]
    d["format_version"] = 1
    old = pp.Localization.from_dict(json.loads(json.dumps(d)), model=binary_task.model)
    assert old.compete is False and old.handle_stage == [{v: i for v in old.variables} for i in range(2)]
    assert old.competition == [None, None] and old.support_width == [{}, {}]
    assert all(old.handles[v].sites == old.final.handles[v].sites for v in old.variables)
    d = pca_loc.to_dict()
    del d["support_width"]  # a version-2 file without its new fields is incomplete
    with pytest.raises(pp.PlotError, match="support_width"):
        pp.Localization.from_dict(d)
    d = pca_loc.to_dict()
    d["handle_stage"][0] = {v: 1 for v in d["variables"]}  # a stage cannot keep a later stage's handle
    with pytest.raises(pp.PlotError, match="handle_stage"):
        pp.Localization.from_dict(d)


def test_empty_truncated_and_incomplete_files(pca_loc, tmp_path):
    path = pca_loc.to_json(tmp_path / "loc.json")
    assert_broken_files_refused(path, pp.Localization, "results", tmp_path)
    d = json.loads(path.read_text())
    d["kept"] = d["kept"][:1]  # a stage's kept sites lost
    short = tmp_path / "short.json"
    short.write_text(json.dumps(d))
    with pytest.raises(pp.PlotError, match="kept") as info:
        pp.Localization.from_json(short)
    assert str(short) in str(info.value)
    d = json.loads(path.read_text())
    del d["results"][0]["coupling"]  # an incomplete stage result is named too
    inner = tmp_path / "inner.json"
    inner.write_text(json.dumps(d))
    with pytest.raises(pp.PlotError, match="coupling"):
        pp.Localization.from_json(inner)


def test_stage_from_dict_restores_tuples_and_refuses_unknown_fields():
    st = pp.Stage("coordinates", group_sizes=(4, 2), positions=(0, -1), top_k=(1, 2), lambdas=(1.0, 2.0), keep=2)
    assert pp.Stage.from_dict(json.loads(json.dumps(st.to_dict()))) == st
    with pytest.raises(pp.PlotError, match="unknown"):
        pp.Stage.from_dict({"kind": "layer", "bandz": 3})
    with pytest.raises(pp.PlotError, match="missing"):
        pp.Stage.from_dict({"bands": 3})
    pre = pp.Stage("pca", prefixes=(16, 1, 4), basis_inputs="base+source")
    assert pre.prefixes == (1, 4, 16) and pre.bands is None
    assert pp.Stage.from_dict(json.loads(json.dumps(pre.to_dict()))) == pre
