"""Optimal ablation: the intervention, closed forms, spoofing, ordering, save/load, screening, necessity.

Every numerical check is against a quantity computed independently of pyvene_plot (hand-unrolled
models, closed forms, the causal model) or against pyvene's own single-site path.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import pyvene as pv
import torch
import torch.nn.functional as F
from pyvene.models.mlp.modelings_mlp import MLPConfig, MLPForClassification
from transformers import GPT2Config, GPT2LMHeadModel

import pyvene_plot as pp
from pyvene_plot.data import as_model_kwargs
from pyvene_plot.interventions import OptimalAblationIntervention
from pyvene_plot.localize import InterchangeEngine
from pyvene_plot.methods.ablation import FORMAT_VERSION, run_ablated, screen_mean, screen_oa
from pyvene_plot.progressive import get_screener


# ------------------------------------------------------------------------------ helpers
def _mlp(d: int, n_classes: int, seed: int, act: str = "gelu") -> MLPForClassification:
    """A pyvene MLP with O(1) random weights (activations far from zero)."""
    torch.manual_seed(seed)
    cfg = MLPConfig(h_dim=d, n_layer=3, num_classes=n_classes, activation_function=act, pdrop=0.0, include_bias=True)
    model = MLPForClassification(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 1.0)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _inputs(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 1, d, generator=torch.Generator().manual_seed(seed))


def _tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=20, n_positions=16, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _padded_ids(n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 20, (n, 7), generator=g)
    mask = torch.ones(n, 7, dtype=torch.long)
    for i in range(0, n, 3):  # right padding on every third row
        mask[i, 5 + (i % 2):] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _orthonormal(r: int, d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, r, generator=torch.Generator().manual_seed(seed)))
    return q.T.contiguous()


def _acts(model, layer: int, x, component: str = "block_output", position: int = -1) -> torch.Tensor:
    eng = InterchangeEngine(model, [(layer, component, position, None)])
    return eng.collect(x)[(layer, component, position)]


def _unroll(model: MLPForClassification, x: torch.Tensor, layer: int, edit) -> torch.Tensor:
    """pyvene's MLP by hand; ``edit(h)`` replaces block ``layer``'s output."""
    h = x
    for i, block in enumerate(model.mlp.h):
        h = block(h)
        if i == layer:
            h = edit(h)
    return model.score(h).squeeze(1)


def _spoof_model() -> MLPForClassification:
    """h = relu(x0 + 2) ∈ {1, 3} at layer 0; downstream reads only |h − 2| (the sign is unused)."""
    m = MLPForClassification(MLPConfig(h_dim=4, n_layer=3, num_classes=2, activation_function="relu", pdrop=0.0,
                                       include_bias=True))
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        h = m.mlp.h
        h[0].ff1.weight[0, 0], h[0].ff1.bias[0] = 1.0, 2.0            # h = relu(x0 + 2)
        h[1].ff1.weight[0, 0], h[1].ff1.bias[0] = 1.0, -2.0           # relu(h − 2)
        h[1].ff1.weight[1, 0], h[1].ff1.bias[1] = -1.0, 2.0           # relu(2 − h)
        h[2].ff1.weight[0, 0] = h[2].ff1.weight[0, 1] = 1.0           # |h − 2|
        m.score.weight[1, 0], m.score.bias[1] = 8.0, -4.0             # logit1 − logit0 = 8 (|h − 2| − 0.5)
    for p in m.parameters():
        p.requires_grad_(False)
    return m.eval()


def _spoof_inputs(n: int = 400, p_plus: float = 0.7) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    sign = torch.where(torch.rand(n, generator=g) < p_plus, 1.0, -1.0)
    x = torch.zeros(n, 1, 4)
    x[:, 0, 0] = sign
    return x


def _kl_gap(model, x, readout, ablated_logits) -> float:
    with torch.no_grad():
        clean = readout(model(**as_model_kwargs(x)), as_model_kwargs(x))
    return float(F.kl_div(F.log_softmax(ablated_logits, -1), F.log_softmax(clean, -1), log_target=True,
                          reduction="none").sum(-1).mean())


# ------------------------------------------------------------------------------ the intervention
def test_intervention_modes_follow_their_formulas():
    g = torch.Generator().manual_seed(0)
    d, k = 8, 3
    base = torch.randn(5, 1, d, generator=g)
    a = torch.randn(d, generator=g)
    full = OptimalAblationIntervention(embed_dim=d, value=a)
    assert torch.equal(full(base), a.expand_as(base))
    dims = (6, 1, 3)
    coords = OptimalAblationIntervention(embed_dim=d, dims=dims, value=a[:3])
    out = coords(base)
    assert torch.equal(out[..., list(dims)], a[:3].expand(5, 1, 3))
    rest = [i for i in range(d) if i not in dims]
    assert torch.equal(out[..., rest], base[..., rest])
    V = _orthonormal(k, d, seed=1)
    span = OptimalAblationIntervention(embed_dim=d, basis=V, value=a[:k])
    out = span(base)
    torch.testing.assert_close(out @ V.T, a[:k].expand(5, 1, k), rtol=0, atol=1e-5)  # span coordinates set
    P_perp = torch.eye(d) - V.T @ V
    torch.testing.assert_close(out @ P_perp, base @ P_perp, rtol=0, atol=1e-5)  # complement untouched
    # row mask and per-row values (the channel optimal_ablation uses)
    mask = torch.tensor([True, False, True, False, False])
    vals = torch.randn(2, k, generator=g)
    out = span(base, subspaces={"mask": mask, "value": vals})
    assert torch.equal(out[~mask], base[~mask])
    torch.testing.assert_close(out[mask] @ V.T, vals.unsqueeze(1), rtol=0, atol=1e-5)
    # pyvene sees a trainable, sourceless intervention
    assert full.is_source_constant and full.trainable and isinstance(full, pv.TrainableIntervention)
    with pytest.raises(pp.PlotError, match="orthonormal"):
        OptimalAblationIntervention(embed_dim=d, basis=2.0 * V)
    with pytest.raises(pp.PlotError, match="dims"):
        OptimalAblationIntervention(embed_dim=d, dims=(0, 8))
    with pytest.raises(pp.PlotError, match="subspaces"):
        full(base, subspaces=[[0], [1], [2], [3], [4]])


def test_intervention_in_intervenable_model_matches_manual_unroll():
    model = _mlp(8, 3, seed=2)
    x = _inputs(16, 8, seed=3)
    a = torch.linspace(-1.0, 1.0, 3)
    iv = OptimalAblationIntervention(embed_dim=8, dims=(0, 4, 5), value=a, position=-1)
    im = pv.IntervenableModel([pp.Site(1).to_representation(low_rank_dimension=3, intervention=iv)], model,
                              use_fast=False)
    assert list(im.get_trainable_parameters()) and iv.value in set(im.get_trainable_parameters())

    def edit(h):
        h = h.clone()
        h[..., [0, 4, 5]] = a
        return h

    with torch.no_grad():
        expected = _unroll(model, x, 1, edit)
    torch.testing.assert_close(run_ablated(im, x), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ closed forms
def test_kl_closed_form_on_the_logit_vector():
    """A = the full logit vector (square, invertible read-out), KL loss: Δ_opt = I(X; Ŷ) = H(p̄) − E H(p_x)."""
    model = _mlp(4, 4, seed=0)
    x = _inputs(200, 4, seed=1)
    res = pp.optimal_ablation(model, [pp.Site(2)], x, holdout=0, restarts=0, baselines=("mean",), progress=False)
    with torch.no_grad():
        p = torch.softmax(model(inputs_embeds=x)[0], -1).double()
    pbar = p.mean(0)
    mutual_info = float(-(pbar * pbar.log()).sum() + (p * p.log()).sum(-1).mean())
    rec = res.records[0]
    assert rec["delta_opt"] == pytest.approx(mutual_info, abs=1e-3)
    assert rec["delta_mean"] > mutual_info + 5e-3  # the mean activation is not the optimal constant here
    assert "training examples themselves" in res.evaluated_on


def test_linear_readout_with_squared_loss_optimum_is_the_mean():
    """Linear read-out and squared loss: a* = E[A] and Δ_opt = Δ_mean, reached from a zero init."""
    model = _mlp(4, 6, seed=3)  # 6 x 4 read-out: full column rank, unique optimum
    x = _inputs(200, 4, seed=2)
    res = pp.optimal_ablation(model, [pp.Site(2)], x, holdout=0, loss="mse", init="zero", restarts=0,
                              batch_size=256, baselines=("mean", "zero"), progress=False)
    rec = res.records[0]
    assert rec["chosen"] == "trained"
    mean = _acts(model, 2, x).mean(0)
    a_star = torch.as_tensor(res.constants[rec["site"]][0])
    W = model.score.weight
    # read-out space (what the loss sees): W a* = W E[A] to 1e-3 of the spread of W A
    spread = float((_acts(model, 2, x) @ W.T).std(0).max())
    assert float((W @ (a_star - mean)).abs().max()) < 1e-3 * spread
    assert rec["delta_opt"] == pytest.approx(rec["delta_mean"], rel=1e-4)
    assert rec["delta_zero"] > rec["delta_mean"] * 1.01


def test_spoofing_toy_mean_ablation_spoofs_optimal_ablation_does_not():
    """h ∈ {1, 3} feeds only |h − 2|: the mean (2.4) is off-distribution and looks harmful; a* = 3 is harmless."""
    model = _spoof_model()
    x = _spoof_inputs()
    res = pp.optimal_ablation(model, [pp.Site(0, dims=(0,))], x, progress=False)
    rec = res.records[0]
    assert rec["delta_mean"] > 0.5 and rec["flip_mean"] > 0.9
    assert abs(rec["delta_opt"]) < 1e-3 and rec["flip_opt"] == 0.0
    a_star = float(res.constants[rec["site"]][0][0])
    assert min(abs(a_star - 1.0), abs(a_star - 3.0)) < 1e-2
    assert "held-out" in res.evaluated_on and rec["n_eval"] == 200 and rec["n_train"] == 200


def test_optimal_ablation_is_never_worse_than_zero_mean_or_resample():
    """On random MLPs (whole vectors, coordinates, spans), evaluated on the training data."""
    V = _orthonormal(3, 6, seed=9).numpy()
    for seed in (0, 1):
        model = _mlp(6, 4, seed=10 + seed)
        x = _inputs(160, 6, seed=20 + seed)
        sites = [pp.Site(0), pp.Site(1, dims=(1, 4)), pp.Site(2, dims=(0, 2), basis="b"), [pp.Site(0, dims=(0,)),
                                                                                         pp.Site(2, dims=(5,))]]
        res = pp.optimal_ablation(model, sites, x, holdout=0, bases={"b": V}, progress=False)
        assert [r["site"] for r in res.records] == res.labels and len(res) == 4
        for r in res.records:
            assert r["delta_opt"] <= r["delta_mean"] * (1 + 1e-6) + 1e-9, r  # the mean is a candidate constant
            assert r["delta_opt"] <= r["delta_zero"] + 1e-3 * max(1.0, r["delta_zero"]), r
            assert r["delta_opt"] <= r["delta_resample"] + 1e-3 * max(1.0, r["delta_resample"]), r
            assert r["delta_mean"] > 1e-3  # not a vacuous comparison
            # flip rates are counts over the evaluation rows (resample: over its 2 draws per row)
            for k, rows in (("opt", 160), ("mean", 160), ("zero", 160), ("resample", 320)):
                assert r[f"flip_{k}"] * rows == pytest.approx(round(r[f"flip_{k}"] * rows), abs=1e-9), (k, r)
            assert r["n_eval"] == r["n_train"] == 160


# ------------------------------------------------------------------------------ parallel = single site
def test_batched_gaps_equal_single_site_pyvene_runs_on_gpt2_with_padding():
    """Gaps from the parallel trainer equal a plain pyvene run of each fitted OptimalAblationIntervention."""
    model = _tiny_gpt2(seed=1)
    ids = _padded_ids(60, seed=2)
    V = _orthonormal(4, 32, seed=3).numpy()
    sites = [pp.Site(0, position=-1), pp.Site(0, position=2, dims=(0, 5, 9)),
             pp.Site(1, position=-1, dims=(0, 1), basis="pca"), [pp.Site(0, position=1, dims=(3,)), pp.Site(1)]]
    res = pp.optimal_ablation(model, sites, ids, steps=30, restarts=1, baselines=("zero", "mean"),
                              bases={"pca": V}, progress=False)
    ev = torch.tensor(res.eval_index)
    x_ev = {k: v[ev] for k, v in ids.items()}
    readout = pp.Readout()
    for rec in res.records:
        im = res.intervenable(rec["site"])
        ablated = run_ablated(im, x_ev, readout)
        got = _kl_gap(model, x_ev, readout, ablated)
        assert got == pytest.approx(rec["delta_opt"], rel=1e-4, abs=1e-6), rec["site"]
        with torch.no_grad():
            clean_pred = readout(model(**x_ev), x_ev).argmax(-1)
        assert rec["flip_opt"] == pytest.approx(float((ablated.argmax(-1) != clean_pred).float().mean())), rec["site"]
        with torch.no_grad():
            for iv in im.interventions.values():
                iv.value.zero_()
        got = _kl_gap(model, x_ev, readout, run_ablated(im, x_ev, readout))
        assert got == pytest.approx(rec["delta_zero"], rel=1e-4, abs=1e-6), rec["site"]
        assert rec["delta_opt"] > 0


# ------------------------------------------------------------------------------ save / load
_CHILD = textwrap.dedent(
    """
    import sys
    import torch
    torch.set_num_threads(1)
    import pyvene as pv
    import pyvene_plot as pp
    from pyvene.models.mlp.modelings_mlp import MLPConfig, MLPForClassification
    from transformers import GPT2Config, GPT2LMHeadModel

    payload = torch.load(sys.argv[1], weights_only=False)
    mlp = MLPForClassification(MLPConfig(**payload["mlp_config"]))
    mlp.load_state_dict(payload["mlp_state"])
    gpt = GPT2LMHeadModel(GPT2Config.from_dict(payload["gpt2_config"]))
    gpt.load_state_dict(payload["gpt2_state"])
    models = {"mlp": mlp.eval(), "gpt2": gpt.eval()}
    out = {}
    for name, spec in payload["cases"].items():
        im = pv.IntervenableModel.load(spec["dir"], models[spec["model"]])
        logits = pp.run_ablated(im, spec["inputs"])
        ivs = list(im.interventions.values())
        out[name] = {
            "logits": logits,
            "state": [{k: v.clone() for k, v in iv.state_dict().items()} for iv in ivs],
            "types": [type(iv).__module__ + "." + type(iv).__name__ for iv in ivs],
            "flags": [(bool(iv.is_source_constant), bool(iv.trainable)) for iv in ivs],
            "n_trainable": len(list(im.get_trainable_parameters())),
        }
    torch.save(out, sys.argv[2])
    """
)


def test_save_load_round_trip_in_fresh_process(tmp_path):
    mlp = _mlp(8, 3, seed=4)
    gpt = _tiny_gpt2(seed=5)
    x = _inputs(40, 8, seed=6)
    ids = _padded_ids(30, seed=7)
    V8 = _orthonormal(3, 8, seed=8).numpy()
    V32 = _orthonormal(5, 32, seed=9).numpy()
    cases = {
        "mlp": (mlp, x, [pp.Site(0), pp.Site(1, dims=(2, 6)), pp.Site(2, dims=(0, 2), basis="b8")], {"b8": V8}),
        "gpt2": (gpt, ids, [[pp.Site(0, position=-1, dims=tuple(range(0, 32, 3))),
                             pp.Site(1, position=2, dims=(1, 3, 4), basis="b32")]], {"b32": V32}),
    }
    payload_cases, parent = {}, {}
    for name, (model, inputs, sites, bases) in cases.items():
        res = pp.optimal_ablation(model, sites, inputs, steps=15, restarts=0, baselines=(), bases=bases,
                                  progress=False)
        for i, rec in enumerate(res.records):
            key = f"{name}{i}"
            im = res.intervenable(i)
            d = tmp_path / key
            im.save(str(d))
            parent[key] = {
                "logits": run_ablated(im, inputs),
                "state": [{k: v.clone() for k, v in iv.state_dict().items()} for iv in im.interventions.values()],
                "constants": res.constants[rec["site"]],
            }
            payload_cases[key] = {"dir": str(d), "model": name, "inputs": inputs}
    torch.save({"mlp_config": mlp.config.to_dict(), "mlp_state": mlp.state_dict(),
                "gpt2_config": gpt.config.to_dict(), "gpt2_state": gpt.state_dict(), "cases": payload_cases},
               tmp_path / "payload.pt")
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "payload.pt"), str(tmp_path / "out.pt")],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    child = torch.load(tmp_path / "out.pt", weights_only=False)
    assert set(child) == set(parent) == {"mlp0", "mlp1", "mlp2", "gpt20"}
    modes = set()
    for key, exp in parent.items():
        got = child[key]
        assert torch.equal(got["logits"], exp["logits"]), key  # bit-identical outputs
        assert set(got["types"]) == {"pyvene_plot.interventions.OptimalAblationIntervention"}
        assert got["flags"] == [(True, True)] * len(got["flags"])  # sourceless and trainable after load
        assert got["n_trainable"] == len(got["state"])
        for s_got, s_exp in zip(got["state"], exp["state"]):
            assert set(s_got) == set(s_exp)
            for name, t in s_exp.items():
                assert torch.equal(s_got[name], t), (key, name)
            modes.add(int(s_exp["mode"]))
        # the saved constants are the fitted ones (compared as a set: pyvene orders keys by layer)
        assert sorted(st["value"].tolist() for st in got["state"]) == sorted(
            np.asarray(c).tolist() for c in exp["constants"])
    assert modes == {0, 1, 2}  # full vector, coordinates and span all round-tripped


def test_config_names_the_public_class_and_old_paths_still_load(tmp_path):
    """Configs name ``pyvene_plot.interventions``; configs saved under ``pyvene_plot.ablation`` still load."""
    model = _mlp(8, 3, seed=11)
    x = _inputs(12, 8, seed=12)
    V = _orthonormal(2, 8, seed=13)
    reps = [pp.Site(0).to_representation(low_rank_dimension=3, intervention=OptimalAblationIntervention(
                embed_dim=8, dims=(1, 4, 6), value=torch.tensor([0.5, -1.0, 2.0]), position=-1)),
            pp.Site(2).to_representation(low_rank_dimension=2, intervention=OptimalAblationIntervention(
                embed_dim=8, basis=V, value=torch.tensor([1.5, -0.25]), position=-1))]
    im = pv.IntervenableModel(reps, model, use_fast=False)
    expected = run_ablated(im, x)
    with torch.no_grad():
        assert not torch.equal(expected, model(inputs_embeds=x)[0])  # the ablation changes the output
    im.save(str(tmp_path))
    config = tmp_path / "config.json"
    saved = json.loads(config.read_text())
    new_path = "<class 'pyvene_plot.interventions.OptimalAblationIntervention'>"
    assert saved["intervention_types"] == [new_path, new_path]
    text = config.read_text()
    # the flat layout's path, and the one of the first restructure step
    for old in ("pyvene_plot.ablation", "pyvene_plot.methods.ablation"):
        old_path = f"<class '{old}.OptimalAblationIntervention'>"
        config.write_text(text.replace(new_path, old_path))
        assert json.loads(config.read_text())["intervention_types"] == [old_path, old_path]
        loaded = pv.IntervenableModel.load(str(tmp_path), model)
        assert all(type(iv) is OptimalAblationIntervention for iv in loaded.interventions.values())
        assert torch.equal(run_ablated(loaded, x), expected), old


# ------------------------------------------------------------------------------ results
def _same(a, b) -> bool:
    """Deep equality for JSON-like values, arrays and Sites; NaN equals NaN; tuples differ from lists."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(
            a, b, equal_nan=True)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _assert_same_fields(a, b, skip=("model",)) -> None:
    for f in dataclasses.fields(a):
        if f.name not in skip:
            assert _same(getattr(a, f.name), getattr(b, f.name)), f.name


