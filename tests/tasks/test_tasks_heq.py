"""Tests of the built-in ``heq`` (trained MLP) and ``planted`` (hand-weighted MLP) tasks.

Everything here is computed directly with torch and plain Python (entity ids decoded from the
bank's input tensors), independently of the code that built the banks.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import pyvene_plot as pp
import pyvene_plot.tasks  # noqa: F401  (makes pp.tasks available)
from pyvene_plot.models import Site
from pyvene_plot.tasks.heq import (
    balanced_sampler,
    heq_causal_model,
    sample_balanced_rows,
)

SPLITS = ("fit", "calibration", "test")


@pytest.fixture(scope="module")
def heq():
    return pp.tasks.load("heq", seed=0)


@pytest.fixture(scope="module")
def planted():
    return pp.tasks.load("planted", seed=0)


# ------------------------------------------------------------------------------- helpers
def _decode_heq(x: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """(N, 1, 16) inputs -> (N, 4) entity ids by exact match against the entity vectors."""
    parts = x.reshape(x.shape[0], 4, -1)  # (N, 4, dim)
    d = (parts[:, :, None, :] - vectors[None, None, :, :]).abs().amax(-1)  # (N, 4, n_entities)
    best = d.min(-1)
    assert float(best.values.max()) == 0.0, "an input block is not an entity vector"
    return best.indices


def _direct_labels(base_ids: torch.Tensor, src_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Labels straight from the definition: O=[WX==YZ], cf_WX=[src.WX==base.YZ], cf_YZ=[base.WX==src.YZ]."""
    b_wx, b_yz = base_ids[:, 0] == base_ids[:, 1], base_ids[:, 2] == base_ids[:, 3]
    s_wx, s_yz = src_ids[:, 0] == src_ids[:, 1], src_ids[:, 2] == src_ids[:, 3]
    return {
        "base": (b_wx == b_yz).long(),
        "WX": (s_wx == b_yz).long(),
        "YZ": (b_wx == s_yz).long(),
    }


def _unroll_with_swap(model, base, source, swaps):
    """Run pyvene's MLP by hand; ``swaps = {layer: dims}`` copies those neurons from the source run."""
    hb, hs = base, source
    for layer, block in enumerate(model.mlp.h):
        hb = torch.relu(block.ff1(hb))
        hs = torch.relu(block.ff1(hs))
        if layer in swaps:
            hb = hb.clone()
            dims = list(swaps[layer])
            hb[..., dims] = hs[..., dims]
    return model.score(hb).squeeze(1)


# ------------------------------------------------------------------------------- HEQ
def test_heq_registered_and_cached(heq):
    assert "heq" in pp.tasks.names() and "planted" in pp.tasks.names()
    assert pp.tasks.load("heq", seed=0) is heq
    assert heq.variables == ["WX", "YZ"]
    assert heq.causal_model is not None


def test_heq_model_accuracy_heldout(heq):
    info = heq.info
    assert info["heldout_accuracy"] >= 0.99
    assert info["train_accuracy"] >= 0.99
    assert info["train_seconds"] < 60
    # independent check on fresh balanced factual data (a seed the builder never used)
    vectors = torch.tensor(info["entity_vectors"])
    ids, y = sample_balanced_rows(info["n_entities"], 5000, torch.Generator().manual_seed(12345))
    x = vectors[ids].reshape(len(ids), 1, -1)
    with torch.no_grad():
        logits = heq.model(inputs_embeds=x)[0]
    assert logits.shape == (5000, 2)
    assert float((logits.argmax(-1) == y).float().mean()) >= 0.99
    # frozen, eval mode
    assert not heq.model.training
    assert all(not p.requires_grad for p in heq.model.parameters())


def test_heq_sites_and_stages(heq):
    assert len(heq.sites) == 48
    assert {s.layer for s in heq.sites} == {0, 1, 2}
    assert all(s.dims is not None and len(s.dims) == 1 for s in heq.sites)
    kinds = [s.kind for s in heq.default_stages]
    assert kinds == ["layer", "coordinates"]
    assert heq.default_stages[1].group_sizes == (4, 1)


def test_heq_bank_sizes_and_balance(heq):
    sizes = {name: len(getattr(heq, name)) for name in SPLITS}
    assert sizes == {"fit": 1000, "calibration": 500, "test": 1000}
    for name in SPLITS:
        bank = getattr(heq, name)
        assert bank.name == name
        assert isinstance(bank.base, torch.Tensor) and bank.base.dtype.is_floating_point
        assert tuple(bank.base.shape) == (len(bank), 1, 16)
        assert bank.source.shape == bank.base.shape
        for var in ("WX", "YZ"):
            frac = float(bank.changed(var).float().mean())
            assert frac >= 0.3, (name, var, frac)
        # both output classes occur on the bases
        assert 0.2 < float(bank.base_labels.float().mean()) < 0.8


