"""Sentinel: the test bank only reports.

Each task is run twice: once as built and once with a test bank whose labels are scrambled
(``base_labels`` and every variable's counterfactual labels permuted, each by its own permutation;
inputs untouched). The searcher, the scheduler, ``run_das`` and ``compare`` must make every
selection (signature mode, ε, β, top-k, λ, the stage's kept sites, the DAS site and size) and
produce every fit / calibration number (couplings, costs, calibration scores, loss curves)
bit-for-bit identically; only what is measured on the test bank may change, and it must change
somewhere (else the scramble did not reach the numbers and the check proves nothing).

The real run goes first, so a cache keyed on the bank's name or size that handed the real test
bank's results to the scrambled one would show up as "test numbers did not change".
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import pyvene_plot as pp
from pyvene_plot._utils import to_serializable
from pyvene_plot.tasks import task_signatures

#: the fastest built-in tasks: a hand-weighted MLP (coordinate sites) and an exact GRU (timestep sites)
TASKS = {
    "planted": {},
    "binary_addition": {"n_fit": 64, "n_calibration": 32, "n_test": 32},
}
DAS_KWARGS = {"epochs": 1, "batch_size": 32}


def scrambled(bank: pp.PairBank, seed: int = 0) -> pp.PairBank:
    """A copy of ``bank`` whose base and counterfactual labels are permuted (inputs untouched)."""
    g = torch.Generator().manual_seed(seed)
    n = len(bank)
    return pp.PairBank(
        bank.base, bank.source, bank.base_labels[torch.randperm(n, generator=g)],
        {v: t[torch.randperm(n, generator=g)] for v, t in bank.counterfactual_labels.items()},
        name=bank.name, num_classes=bank.num_classes, meta=dict(bank.meta), readout=bank.readout,
    )


def _json(x):
    """JSON-normalised copy (tuples -> lists, arrays -> lists, NaN -> "nan"), so == compares exactly."""
    return json.loads(json.dumps(to_serializable(x)))


def _is_timing(key: str) -> bool:
    return key.endswith("_s") or "runtime" in key or key in ("versions", "writer")


def without_timings(x):
    """``x`` (JSON-normalised) without wall-clock fields: the only fit-side numbers allowed to differ."""
    if isinstance(x, dict):
        return {k: without_timings(v) for k, v in x.items() if not _is_timing(k)}
    if isinstance(x, list):
        return [without_timings(v) for v in x]
    return x


@pytest.fixture(scope="module", params=list(TASKS))
def tasks(request):
    """``(real task, the same task with a scrambled test bank)``."""
    real = pp.tasks.load(request.param, seed=0, **TASKS[request.param])
    fake = dataclasses.replace(real, test=scrambled(real.test))
    # the scramble took effect, on the test bank only
    assert not torch.equal(fake.test.base_labels, real.test.base_labels)
    for v in real.variables:
        assert not torch.equal(fake.test.labels(v), real.test.labels(v))
    assert fake.fit is real.fit and fake.calibration is real.calibration
    return real, fake


def _searcher(task) -> pp.OTAlignmentSearcher:
    """Every kind of choice is still swept (two signatures, the auto ε and β grids, two k, two λ), at a
    size that keeps the file fast."""
    signatures = task_signatures(task)[:1] + ("family_mean",)
    return pp.OTAlignmentSearcher(method="uot", readout=task.readout, signature=signatures, top_k=(1, 2),
                                  lambdas=(1.0, 2.0), seed=0, progress=False)


def _assert_test_numbers_differ(real_scores: dict, fake_scores: dict) -> None:
    assert _json(real_scores) != _json(fake_scores), "the scrambled test bank left every test number unchanged"


def test_searcher_fit_ignores_the_test_bank(tasks):
    real, fake = tasks
    results = [_searcher(t).fit(t.model, t.sites, t.fit, t.calibration) for t in (real, fake)]
    a, b = results
    # the selections, by name
    assert (a.signature, a.epsilon, a.beta, a.method) == (b.signature, b.epsilon, b.beta, b.method)
    for v in real.variables:
        ca, cb = a.calibration[v], b.calibration[v]
        assert (ca["k"], ca["strength"], ca["sites"], ca["weights"]) == (cb["k"], cb["strength"], cb["sites"],
                                                                        cb["weights"])
        assert ca["scores"] == cb["scores"]
    # and every fit / calibration number: coupling, cost, trials, calibration candidates, diagnostics
    assert (a.coupling == b.coupling).all() and (a.cost == b.cost).all()
    assert without_timings(_json(a.to_dict())) == without_timings(_json(b.to_dict()))
    _assert_test_numbers_differ({"h": a.evaluate(real.test, detail=True), "b": a.evaluate_baseline(real.test)},
                                {"h": b.evaluate(fake.test, detail=True), "b": b.evaluate_baseline(fake.test)})


def test_scheduler_ignores_the_test_bank(tasks):
    real, fake = tasks
    locs = [pp.ProgressiveScheduler(t.default_stages, _searcher(t), keep=1).run(t.model, t.fit, t.calibration,
                                                                              t.variables)
            for t in (real, fake)]
    a, b = locs
    for i in range(len(a.stages)):
        assert a.kept[i] == b.kept[i] and a.kept_reason[i] == b.kept_reason[i], f"stage {i} kept other sites"
        assert (a.stages[i].coupling == b.stages[i].coupling).all()
    assert [s.to_dict() for s in a.das_specs((1,))] == [s.to_dict() for s in b.das_specs((1,))]
    assert without_timings(_json(a.to_dict())) == without_timings(_json(b.to_dict()))
    _assert_test_numbers_differ([a.evaluate(real.test, stage=i, detail=True) for i in range(len(a.stages))],
                                [b.evaluate(fake.test, stage=i, detail=True) for i in range(len(b.stages))])


def test_run_das_ignores_the_test_bank(tasks):
    real, fake = tasks
    loc = pp.ProgressiveScheduler(real.default_stages, _searcher(real), keep=1).run(
        real.model, real.fit, real.calibration, real.variables)
    specs = loc.das_specs((1, 2), stage=0)
    a, b = (pp.run_das(t.model, specs, t.fit, t.calibration, t.variables, readout=t.readout, seed=0,
                       progress=False, **DAS_KWARGS) for t in (real, fake))
    for v in real.variables:
        assert (a.best[v].k, a.best[v].spec.label) == (b.best[v].k, b.best[v].spec.label)
        for pa, pb in zip(a.best[v].intervention.parameters(), b.best[v].intervention.parameters()):
            assert torch.equal(pa, pb), "the trained rotations differ"
    assert without_timings(_json(a.to_dict())) == without_timings(_json(b.to_dict()))
    _assert_test_numbers_differ({v: a.best[v].scores(real.test) for v in real.variables},
                                {v: b.best[v].scores(fake.test) for v in real.variables})


def test_compare_ignores_the_test_bank(tasks):
    real, fake = tasks
    a, b = (pp.compare(t, subspace_sizes=(1, 2), das_kwargs=DAS_KWARGS, progress=False) for t in (real, fake))
    test_fields = ("iia", "sensitive", "invariant")
    clock_fields = ("runtime_s", "ratio_to_full_das")
    keep = [{k: v for k, v in r.items() if k not in test_fields + clock_fields} for r in a.rows]
    assert keep == [{k: v for k, v in r.items() if k not in test_fields + clock_fields} for r in b.rows]
    assert {r["method"] for r in a.rows} == set(pp.comparison.METHODS)
    # the details hold the localisation and every DAS run; only the test bank's own summary may differ
    da, db = without_timings(_json(a.details)), without_timings(_json(b.details))
    assert da["task"]["banks"].pop("test") != db["task"]["banks"].pop("test")
    assert da == db
    _assert_test_numbers_differ([{k: r[k] for k in test_fields} for r in a.rows],
                                [{k: r[k] for k in test_fields} for r in b.rows])
