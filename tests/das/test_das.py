"""Tests of DAS training (pyvene_plot.das): specs, interventions, both trainers, selection, save/load.

Fast by design: the planted MLP (hand-set weights, d=8) and a tiny random GPT-2 built from a config.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import pyvene as pv
import torch

import pyvene_plot as pp
from pyvene_plot import das as D
from pyvene_plot.das._run import _better
from pyvene_plot.das._train import TrainSite, _loss_on_batch, _Stopper
from pyvene_plot.data import as_model_kwargs
from pyvene_plot.models import Readout
from pyvene_plot.tasks.planted import mlp_interchange_logits

torch.set_num_threads(1)
CPU = torch.device("cpu")


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def planted():
    return pp.tasks.load("planted")


@pytest.fixture(scope="module")
def planted_das(planted):
    """DAS at layer 1 (whole vector, k=1) on the planted MLP: both variables."""
    spec = D.DASSpec(None, layer=1, subspace_sizes=(1,), source="test")
    return D.run_das(planted.model, [spec], planted.fit, planted.calibration, readout=planted.readout,
                     epochs=30, progress=False, seed=0)


def _tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=24, n_positions=8, n_embd=16, n_layer=2, n_head=2, n_inner=32,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(cfg)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _token_bank(n: int, name: str, seed: int, padded: bool = False) -> pp.PairBank:
    """Random 5-token sequences; labels in 0..3 read through Readout(label_tokens=(20..23))."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 20, (n, 5), generator=g)
    src = torch.randint(0, 20, (n, 5), generator=g)
    mask_b, mask_s = torch.ones_like(base), torch.ones_like(src)
    if padded:
        mask_b[::2, 0] = 0  # left padding on some rows
    y = base[:, -1] % 4
    cf = {"A": src[:, -1] % 4, "B": (base[:, 0] + src[:, 1]) % 4}
    return pp.PairBank({"input_ids": base, "attention_mask": mask_b}, {"input_ids": src, "attention_mask": mask_s},
                       y, cf, name=name, num_classes=4)


@pytest.fixture(scope="module")
def gpt():
    model = _tiny_gpt2()
    readout = Readout(position="last", label_tokens=(20, 21, 22, 23))
    return model, readout, _token_bank(96, "fit", 1), _token_bank(64, "calibration", 2)


# ------------------------------------------------------------------------------ specs
def test_spec_validation_errors():
    with pytest.raises(pp.PlotError, match="empty support"):
        D.DASSpec("WX", layer=1, dims=())
    with pytest.raises(pp.PlotError, match=r"3.*larger than the support width 2"):
        D.DASSpec("WX", layer=1, dims=(0, 1), subspace_sizes=(1, 3))
    with pytest.raises(pp.PlotError, match="orthonormal"):
        D.DASSpec(None, layer=0, basis=np.ones((2, 8)))
    with pytest.raises(pp.PlotError):
        D.DASSpec(None, layer=0, subspace_sizes=(0,))
    basis = np.linalg.qr(np.random.default_rng(0).normal(size=(8, 3)))[0].T  # (3, 8) orthonormal rows
    with pytest.raises(pp.PlotError, match=r"4.*support width 3"):
        D.DASSpec(None, layer=0, basis=basis, subspace_sizes=(4,))


def test_spec_hash_eq_and_dict_roundtrip():
    basis = np.linalg.qr(np.random.default_rng(0).normal(size=(8, 3)))[0].T
    a = D.DASSpec("WX", 1, dims=(0, 2), basis=basis, subspace_sizes=(1, 2), source="plot:pca")
    b = D.DASSpec.from_dict(json.loads(json.dumps(a.to_dict())))
    assert a == b and hash(a) == hash(b)
    c = D.DASSpec("WX", 1, dims=(0, 2), basis=-basis, subspace_sizes=(1, 2), source="plot:pca")
    assert a != c  # the basis takes part in equality through its digest
    assert len({a, b, c}) == 2
    assert a.support_width() == 2 and a.label.startswith("L1.block_output@-1{basis 3x8}")
    whole = D.DASSpec(None, 0)
    with pytest.raises(pp.PlotError, match="model="):
        whole.support_width()


