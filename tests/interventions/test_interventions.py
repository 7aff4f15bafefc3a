"""PLOT interventions as pyvene interventions: numerics against hand-unrolled models, equality
with pyvene's VanillaIntervention at λ=1, w=1, and save/load in a fresh process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import pyvene as pv
import torch
from pyvene.models.mlp.modelings_mlp import MLPConfig, MLPForClassification
from transformers import GPT2Config, GPT2LMHeadModel

import pyvene_plot as pp
from pyvene_plot.interventions import intervention_position

D = 8  # MLP width
N = 32  # rows


# ------------------------------------------------------------------------------ helpers
def _mlp(seed: int = 0, act: str = "gelu", n_classes: int = 3) -> MLPForClassification:
    """A pyvene MLP with O(1) random weights (so that activations are far from zero)."""
    torch.manual_seed(seed)
    cfg = MLPConfig(h_dim=D, n_layer=3, num_classes=n_classes, activation_function=act, pdrop=0.0,
                    include_bias=True)
    model = MLPForClassification(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 1.0)
    return model.eval()


def _mlp_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 1, D, generator=g) * 2.0, torch.randn(N, 1, D, generator=g) * 2.0


def _unroll(model: MLPForClassification, base, source, edit):
    """Run pyvene's MLP by hand; ``edit[layer](hb, hs) -> new hb`` applied after block ``layer``."""
    hb, hs = base, source
    for layer, block in enumerate(model.mlp.h):
        hb, hs = block(hb), block(hs)
        if layer in edit:
            hb = edit[layer](hb, hs)
    return model.score(hb).squeeze(1)


def _tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=20, n_positions=16,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def _orthonormal(r: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, r, generator=g))
    return q.T.contiguous()  # (r, d), orthonormal rows


def _all_positions(b, pos):
    return {"sources->base": ([[[pos]] * b], [[[pos]] * b])}


