"""Refinement that pays, on a planted network: a variable in a *rotated* 2-d subspace of one layer.

The network has three parallel hooked layers (width 8) reading one-hot inputs ``(X, D, E)``, each
ternary. Layer 1 holds ``R @ z`` where ``R`` is the 8x8 normalised Hadamard matrix and ``z`` puts
``X``, ``D`` and ``E`` on circles in the planes (0, 1), (2, 3), (4, 5) with radii 4, 1 and 1: every
coordinate of layer 1 mixes all three variables, so no neuron or coordinate group carries ``X``.
The output is ``(X + D + E) mod 3``: ``X`` and ``D`` are decoded from layer 1 (its copy of ``E`` is
inert), ``E`` from layer 2 (a distractor whose effect is unlike ``X``'s); layer 0 is an inert
distractor (copies of the inputs). Sources keep the base's ``D`` on about 3/4 of the pairs, so the
whole-layer swap is a good but imperfect handle for ``X`` (it also moves ``D``). The top-2 PCA directions of layer 1 (fitted on the fit bank's bases) span exactly the
``X`` plane (largest variance), so a PCA-prefix stage recovers it and reaches IIA 1.0, while no
non-negative reweighting of coordinates can (every coordinate of the ``D`` plane is also an ``X``
coordinate): the test shows why spans exist.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import pyvene as pv
import torch
import torch.nn as nn
from transformers import PretrainedConfig

import pyvene_plot as pp
from pyvene_plot.progressive import support_width

WIDTH, N_IN = 8, 9
RADII = {"X": 4.0, "D": 1.0, "E": 1.0}  # planes (0, 1), (2, 3), (4, 5) of the latent z


def _hadamard(n: int) -> np.ndarray:
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / math.sqrt(n)


def _circle(r: float) -> torch.Tensor:
    """The three values of a ternary variable as points on a circle of radius ``r``: shape (3, 2)."""
    a = 2 * math.pi * torch.arange(3) / 3
    return r * torch.stack([torch.cos(a), torch.sin(a)], -1)


class _SpanConfig(PretrainedConfig):
    model_type = "plot_planted_span"

    def __init__(self, n_layer: int = 3, h_dim: int = WIDTH, **kw) -> None:
        self.n_layer, self.h_dim = n_layer, h_dim
        super().__init__(**kw)


class PlantedSpan(nn.Module):
    """Three parallel linear layers (the hooked ``block_output``s); the head decodes X and D from layer 1."""

    def __init__(self) -> None:
        super().__init__()
        self.config = _SpanConfig()
        self.layers = nn.ModuleList([nn.Linear(N_IN, WIDTH) for _ in range(3)])
        R = torch.tensor(_hadamard(WIDTH), dtype=torch.float32)
        z = torch.zeros(WIDTH, N_IN)
        for plane, (var, r) in enumerate(RADII.items()):
            z[2 * plane : 2 * plane + 2, 3 * plane : 3 * plane + 3] = _circle(r).T
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for layer in self.layers:
                layer.weight.zero_()
                layer.bias.zero_()
            self.layers[0].weight[:, :WIDTH] = torch.eye(WIDTH)  # inert copies of the inputs
            self.layers[1].weight.copy_(R @ z)
            self.layers[1].bias.fill_(0.5)
            self.layers[2].weight[2:, :6] = torch.randn(WIDTH - 2, 6, generator=g)  # an inert mixture of X, D
            self.layers[2].weight[0:2, 6:9] = _circle(1.0).T  # E, read by the head
        self.register_buffer("R", R)
        eye = torch.eye(WIDTH)
        self.register_buffer("read_x", _circle(1.0) @ R[:, 0:2].T)  # (3, WIDTH) templates of X in layer 1
        self.register_buffer("read_d", _circle(1.0) @ R[:, 2:4].T)
        self.register_buffer("read_e", _circle(1.0) @ eye[:, 0:2].T)  # E in layer 2
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.R.device

    def forward(self, inputs_embeds: torch.Tensor, **_kw) -> torch.Tensor:
        hs = [layer(inputs_embeds) for layer in self.layers]
        h = hs[1].squeeze(1) - 0.5
        lx = torch.log_softmax(5.0 * h @ self.read_x.T, -1)
        ld = torch.log_softmax(10.0 * h @ self.read_d.T, -1)
        le = torch.log_softmax(10.0 * hs[2].squeeze(1) @ self.read_e.T, -1)
        # log P(class c) = log sum_{x, d} P(X = x) P(D = d) P(E = (c - x - d) mod 3)
        return torch.stack([torch.stack([lx[:, x] + ld[:, d] + le[:, (c - x - d) % 3] for x in range(3)
                                         for d in range(3)], -1).logsumexp(-1) for c in range(3)], -1)


pp.register_model(PlantedSpan, {"block_output": ("layers[%s]", pv.models.constants.CONST_OUTPUT_HOOK)},
                  {"block_output": ("h_dim",)}, has_positions=False)


def _inputs(x: int, d: int, e: int) -> torch.Tensor:
    t = torch.zeros(1, N_IN)
    t[0, [x, 3 + d, 6 + e]] = 1.0
    return t


def _bank(n: int, seed: int, name: str) -> pp.PairBank:
    """Random (base, source) pairs; the source keeps the base's D on about 3/4 of the pairs."""
    r = np.random.default_rng(seed)
    base, source, y, y_cf = [], [], [], []
    for _ in range(n):
        x, d, e, xs, es = (int(v) for v in r.integers(3, size=5))
        ds = d if r.random() < 0.75 else int(r.integers(3))
        base.append(_inputs(x, d, e))
        source.append(_inputs(xs, ds, es))
        y.append((x + d + e) % 3)
        y_cf.append((xs + d + e) % 3)  # X interchanged from the source
    return pp.PairBank(torch.stack(base), torch.stack(source), torch.tensor(y), {"X": torch.tensor(y_cf)},
                       name=name, num_classes=3)