def test_result_json_round_trip_every_field_table_and_plot(tmp_path):
    model = _spoof_model()
    x = _spoof_inputs(120)
    res = pp.optimal_ablation(model, [pp.Site(0, dims=(0,)), pp.Site(1)], x, steps=40, restarts=0, progress=False)
    # steps=0 leaves NaN training losses (written as "nan" in JSON); a span site keeps its basis
    V = _orthonormal(2, 4, seed=0).numpy()
    untrained = pp.optimal_ablation(model, [pp.Site(1, dims=(0, 1), basis="b")], x, steps=0, bases={"b": V},
                                    progress=False)
    assert math.isnan(untrained.records[0]["final_batch_loss"])
    for name, r in (("oa.json", res), ("untrained.json", untrained)):
        path = r.to_json(tmp_path / name)
        saved = json.loads(path.read_text())
        assert saved["format_version"] == FORMAT_VERSION and saved["writer"] == f"pyvene_plot {pp.__version__}"
        back = pp.OptimalAblationResult.from_json(path, model=model)
        _assert_same_fields(r, back)
        assert back.model is model
    assert set(untrained.bases) == {"b"}
    table = res.table()
    assert all(lbl in table for lbl in res.labels) and "Δ_opt" in table
    png = tmp_path / "gaps.png"
    res.plot(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the reloaded result rebuilds the same pyvene intervention
    back = pp.OptimalAblationResult.from_json(tmp_path / "oa.json", model=model)
    torch.testing.assert_close(run_ablated(back.intervenable(0), x), run_ablated(res.intervenable(0), x))


def test_result_from_json_names_empty_truncated_and_incomplete_files(tmp_path):
    model = _spoof_model()
    res = pp.optimal_ablation(model, [pp.Site(0, dims=(0,))], _spoof_inputs(40), steps=0, progress=False)
    text = res.to_json(tmp_path / "oa.json").read_text()
    nec = pp.NecessityResult(records=[{"variable": "V", "sites": res.labels[0], "delta_opt": 0.5}], ablation=res)
    nec_text = nec.to_json(tmp_path / "nec.json").read_text()
    for cls, full in ((pp.OptimalAblationResult, text), (pp.NecessityResult, nec_text)):
        empty, cut, missing = tmp_path / "empty.json", tmp_path / "cut.json", tmp_path / "missing.json"
        empty.write_text("")
        cut.write_text(full[: len(full) // 2])
        payload = json.loads(full)
        del payload["records"]
        missing.write_text(json.dumps(payload))
        with pytest.raises(pp.PlotError, match=r"empty\.json' is empty"):
            cls.from_json(empty)
        with pytest.raises(pp.PlotError, match=r"cut\.json' is truncated or not valid JSON"):
            cls.from_json(cut)
        with pytest.raises(pp.PlotError, match=r"missing\.json' is incomplete: missing \['records'\]"):
            cls.from_json(missing)
        newer = dict(json.loads(full), format_version=FORMAT_VERSION + 1)
        missing.write_text(json.dumps(newer))
        with pytest.raises(pp.PlotError, match="format_version"):
            cls.from_json(missing)
    # a necessity file whose nested ablation run lost a field names both
    payload = json.loads(nec_text)
    del payload["ablation"]["constants"]
    (tmp_path / "nested.json").write_text(json.dumps(payload))
    with pytest.raises(pp.PlotError, match=r"ablation run in NecessityResult file .*nested\.json' is incomplete: missing \['constants'\]"):
        pp.NecessityResult.from_json(tmp_path / "nested.json")
    # the wrong kind of result
    with pytest.raises(pp.PlotError, match="not an OptimalAblationResult"):
        pp.OptimalAblationResult.from_json(tmp_path / "nec.json")


# ------------------------------------------------------------------------------ errors
class _SideModel(torch.nn.Module):
    """A registered toy model whose 'side' module is computed but never used downstream."""

    def __init__(self):
        super().__init__()
        from transformers import PretrainedConfig

        self.config = PretrainedConfig(n_layer=1, hidden_size=4)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4)])
        self.sides = torch.nn.ModuleList([torch.nn.Linear(4, 4)])
        self.head = torch.nn.Linear(4, 3)

    @property
    def device(self):
        return self.head.weight.device

    def forward(self, inputs_embeds):
        h = self.layers[0](inputs_embeds)
        self.sides[0](inputs_embeds)  # computed, discarded
        return self.head(h)


