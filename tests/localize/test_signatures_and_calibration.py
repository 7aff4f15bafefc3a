"""Signatures and calibration against hand computations on tiny inputs.

Signatures: a 3-site toy whose effects are written out by hand, so every mode's formula, the cost
``||a_Z - n_S||² / N``, the direction-only normalisation and the magnitude floor are checked number
by number; and the engine's full swaps on the planted MLP against a direct unroll without pyvene.
Calibration: top-k truncation, renormalisation (sum / max), masking, λ order and the selection
tie-break.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import pyvene_plot as pp
from pyvene_plot.localize import (
    Candidate,
    SiteEffects,
    abstract_signatures,
    collect_site_effects,
    cost_matrix,
    lambda_order,
    neural_signatures,
    select,
    truncate_row,
)
from pyvene_plot.tasks.planted import mlp_interchange_logits

SITES = [pp.Site(layer=i, component="block_output", position=-1) for i in range(3)]


def _bank(base_labels, cf):
    n = len(base_labels)
    x = torch.zeros(n, 1, 2)
    return pp.PairBank(x, x.clone(), torch.tensor(base_labels), {"V": torch.tensor(cf)}, name="toy")


def _effects(base_logits, site_logits):
    base_logits = torch.tensor(base_logits, dtype=torch.float32)
    logits = torch.tensor(site_logits, dtype=torch.float32)
    return SiteEffects(
        sites=list(SITES), label_set=[0, 1], base_logits=base_logits, logits=logits,
        probs=torch.softmax(logits, -1), preds=logits.argmax(-1), runtime_s=0.0, n_rows=logits.shape[0] * logits.shape[1],
    )


# two pairs, two classes: base predicts 0 on both; the variable flips pair 0 only
BASE = [[2.0, 0.0], [2.0, 0.0]]
SITE_LOGITS = [
    [[0.0, 2.0], [2.0, 0.0]],   # site 0 flips pair 0 only: the variable's pattern
    [[0.0, 2.0], [0.0, 2.0]],   # site 1 flips both pairs
    [[2.0, 0.0], [2.0, 0.0]],   # site 2 changes nothing
]


def test_abstract_signature_is_the_onehot_delta_by_hand():
    bank = _bank([0, 0], [1, 0])
    a = abstract_signatures(bank, ["V"], [0, 1], "prob_delta")
    assert a.tolist() == [[-1.0, 1.0, 0.0, 0.0]]  # pair 0: onehot(1) - onehot(0); pair 1: 0
    assert abstract_signatures(bank, ["V"], [0, 1], "margin_delta").tolist() == [[2.0, 0.0]]


def test_neural_signatures_follow_each_formula_by_hand():
    eff = _effects(BASE, SITE_LOGITS)
    p_hi, p_lo = 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(2))  # softmax of (2, 0)
    d = p_hi - p_lo
    prob = neural_signatures(eff, "prob_delta")
    np.testing.assert_allclose(prob, [[-d, d, 0, 0], [-d, d, -d, d], [0, 0, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(neural_signatures(eff, "logit_delta"),
                               [[-2, 2, 0, 0], [-2, 2, -2, 2], [0, 0, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(neural_signatures(eff, "margin_delta"), [[4, 0], [4, 4], [0, 0]], atol=1e-6)


def test_cost_is_mean_squared_distance_per_pair_by_hand():
    bank = _bank([0, 0], [1, 0])
    a = abstract_signatures(bank, ["V"], [0, 1], "logit_delta")
    n = neural_signatures(_effects(BASE, SITE_LOGITS), "logit_delta")
    C, mag, floored = cost_matrix(a, n, n_pairs=2)
    # a = (-1, 1, 0, 0); site 0 = (-2, 2, 0, 0): ||a - n||² = 2; site 1: 2 + 8 = 10; site 2: 2
    np.testing.assert_allclose(C, [[1.0, 5.0, 1.0]])
    np.testing.assert_allclose(mag, [math.sqrt(8 / 2), math.sqrt(16 / 2), 0.0])
    assert not floored.any()
    # direction only: site 0 points exactly like the variable, site 1 at 45 degrees, site 2 is silent
    Cn, _, _ = cost_matrix(a, n, n_pairs=2, normalize=True)
    np.testing.assert_allclose(Cn[0, :2], [0.0, 2 - 2 * math.cos(math.pi / 4)], atol=1e-12)
    # the floor gives a silent site the worst cost of the matrix instead of a free direction
    Cf, _, floored = cost_matrix(a, n, n_pairs=2, normalize=True, min_effect=0.1)
    assert floored.tolist() == [False, False, True]
    assert Cf[0, 2] == pytest.approx(Cf[0, :2].max())
    assert int(np.argmin(Cf[0])) == 0


def test_engine_full_swaps_equal_a_direct_unroll(planted_task):
    """collect_site_effects (pyvene hooks, cached sources, batching) vs an unroll without pyvene."""
    t = planted_task
    sites = [pp.Site(layer=1, component="block_output", position=-1, dims=(0,)),
             pp.Site(layer=1, component="block_output", position=-1, dims=(1,)),
             pp.Site(layer=2, component="block_output", position=-1)]
    bank = t.fit
    eff = collect_site_effects(t.model, sites, bank, t.variables, readout=t.readout, batch_size=7)
    for s, site in enumerate(sites):
        want = mlp_interchange_logits(t.model, bank.base, bank.source, site.layer, site.dims)
        torch.testing.assert_close(eff.logits[s], want[:, eff.label_set], atol=1e-5, rtol=1e-5)
        assert torch.equal(eff.preds[s], want.argmax(-1))


# ------------------------------------------------------------------------------ calibration
def test_truncation_keeps_top_k_and_renormalises():
    row = np.array([0.1, 0.4, 0.2, 0.3])
    idx, w = truncate_row(row, 2)
    assert idx == [1, 3] and w == pytest.approx([0.4 / 0.7, 0.3 / 0.7])
    idx, w = truncate_row(row, 2, weight_norm="max")
    assert idx == [1, 3] and w == pytest.approx([1.0, 0.75])
    assert truncate_row(row, 10)[0] == [1, 3, 2, 0]  # k past the row keeps every site
    # progressive masking: only allowed columns compete
    idx, w = truncate_row(row, 2, allowed=[0, 2])
    assert idx == [2, 0] and w == pytest.approx([2 / 3, 1 / 3])
    # an all-zero row keeps uniform weights rather than dividing by zero
    assert truncate_row(np.zeros(3), 2) == ([0, 1], [0.5, 0.5])
    with pytest.raises(pp.PlotError, match="weight_norm"):
        truncate_row(row, 1, weight_norm="l2")
    with pytest.raises(pp.PlotError, match="empty support"):
        truncate_row(row, 1, allowed=[])


def test_truncation_ties_go_to_the_earlier_site():
    idx, _ = truncate_row(np.array([0.25, 0.5, 0.25, 0.5]), 3)
    assert idx == [1, 3, 0]


def test_lambda_order_and_selection_tie_break():
    assert lambda_order([4.0, 0.5, 1.0, 2.0, 8.0]) == [1.0, 0.5, 2.0, 4.0, 8.0]

    def cand(k, lam, bal):
        return Candidate("V", k, lam, list(range(k)), [1 / k] * k, {"balanced": bal, "iia": bal, "sensitive": bal})

    # equal scores: the first candidate in tie-break order (smaller k, λ closest to 1) wins
    cands = [cand(1, 1.0, 0.8), cand(1, 2.0, 0.8), cand(2, 1.0, 0.8)]
    assert select(cands, "balanced") is cands[0]
    # a strictly better later candidate wins; differences below 1e-12 count as ties
    cands = [cand(1, 1.0, 0.8), cand(2, 1.0, 0.8 + 1e-13), cand(4, 1.0, 0.9)]
    assert select(cands, "balanced") is cands[2]
    assert select(cands[:2], "balanced") is cands[0]
    # NaN scores never win
    cands = [cand(1, 1.0, float("nan")), cand(2, 1.0, 0.1)]
    assert select(cands, "balanced") is cands[1]
    with pytest.raises(pp.PlotError, match="selection rule"):
        select(cands, "best")