def test_size_larger_than_whole_vector_raises_in_run_das(planted):
    spec = D.DASSpec(None, layer=1, subspace_sizes=(1, 16))
    with pytest.raises(pp.PlotError, match=r"16.*support width 8"):
        D.run_das(planted.model, [spec], planted.fit, planted.calibration, progress=False)
    with pytest.raises(pp.PlotError, match="outside the 8-dimensional"):
        D.run_das(planted.model, [D.DASSpec(None, 1, dims=(3, 9))], planted.fit, planted.calibration, progress=False)


def test_full_das_specs_enumeration(planted, gpt):
    specs = D.full_das_specs(planted.model, subspace_sizes=(1, 2, 4, 8, 16))
    assert [(s.layer, s.position) for s in specs] == [(0, -1), (1, -1), (2, -1)]
    assert all(s.subspace_sizes == (1, 2, 4, 8) and s.variable is None and s.whole_vector for s in specs)
    assert all(s.source == "full_das" for s in specs)
    per_var = D.full_das_specs(planted.model, variables=["WX", "YZ"], layers=[1, 2], subspace_sizes=(1,))
    assert [(s.layer, s.variable) for s in per_var] == [(1, "WX"), (1, "YZ"), (2, "WX"), (2, "YZ")]
    model, _, fit, _ = gpt
    with pytest.raises(pp.PlotError, match="positions"):
        D.full_das_specs(model)
    specs = D.full_das_specs(model, bank=fit, subspace_sizes=(1, 4, 32))
    assert [(s.layer, s.position) for s in specs] == [(l, p) for l in range(2) for p in range(5)]
    assert specs[0].subspace_sizes == (1, 4, 16)  # clipped to d = 16
    assert len(D.full_das_specs(model, positions=[-1, 3], layers=[1])) == 2
    assert D.clip_sizes((1, 2, 4, 8, 16), 6) == (1, 2, 4, 6)


# ------------------------------------------------------------------------------ interventions
def test_support_intervention_matches_manual_computation():
    torch.manual_seed(0)
    d, m, k = 12, 5, 2
    P = torch.linalg.qr(torch.randn(d, m))[0].T.contiguous()  # (m, d) orthonormal rows
    iv = D.SupportRotatedSpaceIntervention(embed_dim=d, latent_dim=m, low_rank_dimension=k, support=P, position=3)
    assert iv.keep_last_dim and pp.interventions.intervention_position(iv) == 3
    W = iv.rotate_layer.weight.detach()  # (m, k), orthonormal columns
    assert torch.allclose(W.T @ W, torch.eye(k), atol=1e-5)
    h, hs = torch.randn(4, 1, d), torch.randn(4, 1, d)
    out = iv(h, hs).detach()
    # manual: coordinates in the support, rotate, swap the first k rotated coordinates, map back
    zb, zs = (h @ P.T) @ W, (hs @ P.T) @ W
    manual = h + ((zs - zb) @ W.T) @ P
    assert torch.allclose(out, manual, atol=1e-5)
    # only span(P) moves
    outside = torch.eye(d) - P.T @ P
    assert torch.allclose((out - h) @ outside, torch.zeros_like(h), atol=1e-5)
    # per-row subspaces: row 0 swaps rotated coordinate 0 only, row 1 nothing
    sub = iv(h[:2], hs[:2], subspaces=[[0], []]).detach()
    assert torch.allclose(sub[1], h[1], atol=1e-6)
    assert torch.allclose(sub[0], h[0] + ((zs[0] - zb[0])[..., :1] @ W[:, :1].T) @ P, atol=1e-5)