def test_errors_name_the_problem_and_the_fix():
    model = _mlp(4, 3, seed=0)
    x = _inputs(20, 4, seed=0)
    with pytest.raises(pp.SiteError, match="layer 5 does not exist"):
        pp.optimal_ablation(model, [pp.Site(5)], x, progress=False)
    with pytest.raises(pp.SiteError, match="no sites"):
        pp.optimal_ablation(model, [], x, progress=False)
    with pytest.raises(pp.BankError, match="empty"):
        pp.optimal_ablation(model, [pp.Site(0)], x[:0], progress=False)
    with pytest.raises(pp.BankError, match="holdout=0"):
        pp.optimal_ablation(model, [pp.Site(0)], x[:1], progress=False)
    with pytest.raises(pp.PlotError, match="unknown ablation loss 'nll'"):
        pp.optimal_ablation(model, [pp.Site(0)], x, loss="nll", progress=False)
    with pytest.raises(pp.PlotError, match="unknown optimal_ablation option"):
        pp.optimal_ablation(model, [pp.Site(0)], x, stepz=3, progress=False)
    with pytest.raises(pp.BankError, match="needs labels"):
        pp.optimal_ablation(model, [pp.Site(0)], x, loss="ce", progress=False)
    broken = _mlp(4, 3, seed=0)
    with torch.no_grad():
        broken.mlp.h[1].ff1.weight[0, 0] = float("nan")
    with pytest.raises(pp.ModelError, match="NaN"):
        pp.optimal_ablation(broken, [pp.Site(0)], x, progress=False)
    # a component that is computed but feeds nothing: its constant gets no gradient
    pp.register_model(_SideModel, {"block_output": ("layers[%s]", "register_forward_hook"),
                                   "side_output": ("sides[%s]", "register_forward_hook")},
                      {"block_output": ("hidden_size",), "side_output": ("hidden_size",)}, has_positions=False)
    side = _SideModel().eval()
    for p in side.parameters():
        p.requires_grad_(False)
    xs = _inputs(20, 4, seed=1)
    ok = pp.optimal_ablation(side, [pp.Site(0)], xs, steps=5, restarts=0, progress=False)
    assert ok.records[0]["delta_mean"] > 0
    with pytest.raises(pp.SiteError, match="receive no gradient"):
        pp.optimal_ablation(side, [pp.Site(0, component="side_output")], xs, steps=5, progress=False)
    # a GPT-2 component pyvene cannot hook under transformers 5 (sdpa attention)
    with pytest.raises(pp.SiteError, match="never fired"):
        pp.optimal_ablation(_tiny_gpt2(), [pp.Site(0, component="attention_weight")], _padded_ids(10, 0)["input_ids"],
                            steps=2, progress=False)


