"""The refinement and task-verification benchmark scripts: job lists, summaries and tables (no heavy runs)."""

from __future__ import annotations

import pytest

import pyvene_plot as pp
from benchmarks import refinement, task_verification


def test_group_sizes_are_the_four_largest_powers_below_the_width():
    assert refinement.group_sizes(16) == (8, 4, 2, 1)
    assert refinement.group_sizes(576) == (256, 128, 64, 32)
    assert refinement.group_sizes(1) == (1,)


def test_jobs_leave_out_what_does_not_apply():
    jobs = list(refinement.jobs(["heq", "ioi"], [0], ["coarse", "lib_prefix", "flat"], ["pair"], full_das=True))
    assert ("heq", 0, "lib_prefix", "pair") in jobs and ("heq", 0, "flat", "pair") in jobs
    assert ("ioi", 0, "lib_prefix", "pair") not in jobs  # LIB needs a vocabulary-wide Jacobian
    assert ("ioi", 0, "flat", "pair") not in jobs
    assert jobs[-1] == ("ioi", 0, "full_das", "-")


def test_summary_means_over_seeds_and_balances_full_das_rows():
    def row(seed, variant, a, b, width=4):
        return {"task": "t", "seed": seed, "variant": variant, "signature": "pair", "runtime_s": 2.0 * (seed + 1),
                "n_sites_evaluated": 5, "variables": {
                    "X": {"balanced": a, "width": width, "calibration_balanced": a - 0.1},
                    "Y": {"balanced": b, "width": width, "calibration_balanced": b - 0.1}}}

    rows = [row(0, "coarse", 0.6, 0.8), row(1, "coarse", 0.8, 1.0),
            {"task": "t", "seed": 0, "variant": "full_das", "signature": "-", "runtime_s": 30.0,
             "n_sites_evaluated": 5, "variables": {"X": {"sensitive": 1.0, "invariant": 0.5},
                                                   "Y": {"sensitive": 0.9, "invariant": 0.9}}}]
    summ = {s["variant"]: s for s in refinement.summary(rows)}
    assert summ["coarse"]["mean_balanced"] == pytest.approx(0.8)
    assert summ["coarse"]["per_variable"] == pytest.approx({"X": 0.7, "Y": 0.9})
    assert summ["coarse"]["min_per_variable"] == pytest.approx({"X": 0.6, "Y": 0.8})
    assert summ["coarse"]["calibration_balanced"] == pytest.approx(0.7)
    assert summ["coarse"]["runtime_s"] == pytest.approx(3.0)
    assert summ["full_das"]["per_variable"] == pytest.approx({"X": 0.75, "Y": 0.9})
    table = refinement.markdown(refinement.summary(rows))
    assert "| t | coarse | pair | 2 | 0.700 | 0.800 | X 0.700 (0.600), Y 0.900 (0.800) | 4, 4 | 3.0 | 5 |" in table


def test_schedule_appends_each_variant_to_the_coarse_stages(planted_task):
    t = planted_task
    coarse = [st for st in t.default_stages if st.kind in ("layer", "position")]
    assert refinement.schedule(t, "coarse") == coarse
    assert refinement.schedule(t, "pca_prefix")[-1] == pp.Stage("pca", prefixes=refinement.PREFIXES)
    assert refinement.schedule(t, "flat") is None


def test_verification_best_site_is_the_highest_iia_earliest_on_ties():
    measured = {"sites": ["a", "b", "c"], "iia": {"V": [{"iia": 0.5}, {"iia": 0.9}, {"iia": 0.9}]}}
    assert task_verification.best_sites(measured) == {"V": "b (IIA 0.900)"}