def test_native_dims_full_rank_is_vanilla_swap_through_pyvene(planted):
    """k = m on native dims: the rotation cancels, so DAS equals a plain interchange of those neurons."""
    model, bank = planted.model, planted.test
    for dims in ((0,), (0, 1, 5)):
        spec = D.DASSpec("WX", layer=1, dims=dims, subspace_sizes=(len(dims),))
        im = pv.IntervenableModel([spec.to_representation(len(dims), model=model, seed=3)], model, use_fast=False)
        got = pp.run_intervenable(im, bank.base, bank.source)
        want = mlp_interchange_logits(model, bank.base, bank.source, 1, dims)
        assert torch.allclose(got, want, atol=1e-5)
    whole = D.DASSpec(None, layer=1, subspace_sizes=(8,))
    im = pv.IntervenableModel([whole.to_representation(8, model=model, seed=1)], model, use_fast=False)
    assert isinstance(next(iter(im.interventions.values())), pv.LowRankRotatedSpaceIntervention)
    got = pp.run_intervenable(im, bank.base, bank.source)
    assert torch.allclose(got, mlp_interchange_logits(model, bank.base, bank.source, 1, None), atol=1e-4)


def test_spec_representations_accepted_by_pyvene_on_gpt2(gpt):
    model, readout, fit, _ = gpt
    basis = np.linalg.qr(np.random.default_rng(1).normal(size=(16, 4)))[0].T
    specs = [D.DASSpec(None, 1, position=-1, subspace_sizes=(2,)),
             D.DASSpec(None, 0, position=2, dims=(0, 3, 7), subspace_sizes=(2,)),
             D.DASSpec(None, 0, position=-2, basis=basis, dims=(0, 1, 2), subspace_sizes=(3,))]
    clean = readout(model(**as_model_kwargs(fit.base)), as_model_kwargs(fit.base))
    for spec in specs:
        k = spec.subspace_sizes[0]
        rep = spec.to_representation(k, model=model, seed=0)
        assert rep["low_rank_dimension"] == k and rep["unit"] == "pos" and rep["max_number_of_units"] == 1
        im = pv.IntervenableModel(pv.IntervenableConfig(representations=[rep]), model, use_fast=False)
        out = pp.run_intervenable(im, fit.base, fit.source, readout)
        assert out.shape == (len(fit), 4) and torch.isfinite(out).all()
        assert not torch.allclose(out, clean, atol=1e-6), f"{spec.label}: interchange was a no-op"


# ------------------------------------------------------------------------------ training
def test_planted_layer1_k1_reaches_test_iia(planted, planted_das):
    das = planted_das
    assert das.trainer == "loop"  # inputs_embeds model: pyvene's trainer cannot run
    assert das.n_trained == 2 and set(das.best) == {"WX", "YZ"}
    for v in ("WX", "YZ"):
        h = das.best[v]
        assert h.k == 1 and h.spec.layer == 1
        assert isinstance(h.intervenable, pv.IntervenableModel)
        assert h.iia(planted.test) >= 0.95, (v, h.scores(planted.test))
    # the learned direction weighs the planted neuron most (0 for WX, 1 for YZ) and avoids the other one
    for v, own, other in (("WX", 0, 1), ("YZ", 1, 0)):
        q = das.best[v].directions()[:, 0].abs()
        assert int(q.argmax()) == own and float(q[own]) > 0.7 and float(q[other]) < 0.3, (v, q)


