"""Attribution patching: a first-order estimate of every site's interchange effect, for screening.

Exact neural signatures cost one intervened forward per site and pair. Attribution patching
(Nanda 2023; Syed et al. 2023) linearises the model around the base run instead: for a site ``S``
with base activation ``h`` and source activation ``h'``, the change of a scalar output ``m`` under a
full interchange is estimated as ::

    Δm_S  ≈  ∇_h m · (h' - h) ⊙ mask_S

One forward pass over the bases (with every candidate site's activation retained), one over the
sources (activations only), and one backward pass per variable give the estimate for *all* sites
at once. The scalar per variable ``Z`` and pair ``i`` is the counterfactual margin
``m_Z(i) = z[cf_Z(i)] - z[base(i)]`` of the readout logits ``z``: a site that carries ``Z`` should
raise it on the pairs where interchanging ``Z`` changes the output.

The score of site ``S`` for ``Z`` is the mean estimated margin gain over the pairs where ``Z``
changes the output. It is used only to *screen* a stage's candidates before exact signatures
(:class:`pyvene_plot.Stage` ``screen="attribution"``); the transport still runs on exact
signatures. Linearisation fails where the model saturates, so screening keeps a generous number of
sites per variable and the benchmark reports how often the exactly chosen site survives.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyvene as pv
import torch
from pyvene.models.modeling_utils import get_module_hook

from ..data import PairBank, as_model_kwargs, inputs_len, sequence_length
from ..errors import BankError, SiteError
from ..models import Readout, Site, model_device, model_spec, resolve_positions, validate_sites
from ..progressive import ScreenResult, register_screener

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class AttributionScores:
    """First-order interchange effects of every site.

    Attributes
    ----------
    sites : list of Site
    variables : list of str
    scores : ndarray, shape (V, S)
        Mean estimated counterfactual-margin gain over the pairs where the variable changes the output.
    estimates : ndarray, shape (V, S, N)
        Per-pair estimated margin change.
    runtime_s : float
    n_backward : int
        Backward passes run (variables x batches).
    """

    sites: list[Site]
    variables: list[str]
    scores: np.ndarray
    estimates: np.ndarray
    runtime_s: float
    n_backward: int

    def top(self, variable: str, k: int) -> list[int]:
        """Indices of the ``k`` sites with the highest score for ``variable``."""
        row = self.scores[self.variables.index(variable)]
        return [int(i) for i in np.argsort(-row, kind="stable")[:k]]


def _site_module(model: torch.nn.Module, layer: int, component: str) -> torch.nn.Module:
    mod, hook_type = get_module_hook(model, pv.RepresentationConfig(layer, component, "pos", 1), backend="ndif")
    if hook_type != "register_forward_hook":
        raise SiteError(
            f"attribution patching reads module outputs; component {component!r} is an input hook — "
            "use the matching *_output component (or screen='oa' / no screening)"
        )
    return mod


def attribution_scores(
    model: torch.nn.Module,
    sites: Sequence[Site],
    bank: PairBank,
    variables: Sequence[str] | None = None,
    readout: Readout | None = None,
    bases: dict | None = None,
    batch_size: int = 64,
) -> AttributionScores:
    """Estimate every site's full-interchange effect on the counterfactual margins of ``bank``.

    Parameters
    ----------
    model : torch.nn.Module
    sites : sequence of Site
        Whole-vector, coordinate or basis-span sites (a span site's mask is its projector).
    bank : PairBank
    variables : list of str, optional
        Default: every variable of the bank.
    readout : Readout, optional
        Default: the bank's readout, else ``Readout()``.
    bases : dict, optional
        ``basis_id -> V`` (r, d) for span sites.
    batch_size : int
        Pairs per forward/backward pass.

    Returns
    -------
    AttributionScores
    """
    t0 = time.perf_counter()
    sites = list(sites)
    if not sites:
        raise SiteError("attribution patching needs at least one site")
    if len(bank) == 0:
        raise BankError(f"bank {bank.name!r} is empty; attribution patching needs pairs")
    variables = list(variables) if variables is not None else list(bank.variables)
    readout = readout or getattr(bank, "readout", None) or Readout()
    validate_sites(model, sites, {k: int(np.asarray(v).shape[0]) for k, v in (bases or {}).items()})
    ctx = _context(model, sites, bank, variables, readout, bases)
    kw_b, kw_s = as_model_kwargs(bank.base), as_model_kwargs(bank.source)
    n = inputs_len(kw_b)
    est = np.zeros((len(variables), len(sites), n))
    params = [p for p in model.parameters()]
    was = [p.requires_grad for p in params]
    handles = [ctx.mods[k].register_forward_hook(_grab(ctx.captured, k)) for k in ctx.mods]
    n_backward = 0
    try:
        for p in params:  # a graph from the inputs to every site; weight gradients are never computed
            p.requires_grad_(True)
        for s0 in range(0, n, batch_size):
            pb = {k: v[s0 : s0 + batch_size].to(ctx.device) for k, v in kw_b.items()}
            ps = {k: v[s0 : s0 + batch_size].to(ctx.device) for k, v in kw_s.items()}
            n_backward += _attribute_batch(ctx, pb, ps, s0, est)
    finally:
        for h in handles:
            h.remove()
        for p, w in zip(params, was):
            p.requires_grad_(w)
        ctx.captured.clear()
    scores = np.zeros((len(variables), len(sites)))
    for vi, v in enumerate(variables):
        ch = bank.changed(v).numpy()
        scores[vi] = est[vi][:, ch].mean(1) if ch.any() else est[vi].mean(1)
    rt = time.perf_counter() - t0
    logger.info("attribution patching: %d sites x %d pairs, %d backward passes in %.2fs", len(sites), n, n_backward, rt)
    return AttributionScores(sites, variables, scores, est, rt, n_backward)


# ---------------------------------------------------------------------------------------- steps
@dataclasses.dataclass
class _Context:
    """What every batch of :func:`attribution_scores` reads: the model's hooks and the sites' geometry.

    ``raw`` lists the distinct (layer, component, position) of the sites, ``mods`` the hooked module
    per (layer, component), ``projectors`` each span basis (r, d) on the model's device, and
    ``captured`` the module outputs of the last forward pass.
    """

    model: torch.nn.Module
    sites: list[Site]
    bank: PairBank
    variables: list[str]
    readout: Readout
    spec: Any
    device: torch.device
    raw: list[tuple]
    mods: dict[tuple, torch.nn.Module]
    projectors: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]
    captured: dict[tuple, torch.Tensor]


def _context(model, sites, bank, variables, readout, bases) -> _Context:
    """Resolve the hooked modules, the sites' raw units and span projectors."""
    spec = model_spec(model)
    device = model_device(model)
    raw = list(dict.fromkeys((s.layer, s.component, s.position) for s in sites))
    mods = {(l, c): _site_module(model, l, c) for (l, c, _p) in raw}
    projectors = {}
    for s in sites:
        if s.basis is not None and s.basis not in projectors:
            V = torch.as_tensor(np.asarray((bases or {})[s.basis]), dtype=torch.float32, device=device)
            projectors[s.basis] = V
    labels = {v: bank.labels(v) for v in variables}
    return _Context(model, sites, bank, variables, readout, spec, device, raw, mods, projectors, labels, {})


def _grab(captured: dict, key: tuple):
    """Forward hook storing a module's output (first element of a tuple output) under ``key``."""
    def hook(_m, _i, out):
        captured[key] = out[0] if isinstance(out, tuple) else out
    return hook


def _gather(ctx: _Context, part: dict, h: torch.Tensor, pos_of: dict) -> dict:
    """Rows of ``h`` at each position's per-example index: ``{position: (B, d)}``."""
    b = inputs_len(part)
    if ctx.spec.has_positions and h.dim() >= 3:
        return {p: h[torch.arange(b, device=h.device), torch.as_tensor(pos_of[p], device=h.device)] for p in pos_of}
    return {p: h.reshape(b, -1) for p in pos_of}


def _at_unit(ctx: _Context, part: dict, per_module: dict, positions: dict) -> dict:
    """``{(layer, component, position): (B, d)}`` from the captured module outputs ``per_module``."""
    out = {}
    for (l, c), h in per_module.items():
        pos = {p: positions[p] for (ll, cc, p) in ctx.raw if (ll, cc) == (l, c)}
        for p, a in _gather(ctx, part, h, pos).items():
            out[(l, c, p)] = a
    return out


def _attribute_batch(ctx: _Context, pb: dict, ps: dict, s0: int, est: np.ndarray) -> int:
    """Fill ``est[:, :, s0 : s0 + B]`` for one batch; returns the number of backward passes run."""
    spec, raw = ctx.spec, ctx.raw
    b = inputs_len(pb)
    seq_b, seq_s = (sequence_length(pb), sequence_length(ps)) if spec.has_positions else (1, 1)
    pos_b = {p: resolve_positions(p, pb, seq_b, b) if spec.has_positions else [0] * b for (_l, _c, p) in raw}
    pos_s = {p: resolve_positions(p, ps, seq_s, b) if spec.has_positions else [0] * b for (_l, _c, p) in raw}
    with torch.no_grad():
        ctx.captured.clear()
        ctx.model(**ps)
        src = {k: a.detach() for k, a in _at_unit(ctx, ps, {k: ctx.captured[k] for k in ctx.mods}, pos_s).items()}
    ctx.captured.clear()
    n_backward = 0
    with torch.enable_grad():
        z = ctx.readout(ctx.model(**pb), pb).float()
        full = {k: ctx.captured[k] for k in ctx.mods}  # module outputs the readout depends on
        if not torch.isfinite(z).all():
            raise SiteError("non-finite logits on the base run; check the model and inputs")
        keys = list(full)
        bad = [k for k in keys if not full[k].requires_grad]
        if bad:
            raise SiteError(f"no gradient path from the output to (layer, component) {bad}; "
                            "attribution patching needs differentiable sites")
        base_acts = _at_unit(ctx, pb, {k: full[k].detach() for k in keys}, pos_b)
        base_lab = ctx.bank.base_labels[s0 : s0 + b].to(z.device)
        rows = torch.arange(b, device=z.device)
        for vi, v in enumerate(ctx.variables):
            cf = ctx.labels[v][s0 : s0 + b].to(z.device)
            margin = (z[rows, cf] - z[rows, base_lab]).sum()
            grads = torch.autograd.grad(margin, [full[k] for k in keys], retain_graph=vi < len(ctx.variables) - 1,
                                        allow_unused=True)
            n_backward += 1
            g_full = {k: (torch.zeros_like(full[k]) if g is None else g) for k, g in zip(keys, grads)}
            g_at = _at_unit(ctx, pb, g_full, pos_b)
            for si, s in enumerate(ctx.sites):
                est[vi, si, s0 : s0 + b] = _site_estimate(ctx, s, g_at, src, base_acts).double().cpu().numpy()
    return n_backward


def _site_estimate(ctx: _Context, s: Site, g_at: dict, src: dict, base_acts: dict) -> torch.Tensor:
    """First-order margin change ``∇h m · (h' - h)`` restricted to the site's coordinates or span, (B,)."""
    ru = (s.layer, s.component, s.position)
    g, diff = g_at[ru], src[ru] - base_acts[ru]
    if s.basis is not None:
        V = ctx.projectors[s.basis][list(s.dims)]  # (k, d)
        return ((g @ V.T) * (diff @ V.T)).sum(-1)
    if s.dims is not None:
        d = list(s.dims)
        return (g[:, d] * diff[:, d]).sum(-1)
    return (g * diff).sum(-1)


#: default share of each variable's candidates an attribution screen keeps (at least ``ATTRIBUTION_MIN_KEEP``)
ATTRIBUTION_KEEP_FRACTION = 0.25
ATTRIBUTION_MIN_KEEP = 4


def screen_attribution(model, sites, bank, *, variables, threshold=None, readout=None, bases=None, seed=0):
    """Screener for ``Stage(screen="attribution")``: keep each variable's top sites by attribution score.

    ``threshold`` is the share of candidates kept per variable (default 0.25, never fewer than
    4 sites); the rest are dropped before exact signatures. Scores are the estimated
    counterfactual-margin gains of :func:`attribution_scores` on the fit bank.
    """
    import math


    frac = ATTRIBUTION_KEEP_FRACTION if threshold is None else float(threshold)
    if not 0 < frac <= 1:
        raise SiteError(f"an attribution screen keeps a share of candidates in (0, 1]; got screen_threshold={threshold}")
    est = attribution_scores(model, sites, bank, variables, readout=readout, bases=bases)
    n_keep = min(len(sites), max(ATTRIBUTION_MIN_KEEP, math.ceil(frac * len(sites))))
    by_var = {}
    for v in variables:
        top = set(est.top(v, n_keep))
        by_var[v] = [j in top for j in range(len(sites))]
    keep_any = [any(by_var[v][j] for v in variables) for j in range(len(sites))]
    best = est.scores.max(0)
    return ScreenResult(
        scores=[float(x) for x in best], keep=keep_any, threshold=frac,
        rule=f"per variable, the top {n_keep} of {len(sites)} sites by first-order margin gain (share {frac:g})",
        info={"score": "attribution patching: mean estimated counterfactual-margin gain on changed fit pairs",
              "n_backward": est.n_backward, "attribution_runtime_s": est.runtime_s,
              "scores_by_variable": {v: [float(x) for x in est.scores[i]] for i, v in enumerate(variables)}},
        keep_by_variable=by_var,
    )


register_screener("attribution", screen_attribution, overwrite=True)
