"""PLOT-guided DAS vs Full DAS on the issue's tasks (small grids), the compare accounting, and the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import pyvene_plot as pp
from pyvene_plot import comparison
from pyvene_plot._utils import to_serializable

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def binary_cmp(tmp_path_factory):
    task = pp.tasks.load("binary_addition", seed=0)
    out = tmp_path_factory.mktemp("cmp_binary")
    cmp = pp.compare(task, methods=("plot", "plot_das", "plot_das_coarse", "full_das", "best_site"), subspace_sizes=(2, 4),
                     das_kwargs={"epochs": 8}, progress=False, out=out)
    return task, cmp, out


def _row(cmp, method, variable):
    return next(r for r in cmp.rows if r["method"] == method and r["variable"] == variable)


def _json(x):
    return json.loads(json.dumps(to_serializable(x)))


def test_binary_guided_das_within_002_of_full_das(binary_cmp):
    task, cmp, _ = binary_cmp
    for v in task.variables:
        guided, full = _row(cmp, "plot_das", v), _row(cmp, "full_das", v)
        assert guided["iia"] >= full["iia"] - 0.02, (v, guided["iia"], full["iia"])
        # guided DAS trains fewer candidates than Full DAS and is charged for the localisation too
        assert guided["n_trained"] < full["n_trained"]
        assert guided["runtime_s"] > _row(cmp, "plot", v)["runtime_s"]
        # coarse-only guided DAS: the kept timestep's whole vector, one spec x 2 sizes per variable
        coarse = _row(cmp, "plot_das_coarse", v)
        assert coarse["n_trained"] == 2 * len(task.variables)
        assert coarse["iia"] >= full["iia"] - 0.02, (v, coarse["iia"], full["iia"])
        assert coarse["runtime_s"] < full["runtime_s"]


def test_compare_rows_and_outputs(binary_cmp):
    task, cmp, out = binary_cmp
    assert all(set(comparison.ROW_KEYS) == set(r) for r in cmp.rows)
    assert {r["method"] for r in cmp.rows} == {"plot", "plot_das", "plot_das_coarse", "full_das", "best_site"}
    for r in cmp.rows:
        assert r["ratio_to_full_das"] == pytest.approx(r["runtime_s"] / _row(cmp, "full_das", r["variable"])["runtime_s"])
    assert _row(cmp, "full_das", "C1")["n_trained"] == 5 * 2 * 3  # 5 timesteps x 2 sizes x 3 variables
    assert (out / "compare.png").read_bytes().startswith(b"\x89PNG")
    assert "| plot_das |" in cmp.table()
    # the free baseline comes from the first stage's sweep, and the timestep stage placed Ci at t=i-1
    for i, v in enumerate(task.variables, start=1):
        assert _row(cmp, "best_site", v)["sites"] == f"L{i - 1}.block_output@-1"


def test_compare_json_round_trip(binary_cmp):
    _, cmp, out = binary_cmp
    raw = json.loads((out / "compare.json").read_text())
    assert raw["format_version"] == comparison.COMPARISON_FORMAT_VERSION
    assert raw["writer"].startswith("pyvene_plot ")
    back = pp.Comparison.from_json(out / "compare.json")
    assert back.task == cmp.task == "binary_addition"
    assert back.rows == cmp.rows
    assert back.details == _json(cmp.details)
    assert back.table() == cmp.table()
    # and once more: what was read writes the same file
    back.to_json(out / "again.json")
    again = json.loads((out / "again.json").read_text())
    assert {k: again[k] for k in ("task", "rows", "details")} == {k: raw[k] for k in ("task", "rows", "details")}


def test_compare_json_non_finite_and_missing_values_round_trip(tmp_path):
    row = {"method": "plot", "variable": "V", "iia": 0.5, "sensitive": float("nan"), "invariant": float("inf"),
           "runtime_s": 1.25, "n_sites_evaluated": 3, "n_trained": 0, "ratio_to_full_das": None, "sites": "L0@1"}
    cmp = pp.Comparison("toy", [row], {"subspace_sizes": [1, 2]})
    back = pp.Comparison.from_json(cmp.to_json(tmp_path / "c.json"))
    got = back.rows[0]
    assert math.isnan(got["sensitive"]) and got["invariant"] == float("inf") and got["ratio_to_full_das"] is None
    assert {k: v for k, v in got.items() if k != "sensitive"} == {k: v for k, v in row.items() if k != "sensitive"}
    assert back.table() == cmp.table() and back.details == {"subspace_sizes": [1, 2]}


def test_compare_json_written_before_format_version_still_loads():
    path = REPO / "benchmarks" / "results" / "smollm2" / "ioi_compare.json"
    raw = json.loads(path.read_text())
    assert "format_version" not in raw
    back = pp.Comparison.from_json(path)
    assert back.task == raw["task"] and back.rows == raw["rows"] and back.details == raw["details"]
    assert back.table().count("\n") == len(raw["rows"]) + 1


def test_gpt2_guided_das_reaches_090():
    task = pp.tasks.load("gpt2_lookup", seed=0)
    cmp = pp.compare(task, methods=("plot_das",), subspace_sizes=(4,), das_kwargs={"epochs": 5}, progress=False)
    for v in task.variables:
        r = _row(cmp, "plot_das", v)
        assert r["iia"] >= 0.9, (v, r)
        assert r["n_trained"] <= 3 * len(task.variables)  # at most three supports per variable, one size
    # the two variables live at different token positions
    sites = {v: _row(cmp, "plot_das", v)["sites"] for v in task.variables}
    assert sites["V1"] != sites["V2"]


def test_unknown_compare_method_and_size_grid():
    task = pp.tasks.load("planted", seed=0)
    with pytest.raises(pp.PlotError, match="unknown compare method"):
        pp.compare(task, methods=("magic",))
    with pytest.raises(pp.PlotError, match="subspace_sizes must be"):
        pp.compare(task, subspace_sizes="all")


# ------------------------------------------------------------------------------ accounting
class FakeClock:
    """A clock that advances ``step`` per reading; :meth:`work` simulates seconds of work in between."""

    def __init__(self, step: float = 1.0) -> None:
        self.t, self.step = 0.0, step

    def __call__(self) -> float:
        self.t += self.step
        return self.t

    def work(self, seconds: float) -> None:
        self.t += seconds


LOC_WORK = 1e6  # simulated seconds of the whole localisation
TRAIN_WORK = 1e3  # simulated seconds per DAS training
SLACK = 10.0  # a few clock readings


@pytest.fixture(scope="module")
def accounted(tmp_path_factory):
    """compare on the planted task with a fake clock; the real scheduler and run_das, wrapped to record."""
    task = pp.tasks.load("planted", seed=0)
    clock, calls = FakeClock(), []
    real_run_das = comparison.run_das

    class RecordingScheduler(pp.ProgressiveScheduler):
        def run(self, *args, **kwargs):
            loc = super().run(*args, **kwargs)
            calls.append({"what": "localization", "loc": loc})
            clock.work(LOC_WORK)
            return loc

    def spy_run_das(model, specs, fit_bank, calibration_bank, variables=None, **kwargs):
        res = real_run_das(model, specs, fit_bank, calibration_bank, variables, **kwargs)
        calls.append({"what": "das", "specs": list(specs), "banks": (fit_bank, calibration_bank),
                      "kwargs": kwargs, "result": res})
        clock.work(TRAIN_WORK * res.n_trained)
        return res

    mp = pytest.MonkeyPatch()
    mp.setattr(comparison, "ProgressiveScheduler", RecordingScheduler)
    mp.setattr(comparison, "run_das", spy_run_das)
    try:
        cmp = pp.compare(task, subspace_sizes=(1, 2), das_kwargs={"epochs": 2, "batch_size": 50, "lr": 0.02},
                         progress=False, clock=clock)
    finally:
        mp.undo()
    return task, cmp, calls


def test_guided_and_full_das_get_the_same_trainer_settings(accounted):
    task, cmp, calls = accounted
    das_calls = [c for c in calls if c["what"] == "das"]
    assert len(das_calls) == 3  # plot_das, plot_das_coarse, full_das, in that order
    kw = das_calls[0]["kwargs"]
    assert kw == {"epochs": 2, "batch_size": 50, "lr": 0.02, "readout": task.readout, "seed": 0, "progress": False}
    for c in das_calls:
        assert c["kwargs"] == kw
        assert c["banks"][0] is task.fit and c["banks"][1] is task.calibration  # never the test bank
        assert c["result"].settings["trainer"] == das_calls[0]["result"].settings["trainer"]
    # one size grid: the coarse-guided and the full search train the same sizes (clipped to each width)
    sizes = [{k for sp in c["specs"] for k in sp.subspace_sizes} for c in das_calls]
    assert sizes[1] == sizes[2] == {1, 2} and sizes[0] <= {1, 2}
    assert cmp.details["subspace_sizes"] == [1, 2]
    assert cmp.details["das_kwargs"] == {"epochs": 2, "batch_size": 50, "lr": 0.02, "seed": 0, "progress": False}
    # each DAS row reports the trainings of its own call
    for method, c in zip(("plot_das", "plot_das_coarse", "full_das"), das_calls):
        assert {r["n_trained"] for r in cmp.rows if r["method"] == method} == {c["result"].n_trained}


def test_each_method_is_charged_for_its_whole_sweep(accounted):
    task, cmp, calls = accounted
    rt = {r["method"]: r["runtime_s"] for r in cmp.rows}
    assert all(len({r["runtime_s"] for r in cmp.rows if r["method"] == m}) == 1 for m in rt)  # shared per method
    n = [c["result"].n_trained for c in calls if c["what"] == "das"]
    # PLOT + refinement: the whole schedule, read on the injected clock
    assert LOC_WORK <= rt["plot_refined"] <= LOC_WORK + SLACK
    # PLOT (coarse stages) and the free baseline (the first stage's sweep) are parts of it
    assert 0 < rt["best_site"] <= rt["plot"] < rt["plot_refined"]
    # guided DAS: the localisation it used plus every one of its trainings
    assert rt["plot_refined"] + TRAIN_WORK * n[0] <= rt["plot_das"] <= rt["plot_refined"] + TRAIN_WORK * n[0] + SLACK
    assert rt["plot"] + TRAIN_WORK * n[1] <= rt["plot_das_coarse"] <= rt["plot"] + TRAIN_WORK * n[1] + SLACK
    # Full DAS: all its trainings, and no localisation
    assert TRAIN_WORK * n[2] <= rt["full_das"] <= TRAIN_WORK * n[2] + SLACK < LOC_WORK
    for r in cmp.rows:
        assert r["ratio_to_full_das"] == r["runtime_s"] / rt["full_das"]
    # the wall time covers everything, on the same clock
    assert cmp.details["wall_s"] >= LOC_WORK + TRAIN_WORK * sum(n)


def test_das_budget_benchmark_reads_plot_sites_and_extrapolates(binary_cmp, tmp_path):
    """benchmarks/das_budget.py: DAS at PLOT's sites over a (k, lr, epochs) grid, chosen on calibration."""
    from benchmarks import das_budget

    task, cmp, out = binary_cmp
    res = das_budget.main(["--task", "binary_addition", "--compare", str(out / "compare.json"), "--epochs", "1", "4",
                           "--lrs", "auto", "0.05", "--sizes", "2", "--out", str(tmp_path / "b.json")])
    assert res["full_das_trainings"] == _row(cmp, "full_das", "C1")["n_trained"]
    # the compare run's own budget (k=2, lr auto, 8 epochs) is added to the 2 x 2 grid as the anchor
    assert res["anchor"] == [2, "auto", 8]
    assert len(res["rows"]) == len(task.variables) * (2 * 2 + 1)
    for v in task.variables:
        mine = [r for r in res["rows"] if r["variable"] == v]
        assert sum(r["selected_on_calibration"] for r in mine) == 1
        # DAS ran at the site PLOT picked, on the whole vector
        assert {r["site"] for r in mine} == {_row(cmp, "plot", v)["sites"]}
        chosen = next(r for r in mine if r["selected_on_calibration"])
        assert chosen["calibration"]["balanced"] == max(r["calibration"]["balanced"] for r in mine)
        anchor = next(r for r in mine if r["anchor"])
        assert (anchor["k"], anchor["lr"], anchor["epochs"]) == (2, "auto", 8)
        assert anchor["full_das_est_s"] == pytest.approx(_row(cmp, "full_das", v)["runtime_s"])
        for r in mine:
            assert r["full_das_est_s"] == pytest.approx(
                res["full_das_runtime_s"] * r["seconds_per_training"] / anchor["seconds_per_training"])
    assert json.loads((tmp_path / "b.json").read_text())["rows"] == json.loads(json.dumps(res["rows"]))
    with pytest.raises(ValueError, match="not 'heq'"):
        das_budget.main(["--task", "heq", "--compare", str(out / "compare.json"), "--out", str(tmp_path / "x.json")])
