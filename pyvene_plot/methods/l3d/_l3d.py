"""Local Loss Landscape Decomposition (L3D): sparse, low-rank subnetworks in parameter space.

L3D (Chrisman, Bushnaq & Sharkey 2025, arXiv 2504.00194) asks which *directions in parameter space*
a model uses on which inputs. For every sample ``x_i`` it takes the gradient, at the trained parameters
``W0``, of a divergence between the model's output and a reference output ``y_r = f(x_r)`` of a random
other sample of the batch (``reference="random"``, the paper's choice; ``"mean"`` and ``"zero"`` are
offered as variants)::

    g_i = ∇_W D(f(x_i; W), y_r) |_{W = W0}                           (one vector of n_w numbers)

and learns ``n_v`` parameter directions whose *sparse* combinations reconstruct those gradients:

* an encoder ``V_in`` (n_v × n_w) gives coefficients ``c_i = V_in g_i``;
* **batch top-k** keeps the ``⌈k · B · n_v⌉`` largest ``|c|`` of a batch of ``B`` samples (k = 0.1);
* a decoder ``V_out`` (n_w × n_v) reconstructs ``ĝ_i = V_out (c_i ⊙ mask_i)``;
* the loss is the normalised L2 error ``Σ_i ‖g_i − ĝ_i‖² / Σ_i ‖g_i‖²``, and after every step each
  subnetwork (a column of ``V_out`` across all parameter tensors) is renormalised to unit norm.

Each subnetwork's slice of each parameter tensor is low rank: a Tucker product
``G ×_1 U⁽¹⁾ ×_2 … ×_N U⁽ᴺ⁾`` with core ``G`` of shape ``R_1 × … × R_N`` (rank 1 for toy models,
about a tenth of each dimension for real ones); encoder and decoder are separate Tucker
parametrisations, initialised identically.

What you get back (:class:`L3D`):

* :attr:`L3D.subnetworks` — ``v_k``, parameter-shaped, unit norm over all decomposed tensors (the sign
  is arbitrary: ``v_k`` and ``−v_k`` are the same subnetwork);
* :attr:`L3D.p_act` — how often each subnetwork survives the top-k (0 = dead subnetwork);
* :meth:`L3D.attributions` — the impact ``I(x_i, v_k) = mean_j |V_in[k] · ∇_W D(f(x_i), y_j)|`` over
  ``n_j`` random references;
* :meth:`L3D.perturb` — a copy of the model moved to ``W0 + δ v_k``;
  :meth:`L3D.output_derivative` — ``∂_δ f(x; W0 + δ v_k)`` at ``δ = 0`` (which outputs a subnetwork
  drives);
* :meth:`L3D.evaluate` / :meth:`L3D.reconstruction_error` — the training objective on given inputs.

How this relates to PLOT: PLOT localises *variables of a causal model* in *activation space* with
interchange interventions; L3D finds *mechanisms* in *parameter space* and intervenes by moving
weights, with no base/source counterfactual semantics. It answers a different question (which weights
implement the computation used on these inputs) and is offered next to PLOT, not inside its pipeline.

Cost: every step needs ``B`` per-sample gradients (memory ``O(B · n_w)``, computed with
:func:`torch.func.vmap` over :func:`torch.func.grad` of a :func:`torch.func.functional_call`, in groups of
``chunk_size`` samples); encoding and decoding materialise the ``n_v`` subnetworks (``O(n_v · n_w)``).
This is cheap for toy models and single blocks; decompose one block of a large model, not all of it.

Implementation notes: Adam on the encoder and decoder Tucker factors with a StepLR schedule; the
unit-norm renormalisation after each step rescales the Tucker cores (the factors are rebalanced to
unit-norm columns once per epoch, which leaves the tensors unchanged); the top-k mask is a constant in
the backward pass (gradients flow through the kept coefficients only); ``W0`` of the decomposed tensors is
snapshotted at :meth:`L3D.fit`. :meth:`L3D.perturb` returns a perturbed deep copy;
:meth:`L3D.perturbed` is the in-place context manager for models too large to copy.

Reimplemented from the paper's description; no code from the authors' repository is used.
"""


from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from ...errors import ModelError, PlotError
from ...models import raw_logits
from ..._utils import atomic_write_json, package_versions, resolve_device

logger = logging.getLogger(__name__)



SCHEMA = "pyvene_plot.methods.l3d/1"
DIVERGENCES = ("mse", "kl")
REFERENCES = ("random", "zero", "mean")

Inputs = torch.Tensor | Mapping[str, torch.Tensor] | Sequence[torch.Tensor]
RankSpec = int | float | Mapping[str, int | Sequence[int]]


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------


class L3DError(PlotError):
    """An L3D decomposition cannot be configured, fitted or used."""


class L3DConfigError(L3DError):
    """A configuration value is invalid (names the field, the value and the valid choices)."""


class L3DInputError(L3DError):
    """The inputs are empty, inconsistent or of an unsupported type."""


