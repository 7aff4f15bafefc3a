"""The interchange engine's fast paths (prefix caching, last-token logits, auto batches) change nothing."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import pyvene_plot as pp
from pyvene_plot.localize import InterchangeEngine


def _gpt2():
    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(n_layer=3, n_head=2, n_embd=16, vocab_size=23, n_positions=8,
                                          bos_token_id=0, eos_token_id=0)).eval()
    return m


def _llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=29, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    return LlamaForCausalLM(cfg).eval()


def _run_all(model, units, readout, prefix, batch_size="auto"):
    torch.manual_seed(1)
    base = torch.randint(0, 20, (10, 6))
    src = torch.randint(0, 20, (10, 6))
    eng = InterchangeEngine(model, units, readout, prefix_cache=prefix, batch_size=batch_size)
    clean = eng.forward_clean(base)
    acts = eng.collect(src)
    outs = [clean]
    for u in units:  # one unit at a time, then all together (mixed depths)
        w = eng.widths[u]
        outs.append(eng.run(base, acts, {u: torch.rand(10, w)}))
    outs.append(eng.run(base, acts, {u: torch.rand(5, eng.widths[u]) for u in units},
                        index=torch.tensor([0, 3, 3, 9, 1])))
    return eng, outs


@pytest.mark.parametrize("make", [_gpt2, _llama])
def test_prefix_cache_and_last_logits_are_exact(make):
    model = make()
    units = [(0, "block_output", 2, None), (2, "block_output", -1, None), (1, "mlp_output", 3, None),
             (2, "block_output", 0, None)]
    readout = pp.Readout()
    eng_on, on = _run_all(model, units, readout, prefix=True)
    eng_off, off = _run_all(model, units, readout, prefix=False, batch_size=3)
    assert eng_on._blocks and not eng_off._blocks
    assert eng_on._depth[(1, "mlp_output", 3, None)] == 0  # inside block 1: blocks 0..0 replayed
    for a, b in zip(on, off):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # every block got its own forward back
    assert not any("forward" in vars(b) for b in eng_on._blocks)


def test_prefix_cache_restores_blocks_after_an_error():
    model = _gpt2()
    eng = InterchangeEngine(model, [(1, "block_output", 2, None)], pp.Readout())
    base = torch.randint(0, 20, (4, 6))
    acts = eng.collect(base)
    bad = {k: v[:, :3] for k, v in acts.items()}  # wrong width: pyvene/our intervention fails mid-run
    with pytest.raises(Exception):
        eng.run(base, bad, {(1, "block_output", 2, None): torch.ones(4, 16)})
    assert not any("forward" in vars(b) for b in eng._blocks)
    ok = eng.run(base, acts, {(1, "block_output", 2, None): torch.ones(4, 16)})
    assert torch.isfinite(ok).all()


def test_prefix_cache_off_in_training_mode_and_bad_option():
    model = _gpt2()
    eng = InterchangeEngine(model, [(1, "block_output", 2, None)], pp.Readout())
    assert eng._run_depth([(1, "block_output", 2, None)]) == 1
    model.train()  # dropout on: nothing is replayed
    assert eng._run_depth([(1, "block_output", 2, None)]) == -1
    model.eval()
    with pytest.raises(pp.SiteError, match="prefix_cache"):
        InterchangeEngine(model, [(1, "block_output", 2, None)], pp.Readout(), prefix_cache="yes")
    with pytest.raises(pp.SiteError, match="batch_size"):
        InterchangeEngine(model, [(1, "block_output", 2, None)], pp.Readout(), batch_size=0)


def test_auto_batch_size_scales_with_the_model():
    small = InterchangeEngine(_gpt2(), [(0, "block_output", 0, None)], pp.Readout())
    assert small.rows_per_batch(torch.zeros(4, 6, dtype=torch.long)) == 8192
    lm = InterchangeEngine(_llama(), [(0, "block_output", 0, None)], pp.Readout(position=2))
    lm.batch_mb = 0.01  # a tight budget gives small batches, never below 32
    assert lm.rows_per_batch(torch.zeros(4, 6, dtype=torch.long)) == 32
    lm.batch_mb = 1.0  # full-sequence logits (readout at a fixed position) count against the budget
    per_row = 4 * (6 * 8 * 16 + 29 * 6 + 29)
    assert lm.rows_per_batch(torch.zeros(4, 6, dtype=torch.long)) == 2**20 // per_row
