"""Toy models with known ground-truth mechanisms, trained in-process in seconds.

Used to validate parameter-space decompositions (:mod:`pyvene_plot.methods.l3d`) against mechanisms we know:

* :class:`TiedAutoencoder` — the toy model of superposition (TMS, Elhage et al. 2022):
  ``x -> ReLU(Wᵀ W x + b)`` with ``W`` of shape ``(n_hidden, n_features)`` (tied weights), trained to
  reconstruct sparse inputs. Each feature ``j`` is handled by its own embedding column ``W[:, j]``
  and bias ``b[j]``: one "circuit" per feature, not in superposition in parameter space.
* :class:`CircuitSuperpositionMLP` — ``x -> ReLU((x W_in) W_out + b)`` trained on ``y = x A`` with
  ``A_ij ~ U[0, a_max]`` (the toy model of circuit superposition of Chrisman, Bushnaq & Sharkey 2025):
  the hidden layer is narrower than the input, so the per-input circuits share ``W_out``.

Inputs are sparse: each feature is active with probability ``p_active`` and, when active, uniform on
``[0, 1]``; all-zero rows are dropped (as in the reference setup).

Every trainer takes a ``seed`` and uses a local :class:`torch.Generator`, so the caller's global RNG is
left untouched and the same seed always gives the same model.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import PlotError

logger = logging.getLogger(__name__)


class TiedAutoencoder(nn.Module):
    """Toy model of superposition: ``ReLU(Wᵀ W x + b)`` with tied weights.

    Parameters
    ----------
    n_features : int
        Input and output width ``F``.
    n_hidden : int
        Bottleneck width ``H``.

    Attributes
    ----------
    W : nn.Parameter, shape (H, F)
        Feature embeddings (column ``j`` embeds feature ``j``); also the transposed decoder.
    b : nn.Parameter, shape (F,)
        Output bias.
    """

    def __init__(self, n_features: int = 5, n_hidden: int = 2) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.empty(n_hidden, n_features))
        self.b = nn.Parameter(torch.zeros(n_features))
        nn.init.xavier_normal_(self.W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, F) -> (B, F)."""
        return torch.relu((x @ self.W.T) @ self.W + self.b)


