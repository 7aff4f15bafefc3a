"""PCA and LIB bases: identities, linear-network and invariance checks, pyvene sites, the ``lib``
stage, the oblique intervention, and errors."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import pyvene as pv
import torch

import pyvene_plot as pp
from pyvene_plot.methods.bases import (
    BASIS_FORMAT_VERSION,
    Basis,
    fit_pca_basis,
    lib_chain_bases,
    lib_from_activations,
    output_jacobian_gram,
    pca_from_activations,
    site_activations,
)


# ----------------------------------------------------------------------------------- helpers
def _correlated(n: int, d: int, seed: int, rank: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = d if rank is None else rank
    return torch.randn(n, r, generator=g, dtype=torch.float64) @ torch.randn(r, d, generator=g, dtype=torch.float64) + 2.0


class _TanhNet(torch.nn.Module):
    """y = W2 tanh(W1 f + b1): a smooth nonlinear downstream map (K outputs)."""

    def __init__(self, d: int, h: int, k: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(torch.randn(h, d, generator=g, dtype=torch.float64) / d**0.5, requires_grad=False)
        self.b1 = torch.nn.Parameter(torch.randn(h, generator=g, dtype=torch.float64) * 0.1, requires_grad=False)
        self.w2 = torch.nn.Parameter(torch.randn(k, h, generator=g, dtype=torch.float64) / h**0.5, requires_grad=False)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return torch.tanh(f @ self.w1.T + self.b1) @ self.w2.T


def _per_example_jacobians(fn, X: torch.Tensor) -> torch.Tensor:
    """(n, K, d) Jacobians computed independently of pyvene_plot (torch.func)."""
    return torch.func.vmap(torch.func.jacrev(fn))(X)


def _signs_match(A: np.ndarray, B: np.ndarray, atol: float) -> None:
    """Columns of A equal columns of B up to one sign per column."""
    s = np.sign(np.sum(A * B, axis=0))
    np.testing.assert_allclose(A, B * s, atol=atol)


# ------------------------------------------------------------------------------------------ PCA
def test_pca_basis_identities_and_legacy_helper():
    X = _correlated(300, 7, seed=0)
    b = pca_from_activations(X)
    assert b.kind == "pca" and b.rank == 7 and b.width == 7 and b.is_orthonormal
    assert np.all(np.diff(b.importances) <= 0)
    F = b.transform(X.numpy())
    np.testing.assert_allclose(np.cov(F.T, bias=True), np.diag(b.importances), atol=1e-9)
    np.testing.assert_allclose(b.reconstruct(X.numpy()), X.numpy(), atol=1e-10)  # full rank: exact
    np.testing.assert_allclose(b.mean, X.numpy().mean(0), atol=1e-12)
    # the scheduler's helper (SVD, float32, 1/(n-1)) spans the same directions with the same variances
    V, _mean, var = fit_pca_basis(X.float())
    np.testing.assert_allclose(np.abs(V @ b.rows.T), np.eye(7), atol=1e-4)
    np.testing.assert_allclose(var, b.importances * 300 / 299, rtol=1e-4)
    # rank-deficient data: only the numerical rank survives, torch in -> torch out
    Xl = _correlated(200, 9, seed=1, rank=3)
    bl = pca_from_activations(Xl)
    assert bl.rank == 3 and bl.info["numerical_rank"] == 3
    out = bl.reconstruct(Xl.float(), keep=3)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    torch.testing.assert_close(out, Xl.float(), atol=1e-4, rtol=1e-4)
    assert pca_from_activations(Xl, rank=2).rank == 2


def _reference_gram_pca(X: np.ndarray, threshold: float = 1e-10):
    """The default PCA written out: eigh of the 1/n covariance, largest entry of each row positive."""
    mu = X.mean(0)
    w, U = np.linalg.eigh((X - mu).T @ (X - mu) / len(X))
    w, U = w[::-1], U[:, ::-1]
    keep = w > threshold * w[0]
    rows = U[:, keep].T
    rows = rows * np.sign(rows[np.arange(len(rows)), np.abs(rows).argmax(1)])[:, None]
    return rows, w[keep], mu


def _reference_scheduler_pca(X: torch.Tensor, rtol: float = 1e-6):
    """The progressive pca stage's PCA as it was written before the two PCAs became one (SVD, float32 out)."""
    Xd = X.double()
    centred = Xd - Xd.mean(0)
    sv = torch.linalg.svd(centred, full_matrices=False)
    r = int((sv.S > rtol * max(Xd.shape) * sv.S[0]).sum())
    return sv.Vh[:r].float().numpy(), Xd.mean(0).float().numpy(), (sv.S[:r] ** 2 / (len(Xd) - 1)).float().numpy()


