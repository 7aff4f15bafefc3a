"""PLOT-guided DAS vs Full DAS on the issue's tasks (small grids), and the compare report."""

from __future__ import annotations

import json

import pytest

import pyvene_plot as pp


@pytest.fixture(scope="module")
def binary_cmp(tmp_path_factory):
    task = pp.tasks.load("binary_addition", seed=0)
    out = tmp_path_factory.mktemp("cmp_binary")
    cmp = pp.compare(task, methods=("plot", "plot_das", "plot_das_coarse", "full_das", "best_site"), subspace_sizes=(2, 4),
                     das_kwargs={"epochs": 8}, progress=False, out=out)
    return task, cmp, out


def _row(cmp, method, variable):
    return next(r for r in cmp.rows if r["method"] == method and r["variable"] == variable)


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
    keys = {"method", "variable", "iia", "runtime_s", "n_sites_evaluated", "n_trained", "ratio_to_full_das"}
    assert all(keys <= set(r) for r in cmp.rows)
    assert {r["method"] for r in cmp.rows} == {"plot", "plot_das", "plot_das_coarse", "full_das", "best_site"}
    for r in cmp.rows:
        assert r["ratio_to_full_das"] == pytest.approx(r["runtime_s"] / _row(cmp, "full_das", r["variable"])["runtime_s"])
    assert _row(cmp, "full_das", "C1")["n_trained"] == 5 * 2 * 3  # 5 timesteps x 2 sizes x 3 variables
    data = json.loads((out / "compare.json").read_text())
    assert data["rows"] == json.loads(json.dumps(cmp.rows))
    assert (out / "compare.png").stat().st_size > 0
    assert "| plot_das |" in cmp.table()
    # the free baseline comes from the first stage's sweep, and the timestep stage placed Ci at t=i-1
    for i, v in enumerate(task.variables, start=1):
        assert _row(cmp, "best_site", v)["sites"] == f"L{i - 1}.block_output@-1"


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


def test_unknown_compare_method():
    task = pp.tasks.load("planted", seed=0)
    with pytest.raises(pp.PlotError, match="unknown compare method"):
        pp.compare(task, methods=("magic",))


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
            assert 0.0 <= r["test_iia"] <= 1.0
    assert json.loads((tmp_path / "b.json").read_text())["rows"] == json.loads(json.dumps(res["rows"]))
    with pytest.raises(ValueError, match="not 'heq'"):
        das_budget.main(["--task", "heq", "--compare", str(out / "compare.json"), "--out", str(tmp_path / "x.json")])
