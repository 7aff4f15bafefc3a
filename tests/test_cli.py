"""The command line, run through its real parser on real argv: ``demo``, ``run`` and ``compare``; the files
they write are read back and checked against the objects they describe."""

from __future__ import annotations

import json

import pytest

import pyvene_plot as pp
from pyvene_plot._utils import to_serializable
from pyvene_plot.cli import main


def _json(x):
    return json.loads(json.dumps(to_serializable(x)))


def test_cli_demo_writes_results(tmp_path, capsys, heq_task):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--quiet"])
    assert rc == 0
    for name in ("result_uot.json", "result_ot.json", "coupling_uot.png", "coupling_ot.png", "summary.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "coupling_uot.png").read_bytes().startswith(b"\x89PNG")
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) == {"uot", "ot"}
    assert summary["task"]["name"] == "heq"
    methods = {r["method"] for r in summary["rows"]}
    assert methods == {"PLOT-uot", "PLOT-ot", "best single site (free)"}
    printed = capsys.readouterr().out
    for method in ("uot", "ot"):
        # the written results load back, run on the task's model and give the summary's numbers
        res = pp.AlignmentResult.from_json(out / f"result_{method}.json", model=heq_task.model)
        assert res.method == method
        test = res.evaluate(heq_task.test, detail=True)
        assert _json(test) == summary["results"][method]["test"]
        rows = {r["variable"]: r for r in summary["rows"] if r["method"] == f"PLOT-{method}"}
        assert set(rows) == set(heq_task.variables)
        for v, r in rows.items():
            assert r["test IIA"] == test[v]["iia"]
            assert r["handle sites"] == ", ".join(s.label for s in res.handles[v].sites)
            assert f"| {r['test IIA']:.3f}" in printed
    # the free baseline is the uot sweep's best single site, scored on the test bank
    res = pp.AlignmentResult.from_json(out / "result_uot.json", model=heq_task.model)
    base = res.evaluate_baseline(heq_task.test, detail=True)
    for r in summary["rows"]:
        if r["method"] == "best single site (free)":
            assert r["test IIA"] == base[r["variable"]]["iia"]
            assert r["handle sites"] == res.baseline[r["variable"]].sites[0].label
    assert "PLOT-uot" in printed and "test IIA" in printed


def test_cli_rejects_unknown_task_and_lists_tasks(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--task", "no_such_task", "--out", str(tmp_path / "x"), "--quiet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and "heq" in err


def test_cli_reports_plot_errors(tmp_path, capsys):
    """A PlotError inside a command (here: an empty test bank asked of the task builder) is printed as
    one line naming the problem, exits with 2 and writes no result."""
    out = tmp_path / "run"
    rc = main(["run", "--task", "planted", "--quiet", "--task-option", "n_test=0", "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: split fractions must be positive")
    assert list(out.iterdir()) == []


def test_task_options_parse_and_unknown_option_is_named(capsys):
    from pyvene_plot.cli import parse_task_options, main

    assert parse_task_options(["n_fit=80", "l1=0.5", "flag=true", "name=abc"]) == {
        "n_fit": 80, "l1": 0.5, "flag": True, "name": "abc"}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        parse_task_options(["n_fit"])
    with pytest.raises(SystemExit, match="does not take options"):
        main(["run", "--task", "planted", "--quiet", "--task-option", "bogus=1"])


def test_cli_compare_size_grid_override(tmp_path, capsys, heq_task):
    """``compare --subspace-sizes`` sets the DAS size grid shared by guided and Full DAS."""
    out = tmp_path / "cmp"
    rc = main(["compare", "--task", "heq", "--quiet", "--subspace-sizes", "1", "2", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "compare.json").read_text())
    assert data["details"]["subspace_sizes"] == [1, 2]
    full = next(r for r in data["rows"] if r["method"] == "full_das")
    assert full["n_trained"] == 2 * full["n_sites_evaluated"] * len(heq_task.variables)
    printed = capsys.readouterr().out
    assert "size grid [1, 2]" in printed
    # the printed table is the one the written file reads back to
    back = pp.Comparison.from_json(out / "compare.json")
    assert back.task == "heq" and back.rows == data["rows"]
    assert back.table() in printed
    assert {r["method"] for r in back.rows} == set(pp.comparison.METHODS)
    assert (out / "compare.png").read_bytes().startswith(b"\x89PNG")