class L3DNotFittedError(L3DError):
    """A method needs a fitted decomposition (or a bound model) and there is none."""


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class L3DConfig:
    """Hyper-parameters of an L3D decomposition.

    Defaults follow the paper's toy-model settings (1000 epochs, batch 32, Adam lr 0.01 decayed ×0.8
    every 100 epochs, top-k fraction 0.1, rank 1), with a 10-epoch dense warm start.

    Parameters
    ----------
    n_subnetworks : int, default 10
        Number of subnetworks ``n_v``. A few spare ones help training (they end up dead, ``p_act=0``).
    ranks : int, float or mapping, default 1
        Tucker rank of each subnetwork's slice of each parameter tensor. An int ``r`` uses rank ``r``
        along every dimension (it must not exceed any dimension of any decomposed tensor); a float in
        ``(0, 1]`` uses ``ceil(f · dim)`` per dimension (e.g. 0.1 for real models); a mapping gives
        per-parameter ranks (an int, or a tuple with one rank per dimension), ``"*"`` sets the default
        for unlisted parameters (otherwise 1).
    top_k : float, default 0.1
        Batch-top-k fraction: per batch of ``B`` samples keep the ``ceil(top_k · B · n_v)`` largest
        ``|c|``.
    warm_start_k : float, default 0.999
        Top-k fraction used during the first ``warm_start_epochs`` epochs.
    warm_start_epochs : int, default 10
        Epochs trained with ``warm_start_k`` first (nearly dense coefficients, so every subnetwork gets
        gradient before the top-k starts to select). The reference scripts use 10 for their harder toys
        and the transformer; the paper's TMS run used none (set 0 to reproduce it). On TMS a short run
        (100 epochs) without warm start left one subnetwork dead in 1 of 6 seed pairs; with it, 10 of 10 recovered
        every feature.
    epochs : int, default 1000
        Passes over the inputs.
    batch_size : int, default 32
        Samples per optimisation step (and the pool from which references are drawn); at least 2.
    lr : float, default 0.01
        Adam learning rate.
    lr_step_epochs : int, default 100
        StepLR period in epochs.
    lr_gamma : float, default 0.8
        StepLR decay factor.
    divergence : {"mse", "kl"}, default "mse"
        ``"mse"``: mean squared difference of the outputs (regression). ``"kl"``:
        ``KL(softmax(y_r) ‖ softmax(f(x_i)))`` over the last output dimension, averaged over the others
        (classifiers, language models).
    reference : {"random", "zero", "mean"}, default "random"
        The reference output ``y_r``. ``"random"`` (the paper): the W0 output of a random *other* sample
        of the same batch. ``"mean"``: the mean W0 output of the batch. ``"zero"``: an all-zero output
        (MSE) or logits (KL: the uniform distribution). :meth:`L3D.attributions` always averages over
        random other samples, as in the paper.
    params : tuple of str, optional
        Names (``model.named_parameters()``) of the tensors to decompose; ``None`` = every parameter
        with ``requires_grad=True``.
    n_references : int, default 10
        References ``n_j`` averaged over by :meth:`L3D.attributions`.
    chunk_size : int, default 512
        Per-sample gradients are computed this many samples at a time (memory ``chunk_size · n_w``).
    seed : int, default 0
        Seeds initialisation, batch order and reference choice (local generators only).
    device : str, default "auto"
        Where the decomposition runs; ``"auto"`` = the device of the model's parameters.
    """

    n_subnetworks: int = 10
    ranks: RankSpec = 1
    top_k: float = 0.1
    warm_start_k: float = 0.999
    warm_start_epochs: int = 10
    epochs: int = 1000
    batch_size: int = 32
    lr: float = 0.01
    lr_step_epochs: int = 100
    lr_gamma: float = 0.8
    divergence: str = "mse"
    reference: str = "random"
    params: tuple[str, ...] | None = None
    n_references: int = 10
    chunk_size: int = 512
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        def bad(field: str, value: Any, want: str) -> L3DConfigError:
            return L3DConfigError(f"L3DConfig.{field}={value!r} is invalid: {want}")

        def is_int(v: Any) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        if not is_int(self.n_subnetworks) or self.n_subnetworks < 1:
            raise bad("n_subnetworks", self.n_subnetworks, "use an int >= 1 (the number of subnetworks)")
        for f in ("top_k", "warm_start_k"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < float(v) <= 1.0:
                raise bad(f, v, "use a fraction in (0, 1], e.g. 0.1")
        for f, lo in (("epochs", 1), ("batch_size", 2), ("lr_step_epochs", 1), ("n_references", 1),
                      ("chunk_size", 1), ("warm_start_epochs", 0)):
            v = getattr(self, f)
            if not is_int(v) or v < lo:
                raise bad(f, v, f"use an int >= {lo}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise bad("lr", self.lr, "use a positive float")
        if isinstance(self.lr_gamma, bool) or not isinstance(self.lr_gamma, (int, float)) or not 0 < self.lr_gamma <= 1:
            raise bad("lr_gamma", self.lr_gamma, "use a float in (0, 1]")
        if self.divergence not in DIVERGENCES:
            raise bad("divergence", self.divergence, f"choose one of {DIVERGENCES}")
        if self.reference not in REFERENCES:
            raise bad("reference", self.reference, f"choose one of {REFERENCES}")
        if not is_int(self.seed):
            raise bad("seed", self.seed, "use an int")
        if self.params is not None:
            if isinstance(self.params, str):
                object.__setattr__(self, "params", (self.params,))
            else:
                object.__setattr__(self, "params", tuple(self.params))
            if not self.params or not all(isinstance(p, str) for p in self.params):
                raise bad("params", self.params, "use None (all trainable parameters) or a non-empty "
                          "sequence of parameter names from model.named_parameters()")
        object.__setattr__(self, "ranks", _check_rank_spec(self.ranks))
        try:
            resolve_device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise bad("device", self.device, f'use "auto", "cpu", "cuda" or "cuda:N" ({exc})') from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (round-trips through :meth:`from_dict`)."""
        out = dataclasses.asdict(self)
        out["params"] = list(self.params) if self.params is not None else None
        if isinstance(self.ranks, Mapping):
            out["ranks"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.ranks.items()}
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> L3DConfig:
        """Build from a dict; unknown keys are an error naming the valid ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise L3DConfigError(f"unknown L3DConfig field(s) {unknown}; valid fields: {sorted(names)}")
        return cls(**dict(d))


def _check_rank_spec(ranks: Any) -> RankSpec:
    msg = ("L3DConfig.ranks={!r} is invalid: use an int >= 1, a float fraction in (0, 1], or a mapping "
           "{{param_name: int or tuple of ints}} (key '*' = default)")
    if isinstance(ranks, bool):
        raise L3DConfigError(msg.format(ranks))
    if isinstance(ranks, (int, np.integer)):
        if ranks < 1:
            raise L3DConfigError(msg.format(ranks))
        return int(ranks)
    if isinstance(ranks, float):
        if not 0.0 < ranks <= 1.0:
            raise L3DConfigError(msg.format(ranks))
        return float(ranks)
    if isinstance(ranks, Mapping):
        out: dict[str, int | tuple[int, ...]] = {}
        for k, v in ranks.items():
            if isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1:
                out[str(k)] = int(v)
            elif isinstance(v, Sequence) and not isinstance(v, str) and all(
                isinstance(r, (int, np.integer)) and not isinstance(r, bool) and r >= 1 for r in v
            ):
                out[str(k)] = tuple(int(r) for r in v)
            else:
                raise L3DConfigError(msg.format(ranks) + f"; entry {k!r}: {v!r}")
        return out
    raise L3DConfigError(msg.format(ranks))


def _resolve_ranks(spec: RankSpec, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Per-dimension Tucker ranks of one tensor; errors name the tensor, its shape and the fix."""
    if len(shape) == 0:
        return ()
    if isinstance(spec, float):
        return tuple(max(1, math.ceil(spec * d)) for d in shape)
    if isinstance(spec, Mapping):
        r = spec.get(name, spec.get("*", 1))
    else:
        r = spec
    ranks = (r,) * len(shape) if isinstance(r, int) else tuple(r)
    if len(ranks) != len(shape):
        raise L3DConfigError(
            f"ranks for parameter {name!r} give {len(ranks)} values {ranks} but the tensor has "
            f"{len(shape)} dimensions (shape {tuple(shape)}); give one rank per dimension"
        )
    for d, (rk, dim) in enumerate(zip(ranks, shape)):
        if rk > dim:
            raise L3DConfigError(
                f"rank {rk} along dimension {d} of parameter {name!r} exceeds its size {dim} "
                f"(shape {tuple(shape)}); use ranks <= {min(shape)} for it, e.g. "
                f"ranks={{{name!r}: {tuple(min(rk, s) for s in shape)}, '*': {rk}}}, or a float "
                "fraction such as ranks=0.1"
            )
    return ranks


# ----------------------------------------------------------------------------------------------
# low-rank (Tucker) parametrisation of n_v parameter directions
# ----------------------------------------------------------------------------------------------

_CORE = "abcdefgh"
_MODE = "pqrstuvw"


class _Tucker(nn.Module):
    """``K`` Tucker tensors of one parameter shape: ``T_k = G_k ×_1 U_k⁽¹⁾ … ×_N U_k⁽ᴺ⁾``.

    ``core``: (K, R_1..R_N); ``factors[d]``: (K, I_d, R_d). ``materialise()`` -> (K, I_1..I_N).
    """

    def __init__(self, k: int, shape: tuple[int, ...], ranks: tuple[int, ...], gen: torch.Generator) -> None:
        super().__init__()
        n = len(shape)
        if n > len(_MODE):
            raise L3DConfigError(f"parameters with more than {len(_MODE)} dimensions are not supported (shape {shape})")
        self.shape = tuple(shape)
        self.core = nn.Parameter(torch.randn(k, *ranks, generator=gen))
        self.factors = nn.ParameterList(
            [nn.Parameter(torch.randn(k, i, r, generator=gen)) for i, r in zip(shape, ranks)]
        )
        core = "k" + _CORE[:n]
        ops = [core] + ["k" + _MODE[d] + _CORE[d] for d in range(n)]
        self.expr = ",".join(ops) + "->k" + _MODE[:n]
        self.normalise_factors()

    def materialise(self) -> torch.Tensor:
        return torch.einsum(self.expr, self.core, *self.factors)

    @torch.no_grad()
    def normalise_factors(self) -> None:
        """Unit-norm factor columns, scale moved into the core (the tensor is unchanged)."""
        for d, u in enumerate(self.factors):
            norms = u.norm(dim=1).clamp_min(1e-12)  # (K, R_d)
            u.div_(norms.unsqueeze(1))
            view = [norms.shape[0]] + [1] * (self.core.dim() - 1)
            view[1 + d] = norms.shape[1]
            self.core.mul_(norms.view(view))

    @torch.no_grad()
    def scale_(self, s: torch.Tensor) -> None:
        self.core.mul_(s.view(-1, *([1] * (self.core.dim() - 1))))


class _Directions(nn.Module):
    """``K`` low-rank directions over several parameter tensors, flattened to a (K, n_w) matrix."""

    def __init__(self, k: int, names: list[str], shapes: list[tuple[int, ...]], ranks: list[tuple[int, ...]],
                 gen: torch.Generator) -> None:
        super().__init__()
        self.names = list(names)
        self.shapes = [tuple(s) for s in shapes]
        self.tuckers = nn.ModuleList([_Tucker(k, s, r, gen) for s, r in zip(shapes, ranks)])

    def matrix(self) -> torch.Tensor:
        """(K, n_w): every tensor's slices, flattened in ``names`` order."""
        return torch.cat([t.materialise().flatten(1) for t in self.tuckers], dim=1)

    @torch.no_grad()
    def normalise_(self, unit: bool, factors: bool = True) -> None:
        """Optionally rebalance the Tucker factors (tensor unchanged); with ``unit`` rescale every
        direction to unit norm over all tensors jointly."""
        if factors:
            for t in self.tuckers:
                t.normalise_factors()
        if unit:
            sq = sum(t.materialise().flatten(1).pow(2).sum(1) for t in self.tuckers)
            inv = 1.0 / sq.sqrt().clamp_min(1e-12)
            for t in self.tuckers:
                t.scale_(inv)


def _split(flat: torch.Tensor, names: Sequence[str], shapes: Sequence[tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """(K, n_w) -> {name: (K, *shape)}."""
    out, start = {}, 0
    for name, shape in zip(names, shapes):
        size = int(np.prod(shape)) if len(shape) else 1
        out[name] = flat[:, start:start + size].reshape(flat.shape[0], *shape)
        start += size
    return out


# ----------------------------------------------------------------------------------------------
# inputs and per-sample gradients
# ----------------------------------------------------------------------------------------------


def _n_samples(inputs: Any) -> int:
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


def _take(inputs: Inputs, idx: torch.Tensor, device: torch.device) -> Inputs:
    if isinstance(inputs, torch.Tensor):
        return inputs[idx.to(inputs.device)].to(device)
    if isinstance(inputs, Mapping):
        return {k: v[idx.to(v.device)].to(device) for k, v in inputs.items()}
    return tuple(v[idx.to(v.device)].to(device) for v in inputs)


def _unsqueeze(x: Inputs) -> Inputs:
    if isinstance(x, torch.Tensor):
        return x.unsqueeze(0)
    if isinstance(x, Mapping):
        return {k: v.unsqueeze(0) for k, v in x.items()}
    return tuple(v.unsqueeze(0) for v in x)


def _divergence(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if kind == "mse":
        return lambda out, ref: (out - ref).pow(2).mean()

    def kl(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        logq = torch.log_softmax(out, dim=-1)
        logp = torch.log_softmax(ref, dim=-1)
        return (logp.exp() * (logp - logq)).sum(-1).mean()

    return kl


class _Oracle:
    """Forward passes and per-sample divergence gradients at ``W0`` for the decomposed tensors."""

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

    def _call(self, params: Mapping[str, torch.Tensor], x: Inputs) -> torch.Tensor:
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
        return self._call(self.params0 if params is None else params, x).detach()

    def grads(self, x: Inputs, ref: torch.Tensor) -> torch.Tensor:
        """Per-sample gradients, flattened and concatenated in ``names`` order: (B, n_w)."""

        def loss(p: dict[str, torch.Tensor], xi: Inputs, ri: torch.Tensor) -> torch.Tensor:
            out = self._call(p, _unsqueeze(xi))
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


# ----------------------------------------------------------------------------------------------
# the estimator
# ----------------------------------------------------------------------------------------------


class L3D:
    """Local Loss Landscape Decomposition of a model into sparse, low-rank parameter-space subnetworks.

    Parameters
    ----------
    config : L3DConfig or dict, optional
        Hyper-parameters (see :class:`L3DConfig`).
    **overrides
        Individual :class:`L3DConfig` fields, e.g. ``L3D(n_subnetworks=5, epochs=200)``.

    Attributes
    ----------
    config : L3DConfig
    param_names_ : list of str
        Decomposed tensors, in order.
    param_shapes_ : list of tuple
        Their shapes.
    decoder_ : dict of str to Tensor (n_v, *shape)
        ``V_out`` per tensor (the subnetworks, unit norm over all tensors jointly).
    encoder_ : dict of str to Tensor (n_v, *shape)
        ``V_in`` per tensor.
    p_act_ : Tensor, shape (n_v,)
        Fraction of samples of the last epoch on which each subnetwork was in the top-k.
    history_ : list of float
        Mean training loss (normalised L2 reconstruction error) of each epoch.
    train_error_ : float
        ``history_[-1]``.
    fit_seconds_ : float
        Wall time of :meth:`fit`.

    Examples
    --------
    >>> from pyvene_plot.methods.toys import train_tms
    >>> toy = train_tms(seed=0)
    >>> l3d = L3D(n_subnetworks=5, epochs=100).fit(toy.model, toy.inputs[:1000], progress=False)
    >>> l3d.subnetworks[0]["W"].shape
    torch.Size([2, 5])
    """

    def __init__(self, config: L3DConfig | Mapping[str, Any] | None = None, **overrides: Any) -> None:
        if config is None:
            base: dict[str, Any] = {}
        elif isinstance(config, L3DConfig):
            base = config.to_dict()
        elif isinstance(config, Mapping):
            base = dict(config)
        else:
            raise L3DConfigError(f"config must be an L3DConfig, a dict or None, got {type(config).__name__}")
        base.update(overrides)
        self.config = L3DConfig.from_dict(base)
        self._model: nn.Module | None = None
        self._oracle: _Oracle | None = None
        self._output_fn: Callable[[Any], torch.Tensor] = raw_logits
        self.decoder_: dict[str, torch.Tensor] | None = None
        self.encoder_: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ setup
    def _select(self, model: nn.Module) -> list[str]:
        if not isinstance(model, nn.Module):
            raise ModelError(f"L3D needs a torch.nn.Module, got {type(model).__name__}")
        named = dict(model.named_parameters())
        if self.config.params is None:
            names = [n for n, p in named.items() if p.requires_grad]
            if not names:
                raise ModelError(
                    f"{type(model).__name__} has no trainable parameters (none with requires_grad=True); "
                    "L3D decomposes gradients with respect to parameters: unfreeze the block to decompose "
                    "(p.requires_grad_(True)) or pass params=[...] naming trainable tensors"
                )
            return names
        unknown = [n for n in self.config.params if n not in named]
        if unknown:
            avail = list(named)
            raise L3DConfigError(
                f"params {unknown} are not parameters of {type(model).__name__}; valid names include "
                f"{avail[:12]}{' ...' if len(avail) > 12 else ''} (see model.named_parameters())"
            )
        frozen = [n for n in self.config.params if not named[n].requires_grad]
        if frozen:
            raise ModelError(
                f"params {frozen} have requires_grad=False, so they have no gradient to decompose; "
                "call .requires_grad_(True) on them or leave them out of params"
            )
        if len(set(self.config.params)) != len(self.config.params):
            raise L3DConfigError(f"params lists a name twice: {list(self.config.params)}")
        return list(self.config.params)

    def _bind(self, model: nn.Module, names: list[str], output_fn: Callable[[Any], torch.Tensor] | None) -> None:
        dev = self.config.device
        if dev == "auto":
            first = next(iter(model.parameters()), None)
            device = first.device if first is not None else torch.device("cpu")
        else:
            device = resolve_device(dev)
        self._model = model
        self._output_fn = output_fn or raw_logits
        self._oracle = _Oracle(model, names, device, self.config.divergence, self._output_fn)

    def _check_output(self, out: torch.Tensor, what: str) -> None:
        if not torch.is_floating_point(out):
            raise ModelError(f"the model output ({what}) has dtype {out.dtype}; L3D needs floating-point outputs")
        if not torch.isfinite(out).all():
            bad = int((~torch.isfinite(out)).flatten(1).any(1).sum())
            raise ModelError(
                f"the model produced NaN/inf outputs on {bad} sample(s) ({what}); L3D needs finite outputs at "
                "W0: check the model's weights and inputs (e.g. run model(x) and look for NaN), or drop those samples"
            )

    # ------------------------------------------------------------------ fitting
    def fit(
        self,
        model: nn.Module,
        inputs: Inputs,
        *,
        output_fn: Callable[[Any], torch.Tensor] | None = None,
        progress: bool = True,
    ) -> L3D:
        """Learn the decomposition of ``model``'s parameters from per-sample gradients on ``inputs``.

        Parameters
        ----------
        model : nn.Module
            The trained model at ``W0``; not modified. Put it in eval mode (dropout and batch norm in
            training mode make the gradients stochastic or break ``vmap``).
        inputs : Tensor (N, ...), dict of Tensors or tuple of Tensors
            Model inputs, first dimension = samples; a dict is passed as keyword arguments, a tuple
            positionally. ``N >= 2``.
        output_fn : callable, optional
            Maps the model's raw output to a Tensor ``(B, ...)`` (default: the output itself, its
            ``.logits`` or its first element).
        progress : bool, default True
            tqdm bar over epochs (postfix: running loss).

        Returns
        -------
        L3D
            ``self``, fitted.

        Raises
        ------
        ModelError
            No trainable parameters selected, a selected tensor with ``requires_grad=False``, NaN/inf
            outputs or gradients, or gradients that are zero on every sample.
        L3DConfigError
            Unknown parameter names, or a rank larger than a tensor dimension.
        L3DInputError
            Empty or inconsistent inputs, or fewer than 2 samples.
        """
        cfg = self.config
        t0 = time.perf_counter()
        names = self._select(model)
        named = dict(model.named_parameters())
        shapes = [tuple(named[n].shape) for n in names]
        ranks = [_resolve_ranks(cfg.ranks, n, s) for n, s in zip(names, shapes)]
        if isinstance(cfg.ranks, Mapping):
            stray = sorted(set(cfg.ranks) - set(names) - {"*"})
            if stray:
                raise L3DConfigError(f"ranks names {stray}, which are not decomposed parameters {names}")
        n = _n_samples(inputs)
        if n < 2:
            raise L3DInputError(f"L3D needs at least 2 samples (each sample's reference is another sample), got {n}")
        if model.training and any(isinstance(m, (nn.Dropout, nn.modules.batchnorm._BatchNorm)) for m in model.modules()):
            warnings.warn("model is in training mode and has dropout/batch-norm layers; call model.eval() so the "
                          "gradients at W0 are deterministic", UserWarning, stacklevel=2)
        self._bind(model, names, output_fn)
        oracle = self._oracle
        assert oracle is not None
        device = oracle.device

        gen = torch.Generator().manual_seed(int(cfg.seed))
        k = cfg.n_subnetworks
        dec = _Directions(k, names, shapes, ranks, gen).to(device)
        enc = copy.deepcopy(dec)
        dec.normalise_(unit=True)
        enc.load_state_dict(dec.state_dict())
        opt = torch.optim.Adam(list(enc.parameters()) + list(dec.parameters()), lr=cfg.lr, foreach=True)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step_epochs, gamma=cfg.lr_gamma)
        n_w = sum(int(np.prod(s)) if len(s) else 1 for s in shapes)
        logger.info("L3D: %d subnetworks over %d tensors (%d parameters), %d samples, ranks %s",
                    k, len(names), n_w, n, dict(zip(names, ranks)))

        self.history_: list[float] = []
        bar = None
        epochs: Iterator[int] | range = range(cfg.epochs)
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.epochs, desc="L3D", leave=False)
        tensor_sq = torch.zeros(len(names), dtype=torch.float64)
        sizes = [int(np.prod(s)) if len(s) else 1 for s in shapes]
        try:
            for epoch in epochs:
                frac = cfg.warm_start_k if epoch < cfg.warm_start_epochs else cfg.top_k
                losses, weights = [], []
                active = torch.zeros(k, device=device)
                seen = 0
                for g in self._gradient_batches(inputs, n, gen, shuffle=True):
                    if epoch == 0:
                        tensor_sq += torch.stack([c.pow(2).sum().double().cpu() for c in g.split(sizes, dim=1)])
                    denom = g.pow(2).sum()
                    if denom <= 0:
                        continue
                    v_in, v_out = enc.matrix(), dec.matrix()
                    c = g @ v_in.T
                    mask = batch_topk_mask(c, frac)
                    g_hat = (c * mask) @ v_out
                    loss = (g - g_hat).pow(2).sum() / denom
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    dec.normalise_(unit=True, factors=False)  # subnetworks back to unit norm
                    losses.append(float(loss.detach()))
                    weights.append(float(denom))
                    active += mask.sum(0)
                    seen += g.shape[0]
                if epoch == 0:
                    self._check_gradient_mass(names, tensor_sq)
                # keep the Tucker factors unit-norm (scale lives in the core); the tensors are unchanged
                dec.normalise_(unit=False)
                enc.normalise_(unit=False)
                sched.step()
                # weight batches by their gradient mass: the epoch value is Σ‖g−ĝ‖² / Σ‖g‖²
                ep = float(np.dot(losses, weights) / max(sum(weights), 1e-300)) if losses else float("nan")
                self.history_.append(ep)
                self.p_act_ = (active / max(seen, 1)).cpu()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{ep:.4f}")
                if epoch % max(1, cfg.epochs // 10) == 0:
                    logger.debug("L3D epoch %d: loss %.4f, live subnetworks %d", epoch, ep, int((self.p_act_ > 0).sum()))
        finally:
            if bar is not None:
                bar.close()

        with torch.no_grad():
            self.decoder_ = {n_: t.detach().cpu() for n_, t in _split(dec.matrix(), names, shapes).items()}
            self.encoder_ = {n_: t.detach().cpu() for n_, t in _split(enc.matrix(), names, shapes).items()}
        self.param_names_ = list(names)
        self.param_shapes_ = [tuple(s) for s in shapes]
        self.ranks_ = {n_: tuple(r) for n_, r in zip(names, ranks)}
        self.n_samples_ = n
        self.train_error_ = self.history_[-1]
        self.fit_seconds_ = time.perf_counter() - t0
        logger.info("L3D fitted in %.1fs: reconstruction error %.4f, %d/%d subnetworks alive", self.fit_seconds_,
                    self.train_error_, int((self.p_act_ > 0).sum()), k)
        return self

    def _check_gradient_mass(self, names: list[str], tensor_sq: torch.Tensor) -> None:
        if not torch.isfinite(tensor_sq).all():
            raise ModelError("per-sample gradients contain NaN/inf; check the model and inputs for overflow")
        if float(tensor_sq.sum()) == 0.0:
            raise ModelError(
                f"the divergence gradient with respect to {names} is zero on every sample: the outputs do not "
                "depend on these parameters at W0 (unused or dead tensors, or identical outputs for all inputs); "
                "decompose parameters the output depends on"
            )
        dead = [n for n, s in zip(names, tensor_sq.tolist()) if s == 0.0]
        if dead:
            warnings.warn(f"parameters {dead} get zero gradient on every sample of the first epoch; their "
                          "subnetwork slices are not learned", UserWarning, stacklevel=3)

    def _gradient_batches(self, inputs: Inputs, n: int, gen: torch.Generator, shuffle: bool,
                          keep_index: bool = False) -> Iterator[Any]:
        """Yield per-batch gradient matrices (B, n_w), references (``config.reference``) from each batch.

        Gradients are computed ``chunk_size`` samples at a time; batches of one sample are merged into
        the previous batch (a reference must be another sample).
        """
        cfg = self.config
        oracle = self._oracle
        assert oracle is not None
        order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
        bounds = list(range(0, n, cfg.batch_size)) + [n]
        batches = [order[a:b] for a, b in itertools.pairwise(bounds)]
        if len(batches) > 1 and len(batches[-1]) < 2:
            batches[-2] = torch.cat([batches[-2], batches.pop()])
        per_group = max(1, cfg.chunk_size // cfg.batch_size)
        for start in range(0, len(batches), per_group):
            group = batches[start:start + per_group]
            idx = torch.cat(group)
            x = _take(inputs, idx, oracle.device)
            out = oracle.outputs(x)
            self._check_output(out, "forward pass at W0")
            if cfg.reference == "random":
                refs, offset = [], 0
                for b in group:
                    m = len(b)
                    shift = torch.randint(1, m, (m,), generator=gen)
                    refs.append(offset + (torch.arange(m) + shift) % m)
                    offset += m
                ref = out[torch.cat(refs).to(out.device)]
            elif cfg.reference == "mean":
                ref = torch.cat([out[o:o + len(b)].mean(0, keepdim=True).expand(len(b), *out.shape[1:])
                                 for o, b in zip(np.cumsum([0] + [len(b) for b in group[:-1]]), group)])
            else:
                ref = torch.zeros_like(out)
            g = oracle.grads(x, ref)
            if not torch.isfinite(g).all():
                raise ModelError("per-sample gradients contain NaN/inf; check the model and inputs for overflow")
            offset = 0
            for b in group:
                m = len(b)
                yield (g[offset:offset + m], b) if keep_index else g[offset:offset + m]
                offset += m

    # ------------------------------------------------------------------ fitted state
    def _require_fit(self) -> None:
        if self.decoder_ is None or self.encoder_ is None:
            raise L3DNotFittedError("this L3D is not fitted yet: call fit(model, inputs) first (or L3D.load(path))")

    def _require_model(self) -> _Oracle:
        self._require_fit()
        if self._oracle is None:
            raise L3DNotFittedError("no model is bound to this L3D: pass model= to L3D.load(path, model=...) "
                                    "or call bind(model)")
        return self._oracle

    @property
    def n_subnetworks(self) -> int:
        """Number of subnetworks ``n_v``."""
        return self.config.n_subnetworks

    def _rows(self, d: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return [{n: d[n][i] for n in self.param_names_} for i in range(self.config.n_subnetworks)]

    @property
    def subnetworks(self) -> list[dict[str, torch.Tensor]]:
        """The subnetworks ``v_k`` (rows of ``V_out``): one dict per subnetwork mapping each decomposed
        parameter name to a tensor of that parameter's shape; unit norm over all tensors jointly; the
        sign is arbitrary."""
        self._require_fit()
        return self._rows(self.decoder_)  # type: ignore[arg-type]

    @property
    def encoders(self) -> list[dict[str, torch.Tensor]]:
        """The encoder rows ``V_in[k]`` in the same format as :attr:`subnetworks` (not normalised)."""
        self._require_fit()
        return self._rows(self.encoder_)  # type: ignore[arg-type]

    @property
    def p_act(self) -> torch.Tensor:
        """Activation frequency (n_v,): fraction of samples of the last training epoch on which each
        subnetwork was kept by the top-k (0 = dead). :meth:`evaluate` recomputes it on other inputs."""
        self._require_fit()
        return self.p_act_

    def _flat(self, d: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        return torch.cat([d[n].flatten(1) for n in self.param_names_], dim=1).to(device)

    def bind(self, model: nn.Module, output_fn: Callable[[Any], torch.Tensor] | None = None) -> L3D:
        """Attach ``model`` (e.g. after :meth:`load`); its decomposed tensors must match in name and shape."""
        self._require_fit()
        named = dict(model.named_parameters())
        for n, s in zip(self.param_names_, self.param_shapes_):
            if n not in named or tuple(named[n].shape) != s:
                got = tuple(named[n].shape) if n in named else "missing"
                raise ModelError(f"model does not match the decomposition: parameter {n!r} expected shape {s}, got {got}")
        self._bind(model, self.param_names_, output_fn)
        return self

    # ------------------------------------------------------------------ analysis
    def evaluate(self, inputs: Inputs, seed: int | None = None, top_k: float | None = None) -> dict[str, Any]:
        """The training objective on ``inputs``, without updates.

        Batches of ``config.batch_size`` in a seeded random order, one random other sample of the same
        batch as each sample's reference, batch top-k with fraction ``top_k`` (default
        ``config.top_k``).

        Parameters
        ----------
        inputs : Tensor (N, ...), dict or tuple of Tensors
        seed : int, optional
            Seed of batch order and references (default ``config.seed + 1``).
        top_k : float, optional
            Top-k fraction (1.0 gives the dense reconstruction error).

        Returns
        -------
        dict
            ``reconstruction_error`` (float, ``Σ‖g−ĝ‖² / Σ‖g‖²``), ``p_act`` (Tensor (n_v,)),
            ``coefficients`` (Tensor (N, n_v), ``V_in g`` before the top-k, rows in input order),
            ``mask`` (BoolTensor (N, n_v)), ``n_samples``.
        """
        oracle = self._require_model()
        n = _n_samples(inputs)
        if n < 2:
            raise L3DInputError(f"need at least 2 samples (references are other samples), got {n}")
        frac = self.config.top_k if top_k is None else float(top_k)
        if not 0.0 < frac <= 1.0:
            raise L3DConfigError(f"top_k={top_k!r} is invalid: use a fraction in (0, 1]")
        gen = torch.Generator().manual_seed(int(self.config.seed + 1 if seed is None else seed))
        v_in = self._flat(self.encoder_, oracle.device)  # type: ignore[arg-type]
        v_out = self._flat(self.decoder_, oracle.device)  # type: ignore[arg-type]
        k = self.config.n_subnetworks
        coef = torch.zeros(n, k)
        mask_all = torch.zeros(n, k, dtype=torch.bool)
        err = tot = 0.0
        with torch.no_grad():
            for g, idx in self._gradient_batches(inputs, n, gen, shuffle=True, keep_index=True):
                c = g @ v_in.T
                mask = batch_topk_mask(c, frac)
                g_hat = (c * mask) @ v_out
                err += float((g - g_hat).pow(2).sum())
                tot += float(g.pow(2).sum())
                coef[idx] = c.cpu()
                mask_all[idx] = mask.cpu()
        return {"reconstruction_error": err / tot if tot > 0 else float("nan"),
                "p_act": mask_all.float().mean(0), "coefficients": coef, "mask": mask_all, "n_samples": n}

    def reconstruction_error(self, inputs: Inputs, seed: int | None = None, top_k: float | None = None) -> float:
        """Normalised L2 reconstruction error ``Σ‖g−ĝ‖² / Σ‖g‖²`` on ``inputs`` (see :meth:`evaluate`)."""
        return float(self.evaluate(inputs, seed=seed, top_k=top_k)["reconstruction_error"])

    def activation_frequency(self, inputs: Inputs, seed: int | None = None) -> torch.Tensor:
        """``P_act`` (n_v,) on ``inputs``: fraction of samples on which each subnetwork is in the top-k."""
        return self.evaluate(inputs, seed=seed)["p_act"]

    def attributions(self, inputs: Inputs, n_references: int | None = None, seed: int | None = None) -> torch.Tensor:
        """Impact of each subnetwork on each sample: ``I(x_i, v_k) = mean_j |V_in[k] · ∇_W D(f(x_i), f(x_j))|``.

        Parameters
        ----------
        inputs : Tensor (N, ...), dict or tuple of Tensors
            ``N >= 2``; references ``x_j`` are drawn uniformly among the *other* samples of ``inputs``.
        n_references : int, optional
            ``n_j`` (default ``config.n_references``).
        seed : int, optional
            Seed of the reference draw (default ``config.seed + 2``).

        Returns
        -------
        Tensor, shape (N, n_subnetworks)
            Non-negative; large where the sample's loss landscape moves along ``v_k``.
        """
        oracle = self._require_model()
        n = _n_samples(inputs)
        if n < 2:
            raise L3DInputError(f"need at least 2 samples (references are other samples), got {n}")
        n_ref = self.config.n_references if n_references is None else int(n_references)
        if n_ref < 1:
            raise L3DConfigError(f"n_references={n_references!r} is invalid: use an int >= 1")
        gen = torch.Generator().manual_seed(int(self.config.seed + 2 if seed is None else seed))
        v_in = self._flat(self.encoder_, oracle.device)  # type: ignore[arg-type]
        out = torch.zeros(n, self.config.n_subnetworks)
        step = self.config.chunk_size
        for _ in range(n_ref):
            ref_idx = (torch.arange(n) + torch.randint(1, n, (n,), generator=gen)) % n
            for a in range(0, n, step):
                idx = torch.arange(a, min(n, a + step))
                x = _take(inputs, idx, oracle.device)
                y_ref = oracle.outputs(_take(inputs, ref_idx[idx], oracle.device))
                self._check_output(y_ref, "reference outputs")
                g = oracle.grads(x, y_ref)
                out[idx] += (g @ v_in.T).abs().cpu()
        return out / n_ref

    def output_derivative(self, inputs: Inputs, index: int) -> torch.Tensor:
        """``∂_δ f(x; W0 + δ v_k)`` at ``δ = 0`` (a Jacobian-vector product), shape (N, *output).

        The outputs with the largest ``|·|`` are the ones subnetwork ``index`` drives on each sample.
        """
        oracle = self._require_model()
        k = self._check_index(index)
        n = _n_samples(inputs)
        tangent = {nm: self.decoder_[nm][k].to(oracle.device) for nm in self.param_names_}  # type: ignore[index]
        outs = []
        for a in range(0, n, self.config.chunk_size):
            x = _take(inputs, torch.arange(a, min(n, a + self.config.chunk_size)), oracle.device)
            _, d = jvp(lambda p, x=x: oracle._call(p, x), (oracle.params0,), (tangent,))
            outs.append(d.detach().cpu())
        return torch.cat(outs)

    def _check_index(self, index: int) -> int:
        self._require_fit()
        k = self.config.n_subnetworks
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not -k <= index < k:
            raise L3DConfigError(f"subnetwork index {index!r} is out of range: use an int in [0, {k})")
        return int(index) % k

    def _direction(self, index: int | Sequence[int], delta: float | Sequence[float]) -> dict[str, torch.Tensor]:
        idx = [index] if isinstance(index, (int, np.integer)) else list(index)
        if not idx:
            raise L3DConfigError("index is empty: give a subnetwork index or a non-empty list of them")
        deltas = [float(delta)] * len(idx) if isinstance(delta, (int, float)) else [float(d) for d in delta]
        if len(deltas) != len(idx):
            raise L3DConfigError(f"got {len(idx)} subnetwork indices but {len(deltas)} deltas; give one delta per index")
        ks = [self._check_index(i) for i in idx]
        return {n: sum(d * self.decoder_[n][k] for k, d in zip(ks, deltas)) for n in self.param_names_}  # type: ignore[index]

    def perturb(self, model: nn.Module, index: int | Sequence[int], delta: float | Sequence[float]) -> nn.Module:
        """A deep copy of ``model`` with its decomposed parameters moved to ``W + Σ δ_k v_k``.

        Parameters
        ----------
        model : nn.Module
            The model to start from (normally the fitted one; the decomposed tensors must match by name
            and shape). It is not modified.
        index : int or sequence of int
            Subnetwork(s) ``k``.
        delta : float or sequence of float
            Step(s) ``δ`` (the subnetworks are unit norm, so ``δ`` is the Euclidean length of the move;
            the sign of ``v_k`` is arbitrary, so try both signs).

        Returns
        -------
        nn.Module
            The perturbed copy. For large models use :meth:`perturbed`, which edits in place and restores.
        """
        self._require_fit()
        direction = self._direction(index, delta)
        named = dict(model.named_parameters())
        self._check_match(named)
        clone = copy.deepcopy(model)
        cnamed = dict(clone.named_parameters())
        with torch.no_grad():
            for n, d in direction.items():
                cnamed[n].add_(d.to(device=cnamed[n].device, dtype=cnamed[n].dtype))
        return clone

    @contextlib.contextmanager
    def perturbed(self, model: nn.Module, index: int | Sequence[int], delta: float | Sequence[float]) -> Iterator[nn.Module]:
        """Context manager: ``model`` moved in place to ``W + Σ δ_k v_k`` inside the block, restored on exit.

        >>> with l3d.perturbed(model, 0, 0.5) as m:   # doctest: +SKIP
        ...     y = m(x)
        """
        self._require_fit()
        direction = self._direction(index, delta)
        named = dict(model.named_parameters())
        self._check_match(named)
        saved = {n: named[n].detach().clone() for n in direction}
        try:
            with torch.no_grad():
                for n, d in direction.items():
                    named[n].add_(d.to(device=named[n].device, dtype=named[n].dtype))
            yield model
        finally:
            with torch.no_grad():
                for n, v in saved.items():
                    named[n].copy_(v)

    def _check_match(self, named: Mapping[str, torch.Tensor]) -> None:
        for n, s in zip(self.param_names_, self.param_shapes_):
            if n not in named or tuple(named[n].shape) != s:
                got = tuple(named[n].shape) if n in named else "missing"
                raise ModelError(f"model does not match the decomposition: parameter {n!r} expected shape {s}, got {got}")

    def alignment(self, directions: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``|cos|`` between every subnetwork and every reference direction (see :func:`subnetwork_alignment`)."""
        return subnetwork_alignment(self.subnetworks, directions)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: config, tensors decomposed, ``V_in``/``V_out``, ``p_act``, history, versions."""
        self._require_fit()
        return {
            "schema": SCHEMA,
            "config": self.config.to_dict(),
            "param_names": self.param_names_,
            "param_shapes": [list(s) for s in self.param_shapes_],
            "ranks": {n: list(r) for n, r in self.ranks_.items()},
            "decoder": {n: t.tolist() for n, t in self.decoder_.items()},  # type: ignore[union-attr]
            "encoder": {n: t.tolist() for n, t in self.encoder_.items()},  # type: ignore[union-attr]
            "p_act": self.p_act_.tolist(),
            "history": self.history_,
            "train_error": self.train_error_,
            "n_samples": self.n_samples_,
            "fit_seconds": self.fit_seconds_,
            "versions": package_versions(),
        }

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON atomically; returns the path."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], model: nn.Module | None = None,
                  output_fn: Callable[[Any], torch.Tensor] | None = None) -> L3D:
        """Rebuild a fitted L3D from :meth:`to_dict`; pass ``model`` to use the model-dependent methods."""
        if d.get("schema") != SCHEMA:
            raise L3DInputError(f"not an L3D result (schema {d.get('schema')!r}, expected {SCHEMA!r})")
        self = cls(L3DConfig.from_dict(d["config"]))
        self.param_names_ = list(d["param_names"])
        self.param_shapes_ = [tuple(s) for s in d["param_shapes"]]
        self.ranks_ = {n: tuple(r) for n, r in d["ranks"].items()}
        self.decoder_ = {n: torch.tensor(d["decoder"][n], dtype=torch.float32).reshape(-1, *s)
                         for n, s in zip(self.param_names_, self.param_shapes_)}
        self.encoder_ = {n: torch.tensor(d["encoder"][n], dtype=torch.float32).reshape(-1, *s)
                         for n, s in zip(self.param_names_, self.param_shapes_)}
        self.p_act_ = torch.tensor(d["p_act"], dtype=torch.float32)
        self.history_ = list(d["history"])
        self.train_error_ = float(d["train_error"])
        self.n_samples_ = int(d["n_samples"])
        self.fit_seconds_ = float(d["fit_seconds"])
        if model is not None:
            self.bind(model, output_fn)
        return self

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None,
             output_fn: Callable[[Any], torch.Tensor] | None = None) -> L3D:
        """Read a file written by :meth:`save`."""
        import json

        return cls.from_dict(json.loads(Path(path).read_text()), model=model, output_fn=output_fn)

    def __repr__(self) -> str:
        c = self.config
        head = f"L3D(n_subnetworks={c.n_subnetworks}, ranks={c.ranks!r}, top_k={c.top_k}, divergence={c.divergence!r}"
        if self.decoder_ is None:
            return head + ", unfitted)"
        alive = int((self.p_act_ > 0).sum())
        return (head + f", params={self.param_names_}, train_error={self.train_error_:.4f}, "
                f"alive={alive}/{c.n_subnetworks})")


# ----------------------------------------------------------------------------------------------
# comparing subnetworks with known directions
# ----------------------------------------------------------------------------------------------


def subnetwork_alignment(subnetworks: Sequence[Mapping[str, torch.Tensor]],
                         directions: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``|cos|`` between subnetworks and reference parameter directions, on the tensors in ``directions``.

    Parameters
    ----------
    subnetworks : sequence of dict
        ``n_v`` subnetworks (``L3D.subnetworks``).
    directions : dict of str to Tensor (F, *shape)
        ``F`` reference directions (e.g. one per ground-truth feature), given on a subset of the
        decomposed tensors; only those tensors enter the cosine.

    Returns
    -------
    Tensor, shape (n_v, F)
        Absolute cosine similarities in ``[0, 1]`` (0 where a subnetwork is zero on those tensors).
    """
    if not directions:
        raise L3DConfigError("directions is empty: give {param_name: Tensor (F, *param_shape)}")
    names = list(directions)
    missing = [n for n in names if n not in subnetworks[0]]
    if missing:
        raise L3DConfigError(f"directions name tensors {missing} that the subnetworks do not contain "
                             f"({list(subnetworks[0])})")
    s = torch.stack([torch.cat([sub[n].detach().double().flatten() for n in names]) for sub in subnetworks])
    f = torch.cat([directions[n].detach().double().flatten(1) for n in names], dim=1)
    s = s / s.norm(dim=1, keepdim=True).clamp_min(1e-300)
    f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return (s @ f.T).abs().float()


def match_subnetworks(alignment: torch.Tensor) -> tuple[list[int], list[int]]:
    """One-to-one matching of subnetworks (rows) to reference directions (columns) maximising total ``|cos|``.

    Returns
    -------
    rows, cols : list of int
        ``alignment[rows[i], cols[i]]`` are the matched pairs (``min(n_v, F)`` of them), sorted by column.
    """
    from scipy.optimize import linear_sum_assignment

    r, c = linear_sum_assignment(alignment.detach().double().numpy(), maximize=True)
    order = np.argsort(c)
    return [int(r[i]) for i in order], [int(c[i]) for i in order]