@pytest.fixture(scope="module")
def planted_span():
    model = PlantedSpan()
    fit, cal, test = _bank(300, 0, "fit"), _bank(200, 1, "calibration"), _bank(300, 2, "test")
    with torch.no_grad():
        assert torch.equal(model(inputs_embeds=test.base).argmax(-1), test.base_labels)  # the network is exact
    searcher = pp.OTAlignmentSearcher(method="uot", lambdas=(0.5, 1.0, 2.0), progress=False)
    return model, fit, cal, test, searcher


def _run(planted_span, refinement: pp.Stage) -> pp.Localization:
    model, fit, cal, _test, searcher = planted_span
    return pp.ProgressiveScheduler([pp.Stage("layer"), refinement], searcher).run(model, fit, cal)


def test_pca_prefixes_recover_the_rotated_subspace(planted_span):
    model, fit, _cal, test, _s = planted_span
    loc = _run(planted_span, pp.Stage("pca", prefixes=(1, 2, 4, 8, 16)))
    # the coarse stage finds the layer; its whole-vector swap also moves D
    assert loc.kept[0]["X"] == [pp.Site(1)]
    coarse = loc.evaluate(test, stage=0, detail=True)["X"]
    assert coarse["balanced"] < 0.95
    # prefixes of the base-fitted basis: rank 6 (three planes), r clipped, the full rank included
    (key,) = loc.bases
    assert key == "pca[base]:L1:block_output@-1" and loc.pca_info[key]["n_states"] == len(fit)
    assert [c.dims for c in loc.candidates[1]["X"]] == [tuple(range(r)) for r in (1, 2, 4, 6)]
    # one prefix, and its span contains the X plane: principal angles ~0
    h = loc.handles["X"]
    assert loc.handle_stage[-1]["X"] == 1 and len(h.sites) == 1 and h.sites[0].basis == key
    V = loc.bases[key][list(h.sites[0].dims)].astype(np.float64)
    x_plane = model.R[:, 0:2].double().numpy()
    cosines = np.linalg.svd(V @ x_plane, compute_uv=False)
    assert cosines.min() > 0.999, cosines
    assert loc.support_width[-1]["X"] == {"refined": len(h.sites[0].dims), "kept": len(h.sites[0].dims)} \
        and support_width(h, pp.model_spec(model)) <= 4
    # transport-only, held-out: the refined handle reaches the variable; it won on calibration
    assert loc.evaluate(test, detail=True)["X"]["balanced"] >= 0.95
    assert loc.evaluate(test)["X"] >= 0.95
    rec = loc.competition[1]["variables"]["X"]
    assert rec["kept"] == "refined" and rec["refined_scores"]["balanced"] > rec["previous_scores"]["balanced"]
    assert loc.stages[1].diagnostics["top_k_grid"] == [1]  # nested spans are never merged