def test_heq_counterfactual_labels_equal_direct_computation(heq):
    """PairBank from a pyvene CausalModel: counterfactual labels equal those computed directly."""
    vectors = torch.tensor(heq.info["entity_vectors"])
    for name in SPLITS:
        bank = getattr(heq, name)
        b_ids = _decode_heq(bank.base, vectors)
        s_ids = _decode_heq(bank.source, vectors)
        direct = _direct_labels(b_ids, s_ids)
        assert torch.equal(bank.base_labels, direct["base"])
        assert torch.equal(bank.labels("WX"), direct["WX"])
        assert torch.equal(bank.labels("YZ"), direct["YZ"])
        settings = getattr(bank, "settings", None)
        if settings is not None:  # abstract settings kept with each split agree with the tensors
            assert [[s[v] for v in "WXYZ"] for s in settings[0]] == b_ids.tolist()
            assert [[s[v] for v in "WXYZ"] for s in settings[1]] == s_ids.tolist()


def test_heq_causal_model_matches_definition():
    cm = heq_causal_model(4)
    assert sorted(cm.inputs) == ["W", "X", "Y", "Z"]
    assert cm.outputs == ["O"]
    # exhaustive over a small entity set: run_interchange agrees with the closed form
    combos = list(itertools.product(range(3), repeat=4))
    for b in combos[::7]:
        for s in combos[::11]:
            base = dict(zip("WXYZ", b))
            src = dict(zip("WXYZ", s))
            d = _direct_labels(torch.tensor([b]), torch.tensor([s]))
            assert int(cm.run_forward(base)["O"]) == int(d["base"])
            assert int(cm.run_interchange(base, {"WX": src})["O"]) == int(d["WX"])
            assert int(cm.run_interchange(base, {"YZ": src})["O"]) == int(d["YZ"])
    # fresh state per call (CausalModel mutates its arguments)
    cm2 = heq_causal_model(7)
    assert len(cm.values["W"]) == 4 and len(cm2.values["W"]) == 7
    assert cm.pos is not cm2.pos


def test_heq_training_that_misses_accuracy_raises():
    from pyvene_plot.errors import ModelError
    from pyvene_plot.tasks.heq import train_heq_model

    with pytest.raises(ModelError, match="did not reach held-out accuracy"):
        train_heq_model(seed=0, steps=5, max_attempts=2, n_heldout=500)


def test_balanced_sampler_is_balanced():
    import random

    rng = random.Random(0)
    draws = [balanced_sampler(50)(rng) for _ in range(4000)]
    p_wx = sum(d["W"] == d["X"] for d in draws) / len(draws)
    p_yz = sum(d["Y"] == d["Z"] for d in draws) / len(draws)
    assert 0.45 < p_wx < 0.55 and 0.45 < p_yz < 0.55


# ------------------------------------------------------------------------------- planted
def _planted_grid():
    grid = list(itertools.product(range(5), repeat=4))
    x = torch.zeros(len(grid), 1, 8)
    x[:, 0, :4] = torch.tensor(grid, dtype=torch.float)
    y = torch.tensor([int((g[0] == g[1]) == (g[2] == g[3])) for g in grid])
    return x, y


def test_planted_factual_accuracy_is_exact(planted):
    x, y = _planted_grid()
    with torch.no_grad():
        logits = planted.model(inputs_embeds=x)[0]
    assert len(y) == 625
    assert float((logits.argmax(-1) == y).float().mean()) == 1.0
    assert planted.info["factual_accuracy"] == 1.0
    assert len(planted.sites) == 24
    assert all(not p.requires_grad for p in planted.model.parameters())


def test_planted_banks(planted):
    assert {n: len(getattr(planted, n)) for n in SPLITS} == {"fit": 400, "calibration": 200, "test": 400}
    for name in SPLITS:
        bank = getattr(planted, name)
        assert tuple(bank.base.shape) == (len(bank), 1, 8)
        for var in ("WX", "YZ"):
            assert float(bank.changed(var).float().mean()) >= 0.3
        direct = _direct_labels(bank.base[:, 0, :4].long(), bank.source[:, 0, :4].long())
        assert torch.equal(bank.base_labels, direct["base"])
        assert torch.equal(bank.labels("WX"), direct["WX"])
        assert torch.equal(bank.labels("YZ"), direct["YZ"])


@torch.no_grad()
def test_planted_carriers_reproduce_counterfactuals(planted):
    carriers = planted.info["carriers"]
    assert carriers["WX"][0] == Site(1, "block_output", -1, (0,))
    assert carriers["YZ"][0] == Site(1, "block_output", -1, (1,))
    for name in SPLITS:
        bank = getattr(planted, name)
        for var, layer, dims in (("WX", 1, (0,)), ("YZ", 1, (1,)), ("WX", 0, (0, 1)), ("YZ", 0, (2, 3))):
            pred = _unroll_with_swap(planted.model, bank.base, bank.source, {layer: dims}).argmax(-1)
            assert float((pred == bank.labels(var)).float().mean()) == 1.0, (name, var, layer, dims)
        # the exact WX carrier does not implement YZ (and vice versa)
        pred = _unroll_with_swap(planted.model, bank.base, bank.source, {1: (0,)}).argmax(-1)
        assert float((pred == bank.labels("YZ")).float().mean()) < 0.9
        # inert copies of WX / YZ at layer 2 never change the output
        base_pred = _unroll_with_swap(planted.model, bank.base, bank.source, {}).argmax(-1)
        assert torch.equal(base_pred, bank.base_labels)
        for d in range(2, 8):
            pred = _unroll_with_swap(planted.model, bank.base, bank.source, {2: (d,)}).argmax(-1)
            assert torch.equal(pred, base_pred)
