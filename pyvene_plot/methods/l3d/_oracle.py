"""L3D's gradient machinery: inputs, divergences, per-sample gradients at ``W0``, batches and batch top-k."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ...errors import ModelError
from ._config import Inputs, L3DConfig, L3DInputError


def n_samples(inputs: Any) -> int:
    """Number of samples (first dimension) of L3D inputs; errors name what is wrong with them."""
    if isinstance(inputs, torch.Tensor):
        leaves = [inputs]
    elif isinstance(inputs, Mapping):
        leaves = list(inputs.values())
    elif isinstance(inputs, (tuple, list)):
        leaves = list(inputs)
    else:
        leaves = [inputs]
    if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
        kinds = sorted({type(t).__name__ for t in leaves}) or ["nothing"]
        raise L3DInputError(
            f"inputs of type {type(inputs).__name__} (containing {', '.join(kinds)}) are not supported: pass a "
            "Tensor (first dim = samples), a dict of Tensors passed as keyword arguments (e.g. input_ids, "
            "attention_mask) or a tuple of Tensors passed positionally"
        )
    if any(t.dim() == 0 for t in leaves):
        raise L3DInputError("every input Tensor needs a leading sample dimension; got a 0-d Tensor")
    sizes = {int(t.shape[0]) for t in leaves}
    if len(sizes) != 1:
        raise L3DInputError(f"input Tensors disagree on the number of samples (first dims {sorted(sizes)})")
    n = sizes.pop()
    if n == 0:
        raise L3DInputError("inputs are empty (0 samples); pass at least 2 samples (references are other samples)")
    return n


def take_samples(inputs: Inputs, idx: torch.Tensor, device: torch.device) -> Inputs:
    """Rows ``idx`` of every input Tensor, moved to ``device``."""
    if isinstance(inputs, torch.Tensor):
        return inputs[idx.to(inputs.device)].to(device)
    if isinstance(inputs, Mapping):
        return {k: v[idx.to(v.device)].to(device) for k, v in inputs.items()}
    return tuple(v[idx.to(v.device)].to(device) for v in inputs)


def _unsqueeze(x: Inputs) -> Inputs:
    """Add a leading batch dimension of 1 to every input Tensor (one sample under ``vmap``)."""
    if isinstance(x, torch.Tensor):
        return x.unsqueeze(0)
    if isinstance(x, Mapping):
        return {k: v.unsqueeze(0) for k, v in x.items()}
    return tuple(v.unsqueeze(0) for v in x)


def _divergence(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``D(out, ref)`` of one sample: mean squared error or ``KL(softmax(ref) ‖ softmax(out))``."""
    if kind == "mse":
        return lambda out, ref: (out - ref).pow(2).mean()

    def kl(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        logq = torch.log_softmax(out, dim=-1)
        logp = torch.log_softmax(ref, dim=-1)
        return (logp.exp() * (logp - logq)).sum(-1).mean()

    return kl


class GradientOracle:
    """Forward passes and per-sample divergence gradients at ``W0`` for the decomposed tensors.

    Parameters
    ----------
    model : nn.Module
        Called through :func:`torch.func.functional_call`; not modified.
    names : list of str
        Decomposed parameters; their ``W0`` is snapshotted, every other parameter and buffer is read live.
    device : torch.device
    divergence : {"mse", "kl"}
    output_fn : callable
        Raw model output -> Tensor ``(B, ...)``.
    """

    def __init__(self, model: nn.Module, names: list[str], device: torch.device, divergence: str,
                 output_fn: Callable[[Any], torch.Tensor]) -> None:
        self.model = model
        self.names = list(names)
        self.device = device
        self.output_fn = output_fn
        self.div = _divergence(divergence)
        state = {n: p.detach().to(device) for n, p in model.named_parameters()}
        state.update({n: b.detach().to(device) for n, b in model.named_buffers()})
        # W0 of the decomposed tensors is a snapshot; the other parameters and buffers are read live
        self.params0 = {n: state.pop(n).clone() for n in self.names}
        self.frozen = state

    def call(self, params: Mapping[str, torch.Tensor], x: Inputs) -> torch.Tensor:
        """``output_fn(model(x))`` with the decomposed tensors set to ``params``."""
        full = {**self.frozen, **params}
        if isinstance(x, torch.Tensor):
            out = functional_call(self.model, full, (x,))
        elif isinstance(x, Mapping):
            out = functional_call(self.model, full, (), dict(x))
        else:
            out = functional_call(self.model, full, tuple(x))
        return self.output_fn(out)

    @torch.no_grad()
    def outputs(self, x: Inputs, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Outputs at ``W0`` (or at ``params``), detached."""
        return self.call(self.params0 if params is None else params, x).detach()

    def grads(self, x: Inputs, ref: torch.Tensor) -> torch.Tensor:
        """Per-sample gradients, flattened and concatenated in ``names`` order: (B, n_w)."""

        def loss(p: dict[str, torch.Tensor], xi: Inputs, ri: torch.Tensor) -> torch.Tensor:
            out = self.call(p, _unsqueeze(xi))
            return self.div(out[0], ri)

        g = vmap(grad(loss), in_dims=(None, 0, 0))(self.params0, x, ref)
        return torch.cat([g[n].reshape(ref.shape[0], -1) for n in self.names], dim=1).detach()


def batch_topk_mask(c: torch.Tensor, frac: float) -> torch.Tensor:
    """Batch top-k: keep the ``ceil(frac · c.numel())`` largest ``|c|`` over the whole batch.

    Parameters
    ----------
    c : Tensor, shape (B, K)
        Coefficients of a batch.
    frac : float in (0, 1]
        Fraction kept.

    Returns
    -------
    BoolTensor, shape (B, K)
        True where the coefficient is kept (ties at the threshold are kept; exact zeros never are).
    """
    a = c.detach().abs()
    n = a.numel()
    m = min(n, max(1, math.ceil(frac * n)))
    if m >= n:
        return a > 0
    thr = torch.topk(a.flatten(), m, sorted=False).values.min()
    return (a >= thr) & (a > 0)


def check_output(out: torch.Tensor, what: str) -> None:
    """Refuse non-floating or non-finite model outputs (``what`` names the pass in the message)."""
    if not torch.is_floating_point(out):
        raise ModelError(f"the model output ({what}) has dtype {out.dtype}; L3D needs floating-point outputs")
    if not torch.isfinite(out).all():
        bad = int((~torch.isfinite(out)).flatten(1).any(1).sum())
        raise ModelError(
            f"the model produced NaN/inf outputs on {bad} sample(s) ({what}); L3D needs finite outputs at "
            "W0: check the model's weights and inputs (e.g. run model(x) and look for NaN), or drop those samples"
        )


def _batches(n: int, batch_size: int, gen: torch.Generator, shuffle: bool) -> list[torch.Tensor]:
    """Sample indices per batch (seeded order); a last batch of one sample is merged into the previous one."""
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    bounds = list(range(0, n, batch_size)) + [n]
    batches = [order[a:b] for a, b in itertools.pairwise(bounds)]
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches[-2] = torch.cat([batches[-2], batches.pop()])
    return batches


def _references(out: torch.Tensor, group: list[torch.Tensor], reference: str, gen: torch.Generator) -> torch.Tensor:
    """Reference outputs ``y_r`` (same shape as ``out``) for a group of batches whose outputs are stacked in ``out``."""
    if reference == "random":
        refs, offset = [], 0
        for b in group:
            m = len(b)
            shift = torch.randint(1, m, (m,), generator=gen)
            refs.append(offset + (torch.arange(m) + shift) % m)
            offset += m
        return out[torch.cat(refs).to(out.device)]
    if reference == "mean":
        return torch.cat([out[o:o + len(b)].mean(0, keepdim=True).expand(len(b), *out.shape[1:])
                          for o, b in zip(np.cumsum([0] + [len(b) for b in group[:-1]]), group)])
    return torch.zeros_like(out)


def gradient_batches(oracle: GradientOracle, config: L3DConfig, inputs: Inputs, n: int, gen: torch.Generator,
                     shuffle: bool, keep_index: bool = False) -> Iterator[Any]:
    """Yield per-batch gradient matrices (B, n_w), references (``config.reference``) from each batch.

    Gradients are computed ``config.chunk_size`` samples at a time (whole batches per group); batches
    of one sample are merged into the previous batch (a reference must be another sample). With
    ``keep_index`` each item is ``(gradients, sample indices)``.
    """
    batches = _batches(n, config.batch_size, gen, shuffle)
    per_group = max(1, config.chunk_size // config.batch_size)
    for start in range(0, len(batches), per_group):
        group = batches[start:start + per_group]
        idx = torch.cat(group)
        x = take_samples(inputs, idx, oracle.device)
        out = oracle.outputs(x)
        check_output(out, "forward pass at W0")
        ref = _references(out, group, config.reference, gen)
        g = oracle.grads(x, ref)
        if not torch.isfinite(g).all():
            raise ModelError("per-sample gradients contain NaN/inf; check the model and inputs for overflow")
        offset = 0
        for b in group:
            m = len(b)
            yield (g[offset:offset + m], b) if keep_index else g[offset:offset + m]
            offset += m