def test_basis_inputs_and_lib_prefixes(planted_span):
    model, fit, _cal, test, _s = planted_span
    both = _run(planted_span, pp.Stage("pca", prefixes=(2,), basis_inputs="base+source"))
    assert both.pca_info["pca:L1:block_output@-1"]["n_states"] == 2 * len(fit)
    assert [c.dims for c in both.candidates[1]["X"]] == [(0, 1), tuple(range(6))]
    lib = _run(planted_span, pp.Stage("lib", prefixes=(1, 2, 4)))
    (key,) = lib.bases
    assert key == "lib[base]:L1:block_output@-1" and lib.pca_info[key]["n_states"] == len(fit)
    V = lib.bases[key]
    np.testing.assert_allclose(V @ V.T, np.eye(V.shape[0]), atol=1e-4)
    assert [c.dims for c in lib.candidates[1]["X"]] == [tuple(range(r)) for r in sorted({1, 2, min(4, len(V)), len(V)})]
    assert lib.evaluate(test)["X"] >= lib.evaluate(test, stage=0)["X"] - 0.02


def test_coordinates_refinement_cannot_reach_it(planted_span):
    model, _fit, _cal, test, _s = planted_span
    loc = _run(planted_span, pp.Stage("coordinates", group_sizes=(4, 2, 1)))
    cands = loc.candidates[1]["X"]
    assert cands[-1] == pp.Site(1)  # the whole kept vector is always offered, last
    for own in (False, True):
        assert loc.evaluate(test, own=own)["X"] < 0.95
    # no calibrated candidate of the stage (any k, λ) gets there, nor any single group swapped in full
    assert max(c["balanced"] for c in loc.stages[1].calibration["X"]["candidates"]) < 0.95
    for site in cands[:-1]:
        assert pp.Handle("X", [site], [1.0], model=model).scores(test)["balanced"] < 0.95
    # the refinement is kept only where it won on calibration
    rec = loc.competition[1]["variables"]["X"]
    kept_refined = rec["refined_scores"]["balanced"] > rec["previous_scores"]["balanced"]
    assert rec["kept"] == ("refined" if kept_refined else "previous")
    assert loc.handle_stage[1]["X"] == (1 if kept_refined else 0)


def test_whole_vector_candidate_reproduces_the_previous_handle(planted_span):
    # a group as wide as the kept vector is the kept vector: the stage's only candidate, at λ = 1
    loc = _run(planted_span, pp.Stage("coordinates", group_sizes=(8,), lambdas=(1.0,)))
    assert loc.candidates[1]["X"] == [pp.Site(1)]
    h1, h0 = loc.stages[1].handles["X"], loc.stages[0].handles["X"]
    assert (h1.sites, h1.weights, h1.strength) == (h0.sites, h0.weights, h0.strength) == ([pp.Site(1)], [1.0], 1.0)
    # the same handle: a tie, which keeps the previous (coarser) one
    rec = loc.competition[1]["variables"]["X"]
    assert rec["kept"] == "previous" and "itself" in rec["reason"]
    assert rec["refined_scores"] == rec["previous_scores"]
    assert loc.handle_stage[1]["X"] == 0 and loc.kept[1]["X"] == [pp.Site(1)]
    assert loc.kept_reason[1]["X"] == ["previous"] and loc.support_width[1]["X"] == {"refined": 8, "kept": 8}