# ------------------------------------------------------------------------------ soft interchange
def test_soft_interchange_in_intervenable_model_matches_manual_unroll():
    model = _mlp()
    base, source = _mlp_inputs()
    g = torch.Generator().manual_seed(2)
    w = torch.rand(D, generator=g) * 1.5 - 0.25  # includes negative and > 1 weights
    lam = 1.7
    iv = pp.SoftInterchangeIntervention(embed_dim=D, weight=w, strength=lam)
    im = pv.IntervenableModel(
        [{"layer": 1, "component": "block_output", "unit": "pos", "max_number_of_units": 1, "intervention": iv}],
        model, use_fast=False,
    )
    with torch.no_grad():
        _, cf = im({"inputs_embeds": base}, [{"inputs_embeds": source}], _all_positions(N, 0))
        expected = _unroll(model, base, source, {1: lambda hb, hs: hb + lam * w * (hs - hb)})
    got = cf[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the intervention really did something
    with torch.no_grad():
        clean = model(inputs_embeds=base)[0]
    assert (got - clean).abs().max() > 1e-2


def test_handle_merges_overlapping_sites_and_matches_manual_unroll():
    """Sites at one hook add their weights per coordinate; two hooks act at their own layers."""
    model = _mlp(seed=3)
    base, source = _mlp_inputs(seed=4)
    lam = 2.0
    handle = pp.Handle(
        "V",
        [pp.Site(1, dims=(0, 1, 2)), pp.Site(1, dims=(2, 3)), pp.Site(2, dims=(5,))],
        [0.5, 0.25, 0.8],
        strength=lam,
    )
    w1 = torch.tensor([0.5, 0.5, 0.75, 0.25, 0, 0, 0, 0])
    w2 = torch.zeros(D)
    w2[5] = 0.8
    with torch.no_grad():
        got = handle.run(base, source, model)
        expected = _unroll(model, base, source, {
            1: lambda hb, hs: hb + lam * w1 * (hs - hb),
            2: lambda hb, hs: hb + lam * w2 * (hs - hb),
        })
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # merged weight vectors are visible on the pyvene interventions
    im = handle.intervenable(model)
    weights = sorted((tuple(iv.weight.tolist()) for iv in im.interventions.values()), key=lambda t: t[5])
    assert [list(t) for t in weights] == [pytest.approx(w1.tolist()), pytest.approx(w2.tolist())]
    assert all(float(iv.strength) == lam for iv in im.interventions.values())


def test_soft_interchange_per_row_coefficients_and_coordinate_lists():
    g = torch.Generator().manual_seed(5)
    base, source = torch.randn(4, 1, D, generator=g), torch.randn(4, 1, D, generator=g)
    iv = pp.SoftInterchangeIntervention(embed_dim=D, weight=torch.full((D,), 0.5), strength=2.0)
    coef = torch.rand(4, D, generator=g)
    out = iv(base, source, subspaces=coef)
    torch.testing.assert_close(out, base + coef.unsqueeze(1) * (source - base), rtol=1e-6, atol=1e-6)
    # pyvene's list-of-coordinates convention restricts the (strength * weight) coefficients
    out = iv(base, source, subspaces=[[0, 2], [1], [], [7]])
    mask = torch.zeros(4, 1, D)
    mask[0, 0, [0, 2]] = 1
    mask[1, 0, 1] = 1
    mask[3, 0, 7] = 1
    torch.testing.assert_close(out, base + mask * (source - base), rtol=1e-6, atol=1e-6)
    with pytest.raises(pp.PlotError, match="shape"):
        iv(base, source, subspaces=torch.ones(3, D + 1))


# ------------------------------------------------------------------------------ span interchange
def test_soft_span_moves_only_the_span_and_matches_manual():
    d, r = 16, 5
    V = _orthonormal(r, d, seed=6)
    g = torch.Generator().manual_seed(7)
    w = torch.rand(r, generator=g) * 2.0
    lam = 1.3
    iv = pp.SoftSpanInterchangeIntervention(embed_dim=d, low_rank_dimension=r, basis=V, weight=w, strength=lam)
    base = torch.randn(64, 1, d, generator=g) * 3.0
    source = torch.randn(64, 1, d, generator=g) * 3.0
    out = iv(base, source)
    P_perp = torch.eye(d) - V.T @ V
    # the orthogonal complement of span(V) is unchanged
    assert ((out - base) @ P_perp).abs().max() < 1e-5
    # inside the span: coordinates move by λ·w ⊙ (z_src − z_base)
    z_moved = (out - base) @ V.T
    torch.testing.assert_close(z_moved, lam * w * ((source - base) @ V.T), rtol=1e-5, atol=1e-5)
    # and the whole thing equals the manual formula
    manual = base + (lam * w * ((source - base) @ V.T)) @ V
    torch.testing.assert_close(out, manual, rtol=1e-6, atol=1e-5)
    assert (out - base).abs().max() > 1e-1
    # non-orthonormal bases are refused
    with pytest.raises(pp.PlotError, match="orthonormal"):
        pp.SoftSpanInterchangeIntervention(embed_dim=d, low_rank_dimension=r, basis=2.0 * V)


def test_span_handle_in_intervenable_model_matches_manual_unroll():
    model = _mlp(seed=8)
    base, source = _mlp_inputs(seed=9)
    r = 3
    V = _orthonormal(r, D, seed=10)
    lam = 2.5
    handle = pp.Handle("V", [pp.Site(1, dims=(0, 2), basis="pca")], [0.6], strength=lam,
                       bases={"pca": V.numpy()})
    wr = torch.tensor([0.6, 0.0, 0.6])
    with torch.no_grad():
        got = handle.run(base, source, model)
        expected = _unroll(model, base, source, {1: lambda hb, hs: hb + (lam * wr * ((hs - hb) @ V.T)) @ V})
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    ivs = list(handle.intervenable(model).interventions.values())
    assert len(ivs) == 1 and isinstance(ivs[0], pp.SoftSpanInterchangeIntervention)
    assert ivs[0].rank == r


# ------------------------------------------------------------------------------ λ=1, w=1 is vanilla
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_unit_handle_equals_vanilla_intervention_on_mlp(layer):
    model = _mlp(seed=11)
    base, source = _mlp_inputs(seed=12)
    handle = pp.Handle("V", [pp.Site(layer)], [1.0], strength=1.0)
    with torch.no_grad():
        got = pp.run_intervenable(handle.intervenable(model), base, source)
    vanilla = pv.IntervenableModel(
        [{"layer": layer, "component": "block_output", "unit": "pos", "max_number_of_units": 1}],
        model, use_fast=False,
    )  # default intervention type: VanillaIntervention
    assert isinstance(next(iter(vanilla.interventions.values())), pv.VanillaIntervention)
    with torch.no_grad():
        _, cf = vanilla({"inputs_embeds": base}, [{"inputs_embeds": source}], _all_positions(N, 0))
    assert torch.equal(got, cf[0]), f"max |diff| = {(got - cf[0]).abs().max().item():.3g}"


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("position", [0, 3, -1])
def test_unit_handle_equals_vanilla_intervention_on_gpt2(layer, position):
    model = _tiny_gpt2(seed=0)
    g = torch.Generator().manual_seed(13)
    ids = torch.randint(0, 20, (16, 8), generator=g)
    sids = torch.randint(0, 20, (16, 8), generator=g)
    handle = pp.Handle("V", [pp.Site(layer, position=position)], [1.0], strength=1.0)
    with torch.no_grad():
        got = pp.run_intervenable(handle.intervenable(model), ids, sids)
    vanilla = pv.IntervenableModel(
        [{"layer": layer, "component": "block_output", "unit": "pos", "max_number_of_units": 1}],
        model, use_fast=False,
    )
    with torch.no_grad():
        _, cf = vanilla({"input_ids": ids}, [{"input_ids": sids}], _all_positions(16, position % 8))
    expected = cf.logits[:, -1]
    assert torch.equal(got, expected), f"max |diff| = {(got - expected).abs().max().item():.3g}"


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
    models = {}
    mlp = MLPForClassification(MLPConfig(**payload["mlp_config"]))
    mlp.load_state_dict(payload["mlp_state"])
    models["mlp"] = mlp.eval()
    gpt = GPT2LMHeadModel(GPT2Config.from_dict(payload["gpt2_config"]))
    gpt.load_state_dict(payload["gpt2_state"])
    models["gpt2"] = gpt.eval()
    out = {}
    for name, spec in payload["cases"].items():
        im = pv.IntervenableModel.load(spec["dir"], models[spec["model"]])
        with torch.no_grad():
            logits = pp.run_intervenable(im, spec["base"], spec["source"])
        bufs = {k: {n: b.clone() for n, b in iv.named_buffers()} for k, iv in im.interventions.items()}
        types = {k: type(iv).__module__ + "." + type(iv).__name__ for k, iv in im.interventions.items()}
        out[name] = {"logits": logits, "buffers": bufs, "types": types}
    torch.save(out, sys.argv[2])
    """
)


def test_save_load_round_trip_in_fresh_process(tmp_path):
    mlp = _mlp(seed=14)
    gpt = _tiny_gpt2(seed=15)
    g = torch.Generator().manual_seed(16)
    base_m, src_m = _mlp_inputs(seed=17)
    # GPT-2 inputs with right padding: position -1 resolves per row from the attention mask
    ids = torch.randint(1, 20, (10, 8), generator=g)
    sids = torch.randint(1, 20, (10, 8), generator=g)
    mask = torch.ones(10, 8, dtype=torch.long)
    mask[2, 6:] = 0
    mask[5, 4:] = 0
    smask = torch.ones(10, 8, dtype=torch.long)
    smask[7, 5:] = 0
    base_g = {"input_ids": ids, "attention_mask": mask}
    src_g = {"input_ids": sids, "attention_mask": smask}

    V_m = _orthonormal(3, D, seed=18)  # r=3 < d=8
    V_g = _orthonormal(5, 32, seed=19)  # r=5 < d=32
    handles = {
        "mlp_soft": ("mlp", pp.Handle("V", [pp.Site(0, dims=(0, 1, 2)), pp.Site(2)], [0.7, 0.3], strength=1.7),
                     base_m, src_m),
        "mlp_span": ("mlp", pp.Handle("V", [pp.Site(1, dims=(0, 2), basis="pca")], [0.6], strength=2.5,
                                      bases={"pca": V_m.numpy()}), base_m, src_m),
        "gpt2_soft": ("gpt2", pp.Handle("V", [pp.Site(1, position=3, dims=tuple(range(0, 32, 3))),
                                              pp.Site(0, position=-1)], [0.9, 0.4], strength=1.3),
                      base_g, src_g),
        "gpt2_span": ("gpt2", pp.Handle("V", [pp.Site(1, position=-1, dims=(0, 1, 4), basis="b")], [0.8],
                                        strength=1.9, bases={"b": V_g.numpy()}), base_g, src_g),
    }
    models = {"mlp": mlp, "gpt2": gpt}
    parent, cases, expected_bufs = {}, {}, {}
    for name, (mname, handle, base, src) in handles.items():
        im = handle.intervenable(models[mname])
        d = tmp_path / name
        im.save(str(d))
        with torch.no_grad():
            parent[name] = pp.run_intervenable(im, base, src)
            torch.testing.assert_close(parent[name], handle.run(base, src, models[mname]), rtol=0, atol=0)
        expected_bufs[name] = {k: {n: b.clone() for n, b in iv.named_buffers()} for k, iv in im.interventions.items()}
        cases[name] = {"dir": str(d), "model": mname, "base": base, "source": src}
    payload = {
        "mlp_config": mlp.config.to_dict(), "mlp_state": mlp.state_dict(),
        "gpt2_config": gpt.config.to_dict(), "gpt2_state": gpt.state_dict(),
        "cases": cases,
    }
    torch.save(payload, tmp_path / "payload.pt")
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "payload.pt"), str(tmp_path / "out.pt")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    child = torch.load(tmp_path / "out.pt", weights_only=False)
    for name in handles:
        assert torch.equal(child[name]["logits"], parent[name]), name
        kind = "SoftSpanInterchangeIntervention" if "span" in name else "SoftInterchangeIntervention"
        assert set(child[name]["types"].values()) == {f"pyvene_plot.interventions.{kind}"}, name
        assert set(child[name]["buffers"]) == set(expected_bufs[name])
        for key, bufs in expected_bufs[name].items():
            got = child[name]["buffers"][key]
            for buf in ("weight", "strength", "position") + (("basis",) if "span" in name else ()):
                assert buf in got, f"{name}/{key}: buffer {buf} missing after load"
                assert torch.equal(got[buf], bufs[buf]), f"{name}/{key}: buffer {buf} not restored"
    # the restored values are the non-trivial ones that were set
    span_key = next(iter(expected_bufs["gpt2_span"]))
    assert torch.equal(child["gpt2_span"]["buffers"][span_key]["basis"], V_g)
    assert float(child["gpt2_span"]["buffers"][span_key]["strength"]) == pytest.approx(1.9)
    positions = sorted(int(b["position"]) for b in child["gpt2_soft"]["buffers"].values())
    assert positions == [-1, 3]


def test_intervention_position_buffer():
    iv = pp.SoftInterchangeIntervention(embed_dim=4, position=5)
    assert intervention_position(iv) == 5
    assert intervention_position(pp.SoftInterchangeIntervention(embed_dim=4)) is None
    iv = pp.SoftSpanInterchangeIntervention(embed_dim=4, low_rank_dimension=2, position=-1)
    assert intervention_position(iv) == -1
    assert np.array_equal(iv.basis.numpy(), np.eye(4)[:2])


@pytest.mark.parametrize("cls_name", ["SoftInterchangeIntervention", "SoftSpanInterchangeIntervention"])
def test_soft_config_saved_with_old_class_path_still_loads(tmp_path, cls_name):
    """Handles saved before the restructure name ``pyvene_plot.interventions.<Class>`` (the path is unchanged)."""
    model = _mlp(seed=20)
    base, source = _mlp_inputs(seed=21)
    if cls_name == "SoftInterchangeIntervention":
        handle = pp.Handle("V", [pp.Site(1, dims=(0, 3, 5))], [0.7], strength=1.4)
    else:
        handle = pp.Handle("V", [pp.Site(1, dims=(0, 2), basis="b")], [0.6], strength=2.0,
                           bases={"b": _orthonormal(3, D, seed=22).numpy()})
    im = handle.intervenable(model)
    with torch.no_grad():
        want = pp.run_intervenable(im, base, source)
    im.save(str(tmp_path / "im"))
    cfg_path = tmp_path / "im" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    old_path = f"<class 'pyvene_plot.interventions.{cls_name}'>"
    assert cfg["intervention_types"] == [old_path]
    cfg["intervention_types"] = [old_path]  # written as a pre-restructure config would store it
    cfg_path.write_text(json.dumps(cfg))
    loaded = pv.IntervenableModel.load(str(tmp_path / "im"), model)
    iv = next(iter(loaded.interventions.values()))
    assert type(iv) is getattr(pp.interventions, cls_name)
    with torch.no_grad():
        got = pp.run_intervenable(loaded, base, source)
    assert torch.equal(got, want)
    assert not torch.equal(got, model(inputs_embeds=base)[0].detach())  # the loaded intervention acts
