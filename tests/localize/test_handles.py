"""Handles are ordinary pyvene objects, and their IIA agrees with the calibration engine."""

from __future__ import annotations

import pytest
import pyvene as pv
import torch

import pyvene_plot as pp
from pyvene_plot.interventions import SoftInterchangeIntervention, SoftSpanInterchangeIntervention
from pyvene_plot.localize import BankCache, Candidate, InterchangeEngine, score_candidates


def test_handle_config_is_pyvene_config_with_plot_interventions(heq_task):
    sites = [pp.Site(0, dims=(1, 2)), pp.Site(1, dims=(4,)), pp.Site(1, dims=(5,))]
    h = pp.Handle("WX", sites, [0.5, 0.3, 0.2], strength=2.0, model=heq_task.model)
    cfg = h.config
    assert isinstance(cfg, pv.IntervenableConfig)
    reps = cfg.representations
    assert len(reps) == 2  # one per hook: layer 0 and layer 1
    assert sorted(r.layer for r in reps) == [0, 1]
    for r in reps:
        assert r.component == "block_output" and r.unit == "pos"
        assert isinstance(r.intervention, SoftInterchangeIntervention)
        assert type(r.intervention).__module__ == "pyvene_plot.interventions"
    im = h.intervenable()
    assert isinstance(im, pv.IntervenableModel)
    assert all(isinstance(iv, (SoftInterchangeIntervention, SoftSpanInterchangeIntervention))
               for iv in im.interventions.values())
    # a detached handle says what is missing
    with pytest.raises(pp.PlotError, match="model"):
        pp.Handle("WX", sites, [0.5, 0.3, 0.2]).config


def test_handle_validation():
    with pytest.raises(pp.PlotError, match="weights"):
        pp.Handle("WX", [pp.Site(0)], [0.5, 0.5])
    with pytest.raises(pp.PlotError, match="no sites"):
        pp.Handle("WX", [], [])


@pytest.mark.parametrize("strength", [1.0, 3.0])
def test_handle_scores_equal_engine_calibration_path(heq_task, strength):
    t = heq_task
    model, bank = t.model, t.calibration
    sites = [pp.Site(0, dims=(3,)), pp.Site(0, dims=(11,)), pp.Site(1, dims=(2,)), pp.Site(2, dims=(7,))]
    weights = [0.4, 0.3, 0.2, 0.1]
    engine = InterchangeEngine(model, [s.unit for s in sites], t.readout, batch_size=256)
    cache = BankCache(engine, bank)
    cands = [Candidate(v, len(sites), strength, list(range(len(sites))), list(weights)) for v in ("WX", "YZ")]
    score_candidates(engine, cache, sites, cands)
    for c in cands:
        h = pp.Handle(c.variable, sites, weights, strength=strength, readout=t.readout)
        hs = h.scores(bank, model)
        assert hs == pytest.approx(c.scores, abs=1e-12), c.variable
        assert h.iia(bank, model) == pytest.approx(c.scores["iia"], abs=1e-12)
    # logits agree too (the engine uses cached source activations, the handle a real source run)
    coefs = {}
    for s, w in zip(sites, weights):
        vec = coefs.setdefault(s.unit, torch.zeros(len(bank), engine.widths[s.unit]))
        vec[:, list(s.dims)] += strength * w
    eng_logits = engine.run(bank.base, cache.source_acts, coefs, base_positions=cache.base_positions)
    h_logits = pp.Handle("WX", sites, weights, strength=strength).run(bank.base, bank.source, model)
    torch.testing.assert_close(eng_logits, h_logits, rtol=1e-5, atol=1e-5)


def test_calibration_scores_recorded_by_fit_match_handles(planted_task):
    t = planted_task
    res = pp.OTAlignmentSearcher(method="uot", top_k=(1, 2), lambdas=(1.0, 2.0), progress=False).fit(
        t.model, t.sites, t.fit, t.calibration)
    for v in res.variables:
        recorded = res.calibration[v]["scores"]
        assert res.handles[v].scores(t.calibration) == pytest.approx(recorded, abs=1e-12)


def test_engine_and_handle_agree_on_padded_gpt2():
    """Per-row positions from the attention mask: the batched engine (which switches pyvene's fast
    path on and off per batch) and the handle path give the same logits and scores."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=20, n_positions=16,
                                       bos_token_id=0, eos_token_id=0)).eval()
    n = 40
    g = torch.Generator().manual_seed(1)
    ids, sids = torch.randint(1, 20, (n, 8), generator=g), torch.randint(1, 20, (n, 8), generator=g)
    mask, smask = torch.ones(n, 8, dtype=torch.long), torch.ones(n, 8, dtype=torch.long)
    for i in range(n):
        mask[i, 8 - (i % 4):] = 0 if i % 4 else 1
        smask[i, 8 - ((i + 1) % 3):] = 0 if (i + 1) % 3 else 1
    base = {"input_ids": ids, "attention_mask": mask}
    src = {"input_ids": sids, "attention_mask": smask}
    readout = pp.Readout()
    with torch.no_grad():
        base_labels = readout(model(**base), base).argmax(-1)
    bank = pp.PairBank(base, src, base_labels, {"V": (base_labels + 1) % 20})
    sites = [pp.Site(0, position=-1, dims=tuple(range(16))), pp.Site(1, position=-1), pp.Site(1, position=2, dims=(3, 4))]
    weights, lam = [0.5, 0.3, 0.2], 2.0
    engine = InterchangeEngine(model, [s.unit for s in sites], readout, batch_size=16)
    cache = BankCache(engine, bank)
    # collected source activations are the hooked block outputs at each row's last real token
    grabbed = {}
    hooks = [model.transformer.h[l].register_forward_hook(lambda m, i, o, l=l: grabbed.__setitem__(l, o[0] if isinstance(o, tuple) else o))
             for l in (0, 1)]
    try:
        with torch.no_grad():
            model(**src)
    finally:
        for hk in hooks:
            hk.remove()
    last = smask.sum(1) - 1
    for l in (0, 1):
        torch.testing.assert_close(cache.source_acts[(l, "block_output", -1)], grabbed[l][torch.arange(n), last])
    cand = Candidate("V", 3, lam, [0, 1, 2], weights)
    score_candidates(engine, cache, sites, [cand])
    handle = pp.Handle("V", sites, weights, strength=lam)
    assert handle.scores(bank, model) == pytest.approx(cand.scores, nan_ok=True)
    coefs = {}
    for s, w in zip(sites, weights):
        vec = coefs.setdefault(s.unit, torch.zeros(n, engine.widths[s.unit]))
        vec[:, list(s.dims) if s.dims is not None else slice(None)] += lam * w
    eng_logits = engine.run(bank.base, cache.source_acts, coefs, base_positions=cache.base_positions)
    torch.testing.assert_close(eng_logits, handle.run(base, src, model), rtol=1e-5, atol=1e-5)
    clean = engine.forward_clean(base)
    assert (eng_logits - clean).abs().max() > 1e-3