class CircuitSuperpositionMLP(nn.Module):
    """One hidden linear layer and a ReLU output: ``ReLU((x W_in) W_out + b)``.

    Parameters
    ----------
    n_features, n_hidden, n_outputs : int
        Widths ``F``, ``H`` and ``O``.

    Attributes
    ----------
    W_in : nn.Parameter, shape (F, H)
    W_out : nn.Parameter, shape (H, O)
    b : nn.Parameter, shape (O,)
    """

    def __init__(self, n_features: int = 10, n_hidden: int = 5, n_outputs: int = 10) -> None:
        super().__init__()
        self.W_in = nn.Parameter(torch.empty(n_features, n_hidden))
        self.W_out = nn.Parameter(torch.empty(n_hidden, n_outputs))
        self.b = nn.Parameter(torch.zeros(n_outputs))
        nn.init.xavier_normal_(self.W_in)
        nn.init.xavier_normal_(self.W_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, F) -> (B, O)."""
        return torch.relu((x @ self.W_in) @ self.W_out + self.b)


@dataclasses.dataclass
class ToyModel:
    """A trained toy model with its data.

    Attributes
    ----------
    name : str
        ``"tms"`` or ``"circuit_superposition"``.
    model : nn.Module
        The trained model (eval mode, on CPU).
    inputs : Tensor, shape (N, F)
        The training inputs (sparse, no all-zero rows).
    targets : Tensor, shape (N, O)
        The training targets (``inputs`` for TMS, ``inputs @ A`` for circuit superposition).
    coefficients : Tensor or None, shape (F, O)
        The ground-truth ``A`` of circuit superposition; ``None`` for TMS.
    info : dict
        ``final_loss`` (MSE on ``inputs``), ``train_seconds``, ``steps``, ``seed`` and the sizes.
    """

    name: str
    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    coefficients: torch.Tensor | None
    info: dict[str, Any]

    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """Fresh inputs from the same sparse distribution, shape (n, F)."""
        return sparse_features(n, self.inputs.shape[1], p_active=self.info["p_active"], seed=seed)

    def feature_directions(self) -> dict[str, torch.Tensor]:
        """Parameter-space direction of each input feature's circuit (see the ``*_feature_directions``
        functions), keyed by parameter name, each of shape ``(F, *param.shape)``."""
        if self.name == "tms":
            return tms_feature_directions(self.model)
        return circuit_feature_directions(self.model)


def sparse_features(
    n: int, n_features: int, p_active: float = 0.05, seed: int = 0, drop_zero: bool = True
) -> torch.Tensor:
    """Sparse non-negative inputs: each feature active w.p. ``p_active``, then uniform on [0, 1].

    Parameters
    ----------
    n : int
        Number of rows to return (after dropping all-zero rows, when ``drop_zero``).
    n_features : int
        Width ``F``.
    p_active : float, default 0.05
        Activation probability of each feature.
    seed : int, default 0
        Seed of the local generator.
    drop_zero : bool, default True
        Drop all-zero rows (and draw more until ``n`` rows remain).

    Returns
    -------
    Tensor, shape (n, n_features), float32
    """
    if n < 1 or n_features < 1:
        raise PlotError(f"sparse_features needs n >= 1 and n_features >= 1, got n={n}, n_features={n_features}")
    if not 0.0 < p_active <= 1.0:
        raise PlotError(f"p_active must be in (0, 1], got {p_active}")
    gen = torch.Generator().manual_seed(int(seed))
    rows: list[torch.Tensor] = []
    have = 0
    while have < n:
        draw = max(2 * (n - have), 64)
        x = torch.rand(draw, n_features, generator=gen) * (torch.rand(draw, n_features, generator=gen) < p_active)
        if drop_zero:
            x = x[(x != 0).any(dim=1)]
        rows.append(x)
        have += x.shape[0]
    return torch.cat(rows)[:n].contiguous()


def _train_with_restarts(
    make: Any, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, batch_size: int, seed: int,
    restarts: int, good: Any,
) -> tuple[nn.Module, float, int]:
    """Train ``make()`` from up to ``restarts`` initialisations; stop at the first ``good(model)`` one,
    else keep the lowest loss. Returns (model, loss, attempts)."""
    if restarts < 1:
        raise PlotError(f"restarts must be >= 1, got {restarts}")
    best: tuple[nn.Module, float] | None = None
    for attempt in range(restarts):
        gen = torch.Generator().manual_seed(int(seed) * 1009 + 7919 * attempt + 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed) * 1009 + 7919 * attempt + 2)
            model = make()
        loss = _fit(model, x, y, steps, lr, batch_size, gen)
        if best is None or loss < best[1]:
            best = (model, loss)
        if good(model):
            return model, loss, attempt + 1
        logger.info("toy model attempt %d did not reach the expected solution (loss %.4g); restarting", attempt, loss)
    assert best is not None
    return best[0], best[1], restarts


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, batch_size: int,
         gen: torch.Generator) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr * 0.05)
    n = x.shape[0]
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        loss = ((model(x[idx]) - y[idx]) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        return float(((model(x) - y) ** 2).mean())


def train_tms(
    n_features: int = 5,
    n_hidden: int = 2,
    p_active: float = 0.05,
    n_samples: int = 10_000,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 1e-2,
    seed: int = 0,
    restarts: int = 5,
) -> ToyModel:
    """Train the toy model of superposition (tied weights, ReLU output, MSE).

    Parameters
    ----------
    n_features, n_hidden : int, default 5, 2
        Sizes of :class:`TiedAutoencoder`.
    p_active : float, default 0.05
        Feature activation probability (sparsity 0.95).
    n_samples : int, default 10000
        Training rows (all-zero rows excluded).
    steps, batch_size, lr : int, int, float
        Adam steps (cosine-decayed learning rate), minibatch size and peak learning rate. The defaults
        train in ~1-2 s on one CPU core.
    seed : int, default 0
        Seeds the data, the initialisations and the minibatch order (local generators only).
    restarts : int, default 5
        Some initialisations end in a local minimum with a feature left unembedded (about 2 seeds in 10
        for 5 features in 2 dimensions); training restarts from a new initialisation until every
        feature's embedding has norm > 0.5 (the pentagon solution), at most ``restarts`` times, and
        keeps the lowest-loss model otherwise. ``info["attempts"]`` and
        ``info["all_features_embedded"]`` report what happened.

    Returns
    -------
    ToyModel
        ``name="tms"``, ``targets = inputs``, ``coefficients=None``.
    """
    t0 = time.perf_counter()
    x = sparse_features(n_samples, n_features, p_active, seed=seed)

    def every_feature_embedded(m: TiedAutoencoder) -> bool:
        return bool((m.W.detach().norm(dim=0) > 0.5).all())

    model, loss, attempts = _train_with_restarts(
        lambda: TiedAutoencoder(n_features, n_hidden), x, x, steps, lr, batch_size, seed, restarts,
        every_feature_embedded)
    model.eval()
    info = {"final_loss": loss, "train_seconds": time.perf_counter() - t0, "steps": steps, "seed": seed,
                "attempts": attempts, "all_features_embedded": every_feature_embedded(model),
                "n_features": n_features, "n_hidden": n_hidden, "p_active": p_active, "n_samples": n_samples}
    logger.info("trained TMS %d->%d: mse %.3g in %.1fs", n_features, n_hidden, loss, info["train_seconds"])
    return ToyModel("tms", model, x, x.clone(), None, info)


def train_circuit_superposition(
    n_features: int = 10,
    n_hidden: int = 5,
    n_outputs: int = 10,
    p_active: float = 0.05,
    max_coefficient: float = 3.0,
    n_samples: int = 10_000,
    steps: int = 3000,
    batch_size: int = 256,
    lr: float = 1e-2,
    seed: int = 0,
    restarts: int = 1,
) -> ToyModel:
    """Train the toy model of circuit superposition: ``y = x A``, ``A_ij ~ U[0, max_coefficient]``.

    Parameters
    ----------
    n_features, n_hidden, n_outputs : int, default 10, 5, 10
        Sizes of :class:`CircuitSuperpositionMLP`.
    p_active : float, default 0.05
        Feature activation probability.
    max_coefficient : float, default 3.0
        Upper end of the uniform distribution of ``A``.
    n_samples, steps, batch_size, lr, seed
        As in :func:`train_tms`.
    restarts : int, default 1
        Initialisations tried; the lowest-loss model is kept.

    Returns
    -------
    ToyModel
        ``name="circuit_superposition"``, ``coefficients = A`` of shape ``(F, O)``.
    """
    t0 = time.perf_counter()
    x = sparse_features(n_samples, n_features, p_active, seed=seed)
    a = torch.rand(n_features, n_outputs, generator=torch.Generator().manual_seed(int(seed) + 1)) * max_coefficient
    y = x @ a
    model, loss, attempts = _train_with_restarts(
        lambda: CircuitSuperpositionMLP(n_features, n_hidden, n_outputs), x, y, steps, lr, batch_size, seed,
        restarts, lambda m: False)
    model.eval()
    info = {"final_loss": loss, "train_seconds": time.perf_counter() - t0, "steps": steps, "seed": seed, "attempts": attempts,
                "n_features": n_features, "n_hidden": n_hidden, "n_outputs": n_outputs, "p_active": p_active,
                "max_coefficient": max_coefficient, "n_samples": n_samples}
    logger.info("trained circuit superposition %d->%d->%d: mse %.3g in %.1fs", n_features, n_hidden,
                n_outputs, loss, info["train_seconds"])
    return ToyModel("circuit_superposition", model, x, y, a, info)


def tms_feature_directions(model: TiedAutoencoder) -> dict[str, torch.Tensor]:
    """Ground-truth circuit of each TMS feature in parameter space.

    Feature ``j`` is embedded by column ``W[:, j]``; its circuit direction is the ``W``-shaped matrix
    whose only non-zero column is ``W[:, j]`` (moving along it rescales feature ``j``'s embedding and
    nothing else).

    Returns
    -------
    dict
        ``{"W": Tensor (F, H, F)}``: entry ``j`` is ``W[:, j] e_jᵀ``. Only ``W`` is included: compare
        subnetworks on that tensor (the bias direction of feature ``j`` is ``e_j`` trivially).
    """
    w = model.W.detach()
    f = w.shape[1]
    out = torch.zeros(f, *w.shape)
    for j in range(f):
        out[j, :, j] = w[:, j]
    return {"W": out}


def circuit_feature_directions(model: CircuitSuperpositionMLP, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Parameter-space direction of each input's circuit in the circuit-superposition model.

    The circuit of input ``j`` is the direction in which the weights move when only input ``j`` is
    active: ``∇_{W_in, W_out} ½‖f(scale · e_j)‖²``. Its ``W_in`` part has a single non-zero row ``j``
    (``W_out (m ⊙ f)``, with ``m`` the ReLU mask) and its ``W_out`` part is ``W_in[j]ᵀ (m ⊙ f)``.

    Returns
    -------
    dict
        ``{"W_in": Tensor (F, F, H), "W_out": Tensor (F, H, O)}`` (the bias is left out: every circuit
        writes to it).
    """
    w_in, w_out, b = (t.detach() for t in (model.W_in, model.W_out, model.b))
    f = w_in.shape[0]
    x = torch.eye(f) * scale  # (F, F): one input active per row
    h = x @ w_in  # (F, H)
    out = torch.relu(h @ w_out + b)  # (F, O)
    r = out * (out > 0)  # m ⊙ f
    d_in = torch.zeros(f, *w_in.shape)
    for j in range(f):
        d_in[j, j] = scale * (w_out @ r[j])
    d_out = torch.einsum("fh,fo->fho", h, r)
    return {"W_in": d_in, "W_out": d_out}