# ------------------------------------------------------------------------------ screening
def test_oa_screening_drops_exactly_the_inert_planted_neurons(planted_task, tmp_path):
    t = planted_task
    searcher = pp.OTAlignmentSearcher(method="uot", progress=False, top_k=(1, 2), lambdas=(1.0,))
    sched = pp.ProgressiveScheduler([pp.Stage("coordinates", group_sizes=(1,), screen="oa")], searcher, keep=1)
    loc = sched.run(t.model, t.fit, t.calibration)
    sc = loc.screens[0]
    # inert by construction: layer-0 copies of the inputs, layer-1 copies, layer-2 copies (zero weight downstream)
    inert = {pp.Site(0, dims=(i,)).label for i in range(4, 8)} | {pp.Site(1, dims=(i,)).label for i in range(2, 8)} \
        | {pp.Site(2, dims=(i,)).label for i in range(2, 8)}
    assert set(sc["dropped"]) == inert
    assert sc["n_candidates"] == 24 and sc["n_kept"] == 8 and sc["n_dropped"] == 16
    assert all(sc["scores"][lbl] <= sc["threshold"] for lbl in inert)
    assert min(v for k, v in sc["scores"].items() if k not in inert) > 100 * sc["threshold"]
    assert sc["screener"] == "oa" and "drop if score <=" in sc["rule"]
    for v in ("WX", "YZ"):
        for carrier in t.info["exact_carriers"][v]:
            assert carrier in loc.candidates[0][v]
        assert loc.kept[0][v] == t.info["exact_carriers"][v]
    assert loc.runtime_until(1) >= loc.stages[0].runtime_s + sc["runtime_s"]
    loc.to_json(tmp_path / "loc.json")
    import json

    saved = json.loads((tmp_path / "loc.json").read_text())
    assert saved["screens"][0]["dropped"] == sc["dropped"] and saved["stages"][0]["screen"] == "oa"


