"""L3D (Local Loss Landscape Decomposition): recovery on the toy model of superposition, the pieces it
is built from (per-sample gradients, batch top-k, Tucker directions), attributions, perturbations,
serialisation and error messages.

CI size: the TMS decomposition runs 100 epochs on 1000 samples (~6 s on one core) with fixed seeds; the
full-size reproduction (1000 epochs, circuit superposition included) is ``benchmarks/l3d_toys.py``.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import pyvene_plot as pp
from pyvene_plot.errors import ModelError, PlotError
from pyvene_plot.methods.l3d import (
    L3D,
    L3DConfig,
    L3DConfigError,
    L3DInputError,
    L3DNotFittedError,
    L3D_FORMAT_VERSION,
    batch_topk_mask,
    match_subnetworks,
    subnetwork_alignment,
)
from pyvene_plot.methods.l3d._oracle import GradientOracle
from pyvene_plot.methods.toys import (
    circuit_coefficients_from_subnetworks,
    train_circuit_superposition,
    train_tms,
)

torch.set_num_threads(1)

CI = {"n_subnetworks": 5, "epochs": 100, "lr_step_epochs": 10, "warm_start_epochs": 10, "seed": 0}


@pytest.fixture(scope="module")
def tms():
    toy = train_tms(seed=0)
    assert toy.info["all_features_embedded"], "TMS trainer left a feature unembedded"
    return toy


@pytest.fixture(scope="module")
def fitted(tms):
    return L3D(**CI).fit(tms.model, tms.inputs[:1000], progress=False)


@pytest.fixture(scope="module")
def matching(tms, fitted):
    al = fitted.alignment(tms.feature_directions())
    rows, cols = match_subnetworks(al)
    return al, dict(zip(cols, rows))  # feature -> subnetwork


@pytest.fixture(scope="module")
def test_inputs(tms):
    return tms.sample(1000, seed=123)


# ------------------------------------------------------------------------------------------------
# recovery on the toy model of superposition
# ------------------------------------------------------------------------------------------------


def test_tms_one_subnetwork_per_feature(fitted, matching):
    al, feat_to_sub = matching
    assert al.shape == (5, 5)
    assert sorted(feat_to_sub.values()) == list(range(5))  # one-to-one
    matched = torch.tensor([float(al[feat_to_sub[j], j]) for j in range(5)])
    assert matched.min() > 0.95, f"|cos| of matched pairs {matched}"
    # each subnetwork aligns with exactly one feature: its second-best feature is far below
    top2 = al.topk(2, dim=1).values
    assert (top2[:, 1] < 0.2).all(), al
    # the argmax of every row is the matched feature (no ambiguity)
    assert all(int(al[feat_to_sub[j]].argmax()) == j for j in range(5))


def test_tms_reconstruction_error_near_paper(fitted, test_inputs):
    # paper: 0.19 (15 rank-1 subnetworks on 3 parallel TMS copies); accepted band +-10 pp
    err = fitted.reconstruction_error(test_inputs)
    assert 0.09 < err < 0.29, err
    assert 0.09 < fitted.train_error_ < 0.29, fitted.train_error_
    # training converged from a much worse starting point
    assert fitted.history_[0] > fitted.train_error_ + 0.2, fitted.history_[:3]
    # keeping every coefficient (no top-k) reconstructs strictly better with the same directions
    dense = fitted.reconstruction_error(test_inputs, top_k=1.0)
    assert dense < err, (dense, err)


def test_p_act_and_batch_topk_budget(fitted, test_inputs):
    ev = fitted.evaluate(test_inputs)
    p = ev["p_act"]
    assert p.shape == (5,)
    assert (p > 0.03).all(), p  # no dead subnetwork
    # batch top-k keeps ceil(0.1 * B * n_v) coefficients per batch: on average 0.1 * n_v per sample
    assert abs(float(p.sum()) - 0.5) < 0.02, p
    assert ev["coefficients"].shape == (1000, 5) and ev["mask"].dtype == torch.bool
    assert torch.equal(fitted.p_act, fitted.p_act_) and fitted.p_act.shape == (5,)


def test_subnetworks_are_unit_rank1_parameter_shaped(fitted, tms):
    subs = fitted.subnetworks
    assert len(subs) == 5
    for sub in subs:
        assert set(sub) == {"W", "b"}
        assert sub["W"].shape == tms.model.W.shape and sub["b"].shape == tms.model.b.shape
        norm2 = sum(float(t.pow(2).sum()) for t in sub.values())
        assert abs(norm2 - 1.0) < 1e-4
        s = torch.linalg.svdvals(sub["W"])
        assert float(s[1]) < 1e-5 * float(s[0]) + 1e-7  # rank-1 Tucker slice
    assert len(fitted.encoders) == 5 and fitted.encoders[0]["W"].shape == tms.model.W.shape


def test_attributions_pick_the_active_feature(fitted, matching, tms, test_inputs):
    _, feat_to_sub = matching
    attr = fitted.attributions(test_inputs, n_references=4)
    assert attr.shape == (1000, 5)
    with torch.no_grad():
        y = tms.model(test_inputs)
    feats = test_inputs.argmax(1)
    # one active feature whose output is on (below the ReLU threshold the weights have no effect)
    single = ((test_inputs != 0).sum(1) == 1) & (y[torch.arange(1000), feats] > 0)
    assert int(single.sum()) > 500
    expected = torch.tensor([feat_to_sub[int(j)] for j in feats[single]])
    hit = float((attr[single].argmax(1) == expected).float().mean())
    assert hit > 0.95, hit
    # samples whose outputs are all off have (near) zero impact everywhere
    off = (y == 0).all(1)
    if off.any():
        assert float(attr[off].max()) < 0.05 * float(attr[single].max(1).values.mean())
    # deterministic given the seed, and the seed matters
    again = fitted.attributions(test_inputs, n_references=4)
    assert torch.equal(attr, again)
    assert not torch.equal(attr, fitted.attributions(test_inputs, n_references=4, seed=99))


def test_perturb_mainly_changes_the_matched_output(fitted, matching, tms, test_inputs):
    _, feat_to_sub = matching
    model = tms.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = test_inputs
    with torch.no_grad():
        y0 = model(x)
    for j in range(5):
        others = [m for m in range(5) if m != j]
        active = x[:, j] > 0
        for delta in (0.3, -0.3):  # the sign of a subnetwork is arbitrary
            moved = fitted.perturb(model, feat_to_sub[j], delta)
            with torch.no_grad():
                dy = (moved(x) - y0).abs()
            msg = (j, delta)
            # output j changes far more than the others where feature j is active ...
            assert dy[active, j].mean() > 8 * dy[active][:, others].mean(), msg
            # ... and far more on samples where feature j is active than on the rest (interference only)
            assert dy[active, j].mean() > 4 * dy[~active, j].mean(), msg
            assert dy[:, j].sum() > 0.7 * dy.sum(), msg
            on = active & (y0[:, j] > 0)
            assert float((dy[on].argmax(1) == j).float().mean()) > 0.85, msg
    # the original model is untouched
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_perturbed_context_manager_matches_copy_and_restores(fitted, tms, test_inputs):
    model = tms.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    copy_ = fitted.perturb(model, [0, 1], [0.2, -0.1])
    with fitted.perturbed(model, [0, 1], [0.2, -0.1]) as m, torch.no_grad():
        assert m is model
        assert torch.allclose(m(test_inputs), copy_(test_inputs))
        assert not torch.equal(model.W, before["W"])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_output_derivative_matches_finite_difference(fitted, tms, test_inputs):
    x = test_inputs[:50]
    d = fitted.output_derivative(x, 2)
    eps = 1e-3
    with torch.no_grad():
        fd = (fitted.perturb(tms.model, 2, eps)(x) - fitted.perturb(tms.model, 2, -eps)(x)) / (2 * eps)
    assert d.shape == (50, 5)
    assert torch.allclose(d, fd, atol=2e-3), (d - fd).abs().max()


# ------------------------------------------------------------------------------------------------
# building blocks
# ------------------------------------------------------------------------------------------------


class _Clf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
        h = torch.tanh(self.fc1(x))
        if scale is not None:
            h = h * scale.unsqueeze(-1)
        return self.fc2(h)


@pytest.mark.parametrize("divergence", ["mse", "kl"])
def test_per_sample_gradients_match_autograd_loop(divergence):
    torch.manual_seed(0)
    model = _Clf().eval()
    x = torch.randn(7, 6)
    names = ["fc1.weight", "fc2.bias"]
    oracle = GradientOracle(model, names, torch.device("cpu"), divergence, lambda o: o)
    with torch.no_grad():
        ref = model(x).flip(0)
    g = oracle.grads(x, ref)
    for i in range(7):
        model.zero_grad()
        out = model(x[i:i + 1])[0]
        if divergence == "mse":
            loss = (out - ref[i]).pow(2).mean()
        else:
            loss = torch.nn.functional.kl_div(out.log_softmax(-1), ref[i].log_softmax(-1), log_target=True,
                                              reduction="sum")
        loss.backward()
        want = torch.cat([model.fc1.weight.grad.flatten(), model.fc2.bias.grad.flatten()])
        assert torch.allclose(g[i], want, atol=1e-6), (i, (g[i] - want).abs().max())


def test_reference_choices():
    torch.manual_seed(0)
    model = _Clf().eval()
    x = torch.randn(40, 6)
    # "zero": the coefficients are V_in · ∇ D(f(x), 0), whatever the batch order
    l3d = L3D(n_subnetworks=3, reference="zero", epochs=2, batch_size=8, seed=0).fit(model, x, progress=False)
    ev = l3d.evaluate(x, top_k=1.0)
    oracle = GradientOracle(model, l3d.param_names_, torch.device("cpu"), "mse", lambda o: o)
    v_in = torch.cat([l3d.encoder_[n].flatten(1) for n in l3d.param_names_], 1)
    with torch.no_grad():
        want = oracle.grads(x, torch.zeros(40, 4)) @ v_in.T
    assert torch.allclose(ev["coefficients"], want, atol=1e-5)
    # "random": the reference is another sample, never the sample itself (that gradient would be 0)
    l3d = L3D(n_subnetworks=3, epochs=2, batch_size=8, seed=0).fit(model, x, progress=False)
    coef = l3d.evaluate(x, top_k=1.0)["coefficients"]
    assert (coef.abs().sum(1) > 0).all()
    # "mean": runs and reconstructs
    l3d = L3D(n_subnetworks=3, reference="mean", epochs=2, batch_size=8, seed=0).fit(model, x, progress=False)
    assert 0.0 < l3d.reconstruction_error(x) < 1.0


def test_batch_topk_mask_keeps_largest_fraction():
    torch.manual_seed(1)
    c = torch.randn(32, 5)
    m = batch_topk_mask(c, 0.1)
    assert int(m.sum()) == 16
    assert float(c.abs()[m].min()) > float(c.abs()[~m].max())
    c[0] = 0.0
    assert not batch_topk_mask(c, 1.0)[0].any() and batch_topk_mask(c, 1.0)[1:].all()


def test_kl_dict_inputs_param_subset_and_higher_rank():
    torch.manual_seed(0)
    model = _Clf().eval()
    inputs = {"x": torch.randn(64, 6), "scale": torch.rand(64) + 0.5}
    l3d = L3D(n_subnetworks=3, ranks={"fc1.weight": 2}, divergence="kl", params=["fc1.weight", "fc2.bias"],
              epochs=5, batch_size=16, seed=0).fit(model, inputs, progress=False)
    subs = l3d.subnetworks
    assert set(subs[0]) == {"fc1.weight", "fc2.bias"}
    assert l3d.ranks_ == {"fc1.weight": (2, 2), "fc2.bias": (1,)}
    for s in subs:
        sv = torch.linalg.svdvals(s["fc1.weight"])
        assert float(sv[2]) < 1e-5 * float(sv[0])  # rank <= 2
    err = l3d.reconstruction_error(inputs)
    assert 0.0 < err < 1.0
    assert l3d.attributions(inputs, n_references=2).shape == (64, 3)
    assert l3d.output_derivative(inputs, 0).shape == (64, 4)
    assert "fc1.weight" in repr(l3d)


def test_float_ranks_resolve_per_dimension():
    model = _Clf().eval()
    l3d = L3D(n_subnetworks=2, ranks=0.5, epochs=1, seed=0).fit(model, torch.randn(8, 6), progress=False)
    assert l3d.ranks_["fc1.weight"] == (4, 3) and l3d.ranks_["fc1.bias"] == (4,)


def test_save_load_roundtrip(fitted, tms, test_inputs, tmp_path):
    path = fitted.save(tmp_path / "l3d.json")
    payload = json.loads(path.read_text())
    assert payload["schema"] == "pyvene_plot.methods.l3d/1" and payload["config"]["n_subnetworks"] == 5
    assert payload["format_version"] == L3D_FORMAT_VERSION and payload["writer"].startswith("pyvene_plot ")
    again = L3D.load(path, model=tms.model)
    for a, b in zip(fitted.subnetworks, again.subnetworks):
        assert all(torch.equal(a[n], b[n]) for n in a)
    assert torch.allclose(fitted.attributions(test_inputs[:30], n_references=2),
                          again.attributions(test_inputs[:30], n_references=2), atol=1e-6)
    unbound = L3D.load(path)
    with pytest.raises(L3DNotFittedError, match="model"):
        unbound.attributions(test_inputs[:5])
    assert L3DConfig.from_dict(payload["config"]) == fitted.config_


def test_to_json_from_json_roundtrip_every_field(fitted, tmp_path):
    again = L3D.from_json(fitted.to_json(tmp_path / "fit.json"))
    assert again.config_ == fitted.config_ and again.resolved_config == fitted.config_
    assert again.param_names_ == fitted.param_names_ and again.param_shapes_ == fitted.param_shapes_
    assert again.ranks_ == fitted.ranks_
    for name in fitted.param_names_:
        assert torch.equal(again.decoder_[name], fitted.decoder_[name])
        assert torch.equal(again.encoder_[name], fitted.encoder_[name])
    assert torch.equal(again.p_act_, fitted.p_act_)
    assert again.history_ == fitted.history_ and again.train_error_ == fitted.train_error_
    assert again.n_samples_ == fitted.n_samples_ == 1000 and again.fit_seconds_ == fitted.fit_seconds_
    # the copy writes the same file again (up to the package versions it records)
    a, b = fitted.to_dict(), again.to_dict()
    assert a == b


def test_from_json_errors_name_the_file_and_the_gap(fitted, tmp_path):
    good = fitted.to_json(tmp_path / "good.json")
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(PlotError, match="empty.json.*is empty"):
        L3D.from_json(empty)
    truncated = tmp_path / "truncated.json"
    truncated.write_text(good.read_text()[:200])
    with pytest.raises(PlotError, match="truncated.json.*not valid JSON"):
        L3D.from_json(truncated)
    payload = json.loads(good.read_text())
    del payload["decoder"], payload["p_act"]
    incomplete = tmp_path / "incomplete.json"
    incomplete.write_text(json.dumps(payload))
    with pytest.raises(PlotError, match=r"incomplete.json.*missing \['decoder', 'p_act'\]"):
        L3D.from_json(incomplete)
    payload = json.loads(good.read_text())
    payload["decoder"].pop("W")
    inconsistent = tmp_path / "inconsistent.json"
    inconsistent.write_text(json.dumps(payload))
    with pytest.raises(PlotError, match="inconsistent.json.*incomplete or inconsistent.*'W'"):
        L3D.from_json(inconsistent)
    payload = json.loads(good.read_text())
    payload["format_version"] = L3D_FORMAT_VERSION + 1
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps(payload))
    with pytest.raises(PlotError, match="format_version"):
        L3D.from_json(newer)


def test_get_params_set_params_round_trip():
    cfg = L3DConfig(n_subnetworks=4, epochs=7, ranks={"W": 1})
    est = L3D(cfg, top_k=0.2, seed=3)
    params = est.get_params()
    assert list(params) == ["config", "n_subnetworks", "ranks", "top_k", "warm_start_k", "warm_start_epochs",
                            "epochs", "batch_size", "lr", "lr_step_epochs", "lr_gamma", "divergence", "reference",
                            "params", "n_references", "chunk_size", "seed", "device"]
    assert params["config"] is cfg and params["top_k"] == 0.2 and params["seed"] == 3 and params["epochs"] is None
    resolved = est.resolved_config
    assert resolved == L3DConfig(n_subnetworks=4, epochs=7, ranks={"W": 1}, top_k=0.2, seed=3)
    assert est.set_params(**params) is est
    assert est.get_params() == params and est.resolved_config == resolved
    assert L3D(**params).resolved_config == resolved  # rebuilding from the params gives the same estimator
    est.set_params(epochs=2)
    assert est.epochs == 2 and est.resolved_config.epochs == 2 and est.config is cfg
    with pytest.raises(L3DConfigError, match=r"unknown parameter\(s\) \[.epoch.\] for L3D; valid parameters: .*epochs"):
        est.set_params(epoch=3)
    with pytest.raises(L3DConfigError, match="n_subnetworks=0"):
        est.set_params(n_subnetworks=0)


def test_public_exports():
    assert pp.l3d.L3D is L3D
    assert pp.L3D is L3D


# ------------------------------------------------------------------------------------------------
# circuit superposition (short run; the full-size numbers are in benchmarks/l3d_toys.py)
# ------------------------------------------------------------------------------------------------


def test_circuit_coefficients_read_back_from_ideal_subnetworks():
    """The r² metric of the circuit-superposition benchmark, on subnetworks built from the truth."""
    gen = torch.Generator().manual_seed(0)
    f, h, o = 6, 3, 5
    a = torch.rand(f, o, generator=gen) * 3
    subs = []
    for j in reversed(range(f)):  # order must not matter
        u = torch.randn(h, generator=gen)
        enc = torch.zeros(f, h)
        enc[j] = u
        dec = torch.outer(u, a[j]) / u.dot(u)  # E_k D_k = e_j a_j^T
        scale = -0.5 if j % 2 else 0.5  # a sign flip of a subnetwork cancels in the product
        subs.append({"W_in": enc * scale, "W_out": dec * scale, "b": torch.zeros(o)})
    rec = circuit_coefficients_from_subnetworks(subs, a)
    assert rec["covered"] == list(range(f)) and rec["inputs"] == list(reversed(range(f)))
    assert rec["r2"] > 0.999
    # a weaker duplicate claim on input 0 is ignored (the larger path is kept)
    dup = circuit_coefficients_from_subnetworks(subs + [{k: 0.1 * v for k, v in subs[-1].items()}], a)
    assert torch.allclose(dup["a_hat"], rec["a_hat"]) and dup["inputs"][-1] == 0
    # noise lowers r²
    noisy = [{k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in s.items()} for s in subs]
    rec2 = circuit_coefficients_from_subnetworks(noisy, a)
    assert rec2["r2"] < rec["r2"]
    rec3 = circuit_coefficients_from_subnetworks(subs[:3], a)
    assert len(rec3["covered"]) == 3 and torch.isnan(rec3["a_hat"]).any()


def test_circuit_superposition_toy_and_directions():
    toy = train_circuit_superposition(seed=0, steps=400, n_samples=2000)
    assert toy.coefficients.shape == (10, 10) and toy.inputs.shape == (2000, 10)
    assert (toy.inputs != 0).any(1).all()  # no all-zero rows
    assert toy.info["final_loss"] < 0.5 * float(toy.targets.pow(2).mean())
    d = toy.feature_directions()
    assert d["W_in"].shape == (10, 10, 5) and d["W_out"].shape == (10, 5, 10)
    rows_used = (d["W_in"].abs().sum(2) > 0).float()
    assert torch.equal(rows_used, torch.eye(10) * rows_used.diagonal())  # only row j is non-zero
    al = subnetwork_alignment([{"W_in": d["W_in"][j], "W_out": d["W_out"][j]} for j in range(10)], d)
    assert torch.allclose(al.diagonal(), torch.ones(10), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# errors name the problem and the fix
# ------------------------------------------------------------------------------------------------


def test_config_errors():
    with pytest.raises(L3DConfigError, match="n_subnetworks=0.*>= 1"):
        L3D(n_subnetworks=0)
    with pytest.raises(L3DConfigError, match="divergence.*choose one of"):
        L3D(divergence="l1")
    with pytest.raises(L3DConfigError, match="reference.*choose one of"):
        L3D(reference="self")
    with pytest.raises(L3DConfigError, match="top_k"):
        L3DConfig(top_k=0.0)
    with pytest.raises(L3DConfigError, match="batch_size"):
        L3DConfig(batch_size=1)
    with pytest.raises(L3DConfigError, match="unknown L3DConfig field"):
        L3D(n_subnetwork=3)
    assert issubclass(L3DConfigError, PlotError) and issubclass(L3DConfigError, ValueError)


def test_rank_larger_than_dimension(tms):
    with pytest.raises(L3DConfigError, match=r"rank 3 .*parameter 'W' exceeds its size 2"):
        L3D(n_subnetworks=2, ranks=3, epochs=1).fit(tms.model, tms.inputs[:10], progress=False)
    with pytest.raises(L3DConfigError, match="one rank per dimension"):
        L3D(n_subnetworks=2, ranks={"W": (1, 1, 1)}, epochs=1).fit(tms.model, tms.inputs[:10], progress=False)


def test_no_trainable_parameters():
    model = _Clf().eval().requires_grad_(False)
    with pytest.raises(ModelError, match="no trainable parameters.*requires_grad"):
        L3D(epochs=1).fit(model, torch.randn(8, 6), progress=False)
    model = _Clf().eval()
    model.fc1.weight.requires_grad_(False)
    with pytest.raises(ModelError, match=r"\['fc1.weight'\] have requires_grad=False"):
        L3D(params=["fc1.weight"], epochs=1).fit(model, torch.randn(8, 6), progress=False)
    with pytest.raises(L3DConfigError, match="not parameters of _Clf"):
        L3D(params=["fc3.weight"], epochs=1).fit(model, torch.randn(8, 6), progress=False)


def test_parameters_without_gradient():
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(3, 2)
            self.unused = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return self.used(x)

    with pytest.raises(ModelError, match="zero on every sample"):
        L3D(params=["unused"], epochs=1).fit(Unused().eval(), torch.randn(8, 3), progress=False)
    with pytest.warns(UserWarning, match=r"\['unused'\] get zero gradient"):
        L3D(n_subnetworks=2, epochs=1).fit(Unused().eval(), torch.randn(8, 3), progress=False)


def test_empty_and_too_small_inputs(tms):
    with pytest.raises(L3DInputError, match="empty"):
        L3D(epochs=1).fit(tms.model, torch.zeros(0, 5), progress=False)
    with pytest.raises(L3DInputError, match="at least 2 samples"):
        L3D(epochs=1).fit(tms.model, torch.zeros(1, 5), progress=False)
    with pytest.raises(L3DInputError, match="disagree"):
        L3D(epochs=1).fit(_Clf(), {"x": torch.zeros(4, 6), "scale": torch.ones(3)}, progress=False)
    with pytest.raises(L3DInputError, match="not supported"):
        L3D(epochs=1).fit(tms.model, [[0.0] * 5] * 4, progress=False)


def test_nan_outputs():
    class NaNModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x) * torch.tensor(float("nan"))

    with pytest.raises(ModelError, match="NaN/inf outputs"):
        L3D(epochs=1).fit(NaNModel(), torch.randn(8, 3), progress=False)


def test_use_before_fit_and_bad_index(fitted, tms):
    with pytest.raises(L3DNotFittedError, match="fit"):
        _ = L3D().subnetworks
    with pytest.raises(L3DConfigError, match=r"index 7 is out of range.*\[0, 5\)"):
        fitted.perturb(tms.model, 7, 1.0)
    with pytest.raises(L3DConfigError, match="one delta per index"):
        fitted.perturb(tms.model, [0, 1], [1.0])
    with pytest.raises(ModelError, match="does not match"):
        fitted.perturb(_Clf(), 0, 1.0)