@pytest.mark.parametrize("n, d, rank", [(60, 8, None), (300, 7, None), (40, 12, 5), (15, 30, None)])
def test_one_pca_keeps_both_old_call_patterns(n, d, rank):
    X = _correlated(n, d, seed=n + d, rank=rank).float()
    # pca_basis / pca_from_activations (method="gram")
    b = pca_from_activations(X)
    rows, var, mu = _reference_gram_pca(X.double().numpy())
    assert b.rank == rows.shape[0] and b.info["numerical_rank"] == rows.shape[0]
    np.testing.assert_allclose(b.rows, rows, rtol=0, atol=1e-12)
    np.testing.assert_allclose(b.importances, var, rtol=0, atol=1e-12)
    np.testing.assert_allclose(b.mean, mu, rtol=0, atol=1e-12)
    # the scheduler's pca stage (fit_pca_basis = method="svd", float32)
    V, mean, explained = fit_pca_basis(X)
    V_ref, mean_ref, explained_ref = _reference_scheduler_pca(X)
    assert V.dtype == mean.dtype == explained.dtype == np.float32 and V.shape == V_ref.shape
    np.testing.assert_allclose(V, V_ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(mean, mean_ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(explained, explained_ref, rtol=0, atol=1e-12)
    # the two conventions differ (signs are LAPACK's in one, normalised in the other; 1/(n-1) vs 1/n)
    svd = pca_from_activations(X, method="svd", truncation_threshold=1e-6)
    np.testing.assert_allclose(svd.importances, b.importances * n / (n - 1), rtol=1e-6)
    with pytest.raises(pp.PlotError, match="unknown PCA method"):
        pca_from_activations(X, method="qr")


# ------------------------------------------------------------------------------------------ LIB
def test_lib_identities_cov_equals_lambda_and_whitened_jacobian_is_identity():
    n, d = 400, 6
    X = _correlated(n, d, seed=2)
    net = _TanhNet(d, 16, 9, seed=3)
    (basis,) = lib_chain_bases([net], X)
    J = _per_example_jacobians(net, X)  # (n, K, d), independent of the implementation
    assert basis.kind == "lib" and basis.rank == d  # K >= d and generic weights: every direction matters
    assert np.all(np.diff(basis.importances) <= 0) and np.all(basis.importances > 0)
    # biorthogonal encoder/decoder, exact reconstruction with every direction kept
    np.testing.assert_allclose(basis.encoder @ basis.rows.T, np.eye(d), atol=1e-9)
    np.testing.assert_allclose(basis.reconstruct(X.numpy()), X.numpy(), atol=1e-8)
    # Cov(f̂) = Λ
    F = basis.transform(X.numpy())
    np.testing.assert_allclose(np.cov(F.T, bias=True), np.diag(basis.importances), atol=1e-8 * basis.importances[0])
    # E[Ĵᵀ Ĵ] = I with Ĵ = ∂y/∂f̂ = J C⁺ᵀ
    Jhat = J.numpy() @ basis.rows.T
    np.testing.assert_allclose(np.einsum("nki,nkj->ij", Jhat, Jhat) / n, np.eye(d), atol=1e-8)
    # a lower rank keeps the most important directions of the same basis
    top = lib_from_activations(X, torch.einsum("nki,nkj->ij", J, J) / n, rank=3)
    assert top.rank == 3
    _signs_match(top.rows.T, basis.rows[:3].T, atol=1e-7)


def test_lib_linear_network_gives_right_singular_vectors_and_squared_singular_values():
    n, d, k = 2000, 8, 3
    g = torch.Generator().manual_seed(4)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    X = X - X.mean(0)
    L = torch.linalg.cholesky(X.T @ X / n)
    X = X @ torch.linalg.inv(L).T  # exactly isotropic: E[f fᵀ] = I
    A = torch.randn(k, d, generator=g, dtype=torch.float64)
    (basis,) = lib_chain_bases([lambda f: f @ A.T], X)
    _U, S, Vh = torch.linalg.svd(A)
    assert basis.rank == k  # the Jacobian's null space (d - k directions) is dropped
    np.testing.assert_allclose(basis.importances, (S**2).numpy(), rtol=1e-9)
    directions = basis.rows / np.linalg.norm(basis.rows, axis=1, keepdims=True)
    _signs_match(directions.T, Vh[:k].numpy().T, atol=1e-9)
    # on the kept directions: E[Ĵᵀ Ĵ] = I, and reconstructing from them keeps the output exactly
    Jhat = A.numpy() @ basis.rows.T
    np.testing.assert_allclose(Jhat.T @ Jhat, np.eye(k), atol=1e-9)
    np.testing.assert_allclose(basis.reconstruct(X.numpy()) @ A.numpy().T, X.numpy() @ A.numpy().T, atol=1e-9)
    assert not np.allclose(basis.reconstruct(X.numpy()), X.numpy(), atol=1e-3)  # the null space is dropped
    # with identity covariance encoder and decoder directions coincide (the basis is orthogonal)
    enc = basis.encoder / np.linalg.norm(basis.encoder, axis=1, keepdims=True)
    np.testing.assert_allclose(np.abs(np.sum(enc * directions, axis=1)), 1.0, atol=1e-9)


def test_lib_features_invariant_to_reparametrisation_pca_features_not():
    n, d = 500, 5
    X = _correlated(n, d, seed=5)
    net = _TanhNet(d, 12, 7, seed=6)
    g = torch.Generator().manual_seed(7)
    T = torch.randn(d, d, generator=g, dtype=torch.float64) + 2 * torch.eye(d, dtype=torch.float64)
    Tinv = torch.linalg.inv(T)
    X2 = X @ T.T  # f2 = T f; the downstream network sees the same function of f
    (b1,) = lib_chain_bases([net], X)
    (b2,) = lib_chain_bases([lambda f2: net(f2 @ Tinv.T)], X2)
    np.testing.assert_allclose(b2.importances, b1.importances, rtol=1e-7)
    F1, F2 = b1.transform(X.numpy()), b2.transform(X2.numpy())
    _signs_match(F2, F1, atol=1e-6 * np.abs(F1).max())
    p1, p2 = pca_from_activations(X), pca_from_activations(X2)
    P1, P2 = p1.transform(X.numpy()), p2.transform(X2.numpy())
    s = np.sign(np.sum(P1 * P2, axis=0))
    assert np.abs(P2 * s - P1).max() > 0.1 * np.abs(P1).max()
    assert not np.allclose(p1.importances, p2.importances, rtol=1e-2)


def test_lib_chain_recursion_uses_next_layer_features():
    n, d = 300, 5
    X = _correlated(n, d, seed=8)
    f1, f2 = _TanhNet(d, 10, 6, seed=9), _TanhNet(6, 10, 4, seed=10)
    b0, b1 = lib_chain_bases([f1, f2], X)
    assert b1.info["jacobian_target"] == "output" and b0.info["jacobian_target"] == "next-layer LIB features"
    H = f1(X)
    # layer 1 alone is the plain output-Jacobian LIB of f2
    (b1_alone,) = lib_chain_bases([f2], H)
    np.testing.assert_allclose(b1.rows, b1_alone.rows, atol=1e-9)
    # layer 0: Jacobian to layer 1's LIB features, E[Ĵᵀ Ĵ] = I in layer 0's LIB coordinates
    J = _per_example_jacobians(lambda f: (f1(f) - torch.tensor(b1.mean)) @ torch.tensor(b1.encoder).T, X)
    Jhat = J.numpy() @ b0.rows.T
    np.testing.assert_allclose(np.einsum("nki,nkj->ij", Jhat, Jhat) / n, np.eye(b0.rank), atol=1e-8)


# --------------------------------------------------------------------- pyvene sites (planted MLP)
def test_output_jacobian_on_pyvene_site_matches_independent_jacobian(planted_task):
    model, bank = planted_task.model, planted_task.fit.subset(range(200))
    site = pp.Site(1)
    acts, M = output_jacobian_gram(model, site, bank)
    assert acts.shape == (400, 8)  # bases then sources
    head = pp.bases.mlp_chain(model, site)

    def downstream(h):
        for f in head:
            h = f(h)
        return h

    J = _per_example_jacobians(lambda h: downstream(h.unsqueeze(0)).squeeze(0), acts)
    torch.testing.assert_close(M, torch.einsum("nki,nkj->ij", J.double(), J.double()) / 400, atol=1e-5, rtol=1e-5)
    # the chain reproduces the model from the site's activations
    with torch.no_grad():
        ref = model(inputs_embeds=torch.cat([bank.base, bank.source]))[0]
    torch.testing.assert_close(downstream(acts), ref)
    torch.testing.assert_close(site_activations(model, site, bank), acts)


def test_one_collector_serves_the_scheduler_call_pattern(planted_task):
    """The scheduler's call (two passes, "auto" batches, model dtype) gives the engine's activations bit for bit."""
    from pyvene_plot.localize import InterchangeEngine

    model, bank, site = planted_task.model, planted_task.fit.subset(range(50)), pp.Site(1)
    eng = InterchangeEngine(model, [(1, "block_output", -1, None)])
    ru = (1, "block_output", -1)
    want = torch.cat([eng.collect(bank.base)[ru], eng.collect(bank.source)[ru]], 0)
    got = site_activations(model, site, bank, batch_size="auto", split_bank=True, dtype=None)
    assert got.dtype == want.dtype and torch.equal(got, want)
    one_pass = site_activations(model, site, bank)
    assert one_pass.shape == (100, 8) and torch.equal(one_pass, want.float())
    # a model in float64: dtype=None keeps it, the default casts to float32
    model64 = copy.deepcopy(model).double()  # a copy: the task is cached
    acts64 = site_activations(model64, site, bank.base.double(), dtype=None)
    assert acts64.dtype == torch.float64
    assert site_activations(model64, site, bank.base.double()).dtype == torch.float32


def test_lib_basis_methods_agree_before_the_head_and_keep_the_output(planted_task):
    model, bank = planted_task.model, planted_task.fit
    site = pp.Site(2)  # the last hidden layer: next node layer is the output
    lite = pp.lib_basis(model, site, bank)
    full = pp.lib_basis(model, site, bank, method="lib")
    assert lite.info["method"] == "output_jacobian" and full.info["method"] == "lib"
    np.testing.assert_allclose(lite.importances, full.importances, rtol=1e-6)
    _signs_match(lite.rows.T, full.rows.T, atol=1e-5)
    # the score is linear: the output depends on one direction; reconstruction keeps every logit
    assert lite.rank == 1
    acts = site_activations(model, site, bank)
    with torch.no_grad():
        logits = model.score(acts)
        kept = model.score(lite.reconstruct(acts))
    torch.testing.assert_close(kept, logits, atol=1e-4, rtol=1e-4)
    # an earlier site: the faithful chain differs from LIB-lite and reports its downstream ranks
    early = pp.lib_basis(model, pp.Site(0), bank, method="lib")
    assert len(early.info["downstream_ranks"]) == 2
    pca = pp.pca_basis(model, pp.Site(0), bank)
    assert pca.is_orthonormal and not early.is_orthonormal
    assert pca.info["site"] == pp.Site(0).to_dict()


def test_basis_api_roundtrip_bands_truncate_keep(planted_task):
    b = pp.lib_basis(planted_task.model, pp.Site(0), planted_task.fit)
    again = Basis.from_dict(b.to_dict())
    np.testing.assert_array_equal(again.rows, b.rows)
    np.testing.assert_array_equal(again.encoder, b.encoder)
    assert again.kind == "lib" and again.info["method"] == "output_jacobian"
    bands = b.bands(2)
    assert [i for band in bands for i in band] == list(range(b.rank)) and len(bands) == min(2, b.rank)
    t = b.truncate(1)
    assert t.rank == 1 and t.info["truncated_from"] == b.rank
    acts = site_activations(planted_task.model, pp.Site(0), planted_task.fit)
    np.testing.assert_allclose(b.reconstruct(acts.numpy(), keep=[0]), t.reconstruct(acts.numpy()), atol=1e-9)
    np.testing.assert_allclose(b.reconstruct(acts.numpy(), keep=0), np.broadcast_to(b.mean, acts.shape), atol=1e-12)
    with pytest.raises(pp.PlotError, match="keep"):
        b.reconstruct(acts, keep=b.rank + 1)
    Q = b.orthonormal_rows()
    np.testing.assert_allclose(Q @ Q.T, np.eye(b.rank), atol=1e-10)
    for k in range(1, b.rank + 1):  # nested spans: span(Q[:k]) = span(encoder[:k])
        P = Q[:k].T @ Q[:k]
        np.testing.assert_allclose(b.encoder[:k] @ P, b.encoder[:k], atol=1e-8 * np.abs(b.encoder).max())
    Qr = b.orthonormal_rows("rows")
    np.testing.assert_allclose(b.rows[:1] @ Qr[:1].T @ Qr[:1], b.rows[:1], atol=1e-8 * np.abs(b.rows).max())
    assert "rank=" in repr(b)


def test_basis_to_json_from_json_every_field(planted_task, tmp_path):
    b = pp.lib_basis(planted_task.model, pp.Site(0), planted_task.fit)
    path = b.to_json(tmp_path / "basis.json")
    import json

    payload = json.loads(path.read_text())
    assert payload["format_version"] == BASIS_FORMAT_VERSION and payload["writer"].startswith("pyvene_plot ")
    again = Basis.from_json(path)
    assert again.kind == b.kind
    for field in ("rows", "encoder", "importances", "mean"):
        np.testing.assert_array_equal(getattr(again, field), getattr(b, field))
    assert again.info == json.loads(json.dumps(payload["info"])) and again.info["site"] == pp.Site(0).to_dict()
    assert again.info["n_states"] == b.info["n_states"] and again.info["runtime_s"] == b.info["runtime_s"]
    empty = tmp_path / "empty.json"
    empty.write_text("  ")
    with pytest.raises(pp.PlotError, match="empty.json.*is empty"):
        Basis.from_json(empty)
    cut = tmp_path / "cut.json"
    cut.write_text(path.read_text()[:100])
    with pytest.raises(pp.PlotError, match="cut.json.*not valid JSON"):
        Basis.from_json(cut)
    del payload["encoder"]
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(payload))
    with pytest.raises(pp.PlotError, match=r"partial.json.*missing \['encoder'\]"):
        Basis.from_json(partial)


def test_stochastic_sources_estimate_the_exact_gram():
    task = pp.tasks.load("binary_addition", seed=0)
    inputs = task.fit.subset(range(150)).base
    site = pp.Site(1)
    _, exact = output_jacobian_gram(task.model, site, inputs, readout=task.readout)
    _, est = output_jacobian_gram(task.model, site, inputs, readout=task.readout, n_stochastic_sources=48, seed=3)
    rel = float(torch.linalg.norm(est - exact) / torch.linalg.norm(exact))
    assert rel < 0.15, rel
    assert not torch.equal(est, exact)


# ---------------------------------------------------------------------------- scheduler stage
def test_lib_stage_in_scheduler_candidates_are_bands():
    task = pp.tasks.load("binary_addition", seed=0)
    searcher = pp.OTAlignmentSearcher(method="ot", readout=task.readout, progress=False, epsilon=[0.05],
                                      top_k=(1, 2), lambdas=(1.0,))
    loc = pp.ProgressiveScheduler([pp.Stage("layer"), pp.Stage("lib", bands=3)], searcher, compete=False).run(
        task.model, task.fit, task.calibration)
    # basis fitting time is charged to the lib stage only (the layer stage fits no basis)
    assert loc.stage_specs[1].kind == "lib" and loc.extra_s[0] == 0.0 and loc.extra_s[1] > 0
    lib_keys = [k for k in loc.bases if k.startswith("lib:")]
    assert lib_keys and all(loc.pca_info[k]["kind"] == "lib" for k in lib_keys)
    for v in loc.variables:
        parent = loc.kept[0][v][0]
        key = f"lib:L{parent.layer}:{parent.component}@{parent.position}"
        cands = loc.candidates[1][v]
        # candidates are contiguous bands partitioning the LIB directions at the kept site
        assert all(c.basis == key and c.layer == parent.layer for c in cands)
        dims = [d for c in cands for d in c.dims]
        V = loc.bases[key]
        assert dims == list(range(V.shape[0])) and len(cands) == min(3, V.shape[0])
        assert all(c.dims == tuple(range(c.dims[0], c.dims[-1] + 1)) for c in cands)
        np.testing.assert_allclose(V @ V.T, np.eye(V.shape[0]), atol=1e-4)
        # the orthonormal basis spans exactly the LIB encoder rows, in importance order
        b = pp.lib_basis(task.model, pp.Site(parent.layer), task.fit, readout=task.readout)
        assert b.rank == V.shape[0] == loc.pca_info[key]["rank"]
        np.testing.assert_allclose(loc.pca_info[key]["importances"], b.importances, rtol=1e-5)
        first = cands[0].dims
        P = V[list(first)].T.astype(np.float64) @ V[list(first)].astype(np.float64)
        np.testing.assert_allclose(b.encoder[list(first)] @ P, b.encoder[list(first)],
                                   atol=1e-4 * np.abs(b.encoder).max())
        h = loc.final.handles[v]
        assert all(s.basis == key for s in h.sites)
        types = {type(i).__name__ for i in h.intervenable(task.model).interventions.values()}
        assert types == {"SoftSpanInterchangeIntervention"}
    kept_specs = [s for s in loc.das_specs() if s.source.endswith(":kept")]
    assert len(kept_specs) == len(loc.variables) and all(s.basis is not None for s in kept_specs)
    # the LIB bands carry each carry bit above chance (0.5); seeded run: 0.744 / 0.706 / 0.569
    iia = loc.evaluate(task.test)
    assert set(iia) == set(loc.variables) and min(iia.values()) > 0.5, iia
    assert iia == pytest.approx({"C1": 0.7437, "C2": 0.7063, "C3": 0.5688}, abs=0.03)


# -------------------------------------------------------------------------- oblique intervention
def test_oblique_intervention_sets_chosen_features_and_keeps_the_rest(planted_task):
    model, bank = planted_task.model, planted_task.fit.subset(range(64))
    site = pp.Site(0)
    b = pp.lib_basis(model, site, planted_task.fit)
    assert b.rank >= 2
    S = [0]
    iv = b.intervention(dims=S)
    im = pv.IntervenableModel([{"layer": 0, "component": "block_output", "unit": "pos", "max_number_of_units": 1,
                                "intervention": iv}], model)
    base_acts = site_activations(model, site, bank.base)
    src_acts = site_activations(model, site, bank.source)
    out = iv(base_acts, src_acts)  # the forward the hook runs
    Fo, Fb, Fs = b.transform(out.double()), b.transform(base_acts.double()), b.transform(src_acts.double())
    torch.testing.assert_close(Fo[:, S], Fs[:, S], atol=1e-4, rtol=1e-4)
    rest = [i for i in range(b.rank) if i not in S]
    torch.testing.assert_close(Fo[:, rest], Fb[:, rest], atol=1e-4, rtol=1e-4)
    # inside pyvene: the model continues from exactly those activations
    with torch.no_grad():
        logits = pp.run_intervenable(im, bank.base, bank.source)
        manual = model.score(model.mlp.h[2](model.mlp.h[1](out)))
    torch.testing.assert_close(logits, manual, atol=1e-5, rtol=1e-5)
    # an orthonormal basis makes it the span intervention
    V = torch.linalg.qr(torch.randn(8, 3, generator=torch.Generator().manual_seed(0)))[0].T.contiguous()
    obl = pp.ObliqueSpanInterchangeIntervention(embed_dim=8, low_rank_dimension=3, basis=V)
    span = pp.SoftSpanInterchangeIntervention(embed_dim=8, low_rank_dimension=3, basis=V)
    torch.testing.assert_close(obl(base_acts, src_acts), span(base_acts, src_acts))
    with pytest.raises(pp.PlotError, match="biorthogonal"):
        pp.ObliqueSpanInterchangeIntervention(embed_dim=8, low_rank_dimension=3, basis=V, encoder=2 * V)


_CHILD = textwrap.dedent(
    """
    import sys
    import torch
    torch.set_num_threads(1)
    import pyvene as pv
    import pyvene_plot as pp
    p = torch.load(sys.argv[1], weights_only=False)
    model = pp.tasks.load("planted").model
    im = pv.IntervenableModel.load(p["dir"], model)
    with torch.no_grad():
        logits = pp.run_intervenable(im, p["base"], p["source"])
    iv = next(iter(im.interventions.values()))
    torch.save({"logits": logits, "type": type(iv).__name__, "encoder": iv.encoder.clone(),
                "basis": iv.basis.clone()}, sys.argv[2])
    """
)


def test_oblique_intervention_save_load_in_fresh_process(planted_task, tmp_path):
    model, bank = planted_task.model, planted_task.fit.subset(range(32))
    b = pp.lib_basis(model, pp.Site(1), planted_task.fit)
    rep = b.representation(pp.Site(1), dims=range(b.rank), strength=0.8)
    iv = rep.intervention
    im = pv.IntervenableModel([rep], model)
    with torch.no_grad():
        parent = pp.run_intervenable(im, bank.base, bank.source)
    im.save(str(tmp_path / "iv"))
    torch.save({"dir": str(tmp_path / "iv"), "base": bank.base, "source": bank.source}, tmp_path / "in.pt")
    (tmp_path / "child.py").write_text(_CHILD)
    proc = subprocess.run([sys.executable, str(tmp_path / "child.py"), str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    child = torch.load(tmp_path / "out.pt", weights_only=False)
    assert child["type"] == "ObliqueSpanInterchangeIntervention"
    assert torch.equal(child["encoder"], iv.encoder) and torch.equal(child["basis"], iv.basis)
    assert torch.equal(child["logits"], parent)


# ------------------------------------------------------------------------------------- errors
def test_clear_errors(planted_task):
    model = planted_task.model
    tiny = planted_task.fit.subset(range(2))  # 4 states
    with pytest.raises(pp.BankError, match="bigger bank"):
        pp.lib_basis(model, pp.Site(0), tiny, rank=6)
    with pytest.raises(pp.BankError, match="bigger bank"):
        pp.pca_basis(model, pp.Site(0), tiny, rank=5)
    with pytest.raises(pp.SiteError, match="larger than the site's width"):
        pp.lib_basis(model, pp.Site(0), planted_task.fit, rank=9)
    with pytest.raises(pp.SiteError, match="larger than the site's width"):
        pca_from_activations(torch.randn(50, 4), rank=5)
    with pytest.raises(pp.SiteError, match="whole activation vector"):
        pp.lib_basis(model, pp.Site(0, dims=(0, 1)), planted_task.fit)
    with pytest.raises(pp.SiteError, match="layer 7 does not exist"):
        pp.pca_basis(model, pp.Site(7), planted_task.fit)
    with pytest.raises(pp.PlotError, match="unknown LIB method"):
        pp.lib_basis(model, pp.Site(0), planted_task.fit, method="svd")
    with pytest.raises(pp.ModelError, match="gradient path"):
        lib_from_activations(torch.randn(20, 3), torch.zeros(3, 3))
    with pytest.raises(pp.SiteError, match="do not vary"):
        pca_from_activations(torch.ones(10, 4))
    binary = pp.tasks.load("binary_addition", seed=0)
    with pytest.raises(pp.ModelError, match="chain="):
        pp.lib_basis(binary.model, pp.Site(0), binary.fit.subset(range(8)), method="lib")


def test_site_without_gradient_path_to_the_output():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=20, n_positions=8, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 20, (12, 5), generator=torch.Generator().manual_seed(1))
    readout = pp.Readout(position=1)  # logits of token 1 cannot see token 3 (causal attention)
    with pytest.raises(pp.ModelError, match="gradient path"):
        pp.lib_basis(model, pp.Site(0, position=3), ids, readout=readout)
    ok = pp.lib_basis(model, pp.Site(0, position=0), ids, readout=readout, n_stochastic_sources=4)
    assert ok.rank >= 1 and ok.info["n_stochastic_sources"] == 4
