"""Progressive scheduler: narrowing, PCA stages, DAS specs and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pyvene_plot as pp
from pyvene_plot.methods.bases import fit_pca_basis


def _inside(child: pp.Site, parent: pp.Site, kind: str) -> bool:
    if kind == "position":
        return child.layer == parent.layer and child.component == parent.component
    if kind == "coordinates":
        same_unit = (child.layer, child.component, child.position) == (parent.layer, parent.component, parent.position)
        pdims = set(parent.dims) if parent.dims is not None else None
        return same_unit and (pdims is None or set(child.dims) <= pdims)
    if kind == "pca":
        return (child.layer, child.component, child.position) == (parent.layer, parent.component, parent.position)
    if kind == "layer":
        return child.layer == parent.layer
    raise AssertionError(kind)


@pytest.fixture(scope="module")
def binary_loc(binary_task):
    searcher = pp.OTAlignmentSearcher(method="ot", readout=binary_task.readout, progress=False, epsilon=[0.05],
                                      top_k=(1, 2, 4), lambdas=(1.0, 2.0))
    sched = pp.ProgressiveScheduler([pp.Stage("layer"), pp.Stage("coordinates", group_sizes=(8, 4))], searcher, keep=1)
    return sched.run(binary_task.model, binary_task.fit, binary_task.calibration)


def test_narrowing_each_stage_inside_previous_kept(binary_loc):
    loc = binary_loc
    assert len(loc.stages) == 2 and len(loc.candidates) == 2
    for i in range(1, len(loc.stages)):
        kind = loc.stage_specs[i].kind
        for v in loc.variables:
            parents = loc.kept[i - 1][v]
            assert parents
            for c in loc.candidates[i][v]:
                assert any(_inside(c, p, kind) for p in parents), (v, c.label, [p.label for p in parents])
            # the calibrated handle only uses allowed sites
            assert set(loc.stages[i].handles[v].sites) <= set(loc.candidates[i][v])


def test_timestep_stage_puts_carries_at_their_timestep(binary_loc):
    # carry Ci is computed at timestep i-1
    for i, v in enumerate(["C1", "C2", "C3"], start=1):
        assert [s.layer for s in binary_loc.kept[0][v]] == [i - 1]
    # the coarse stage calibrates one full-swap site per variable: that site is what it keeps
    for v in ("C1", "C2", "C3"):
        assert binary_loc.stages[0].handles[v].sites == binary_loc.kept[0][v]
        assert binary_loc.kept_reason[0][v] == ["handle"]
    # the total covers every stage and nothing is counted twice
    stages_s = sum(r.runtime_s for r in binary_loc.stages)
    assert binary_loc.runtime_s >= stages_s
    compete_s = binary_loc.competition[1]["runtime_s"]
    assert compete_s > 0 and binary_loc.competition[0] is None
    assert binary_loc.runtime_until(2) == pytest.approx(stages_s + sum(binary_loc.extra_s) + compete_s)
    assert binary_loc.runtime_until(1) == pytest.approx(binary_loc.stages[0].runtime_s)


def test_das_specs_restricted_to_support(binary_loc, binary_task):
    specs = binary_loc.das_specs()
    assert {s.variable for s in specs} == {"C1", "C2", "C3"}
    for v in ("C1", "C2", "C3"):
        kept = binary_loc.kept[-1][v]
        mine = [s for s in specs if s.variable == v]
        kept_spec = [s for s in mine if s.source.endswith(":kept")]
        assert len(kept_spec) == 1
        whole = any(k.dims is None for k in kept)
        dims = None if whole else sorted({d for k in kept for d in k.dims})
        assert (kept_spec[0].dims is None) if whole else list(kept_spec[0].dims) == dims
        assert max(kept_spec[0].subspace_sizes) <= (16 if whole else len(dims))
        # the menu follows the handle in effect: the layer stage's where the refinement lost
        j = binary_loc.handle_stage[-1][v]
        assert all(s.source.startswith(f"plot:{binary_loc.stage_specs[j].kind}:") for s in mine)
        # every spec of the menu sits at the kept hook; the parent is the whole vector there
        assert all(s.layer == kept[0].layer for s in mine)
        assert any(s.dims is None for s in mine)  # the whole vector at the kept hook (parent or handle)
        assert len({(s.dims, s.source) for s in mine}) == len(mine)
    only = binary_loc.das_specs(include_handle=False, include_parent=False, subspace_sizes=(1, 2))
    assert all(s.subspace_sizes == (1, 2) for s in only) and len(only) == 3


def test_pca_stage_basis_and_span_handles(binary_task):
    searcher = pp.OTAlignmentSearcher(method="ot", readout=binary_task.readout, progress=False, epsilon=[0.05],
                                      top_k=(1, 2), lambdas=(1.0,))
    # compete=False: every variable keeps the PCA stage's own span handle (the machinery under test)
    loc = pp.ProgressiveScheduler([pp.Stage("layer"), pp.Stage("pca", bands=4)], searcher, compete=False).run(
        binary_task.model, binary_task.fit, binary_task.calibration)
    assert loc.competition == [None, None] and loc.handle_stage == [{v: i for v in loc.variables} for i in (0, 1)]
    assert loc.bases and loc.pca_info
    for key, V in loc.bases.items():
        assert np.allclose(V @ V.T, np.eye(V.shape[0]), atol=1e-4)
        # fitted on every base and source state of the fit bank (counted)
        assert loc.pca_info[key]["n_states"] == 2 * len(binary_task.fit)
    for v in loc.variables:
        h = loc.final.handles[v]
        assert all(s.basis is not None for s in h.sites)
        types = {type(i).__name__ for i in h.intervenable(binary_task.model).interventions.values()}
        assert types == {"SoftSpanInterchangeIntervention"}
    specs = loc.das_specs()
    kept_specs = [s for s in specs if s.source.endswith(":kept")]
    assert len(kept_specs) == 3 and all(s.basis is not None and s.dims is None for s in kept_specs)
    for s in kept_specs:  # the span of the kept PCA bands: rows of the fitted basis
        V = loc.bases[loc.kept[-1][s.variable][0].basis]
        assert s.basis.shape[1] == V.shape[1] and s.basis.shape[0] <= V.shape[0]


def test_fit_pca_basis_counts_rank():
    torch.manual_seed(0)
    X = torch.randn(50, 3) @ torch.randn(3, 8)
    V, mean, var = fit_pca_basis(X)
    assert V.shape == (3, 8)
    assert np.all(np.diff(var) <= 1e-6)
    with pytest.raises(pp.SiteError, match="do not vary"):
        fit_pca_basis(torch.ones(10, 4))


def test_position_stage_on_model_without_positions(binary_task):
    sched = pp.ProgressiveScheduler([pp.Stage("layer"), pp.Stage("position")],
                                    pp.OTAlignmentSearcher(readout=binary_task.readout, progress=False))
    with pytest.raises(pp.PlotError, match="position"):
        sched.run(binary_task.model, binary_task.fit, binary_task.calibration)


def test_keep_must_be_positive():
    with pytest.raises(pp.PlotError, match="keep"):
        pp.ProgressiveScheduler([pp.Stage("layer")], keep=0)
    with pytest.raises(pp.PlotError, match="keep"):
        pp.Stage("layer", keep=0)


def test_unknown_stage_kind_and_bad_groups():
    with pytest.raises(pp.PlotError, match="stage kind"):
        pp.Stage("heads")
    with pytest.raises(pp.PlotError, match="group_sizes"):
        pp.Stage("coordinates", group_sizes=(0,))


def test_empty_support_is_an_error(planted_task):
    searcher = pp.OTAlignmentSearcher(progress=False, epsilon=[0.05])
    with pytest.raises(pp.SiteError, match="empty support"):
        searcher.fit(planted_task.model, planted_task.sites, planted_task.fit, planted_task.calibration,
                     allowed={"WX": [], "YZ": [0, 1]})


def test_coordinates_groups_larger_than_support(binary_task):
    searcher = pp.OTAlignmentSearcher(method="ot", readout=binary_task.readout, progress=False, epsilon=[0.05])
    sched = pp.ProgressiveScheduler([pp.Stage("layer"), pp.Stage("coordinates", group_sizes=(64,))], searcher)
    with pytest.raises(pp.SiteError, match="no candidates"):
        sched.run(binary_task.model, binary_task.fit, binary_task.calibration)


def test_das_specs_accepted_and_trained_by_pyvene(binary_loc, binary_task):
    import pyvene as pv

    specs = binary_loc.das_specs(subspace_sizes=(2,))
    for s in specs:
        im = pv.IntervenableModel([s.to_representation(2, model=binary_task.model)], binary_task.model)
        assert len(im.interventions) == 1
    das = pp.run_das(binary_task.model, [s for s in specs if s.variable == "C2"], binary_task.fit,
                     binary_task.calibration, ["C2"], readout=binary_task.readout, epochs=2, progress=False)
    assert das.n_trained == len([s for s in specs if s.variable == "C2"])
    # the selected candidate's recorded calibration IIA is what its trained handle scores (real source runs)
    chosen = [c for c in das.candidates if c["selected"]]
    assert len(chosen) == 1 and chosen[0]["variable"] == "C2"
    recorded = chosen[0]["calibration"]["iia"]
    assert das.best["C2"].iia(binary_task.calibration) == pytest.approx(recorded, abs=1.0 / len(binary_task.calibration))
    assert das.runtime_s >= sum(c["train_s"] + c["calibration_s"] for c in das.candidates)


def test_span_stage_options_are_validated():
    with pytest.raises(pp.PlotError, match="mutually exclusive"):
        pp.Stage("pca", bands=8, prefixes=(1, 2))
    with pytest.raises(pp.PlotError, match="prefixes"):
        pp.Stage("coordinates", prefixes=(1,))
    with pytest.raises(pp.PlotError, match="prefixes"):
        pp.Stage("pca", prefixes=(0, 2))
    with pytest.raises(pp.PlotError, match="basis_inputs"):
        pp.Stage("pca", basis_inputs="sources")
    with pytest.raises(pp.PlotError, match="basis_inputs"):
        pp.Stage("layer", basis_inputs="base")
    # bands stages keep their default (8 bands of a basis of bases and sources); prefixes fit on bases
    assert (pp.Stage("pca").bands, pp.Stage("pca").fit_states) == (8, "base+source")
    assert pp.Stage("pca") == pp.Stage("pca", bands=8)
    assert (pp.Stage("lib", prefixes=(4,)).bands, pp.Stage("lib", prefixes=(4,)).fit_states) == (None, "base")
    with pytest.raises(pp.PlotError, match="compete"):
        pp.ProgressiveScheduler([pp.Stage("layer")], compete="yes")
