"""scikit-learn's estimator convention, checked for every estimator of the package.

For each estimator: ``get_params()`` has exactly the ``__init__`` signature's parameters, returns the
constructor arguments unchanged (the same objects, tuples as tuples), ``set_params(**get_params())``
round-trips, ``set_params`` really sets, and an unknown name raises an error that lists the valid ones.
"""

from __future__ import annotations

import inspect

import pytest

import pyvene_plot as pp


def _init_params(cls) -> list[str]:
    sig = inspect.signature(cls.__init__)
    return [p.name for p in sig.parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _searcher_case():
    readout = pp.Readout(position=-1)
    kwargs = dict(method="ot", epsilon=(0.02, 0.05), signature=("prob_delta", "logit_delta"), top_k=(1, 3),
                  lambdas=(1.0, 2.0), seed=7, normalize=(False, True), min_effect=0.01, selection="iia",
                  readout=readout, batch_size=16, max_iter=123, tol=1e-7, progress=False)
    return pp.OTAlignmentSearcher, kwargs, {"seed": 11, "lambdas": (4.0,)}


def _scheduler_case():
    searcher = pp.OTAlignmentSearcher(method="ot", progress=False)
    stages = (pp.Stage("layer"), pp.Stage("coordinates", group_sizes=(2, 1)))
    kwargs = dict(stages=stages, searcher=searcher, keep=2)
    return pp.ProgressiveScheduler, kwargs, {"keep": 3, "stages": [pp.Stage("layer")]}


def _l3d_case():
    from pyvene_plot.methods.l3d import L3D

    wanted = {"n_subnetworks": 5, "epochs": 7, "top_k": 0.2, "seed": 3, "batch_size": 8, "lr": 0.05}
    names = _init_params(L3D)
    kwargs = {k: v for k, v in wanted.items() if k in names}
    changes = {k: v for k, v in {"seed": 4, "epochs": 9}.items() if k in names}
    return L3D, kwargs, changes


CASES = {"OTAlignmentSearcher": _searcher_case, "ProgressiveScheduler": _scheduler_case, "L3D": _l3d_case}


@pytest.fixture(params=list(CASES))
def case(request):
    return CASES[request.param]()


def test_get_params_are_the_init_signature_and_the_arguments_unchanged(case):
    cls, kwargs, _ = case
    est = cls(**kwargs)
    params = est.get_params()
    names = _init_params(cls)
    assert list(params) == names
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k in names}
    for k in names:
        if k in kwargs:
            assert params[k] is kwargs[k], f"{cls.__name__}.get_params()[{k!r}] is not the argument given"
        else:
            assert params[k] == defaults[k], f"{cls.__name__}.get_params()[{k!r}] is not the default"
    assert kwargs, f"{cls.__name__}: the test passes no non-default argument"


def test_set_params_of_get_params_round_trips(case):
    cls, kwargs, changes = case
    est = cls(**kwargs)
    before = est.get_params()
    assert est.set_params(**before) is est
    after = est.get_params()
    assert list(after) == list(before)
    for k in before:
        assert after[k] is before[k], k
    # a fresh estimator built from the parameters has the same parameters
    again = cls(**before).get_params()
    assert all(again[k] is before[k] for k in before)
    # set_params really sets
    est.set_params(**changes)
    for k, v in changes.items():
        assert est.get_params()[k] is v


def test_unknown_parameter_names_the_valid_ones(case):
    cls, kwargs, _ = case
    est = cls(**kwargs)
    with pytest.raises(ValueError) as info:
        est.set_params(bogus=1)
    msg = str(info.value)
    assert "bogus" in msg
    for name in _init_params(cls):
        assert name in msg, f"the error does not list the valid parameter {name!r}: {msg}"
    assert "bogus" not in est.get_params()


def test_searcher_invalid_value_is_refused_by_set_params():
    s = pp.OTAlignmentSearcher(progress=False)
    with pytest.raises(pp.PlotError, match="method"):
        s.set_params(method="sinkhorn")


def test_searcher_params_dict_is_what_results_record():
    readout = pp.Readout(position=-1)
    s = pp.OTAlignmentSearcher(method="ot", readout=readout, lambdas=(1.0, 2.0), progress=False)
    d = s.params_dict()
    assert d["readout"] == readout.to_dict()
    assert "progress" not in d
    assert set(d) == set(_init_params(pp.OTAlignmentSearcher)) - {"progress"}
    assert pp.OTAlignmentSearcher(progress=False).params_dict()["readout"] == pp.Readout().to_dict()
    # clone keeps every parameter and overrides the given ones
    c = s.clone(seed=5)
    assert c.get_params() == {**s.get_params(), "seed": 5}


def test_scheduler_rejects_bad_params_through_set_params():
    sched = pp.ProgressiveScheduler([pp.Stage("layer")])
    with pytest.raises(pp.PlotError, match="keep"):
        sched.set_params(keep=0)
    with pytest.raises(pp.PlotError, match="at least one stage"):
        pp.ProgressiveScheduler([])