def test_result_bookkeeping(planted, planted_das):
    das = planted_das
    for c in das.candidates:
        assert {"variable", "spec", "layer", "position", "support_width", "k", "epochs", "final_loss", "train_s",
                "calibration", "seed", "lr", "trainer", "selected"} <= set(c)
        h = c["loss_history"]
        assert c["epochs"] == len(h) and c["final_loss"] == h[-1] and c["best_loss"] == min(h)
        assert c["stopped_early"] == (c["epochs"] < 30)
        assert c["support_width"] == 8 and c["lr"] == D.auto_lr(8) and c["trainer"] == "loop" and c["k"] == 1
    assert [c["variable"] for c in das.candidates] == ["WX", "YZ"] and all(c["selected"] for c in das.candidates)
    assert das.candidates[0]["seed"] != das.candidates[1]["seed"]  # seeds differ per variable
    # the timings add up: the totals are the candidates' sums, and the runtime covers all three phases
    assert das.timings["train_s"] == pytest.approx(sum(c["train_s"] for c in das.candidates))
    assert das.timings["calibration_s"] == pytest.approx(sum(c["calibration_s"] for c in das.candidates))
    assert das.runtime_s >= das.timings["collect_s"] + das.timings["train_s"] + das.timings["calibration_s"]
    # the handle's meta is its candidate's row
    for c in das.candidates:
        meta = das.best[c["variable"]].meta
        assert meta["selection"] == "balanced" and meta["loss_history"] == c["loss_history"]
        assert meta["seed"] == c["seed"] and meta["calibration"] == c["calibration"]
    # cached-source calibration scores == real-source handle scores
    for v in das.variables:
        row = next(c for c in das.candidates if c["variable"] == v and c["selected"])
        assert das.best[v].scores(planted.calibration)["iia"] == pytest.approx(row["calibration"]["iia"])
    with pytest.raises(pp.PlotError, match="2 variables"):
        das.best.iia(planted.test)
    assert set(das.evaluate(planted.test)) == {"WX", "YZ"}
    table = das.table()
    assert table.count("\n| WX") == 1 and table.count("| * |") == 2 and "2 trainings (loop trainer)" in table


def test_to_json_and_single_variable_best(planted, tmp_path):
    spec = D.DASSpec("WX", layer=1, dims=(0, 1, 2), subspace_sizes=(1, 2))
    das = D.run_das(planted.model, [spec], planted.fit, planted.calibration, epochs=3, progress=False)
    assert das.variables == ["WX"] and das.n_trained == 2
    # one variable: best.iia works directly and is that variable's handle's IIA
    assert das.best.iia(planted.test) == das.best["WX"].iia(planted.test) == das.evaluate(planted.test)["WX"]
    selected = [c for c in das.candidates if c["selected"]]
    assert len(selected) == 1 and selected[0]["k"] == das.best["WX"].k
    p = das.to_json(tmp_path / "das.json")
    d = json.loads(p.read_text())
    assert d["n_trained"] == 2 and d["trainer"] == "loop" and len(d["candidates"]) == 2
    assert D.DASSpec.from_dict(d["best"]["WX"]["spec"]) == spec


def test_selection_tie_break_prefers_smaller_k_then_earlier_spec():
    cur = (0.9, 4, 0)
    assert _better(0.95, 8, 3, cur)
    assert not _better(0.85, 1, 0, cur)
    assert _better(0.9, 2, 5, cur)        # tie -> smaller k
    assert not _better(0.9, 4, 1, cur)    # tie, same k -> earlier spec stays
    assert _better(0.9, 4, 0, (0.9, 4, 2))
    assert _better(float("nan"), 1, 0, None)
    assert not _better(float("nan"), 1, 0, (0.0, 8, 9))  # NaN scores lose to any real score


def test_early_stopping_rule():
    st = _Stopper(min_epochs=2, patience=2, rel_tol=1e-2)
    assert [st.update(x) for x in (1.0, 0.5, 0.499, 0.498)] == [False, False, False, True]
    st = _Stopper(min_epochs=5, patience=1, rel_tol=0.0)
    assert [st.update(1.0) for _ in range(5)] == [False, False, False, False, True]
    with pytest.raises(pp.PlotError):
        _Stopper(1, 1, 0).update(float("nan"))


@pytest.mark.parametrize("spec", [D.DASSpec(None, 1, subspace_sizes=(3,)),
                                  D.DASSpec(None, 1, dims=(0, 1, 4), subspace_sizes=(2,))])
