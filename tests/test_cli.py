"""The command line: ``pyvene-plot demo`` end to end on the embedded HEQ task."""

from __future__ import annotations

import json

import pyvene_plot as pp
from pyvene_plot.cli import main


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
    assert {"PLOT-uot", "PLOT-ot", "best single site (free)"} <= methods
    for r in summary["rows"]:
        assert 0.0 <= r["test IIA"] <= 1.0
    # the written results load back and run on the task's model
    res = pp.AlignmentResult.from_json(out / "result_uot.json", model=heq_task.model)
    assert res.method == "uot"
    test_iia = res.evaluate(heq_task.test)
    assert test_iia == {v: summary["results"]["uot"]["test"][v]["iia"] for v in res.variables}
    printed = capsys.readouterr().out
    assert "PLOT-uot" in printed and "test IIA" in printed


def test_cli_reports_plot_errors(tmp_path, capsys):
    rc = main(["run", "--task", "no_such_task", "--out", str(tmp_path / "x"), "--quiet"])
    assert rc == 2
    assert "unknown task" in capsys.readouterr().err
