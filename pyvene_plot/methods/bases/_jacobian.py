"""Jacobian Gram ``E[JᵀJ]`` of a downstream output w.r.t. a site's activations (the input of LIB)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...data import Inputs, PairBank, as_model_kwargs, inputs_len
from ...errors import ModelError, PlotError
from ...models import Readout, Site
from ._activations import bank_states, whole_site


def _output_values(out: torch.Tensor, output_fn: str | Callable | None) -> torch.Tensor:
    """The output ``y`` (B, K) whose Jacobian is used: logits ``out`` (B, C), their log-softmax or ``output_fn(out)``."""
    if output_fn is None or output_fn == "logits":
        return out
    if output_fn == "log_probs":
        return torch.log_softmax(out, dim=-1)
    if callable(output_fn):
        y = output_fn(out)
        if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[0] != out.shape[0]:
            raise PlotError("output_fn must map readout logits (B, C) to a tensor (B, K)")
        return y
    raise PlotError(f"unknown output_fn {output_fn!r}; use 'logits', 'log_probs' or a callable (B, C) -> (B, K)")


def accumulate_jacobian_gram(
    y: torch.Tensor, f: torch.Tensor, n_sources: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """Σ_b J_bᵀ J_b for ``y`` (B, K) depending row-wise on the leaf ``f`` (B, d); float64 on CPU.

    Parameters
    ----------
    y : Tensor, shape (B, K)
    f : Tensor, shape (B, d)
        Leaf with ``requires_grad``.
    n_sources : int, optional
        ``None``: exact (one vector-Jacobian product per output); else this many Rademacher projections.
    generator : torch.Generator, optional
        Draws the Rademacher signs.

    Returns
    -------
    Tensor, shape (d, d), float64
    """
    B, K = y.shape
    d = f.shape[1]
    out = torch.zeros(d, d, dtype=torch.float64)
    if n_sources is None:  # exact: one vector-Jacobian product per output coordinate
        for k in range(K):
            g = torch.autograd.grad(y[:, k].sum(), f, retain_graph=True, allow_unused=True)[0]
            if g is not None:
                g = g.detach().double().cpu()
                out += g.T @ g
        return out
    for _ in range(int(n_sources)):  # Rademacher sources: E[s sᵀ] = I, unbiased for Σ JᵀJ
        s = torch.randint(0, 2, (B, K), generator=generator).to(y.dtype).mul_(2).sub_(1).to(y.device)
        g = torch.autograd.grad((y * s).sum(), f, retain_graph=True, allow_unused=True)[0]
        if g is not None:
            g = g.detach().double().cpu()
            out += g.T @ g
    return out / int(n_sources)


def _leaf_intervenable(model: torch.nn.Module, site: Site, d: int):
    """An intervenable model whose interchange at ``site`` replaces the activation by a given leaf.

    Returns ``(IntervenableModel, intervention key, device)``; the intervention has weight 1 and
    strength 1, so with the clean activation as the leaf the forward pass is the clean one.
    """
    import pyvene as pv

    from ...interventions import SoftInterchangeIntervention
    from ...models import model_device

    iv = SoftInterchangeIntervention(embed_dim=d)  # weight 1, strength 1: the leaf replaces the activation
    im = pv.IntervenableModel(
        [{"layer": site.layer, "component": site.component, "unit": "pos", "max_number_of_units": 1,
          "intervention": iv}],
        model,
        use_fast=False,
    )
    device = model_device(model)
    im.set_device(device)
    return im, im.sorted_keys[0], device


def output_jacobian_gram(
    model: torch.nn.Module,
    site: Site,
    bank: PairBank | Inputs,
    *,
    readout: Readout | None = None,
    output_fn: str | Callable[[torch.Tensor], torch.Tensor] | None = None,
    n_stochastic_sources: int | None = None,
    batch_size: int = 256,
    progress: bool = False,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations at a site and ``M' = E[JᵀJ]`` of the readout output w.r.t. them.

    The site's activation is replaced by a leaf tensor through a pyvene interchange (coefficient 1,
    so the forward pass is the clean one), and ``J = ∂y/∂f`` is obtained by vector-Jacobian products.

    Parameters
    ----------
    model : torch.nn.Module
        A model pyvene can hook (its parameters are not modified; no gradients are stored on them).
    site : Site
        Whole-vector site.
    bank : PairBank or inputs
        States: a bank's bases then sources, or raw model inputs.
    readout : Readout, optional
        Output -> logits ``(B, C)``; default the bank's readout or :class:`Readout`.
    output_fn : {"logits", "log_probs"} or callable, optional
        ``y``: raw readout logits (default, as LIB's output node), their log-softmax, or any map
        ``(B, C) -> (B, K)`` (e.g. a logit difference).
    n_stochastic_sources : int, optional
        Estimate the sum over outputs with this many Rademacher projections per batch instead of
        ``K`` exact products (for large ``K``, e.g. a full vocabulary).
    batch_size : int, default 256
    progress : bool, default False
        tqdm bar over batches.
    seed : int, default 0
        Seed of the stochastic sources.

    Returns
    -------
    acts : Tensor, shape (n, d), float32
    jacobian_gram : Tensor, shape (d, d), float64

    Raises
    ------
    ModelError
        The readout output does not depend on the site (no gradient path).
    """
    from ...localize import InterchangeEngine

    site = whole_site(model, site)
    states = bank_states(bank)
    readout = readout or getattr(bank, "readout", None) or Readout()
    eng = InterchangeEngine(model, [site.unit], readout, batch_size=batch_size)
    ru = (site.layer, site.component, site.position)
    acts = eng.collect(states)[ru].float()
    positions = eng.positions(states)[ru]
    d = int(acts.shape[1])
    im, key, device = _leaf_intervenable(model, site, d)
    kw = as_model_kwargs(states)
    n = inputs_len(kw)
    gen = torch.Generator().manual_seed(int(seed))
    M = torch.zeros(d, d, dtype=torch.float64)
    starts = range(0, n, int(batch_size))
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"Jacobian at {site.label}", leave=False)
    for s in starts:
        part = {k: v[s : s + batch_size].to(device) for k, v in kw.items()}
        b = inputs_len(part)
        f = acts[s : s + b].to(device).clone().requires_grad_(True)
        p = positions[s : s + b]
        locs = [[[int(x)] for x in p.tolist()]]
        im.use_fast = False
        with torch.enable_grad():
            _, cf = im(part, unit_locations={"sources->base": (locs, locs)},
                       source_representations={key: f.unsqueeze(1)})
            y = _output_values(readout(cf, part), output_fn)
            if not y.requires_grad:
                raise ModelError(
                    f"the readout output does not depend on site {site.label} (no gradient path); choose a "
                    "site upstream of the read-out"
                )
            M += accumulate_jacobian_gram(y, f, n_stochastic_sources, gen)
    return acts.cpu(), M / n