def test_parametrize_cached_gives_identical_gradients(planted, spec):
    model = planted.model
    site = TrainSite(model, spec, spec.subspace_sizes[0], seed=0, device=CPU)
    eng = pp.InterchangeEngine(model, [(1, "block_output", -1, None)])
    src = eng.collect(planted.fit.source)[(1, "block_output", -1)]
    bpos = eng.positions(planted.fit.base)[(1, "block_output", -1)]
    kw = as_model_kwargs(planted.fit.base)
    grads, losses = [], []
    for cached in (False, True):
        for p in site.params:
            p.grad = None
        with torch.nn.utils.parametrize.cached() if cached else contextlib.nullcontext():
            loss = _loss_on_batch(site, kw, bpos, src, planted.fit.labels("WX"), torch.arange(64),
                                    planted.readout, CPU)
            loss.backward()
        losses.append(float(loss.detach()))
        grads.append([p.grad.clone() for p in site.params])
    assert losses[0] == pytest.approx(losses[1], abs=1e-7)
    for a, b in zip(*grads):
        assert a.abs().sum() > 0
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)  # equal up to float re-association


def test_trainer_pyvene_rejected_for_inputs_embeds_models(planted):
    with pytest.raises(pp.PlotError, match="trainer='pyvene' cannot run.*inputs_embeds"):
        D.run_das(planted.model, [D.DASSpec(None, 1)], planted.fit, planted.calibration, trainer="pyvene",
                  progress=False)
    with pytest.raises(pp.PlotError, match="unknown trainer"):
        D.run_das(planted.model, [D.DASSpec(None, 1)], planted.fit, planted.calibration, trainer="hf")


def test_pyvene_train_alignment_path_on_gpt2_matches_loop(gpt):
    model, readout, fit, cal = gpt
    specs = [D.DASSpec(None, 1, position=-1, subspace_sizes=(2,)),
             D.DASSpec("A", 0, position=4, dims=tuple(range(8)), subspace_sizes=(2,))]
    kw = {"readout": readout, "epochs": 3, "min_epochs": 3, "batch_size": 32, "progress": False, "seed": 5,
          "lr": 0.02}
    auto = D.run_das(model, specs, fit, cal, **kw)
    assert auto.trainer == "pyvene" and all(c["trainer"] == "pyvene" for c in auto.candidates)
    assert auto.n_trained == 3  # shared spec x {A, B} + the A-only spec
    hist = [c["loss_history"] for c in auto.candidates]
    assert all(len(h) == 3 and h[-1] < h[0] for h in hist), hist
    loop = D.run_das(model, specs, fit, cal, trainer="loop", **kw)
    assert loop.trainer == "loop"
    # same seeds, same batches, same Adam: the two trainers follow the same trajectory
    for a, b in zip(auto.candidates, loop.candidates):
        assert np.allclose(a["loss_history"], b["loss_history"], rtol=1e-4, atol=1e-5)
        assert a["calibration"] == b["calibration"]
    # padded banks do not fit train_alignment (no attention_mask): auto falls back, explicit raises
    padded = _token_bank(48, "fit", 3, padded=True)
    res = D.run_das(model, specs[:1], padded, cal, variables=["A"], **{**kw, "epochs": 1, "min_epochs": 1})
    assert res.trainer == "loop" and "padded" in res.settings["pyvene_trainer_unavailable"]
    with pytest.raises(pp.PlotError, match="padded"):
        D.run_das(model, specs[:1], padded, cal, variables=["A"], trainer="pyvene", **kw)