def circuit_coefficients_from_subnetworks(
    subnetworks: list[dict[str, torch.Tensor]],
    coefficients: torch.Tensor,
    enc: str = "W_in",
    dec: str = "W_out",
) -> dict[str, Any]:
    """Read ``A`` back off circuit-superposition subnetworks and correlate it with the truth.

    For subnetwork ``k`` with encoder part ``E_k`` (F, H) and decoder part ``D_k`` (H, O), the
    input→output path it carries is ``M_k = E_k D_k`` (F, O). Its input ``j* = argmax_j ‖M_k[j]‖``
    (the row traced by the largest-norm path), and ``â[j*, :] = M_k[j*, :]`` estimates row ``j*`` of
    ``A`` up to one global scale (subnetworks are unit-norm; the sign cancels in the product). When
    several subnetworks claim the same input, the one with the largest path norm is kept.

    Parameters
    ----------
    subnetworks : list of dict
        Parameter-shaped unit directions (``L3D.subnetworks``).
    coefficients : Tensor, shape (F, O)
        The true ``A``.
    enc, dec : str
        Parameter names of the encoder (F, H) and decoder (H, O).

    Returns
    -------
    dict
        ``a_hat`` (F, O) with NaN rows for inputs no subnetwork claims, ``inputs`` (the ``j*`` of each
        subnetwork), ``covered`` (sorted claimed inputs), ``r2`` (squared Pearson correlation between
        the covered rows of ``â`` and ``A``, all entries pooled).
    """
    a = coefficients.detach().double()
    a_hat = torch.full_like(a, float("nan"))
    best = torch.zeros(a.shape[0], dtype=torch.float64)
    inputs = []
    for sub in subnetworks:
        m = sub[enc].detach().double() @ sub[dec].detach().double()
        norms = m.norm(dim=1)
        j = int(norms.argmax())
        inputs.append(j)
        if norms[j] > best[j]:
            best[j] = norms[j]
            a_hat[j] = m[j]
    covered = sorted({j for j in inputs})
    if len(covered) == 0:
        return {"a_hat": a_hat, "inputs": inputs, "covered": covered, "r2": float("nan")}
    x = a_hat[covered].flatten().numpy()
    y = a[covered].flatten().numpy()
    r = float(np.corrcoef(x, y)[0, 1]) if x.std() > 0 and y.std() > 0 else float("nan")
    return {"a_hat": a_hat, "inputs": inputs, "covered": covered, "r2": r * r if not math.isnan(r) else r}