def test_screen_registry_rescue_and_mean_screener(planted_task):
    from pyvene_plot.progressive.screening import SCREENERS

    t = planted_task
    with pytest.raises(pp.PlotError, match="unknown screener"):
        pp.Stage("layer", screen="nope")
    with pytest.raises(pp.PlotError, match="already registered"):
        pp.register_screener("oa", lambda *a, **k: None)

    def drop_all(model, sites, bank, **kw):
        return pp.ScreenResult(scores=[float(s.layer) for s in sites], keep=[False] * len(sites), threshold=1e9,
                               rule="drop everything")

    pp.register_screener("_test_drop_all", drop_all, overwrite=True)
    try:
        searcher = pp.OTAlignmentSearcher(method="uot", progress=False, top_k=(1,), lambdas=(1.0,))
        loc = pp.ProgressiveScheduler([pp.Stage("layer", screen="_test_drop_all")], searcher, keep=1).run(
            t.model, t.fit, t.calibration)
        sc = loc.screens[0]
        assert sc["rescued"] == {"WX": ["L2.block_output@-1"], "YZ": ["L2.block_output@-1"]}
        assert [s.label for s in loc.candidates[0]["WX"]] == ["L2.block_output@-1"]
    finally:
        SCREENERS.pop("_test_drop_all", None)
    # the mean screener needs no training; Δ_opt <= Δ_mean so it never drops more than OA
    sites = pp.neuron_sites(t.model, layers=[2])
    assert get_screener("mean") is screen_mean and get_screener("oa") is screen_oa  # registered on import
    mean_rep = get_screener("mean")(t.model, sites, t.fit, threshold=1e-3)
    oa_rep = get_screener("oa")(t.model, sites, t.fit, threshold=1e-3)
    assert all(km or not ko for km, ko in zip(mean_rep.keep, oa_rep.keep))
    assert sum(mean_rep.keep) == 2 and mean_rep.info["score"] == "delta_mean"


