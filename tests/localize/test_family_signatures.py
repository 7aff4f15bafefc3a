"""The ``family_mean`` signature: family means of per-pair deltas, centred and L2-normalised per
block, checked number by number on a tiny bank with two families; zero blocks; the missing-family
error; and an end-to-end search on the HEQ task (whose banks come from ``from_causal_model``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import pyvene_plot as pp
from pyvene_plot.errors import SignatureError
from pyvene_plot.localize import (
    SIGNATURE_MODES,
    OTAlignmentSearcher,
    SiteEffects,
    abstract_signatures,
    collect_site_effects,
    cost_matrix,
    neural_signatures,
)

R2, R6, R15 = math.sqrt(2), math.sqrt(6), math.sqrt(1.5)

# four pairs, classes {0, 1, 2}; families "b" (pairs 0, 1) and "a" (pairs 2, 3): order a, b
BASE_LABELS = [0, 0, 1, 2]
CF = {"V": [1, 2, 1, 0], "Q": [0, 0, 2, 0]}
FAMILY = ["b", "b", "a", "a"]
BASE_LOGITS = [[1.0, 0.0, 0.0]] * 4
DELTAS = [  # site logits minus base logits, per pair; site 1 has no effect on family "a"
    [[1.0, 2.0, 0.0], [0.0, 0.0, 3.0], [5.0, 5.0, 5.0], [2.0, 0.0, 0.0]],
    [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
]


def _bank(family=FAMILY) -> pp.PairBank:
    x = torch.zeros(4, 1, 2)
    return pp.PairBank(x, x.clone(), torch.tensor(BASE_LABELS), {v: torch.tensor(c) for v, c in CF.items()},
                       name="toy", family=family)


def _effects(family=FAMILY) -> SiteEffects:
    base = torch.tensor(BASE_LOGITS)
    logits = base.unsqueeze(0) + torch.tensor(DELTAS)
    sites = [pp.Site(layer=i, component="block_output", position=-1) for i in range(2)]
    return SiteEffects(sites=sites, label_set=[0, 1, 2], base_logits=base, logits=logits,
                       probs=torch.softmax(logits, -1), preds=logits.argmax(-1), runtime_s=0.0, n_rows=8,
                       bank_name="toy", family=family)


def test_family_mean_is_a_mode():
    assert "family_mean" in SIGNATURE_MODES


def test_abstract_family_mean_by_hand():
    A = abstract_signatures(_bank(), ["V", "Q"], [0, 1, 2], "family_mean")
    # V, family a: pairs 2 (1 -> 1: 0) and 3 (2 -> 0: [1, 0, -1]); mean [.5, 0, -.5], norm sqrt(.5)
    # V, family b: pairs 0 (0 -> 1: [-1, 1, 0]) and 1 (0 -> 2: [-1, 0, 1]); mean [-1, .5, .5], norm sqrt(1.5)
    np.testing.assert_allclose(A[0], [1 / R2, 0, -1 / R2, -1 / R15, 0.5 / R15, 0.5 / R15], atol=1e-12)
    # Q, family a: pairs 2 (1 -> 2: [0, -1, 1]) and 3 (2 -> 0: [1, 0, -1]); mean [.5, -.5, 0]
    # Q, family b: base 0 -> 0 twice: no effect, a zero block (not NaN)
    np.testing.assert_allclose(A[1], [1 / R2, -1 / R2, 0, 0, 0, 0], atol=1e-12)
    assert A.shape == (2, 6) and np.isfinite(A).all()


def test_neural_family_mean_by_hand():
    N = neural_signatures(_effects(), "family_mean")
    # site 0, family a: deltas [5, 5, 5] and [2, 0, 0]; mean [3.5, 2.5, 2.5]; centred [2, -1, -1] / 3
    # site 0, family b: deltas [1, 2, 0] and [0, 0, 3]; mean [.5, 1, 1.5]; centred [-.5, 0, .5]
    np.testing.assert_allclose(N[0], [2 / R6, -1 / R6, -1 / R6, -1 / R2, 0, 1 / R2], atol=1e-6)
    # site 1: nothing in family a (zero block); family b mean [0, 1, 0], centred [-1, 2, -1] / 3
    np.testing.assert_allclose(N[1], [0, 0, 0, -1 / R6, 2 / R6, -1 / R6], atol=1e-6)
    # the cost is the squared distance between the block vectors, divided by the N = 4 pairs
    A = abstract_signatures(_bank(), ["V", "Q"], [0, 1, 2], "family_mean")
    C, mag, floored = cost_matrix(A, N, 4)
    np.testing.assert_allclose(C, ((A[:, None, :] - N[None, :, :]) ** 2).sum(-1) / 4, atol=1e-12)
    np.testing.assert_allclose(mag, [R2 / 2, 1 / 2], atol=1e-6)
    assert not floored.any()


def test_family_order_is_sorted_labels_not_first_appearance():
    flipped = ["a", "a", "b", "b"]  # now pairs 0, 1 are family a (first block)
    A = abstract_signatures(_bank(flipped), ["V"], [0, 1, 2], "family_mean")
    np.testing.assert_allclose(A[0], [-1 / R15, 0.5 / R15, 0.5 / R15, 1 / R2, 0, -1 / R2], atol=1e-12)


def test_zero_blocks_are_zeros_not_nan():
    # a site with no effect at all: every block zero, the magnitude floor removes it
    eff = _effects()
    eff.logits[1] = eff.base_logits
    N = neural_signatures(eff, "family_mean")
    assert np.isfinite(N).all() and not N[1].any()
    A = abstract_signatures(_bank(), ["V"], [0, 1, 2], "family_mean")
    C, mag, floored = cost_matrix(A, N, 4, min_effect=1e-3)
    assert floored.tolist() == [False, True] and np.isfinite(C).all()
    # float noise on the logits (below 1e-6 of the logit scale) stays a zero block
    eff.logits[1] = eff.base_logits + 1e-8 * torch.tensor([1.0, -2.0, 0.5])
    assert not neural_signatures(eff, "family_mean")[1].any()
    # a variable with no effect anywhere: the cost matrix reports it instead of dividing by zero
    dead = pp.PairBank(torch.zeros(4, 1, 2), torch.zeros(4, 1, 2), torch.tensor(BASE_LABELS),
                       {"V": torch.tensor(BASE_LABELS)}, family=FAMILY)
    Ad = abstract_signatures(dead, ["V"], [0, 1, 2], "family_mean")
    assert np.isfinite(Ad).all() and not Ad.any()
    with pytest.raises(SignatureError, match="all zero"):
        cost_matrix(Ad, N, 4)


def test_missing_families_raise_and_say_how_to_add_them():
    with pytest.raises(SignatureError, match=r"PairBank\(\.\.\., family=.*from_causal_model"):
        abstract_signatures(_bank(family=None), ["V"], [0, 1, 2], "family_mean")
    with pytest.raises(SignatureError, match=r"family=.*from_causal_model"):
        neural_signatures(_effects(family=None), "family_mean")
    # the other modes do not need families
    assert abstract_signatures(_bank(family=None), ["V"], [0, 1, 2], "prob_delta").shape == (1, 12)


def test_collect_site_effects_copies_the_bank_families(heq_task):
    fit = heq_task.fit.subset(list(range(40)))
    eff = collect_site_effects(heq_task.model, heq_task.sites[:3], fit, heq_task.variables, progress=False)
    assert eff.family == fit.family and eff.subset([0]).family == fit.family


def test_heq_search_with_family_signatures_fits_and_evaluates(heq_task):
    task = heq_task
    assert set(task.fit.families) <= {"WX", "YZ", "WX+YZ", "none"} and len(task.fit.families) >= 3
    res = OTAlignmentSearcher(method="uot", signature="family_mean", progress=False).fit(
        task.model, task.sites, task.fit, task.calibration)
    assert res.signature == "family_mean" and set(res.handles) == set(task.variables)
    ev = res.evaluate(task.test, detail=True)
    for v in task.variables:
        assert ev[v]["balanced"] == ev[v]["balanced"]  # a number, not NaN
        assert res.handles[v].sites  # at least one site kept
    # the sweep over both modes tries both and selects one on calibration
    both = OTAlignmentSearcher(method="uot", signature=("prob_delta", "family_mean"), progress=False).fit(
        task.model, task.sites, task.fit, task.calibration)
    tried = {t["signature"] for t in both.trials if "failed" not in t}
    assert tried == {"prob_delta", "family_mean"} and both.signature in tried
