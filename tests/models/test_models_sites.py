"""Sites on the model families pyvene supports: MLP, GRU (step adapter), GPT-2 and Llama."""

from __future__ import annotations

import pytest
import torch
import pyvene as pv

import pyvene_plot as pp


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def _lm_bank(n=16, T=6, vocab=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, vocab, (n, T), generator=g)
    src = torch.randint(0, vocab, (n, T), generator=g)
    ones = torch.ones(n, T, dtype=torch.long)
    labels = torch.randint(0, vocab, (n,), generator=g)
    return pp.PairBank({"input_ids": base, "attention_mask": ones}, {"input_ids": src, "attention_mask": ones},
                       labels, {"V": labels.roll(1)}, name="lm")


def test_llama_sites_and_vanilla_equivalence():
    model = _tiny_llama()
    spec = pp.model_spec(model)
    assert spec.n_layers == 2 and spec.has_positions and spec.dim("block_output") == 32
    sites = pp.layer_sites(model, positions=[0, -1])
    assert len(sites) == 4
    assert len(pp.neuron_sites(model, layers=[1], group_size=8)) == 4
    bank = _lm_bank()
    h = pp.Handle("V", [pp.Site(1, "block_output", 2)], [1.0], 1.0, pp.Readout(), model=model)
    ours = h.run(bank.base, bank.source)
    vim = pv.IntervenableModel([{"layer": 1, "component": "block_output", "unit": "pos", "max_number_of_units": 1,
                                 "intervention_type": pv.VanillaIntervention}], model)
    n = len(bank)
    _, cf = vim(bank.base, [bank.source], {"sources->base": ([[[2]] * n], [[[2]] * n])})
    ref = cf.logits[:, -1]
    assert torch.equal(ours, ref.float())
    with pytest.raises(pp.SiteError, match="layer 5 does not exist"):
        pp.OTAlignmentSearcher(progress=False).fit(model, [pp.Site(5)], bank, bank)


def test_llama_signature_sweep_runs():
    model = _tiny_llama()
    bank = _lm_bank(n=12)
    sites = pp.layer_sites(model, positions=[-1, -2])
    eff = pp.collect_site_effects(model, sites, bank, ["V"])
    assert eff.probs.shape[:2] == (4, 12)
    assert torch.isfinite(eff.probs).all()
    # a full swap of the last layer at the read-out token hands over the source's prediction
    last = sites.index(pp.Site(1, "block_output", -1))
    with torch.no_grad():
        src_pred = pp.Readout()(model(**bank.source), bank.source).argmax(-1)
        base_pred = pp.Readout()(model(**bank.base), bank.base).argmax(-1)
    assert torch.equal(eff.preds[last], src_pred)
    assert torch.equal(eff.base_logits.argmax(-1), base_pred)
    assert not torch.equal(src_pred, base_pred)  # the check above can tell the two apart


def test_pyvene_gru_is_refused_and_step_adapter_works():
    from pyvene.models.gru.modelings_gru import GRUConfig, GRUForClassification

    torch.manual_seed(0)
    gru = GRUForClassification(GRUConfig(h_dim=8, n_layer=1, n_labels=3, include_emb=False, pdrop=0.0,
                                         max_position_embeddings=4)).eval()
    with pytest.raises(pp.ModelError, match="steppable_gru"):
        pp.model_spec(gru)
    step = pp.steppable_gru(gru)
    x = torch.randn(5, 4, 8)
    assert torch.equal(step(inputs_embeds=x)[0], gru(inputs_embeds=x)[0])  # same weights, same function
    spec = pp.model_spec(step)
    assert spec.n_layers == 4 and not spec.has_positions  # one site per timestep
    sites = pp.layer_sites(step)
    assert [s.layer for s in sites] == [0, 1, 2, 3]
    # a full swap at the last timestep makes the classifier output the source's logits
    src = torch.randn(5, 4, 8)
    h = pp.Handle("V", [pp.Site(3)], [1.0], 1.0, pp.Readout(), model=step)
    assert torch.allclose(h.run(x, src), step(inputs_embeds=src)[0], atol=1e-6)


def test_mlp_has_single_position(planted_task):
    spec = pp.model_spec(planted_task.model)
    assert not spec.has_positions
    with pytest.raises(pp.SiteError, match="no token positions"):
        pp.OTAlignmentSearcher(progress=False).fit(planted_task.model, [pp.Site(0, position=3)],
                                                   planted_task.fit, planted_task.calibration)