# ------------------------------------------------------------------------------ necessity
def _planted_settings(bank) -> list[dict]:
    return [dict(zip("WXYZ", (int(v) for v in row[0, :4]))) for row in bank.base]


def test_necessity_exact_carrier_is_consistent_partial_carrier_is_incomplete(planted_task, tmp_path):
    t = planted_task
    bank = t.fit
    handles = [pp.Handle("WX", [pp.Site(1, dims=(0,))], [1.0]),  # exactly WX
               pp.Handle("WX", [pp.Site(0, dims=(0,))], [1.0]),  # relu(w - x): half of WX's route
               pp.Handle("WX", [pp.Site(0, dims=(0,)), pp.Site(0, dims=(1,))], [0.5, 0.5])]  # both halves
    nec = pp.necessity_check(t.model, handles, bank, t.causal_model, settings=_planted_settings(bank))
    exact, partial, joint = nec.records
    # causal side, computed independently: with V <- soft value q, the loss is the entropy of WX on the rows
    rows = nec.ablation.eval_index
    wx = np.array([s["W"] == s["X"] for s in (_planted_settings(bank)[i] for i in rows)], dtype=float)
    p = wx.mean()
    entropy = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    for r in nec.records:
        assert r["causal_delta_opt"] == pytest.approx(entropy, abs=1e-6)
        assert r["causal_flip_opt"] == pytest.approx(min(p, 1 - p))
        assert r["causal_weights"]["True"] == pytest.approx(p, abs=1e-4)
    assert abs(exact["gap"]) < 0.05 and exact["reading"].startswith("consistent")
    assert partial["gap"] < -0.1 and partial["reading"].startswith("incomplete")
    assert abs(joint["gap"]) < 0.05
    assert "WX" in repr(nec) and "gap" in nec.table()
    back = pp.NecessityResult.from_json(nec.to_json(tmp_path / "nec.json"), model=t.model)
    _assert_same_fields(nec, back, skip=("ablation",))
    _assert_same_fields(nec.ablation, back.ablation)
    assert back.ablation.model is t.model
    with pytest.raises(pp.BankError, match="settings"):
        pp.necessity_check(t.model, handles[:1], bank, t.causal_model)  # planted banks carry no settings


