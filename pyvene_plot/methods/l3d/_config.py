"""L3D configuration: :class:`L3DConfig`, its errors, and the Tucker rank specification."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..._utils import resolve_device
from ...errors import PlotError

SCHEMA = "pyvene_plot.methods.l3d/1"
#: version of the JSON layout written by :meth:`L3D.to_json` (the ``format_version`` field)
L3D_FORMAT_VERSION = 1
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
    """Validate and normalise ``L3DConfig.ranks`` (int, float fraction, or per-parameter mapping)."""
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


def resolve_ranks(spec: RankSpec, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
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