# ------------------------------------------------------------------------------ save / load
def test_save_load_roundtrip_same_process(planted, planted_das, gpt, tmp_path):
    h = planted_das.best["WX"]
    before = h.run(planted.test.base, planted.test.source)
    h.save(tmp_path / "wx")
    im = pv.IntervenableModel.load(str(tmp_path / "wx"), planted.model)
    assert isinstance(next(iter(im.interventions.values())), D.LowRankDASIntervention)
    assert torch.equal(pp.run_intervenable(im, planted.test.base, planted.test.source, h.readout), before)
    h2 = D.DASHandle.load(tmp_path / "wx", planted.model)
    assert h2.spec == h.spec and h2.k == h.k and torch.equal(h2.run(planted.test.base, planted.test.source), before)

    # restricted support with a position on GPT-2
    model, readout, fit, cal = gpt
    spec = D.DASSpec("A", 0, position=-2, dims=(1, 5, 9, 12), subspace_sizes=(2,))
    das = D.run_das(model, [spec], fit, cal, readout=readout, epochs=1, progress=False, trainer="loop")
    g = das.best["A"]
    before = g.run(cal.base, cal.source)
    g.save(tmp_path / "a")
    im = pv.IntervenableModel.load(str(tmp_path / "a"), model)
    iv = next(iter(im.interventions.values()))
    assert isinstance(iv, D.SupportRotatedSpaceIntervention)
    assert pp.interventions.intervention_position(iv) == -2 and iv.support_width == 4 and iv.k == 2
    assert torch.equal(pp.run_intervenable(im, cal.base, cal.source, readout), before)


def test_save_load_roundtrip_fresh_process(planted, tmp_path):
    spec = D.DASSpec("YZ", layer=1, dims=(0, 1, 3), subspace_sizes=(2,))
    das = D.run_das(planted.model, [spec], planted.fit, planted.calibration, epochs=2, progress=False)
    h = das.best["YZ"]
    h.save(tmp_path / "yz")
    torch.save(h.run(planted.test.base, planted.test.source), tmp_path / "logits.pt")
    code = textwrap.dedent(f"""
        import torch, pyvene, pyvene_plot as pp
        torch.set_num_threads(1)
        task = pp.tasks.load("planted")
        im = pyvene.IntervenableModel.load({str(tmp_path / 'yz')!r}, task.model)
        got = pp.run_intervenable(im, task.test.base, task.test.source)
        want = torch.load({str(tmp_path / 'logits.pt')!r})
        assert type(next(iter(im.interventions.values()))).__name__ == "SupportRotatedSpaceIntervention"
        assert torch.equal(got, want), (got - want).abs().max()
        print("ROUNDTRIP_OK")
    """)
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert "ROUNDTRIP_OK" in out.stdout, out.stderr[-2000:]


# ------------------------------------------------------------------------------ DASResult JSON round trip
def _same(a, b) -> bool:
    """Equality that treats NaN as equal to NaN (calibration scores may be NaN)."""
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _assert_results_equal(a: D.DASResult, b: D.DASResult) -> None:
    for f in ("candidates", "runtime_s", "n_trained", "trainer", "variables", "settings", "timings"):
        assert _same(getattr(a, f), getattr(b, f)), f
    assert isinstance(b.best, D.DASBest) and list(a.best) == list(b.best)
    for v in a.best:
        ha, hb = a.best[v], b.best[v]
        assert hb.variable == ha.variable and hb.k == ha.k and hb.readout == ha.readout
        assert hb.spec == ha.spec and hb.spec.label == ha.spec.label
        assert _same(hb.meta, ha.meta)
        sa, sb = ha.state_dict(), hb.state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def test_das_result_json_round_trip(planted, planted_das, tmp_path):
    basis = np.linalg.qr(np.random.default_rng(2).normal(size=(8, 4)))[0].T
    spec = D.DASSpec("WX", layer=1, basis=basis, dims=(0, 1, 3), subspace_sizes=(1, 2))
    restricted = D.run_das(planted.model, [spec], planted.fit, planted.calibration, epochs=2, progress=False)
    for name, das in (("whole", planted_das), ("basis", restricted)):
        p = das.to_json(tmp_path / f"{name}.json")
        raw = json.loads(p.read_text())
        assert raw["format_version"] == 1 and raw["writer"].startswith("pyvene_plot ")
        back = D.DASResult.from_json(p, model=planted.model)
        _assert_results_equal(das, back)
        for v in das.variables:
            assert back.best[v].iia(planted.test) == das.best[v].iia(planted.test)
            assert torch.equal(back.best[v].run(planted.test.base, planted.test.source),
                               das.best[v].run(planted.test.base, planted.test.source))
            assert torch.equal(back.best[v].directions(), das.best[v].directions())
        # without a model: every field comes back, the handles wait for attach(model)
        detached = D.DASResult.from_json(p)
        _assert_results_equal(das, detached)
        v = das.variables[0]
        with pytest.raises(pp.PlotError, match="attach"):
            detached.best[v].iia(planted.test)
        detached.attach(planted.model)
        assert detached.best[v].iia(planted.test) == das.best[v].iia(planted.test)