def test_necessity_on_heq_handles(heq_task, tmp_path):
    t = heq_task
    searcher = pp.OTAlignmentSearcher(method="uot", progress=False)
    res = searcher.fit(t.model, t.sites, t.fit, t.calibration)
    nec = pp.necessity_check(t.model, res, t.test, t.causal_model, steps=150)  # the result stands for its handles
    assert [r["variable"] for r in nec.records] == list(res.handles) == ["WX", "YZ"]
    for i, r in enumerate(nec.records):
        assert r["sites"] == nec.ablation.records[i]["site"] == "+".join(s.label for s in res.handles[r["variable"]].sites)
        assert r["causal_delta_opt"] == pytest.approx(math.log(2), abs=0.02)  # WX, YZ balanced by construction
        assert r["gap"] == pytest.approx(r["delta_opt"] - r["causal_delta_opt"])
        expected = "consistent" if abs(r["gap"]) <= nec.tolerance else ("incomplete" if r["gap"] < 0 else "excess")
        assert r["reading"].startswith(expected + ":"), r
        assert r["n_eval"] == len(t.test) // 2
    one = pp.necessity_check(t.model, [res.handles["WX"]], t.test, t.causal_model, steps=150)
    # a site's fit does not depend on the other sites trained alongside it
    assert one.records[0]["delta_opt"] == pytest.approx(nec.records[0]["delta_opt"], rel=1e-2)
    back = pp.NecessityResult.from_json(nec.to_json(tmp_path / "nec.json"))
    _assert_same_fields(nec, back, skip=("ablation",))
    _assert_same_fields(nec.ablation, back.ablation)
