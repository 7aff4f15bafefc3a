"""Tests of the built-in ``gpt2_lookup`` task (tiny GPT-2 trained in-process on a pointer-lookup sum).

Labels are recomputed here straight from the token ids (and, for a few pairs, through the
causal model), independently of the code that built the banks.
"""

from __future__ import annotations

import pytest
import torch

import pyvene_plot as pp
import pyvene_plot.tasks  # noqa: F401  (makes pp.tasks available)
from pyvene_plot.models import Readout
from pyvene_plot.progressive import Stage
from pyvene_plot.tasks import gpt2_lookup as G

SPLITS = ("fit", "calibration", "test")


@pytest.fixture(scope="module")
def task():
    return pp.tasks.load("gpt2_lookup", seed=0)


def _decode(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T) token ids -> slot values (N, N_SLOTS) and pointers (N, 2)."""
    x = ids[:, : G.N_SLOTS] - G.VALUE_TOKENS[0]
    p = ids[:, G.N_SLOTS :] - G.POINTER_TOKENS[0]
    assert int(x.min()) >= 0 and int(x.max()) < G.K, "a slot token is not a value token"
    assert int(p.min()) >= 0 and int(p.max()) < G.N_SLOTS, "a pointer token is not a pointer"
    return x, p


def _looked_up(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x, p = _decode(ids)
    return x.gather(1, p[:, :1])[:, 0], x.gather(1, p[:, 1:])[:, 0]


def _direct_labels(base_ids: torch.Tensor, src_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    b1, b2 = _looked_up(base_ids)
    s1, s2 = _looked_up(src_ids)
    return {"base": b1 + b2, "V1": s1 + b2, "V2": b1 + s2}


def _bank(task, split):
    return getattr(task, split)


# ------------------------------------------------------------------------------ structure
def test_registered_and_cached(task):
    assert "gpt2_lookup" in pp.tasks.names()
    assert pp.tasks.load("gpt2_lookup", seed=0) is task
    assert task.name.startswith("gpt2_")
    assert task.variables == ["V1", "V2"]
    assert task.causal_model is not None


def test_model_frozen_eval_gpt2(task):
    from transformers import GPT2LMHeadModel

    assert type(task.model) is GPT2LMHeadModel
    assert not task.model.training
    assert all(not p.requires_grad for p in task.model.parameters())


def test_sites_and_stages(task):
    n_layer = task.model.config.n_layer
    assert len(task.sites) == n_layer * G.SEQ_LEN
    assert {s.component for s in task.sites} == {"block_output"}
    assert {s.position for s in task.sites} == set(range(G.SEQ_LEN))
    assert {s.layer for s in task.sites} == set(range(n_layer))
    assert [s.kind for s in task.default_stages] == ["layer", "position", "coordinates"]
    assert all(isinstance(s, Stage) for s in task.default_stages)
    assert task.model.config.n_embd % max(task.default_stages[-1].group_sizes) == 0


def test_info(task):
    info = task.info
    assert info["train_seconds"] < 120, info["train_seconds"]  # trained in-process, in seconds
    assert info["vocab"] == list(G.VOCAB)
    assert info["answer_tokens"] == list(G.ANSWER_TOKENS)


# ------------------------------------------------------------------------------ accuracy
def test_model_accuracy_heldout(task):
    assert task.info["heldout_accuracy"] >= 0.99
    assert task.info["n_heldout"] > 1000


def test_readout_matches_direct_labels(task):
    ro = task.readout
    assert isinstance(ro, Readout)
    assert ro.position == "last" and ro.label_tokens == tuple(G.ANSWER_TOKENS)
    for split in SPLITS:
        bank = _bank(task, split)
        with torch.no_grad():
            out = task.model(**bank.base)
        logits = ro(out, bank.base)
        assert logits.shape == (len(bank), len(G.ANSWER_TOKENS))
        pred = logits.argmax(-1)
        # Same as reading the full vocabulary at the last token and mapping back to classes.
        full = out.logits[:, -1].argmax(-1) - G.ANSWER_TOKENS[0]
        assert (pred == full).float().mean() >= 0.99
        assert (pred == bank.base_labels).float().mean() >= 0.99
        assert (pred == _direct_labels(bank.base["input_ids"], bank.source["input_ids"])["base"]).float().mean() >= 0.99


def test_accuracy_on_fresh_inputs(task):
    all_ids = G._all_inputs()
    idx = torch.randperm(len(all_ids), generator=torch.Generator().manual_seed(7))[:3000]
    ids = all_ids[idx]
    b1, b2 = _looked_up(ids)
    inp = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        pred = task.readout(task.model(**inp), inp).argmax(-1)
    assert (pred == b1 + b2).float().mean() >= 0.99


# ------------------------------------------------------------------------------ banks
def test_bank_sizes_and_inputs(task):
    sizes = {s: len(_bank(task, s)) for s in SPLITS}
    assert sizes == {"fit": 1000, "calibration": 500, "test": 1000}
    for split in SPLITS:
        bank = _bank(task, split)
        assert bank.name == split
        assert bank.variables == ["V1", "V2"]
        assert bank.num_classes == len(G.ANSWER_TOKENS)
        for inp in (bank.base, bank.source):
            assert set(inp) == {"input_ids", "attention_mask"}
            assert inp["input_ids"].dtype == torch.long
            assert inp["input_ids"].shape == (len(bank), G.SEQ_LEN)
            assert bool((inp["attention_mask"] == 1).all())
            _decode(inp["input_ids"])


def test_banks_disjoint(task):
    rows = {}
    for split in SPLITS:
        bank = _bank(task, split)
        pairs = torch.cat([bank.base["input_ids"], bank.source["input_ids"]], 1).tolist()
        rows[split] = {tuple(r) for r in pairs}
    assert not rows["fit"] & rows["calibration"]
    assert not rows["fit"] & rows["test"]
    assert not rows["calibration"] & rows["test"]


@pytest.mark.parametrize("split", SPLITS)
def test_labels_match_direct_computation(task, split):
    bank = _bank(task, split)
    direct = _direct_labels(bank.base["input_ids"], bank.source["input_ids"])
    assert torch.equal(bank.base_labels, direct["base"])
    for var in ("V1", "V2"):
        assert torch.equal(bank.labels(var), direct[var])


def test_labels_match_causal_model(task):
    cm = task.causal_model
    bank = task.test
    bases, sources = bank.settings
    for i in range(20):
        b, s = bases[i], sources[i]
        assert G.to_model_inputs(b)["input_ids"].tolist() == bank.base["input_ids"][i].tolist()
        assert G.to_model_inputs(s)["input_ids"].tolist() == bank.source["input_ids"][i].tolist()
        assert cm.run_forward(b)["O"] == int(bank.base_labels[i])
        for var in ("V1", "V2"):
            assert cm.run_interchange(b, {var: s})["O"] == int(bank.labels(var)[i])


@pytest.mark.parametrize("split", SPLITS)
def test_every_variable_matters(task, split):
    bank = _bank(task, split)
    for var in bank.variables:
        assert bank.changed(var).float().mean() >= 0.30


# ------------------------------------------------------------------------------ localisation
def _swap_block_output(model, base, source, layer, pos):
    """Copy the residual stream after block ``layer`` at ``pos`` from the source run (plain hooks)."""
    block = model.transformer.h[layer]
    cache = {}

    def grab(_m, _i, out):
        cache["h"] = (out[0] if isinstance(out, tuple) else out)[:, pos].clone()

    def put(_m, _i, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        h[:, pos] = cache["h"]
        return (h, *out[1:]) if isinstance(out, tuple) else h

    with torch.no_grad():
        hk = block.register_forward_hook(grab)
        try:
            model(**source)
        finally:
            hk.remove()
        hk = block.register_forward_hook(put)
        try:
            out = model(**base)
        finally:
            hk.remove()
    return out


def test_variables_live_at_documented_sites(task):
    """Full-vector interchange at L0@5 realises V1 and at L0@6 realises V2 (the documented sites)."""
    bank = task.test
    for var, pos, other in (("V1", 5, "V2"), ("V2", 6, "V1")):
        out = _swap_block_output(task.model, bank.base, bank.source, 0, pos)
        pred = task.readout(out, bank.base).argmax(-1)
        assert (pred == bank.labels(var)).float().mean() >= 0.95
        assert (pred == bank.labels(other)).float().mean() < 0.5