def test_das_result_from_json_errors_name_the_file(planted_das, tmp_path):
    p = planted_das.to_json(tmp_path / "das.json")
    text = p.read_text()
    bad = tmp_path / "truncated.json"
    bad.write_text(text[: len(text) // 2])
    with pytest.raises(pp.PlotError, match=r"truncated\.json.*truncated"):
        D.DASResult.from_json(bad)
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(pp.PlotError, match=r"empty\.json.*empty"):
        D.DASResult.from_json(tmp_path / "empty.json")
    d = json.loads(text)
    del d["candidates"]
    (tmp_path / "no_candidates.json").write_text(json.dumps(d))
    with pytest.raises(pp.PlotError, match=r"no_candidates\.json.*missing \['candidates'\]"):
        D.DASResult.from_json(tmp_path / "no_candidates.json")
    d = json.loads(text)
    del d["best"]["YZ"]["weights"]
    (tmp_path / "no_weights.json").write_text(json.dumps(d))
    with pytest.raises(pp.PlotError, match=r"no_weights\.json.*best\['YZ'\].*missing \['weights'\]"):
        D.DASResult.from_json(tmp_path / "no_weights.json")
    d = json.loads(text)
    del d["best"]["YZ"]
    (tmp_path / "no_handle.json").write_text(json.dumps(d))
    with pytest.raises(pp.PlotError, match=r"no_handle\.json.*missing \['YZ'\]"):
        D.DASResult.from_json(tmp_path / "no_handle.json")


# ------------------------------------------------------------------------------ configs saved with old class paths
@pytest.mark.parametrize("cls_name, spec", [
    ("LowRankDASIntervention", D.DASSpec("WX", layer=1, subspace_sizes=(2,))),
    ("SupportRotatedSpaceIntervention", D.DASSpec("WX", layer=1, dims=(0, 1, 4), subspace_sizes=(2,))),
])
def test_das_config_saved_with_old_class_path_still_loads(planted, tmp_path, cls_name, spec):
    das = D.run_das(planted.model, [spec], planted.fit, planted.calibration, epochs=2, progress=False)
    h = das.best["WX"]
    want = h.run(planted.test.base, planted.test.source)
    h.intervenable.save(str(tmp_path / "im"))
    cfg_path = tmp_path / "im" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["intervention_types"] == [f"<class 'pyvene_plot.interventions.{cls_name}'>"]  # the stable path
    cfg["intervention_types"] = [f"<class 'pyvene_plot.das.{cls_name}'>"]  # as saved before the restructure
    cfg_path.write_text(json.dumps(cfg))
    im = pv.IntervenableModel.load(str(tmp_path / "im"), planted.model)
    iv = next(iter(im.interventions.values()))
    assert type(iv) is getattr(pp.interventions, cls_name)
    assert torch.equal(pp.run_intervenable(im, planted.test.base, planted.test.source, h.readout), want)
