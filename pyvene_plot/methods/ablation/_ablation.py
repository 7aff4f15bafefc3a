"""Optimal ablation (OA; Li & Janson 2024) as pyvene interventions, and ablation-gap reports.

Ablating a component ``A`` (a site: a layer's activation at a token position, a subset of its
coordinates, or the span of an orthonormal basis) replaces it by a value ``a`` that carries no
information about the input. The *ablation loss gap* is::

    Δ(A; a) = E_x L(M_{A←a}(x)) − E_x L(M(x))

with ``L`` by default the KL divergence ``KL(p_M(x) ‖ p_{M, A←a}(x))`` between the clean and the
ablated read-out distributions (so ``E_x L(M(x)) = 0``). The classical choices of ``a`` are zero,
the dataset mean, and a resampled activation ``A(x')`` of an independent input ``x'``. *Optimal*
ablation learns the constant::

    a* = argmin_a E_x L(M_{A←a}(x)),        Δ_opt = Δ(A; a*)

so ``Δ_opt ≤ Δ_zero``, ``Δ_opt ≤ Δ_mean`` and ``Δ_opt ≤ Δ_resample`` (population quantities): OA
removes the component's information while choosing the least misleading value for the rest of the
network (no "spoofing" by off-distribution values such as 0 or the mean).

What is here:

* :class:`OptimalAblationIntervention`: a trainable, *sourceless* pyvene intervention holding the
  constant ``a`` (``nn.Parameter``). Modes: the whole vector (``h ← a``), selected coordinates
  (``h[..., dims] ← a``) or the span of orthonormal rows ``V`` (``h ← h + (a − h Vᵀ) V``). It saves
  and loads with ``IntervenableModel.save`` / ``pyvene.IntervenableModel.load`` (shapes, mode,
  coordinates, basis and position all live in the ``state_dict``).
* :func:`optimal_ablation`: Δ_opt next to Δ_zero, Δ_mean and Δ_resample for many sites, training
  every site's constant *in parallel* (the batch is replicated once per site and each copy is
  ablated at one site only; the joint loss is a sum of independent terms, and AdamW is
  per-coordinate, so this is exactly independent training).
* :func:`necessity_check`: Δ_opt of the sites of PLOT handles (a deletion-style test that needs no
  counterfactual pairs) next to the exact optimal ablation of the variable in the causal model.
* :func:`screen_mean` / :func:`screen_oa`: site screeners for
  :class:`~pyvene_plot.progressive.ProgressiveScheduler` stages (``Stage(..., screen="oa")``).

Which data the gaps are measured on: by default the bank's base inputs are split once (seeded):
constants and the mean/resample statistics come from the *training* part, and all four gaps are
evaluated on the *held-out* part (``holdout=0.5``), so Δ_opt is not flattered by fitting the
evaluation data. ``holdout=0`` evaluates on the training examples themselves (then the recorded
``evaluated_on`` says so), and ``eval_bank=`` evaluates on another bank.
"""


from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyvene as pv
import torch
import torch.nn.functional as F

from ..._constants import ORTHO_ATOL
from ...data import Inputs, inputs_len

from ...data import PairBank
from ...localize import InterchangeEngine
from ...data import as_model_kwargs
from ...models import model_device
from ...errors import BankError, ModelError, PlotError, SiteError
from ...interventions import set_intervention_position, intervention_position
from ...models import Readout
from ...models import Site, resolve_positions
from ...models import model_spec, validate_sites
from ..._utils import atomic_write_bytes, atomic_write_json, package_versions
from ...data import sequence_length
from ...progressive import ScreenResult, register_screener

logger = logging.getLogger(__name__)



#: losses ``L``: ``"kl"`` KL(clean ‖ ablated) of the read-out distributions; ``"ce"`` task
#: cross-entropy against the bank's ``base_labels`` (minus the clean model's); ``"mse"`` squared
#: error between ablated and clean read-out logits (summed over classes)
ABLATION_LOSSES = ("kl", "ce", "mse")
#: ablation types reported next to OA
ABLATION_KINDS = ("zero", "mean", "resample")

_FULL, _COORDS, _SPAN = 0, 1, 2
_MODE_NAMES = {_FULL: "full", _COORDS: "coords", _SPAN: "span"}

#: default screening rule: a site is dropped only if its score is below BOTH this absolute level
#: (nats for the KL loss) ...
SCREEN_ABS_TOL = 1e-4
#: ... AND this fraction of the largest score among the candidates
SCREEN_REL_TOL = 1e-2


# ============================================================================ the intervention
class OptimalAblationIntervention(
    pv.SourcelessIntervention, pv.TrainableIntervention, pv.LocalistRepresentationIntervention
):
    """Replace a site's activation by a learned constant (trainable, needs no source).

    Modes (``h`` has shape ``(..., d)``, the constant ``a`` shape ``(k,)``)::

        full    h  <-  a                               k = d
        coords  h[..., dims]  <-  a                    k = len(dims)
        span    h  <-  h + (a - h @ V.T) @ V           V: (k, d) orthonormal rows

    In the span mode only the coordinates ``h @ V.T`` inside ``span(V)`` are set to ``a``; the
    orthogonal complement is untouched.

    Parameters
    ----------
    embed_dim : int
        Width ``d`` of the hooked component (pyvene fills it in from the model card).
    low_rank_dimension : int, optional
        Width ``k`` of the constant (a ``RepresentationConfig`` field, so it survives ``load``).
    dims : sequence of int, optional
        Coordinates to ablate (coords mode).
    basis : Tensor, shape (k, d), optional
        Orthonormal rows (span mode).
    value : Tensor, shape (k,), optional
        Initial constant; default zeros (``optimal_ablation`` initialises at the dataset mean).
    position : int, optional
        Token position of the site (stored as a buffer, read by :func:`run_ablated`).

    Notes
    -----
    pyvene's ``TrainableIntervention.__init__`` sets ``is_source_constant = False``; the bases are
    ordered ``(SourcelessIntervention, TrainableIntervention, ...)`` so that the class ends up
    source-constant (pyvene runs its setter without a source) *and* trainable (its parameter is in
    ``get_trainable_parameters()`` and ``save`` writes its ``state_dict``); the flag is also set
    explicitly after ``super().__init__``. ``load`` rebuilds the class from the
    ``RepresentationConfig`` fields only, so everything else (mode, coordinates, basis, position,
    the constant) is kept in buffers and parameters; their shapes are adopted from the saved
    ``state_dict`` on load.

    Per-call control: pass, as this intervention's ``subspaces`` entry, a BoolTensor ``(B,)``
    selecting the rows to ablate, or a dict ``{"mask": BoolTensor (B,) or None, "value": Tensor (k,)
    or (n_rows, k) or None}`` where ``value`` overrides the constant (e.g. a resampled activation
    per ablated row). (:func:`optimal_ablation` trains many sites at once through an internal
    batched variant of this intervention and hands out instances of this class.)
    """

    def __init__(self, **kwargs: Any) -> None:
        dims = kwargs.pop("dims", None)
        basis = kwargs.pop("basis", None)
        value = kwargs.pop("value", None)
        position = kwargs.pop("position", None)
        super().__init__(**kwargs)
        self.is_source_constant = True  # sourceless (pyvene calls the setter without a source)
        self.trainable = True
        self.keep_last_dim = True  # acts on the last dimension; never flatten positions
        set_intervention_position(self, position)
        if basis is not None:
            basis = torch.as_tensor(basis, dtype=torch.float32)
            if basis.dim() != 2:
                raise PlotError(f"basis must have shape (k, d), got {tuple(basis.shape)}")
        if self.embed_dim is None:
            if basis is not None:
                d = int(basis.shape[1])
            elif dims is None and value is not None:
                d = int(torch.as_tensor(value).numel())
            else:
                raise PlotError(
                    "OptimalAblationIntervention needs embed_dim (from a registered model card) or, for the "
                    "whole vector, an explicit value= (for a span, basis=)"
                )
            self.register_buffer("embed_dim", torch.tensor(d))
            self.register_buffer("interchange_dim", torch.tensor(d))
        d = int(self.embed_dim)
        k_cfg = kwargs.get("low_rank_dimension")
        if basis is not None:
            if dims is not None:
                raise PlotError("pass either dims= (native coordinates) or basis= (a span), not both")
            if basis.shape[1] != d:
                raise PlotError(f"basis has width {basis.shape[1]} but the component has width {d}")
            gram = basis @ basis.T
            if not torch.allclose(gram, torch.eye(basis.shape[0]), atol=ORTHO_ATOL):
                raise PlotError("basis rows must be orthonormal (V @ V.T == I); orthonormalise it (e.g. QR) first")
            mode, index = _SPAN, torch.arange(basis.shape[0])
        elif dims is not None:
            idx = [int(i) for i in dims]
            if not idx or len(set(idx)) != len(idx) or min(idx) < 0 or max(idx) >= d:
                raise PlotError(f"dims must be distinct coordinates in [0, {d}), got {list(dims)}")
            mode, index = (_FULL, torch.arange(d)) if sorted(idx) == list(range(d)) and idx == sorted(idx) else (
                _COORDS, torch.tensor(idx))
            basis = None
        elif k_cfg is not None and int(k_cfg) != d:
            # rebuilt by IntervenableModel.load: the real coordinates / basis come from the state_dict
            mode, index = _COORDS, torch.arange(int(k_cfg))
        else:
            mode, index = _FULL, torch.arange(d)
        k = int(index.numel())
        self.register_buffer("mode", torch.tensor(mode, dtype=torch.long))
        self.register_buffer("index", index.long())
        self.register_buffer("basis", basis.clone() if basis is not None else torch.zeros(0, d))
        v = torch.zeros(k) if value is None else torch.as_tensor(value, dtype=torch.float32).flatten().clone()
        if v.numel() != k:
            raise PlotError(f"value has {v.numel()} entries but the ablated support has width {k}")
        self.value = torch.nn.Parameter(v.float())

    # -------------------------------------------------------------- state
    @property
    def width(self) -> int:
        """Width ``k`` of the constant."""
        return int(self.value.numel())

    @property
    def mode_name(self) -> str:
        return _MODE_NAMES[int(self.mode)]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # adopt the saved shapes (the class is rebuilt from RepresentationConfig fields only)
        for name in ("value", "index", "basis"):
            key = prefix + name
            if key not in state_dict:
                continue
            saved = state_dict[key]
            cur = getattr(self, name)
            if tuple(cur.shape) == tuple(saved.shape):
                continue
            if name == "value":
                self.value = torch.nn.Parameter(torch.zeros(saved.shape, dtype=cur.dtype, device=cur.device))
            else:
                self.register_buffer(name, torch.zeros(saved.shape, dtype=saved.dtype, device=cur.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # -------------------------------------------------------------- forward
    def coordinates(self, h: torch.Tensor) -> torch.Tensor:
        """The ablated support's coordinates of activations ``h`` (..., d) -> (..., k)."""
        mode = int(self.mode)
        if mode == _FULL:
            return h
        if mode == _COORDS:
            return h.index_select(-1, self.index.to(h.device))
        return h @ self.basis.to(device=h.device, dtype=h.dtype).T

    def replace(self, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``h`` (n, ..., d) with its support set to ``a`` ((k,) or (n, k))."""
        a = a.to(device=h.device, dtype=h.dtype)
        if a.dim() == 2:
            a = a.reshape(a.shape[0], *([1] * (h.dim() - 2)), a.shape[1])
        mode = int(self.mode)
        if mode == _FULL:
            return a.expand_as(h)
        if mode == _COORDS:
            src = a.expand(*h.shape[:-1], a.shape[-1]).contiguous()
            return h.index_copy(h.dim() - 1, self.index.to(h.device), src)
        V = self.basis.to(device=h.device, dtype=h.dtype)
        return h + (a - h @ V.T) @ V

    def forward(self, base: torch.Tensor, source: Any = None, subspaces: Any = None, **kwargs: Any) -> torch.Tensor:
        mask, value = None, None
        if isinstance(subspaces, Mapping):
            mask, value = subspaces.get("mask"), subspaces.get("value")
        elif isinstance(subspaces, torch.Tensor):
            mask = subspaces
        elif subspaces is not None:
            raise PlotError(
                "OptimalAblationIntervention takes, as its subspaces entry, None, a BoolTensor (B,) of rows "
                f"to ablate, or a dict(mask=..., value=...); got {type(subspaces).__name__}. The ablated "
                "coordinates are fixed at construction (dims= / basis=)"
            )
        a = self.value if value is None else value
        if mask is None:
            return self.replace(base, a)
        mask = mask.to(base.device).bool().reshape(-1)
        if mask.shape[0] != base.shape[0]:
            raise PlotError(f"row mask has {mask.shape[0]} entries but the batch has {base.shape[0]} rows")
        if not bool(mask.any()):
            return base
        new = self.replace(base[mask], a)
        return base.index_put((mask,), new)

    def __str__(self) -> str:
        return f"OptimalAblationIntervention(mode={self.mode_name}, width={self.width})"


def run_ablated(
    im: pv.IntervenableModel, inputs: Inputs, readout: Readout | None = None, batch_size: int = 512
) -> torch.Tensor:
    """Read-out logits ``(N, C)`` of a model whose sites are ablated by :class:`OptimalAblationIntervention` s.

    Positions come from each intervention's ``position`` buffer and are resolved per row against
    the ``attention_mask`` (padding honoured). Works on a freshly loaded
    ``pyvene.IntervenableModel.load(dir, model)``.
    """
    readout = readout or Readout()
    keys = list(im.sorted_keys)
    if not keys or any(not isinstance(im.interventions[k], OptimalAblationIntervention) for k in keys):
        raise PlotError("run_ablated needs an IntervenableModel whose interventions are all OptimalAblationIntervention")
    spec = model_spec(im.model)
    kw = as_model_kwargs(inputs)
    n = inputs_len(kw)
    dev = model_device(im.model)
    im.use_fast = False
    out = []
    with torch.no_grad():
        for s in range(0, n, batch_size):
            part = {k: v[s : s + batch_size].to(dev) for k, v in kw.items()}
            b = inputs_len(part)
            locs = []
            for key in keys:
                pos = intervention_position(im.interventions[key])
                if not spec.has_positions:
                    rows = [0] * b
                else:
                    if pos is None:
                        raise SiteError(f"intervention {key} has no stored position; build it with position=")
                    rows = resolve_positions(pos, part, sequence_length(part), b)
                locs.append(_row_locations(torch.as_tensor(rows)))
            _, cf = im(part, unit_locations={"sources->base": (None, locs)})
            out.append(readout(cf, part).float().cpu())
    logits = torch.cat(out, 0)
    _check_finite(logits, "the ablated model")
    return logits


def _row_locations(pos: torch.Tensor) -> list:
    """pyvene per-row locations ``[[p_0], [p_1], ...]`` for one intervention (cheap when uniform)."""
    if pos.numel() and bool((pos == pos[0]).all()):
        return [[int(pos[0])]] * int(pos.numel())
    return pos.reshape(-1, 1).tolist()


@torch.no_grad()
def _clean_logits(model: torch.nn.Module, kw: Mapping[str, torch.Tensor], readout: Readout, batch: int) -> torch.Tensor:
    """Read-out logits of the unablated model, (N, C) float32 on CPU."""
    dev = model_device(model)
    n = inputs_len(dict(kw))
    out = []
    for s in range(0, n, batch):
        part = {k: v[s : s + batch].to(dev) for k, v in kw.items()}
        out.append(readout(model(**part), part).float().cpu())
    logits = torch.cat(out, 0)
    _check_finite(logits, "the unablated model's read-out")
    return logits


def _check_finite(x: torch.Tensor, where: str) -> None:
    if x.numel() and not torch.isfinite(x).all():
        raise ModelError(
            f"non-finite values (NaN or inf) in {where}; check the model's weights and inputs "
            "(for optimal ablation also try a smaller lr=)"
        )


# ============================================================================ configuration
@dataclasses.dataclass
class OptimalAblationConfig:
    """Settings of :func:`optimal_ablation`.

    Parameters
    ----------
    loss : {"kl", "ce", "mse"}
        ``"kl"``: KL(clean ‖ ablated) of the read-out distributions (the reference's choice);
        ``"ce"``: cross-entropy against the bank's ``base_labels`` minus the clean model's;
        ``"mse"``: squared error between ablated and clean read-out logits.
    steps : int
        AdamW steps per site (all sites of a chunk train together).
    lr : float or "auto"
        ``"auto"`` (default): whitened steps. The constant is parametrised as ``a = a0 + s ⊙ z``
        with ``s`` the per-coordinate standard deviation of the site on the training data (floored
        at 10 % of its RMS), and ``z`` is trained with learning rate ``lr_scale``: every coordinate
        moves in units of its own spread, so one setting fits sites of any scale. Adam moves ``z``
        by at most about ``lr_scale`` per step; with the cosine decay to 0 the reach is about
        ``steps * lr_scale / 2`` standard deviations (10 by default). A float: plain AdamW on ``a``
        with that learning rate (the reference implementation uses 2e-3 with 10,000 steps on
        GPT-2). The defaults converge on small models in seconds; the tests check the closed forms
        to 1e-3.
    lr_scale : float
        Learning rate of the whitened coordinates (``lr="auto"``).
    batch_size : int
        Training examples per step (shared by all sites; each site sees them in its own copy).
        With ``n_train <= batch_size`` training is full-batch (deterministic).
    holdout : float
        Fraction of the bank's examples held out for evaluating the gaps (0 = evaluate on the
        training examples). Ignored when ``eval_bank`` is given.
    init : {"mean", "zero"}
        Initial constant (the reference initialises at the mean).
    restarts : int
        Extra starting points per site, each the site's activation on a random training example
        (on-distribution), trained in parallel with the first; the constant with the lowest
        training loss is kept. Gradient descent from the mean can stall on flat regions (e.g. a
        downstream ReLU that the mean switches off), which overestimates Δ_opt.
    baselines : tuple of str
        Classical ablations reported next to OA, among ``("zero", "mean", "resample")``.
    resample_draws : int
        Resampled sources per evaluation example (drawn from the training examples; never the
        example itself).
    max_rows : int
        Rows per forward pass (bounds memory): the number of sites trained in parallel is
        ``max(1, max_rows // batch_size)``.
    seed : int
        Seeds the split, the mini-batches and the resampling (local generators).
    """

    loss: str = "kl"
    steps: int = 200
    lr: float | str = "auto"
    lr_scale: float = 0.1
    batch_size: int = 64
    holdout: float = 0.5
    init: str = "mean"
    restarts: int = 1
    baselines: tuple[str, ...] = ABLATION_KINDS
    resample_draws: int = 2
    max_rows: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss not in ABLATION_LOSSES:
            raise PlotError(f"unknown ablation loss {self.loss!r}; choose one of {ABLATION_LOSSES}")
        if int(self.steps) < 0:
            raise PlotError(f"steps must be >= 0, got {self.steps}")
        if not (self.lr == "auto" or (isinstance(self.lr, (int, float)) and self.lr > 0)):
            raise PlotError(f"lr must be a positive float or 'auto', got {self.lr!r}")
        if not self.lr_scale > 0:
            raise PlotError(f"lr_scale must be positive, got {self.lr_scale}")
        if int(self.batch_size) < 1:
            raise PlotError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= float(self.holdout) < 1.0:
            raise PlotError(f"holdout must be in [0, 1), got {self.holdout}")
        if self.init not in ("mean", "zero"):
            raise PlotError(f"init must be 'mean' or 'zero', got {self.init!r}")
        if int(self.restarts) < 0:
            raise PlotError(f"restarts must be >= 0, got {self.restarts}")
        self.baselines = tuple(self.baselines)
        bad = [b for b in self.baselines if b not in ABLATION_KINDS]
        if bad:
            raise PlotError(f"unknown baseline ablation(s) {bad}; choose among {ABLATION_KINDS}")
        if int(self.resample_draws) < 1:
            raise PlotError(f"resample_draws must be >= 1, got {self.resample_draws}")
        if int(self.max_rows) < 1:
            raise PlotError(f"max_rows must be >= 1, got {self.max_rows}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ============================================================================ targets
@dataclasses.dataclass
class _Unit:
    """One ablated hook of a target: native coordinates (``dims``) or basis rows ``V``."""

    layer: int
    component: str
    position: int | None
    d: int
    dims: tuple[int, ...] | None = None
    V: torch.Tensor | None = None  # (k, d)

    @property
    def raw(self) -> tuple:
        return (self.layer, self.component, self.position)

    @property
    def width(self) -> int:
        if self.V is not None:
            return int(self.V.shape[0])
        return self.d if self.dims is None else len(self.dims)

    def coords(self, acts: torch.Tensor) -> torch.Tensor:
        """(n, d) activations -> (n, k) coordinates of the ablated support."""
        if self.V is not None:
            return acts @ self.V.to(device=acts.device, dtype=acts.dtype).T
        if self.dims is None:
            return acts
        return acts[:, list(self.dims)]

    def intervention(self, value: torch.Tensor) -> OptimalAblationIntervention:
        return OptimalAblationIntervention(
            embed_dim=self.d, low_rank_dimension=self.width, dims=self.dims, basis=self.V, value=value,
            position=self.position,
        )

    def representation(self, iv: OptimalAblationIntervention) -> dict:
        site = Site(self.layer, self.component, self.position)
        return site.to_representation(low_rank_dimension=self.width, intervention=iv)


@dataclasses.dataclass
class _Target:
    label: str
    sites: list[Site]
    units: list[_Unit]


SiteLike = Site | Sequence[Site]


def _group_label(sites: Sequence[Site]) -> str:
    return sites[0].label if len(sites) == 1 else "+".join(s.label for s in sites)


def _build_targets(
    model: torch.nn.Module, sites: Sequence[SiteLike], bases: Mapping[str, Any] | None
) -> list[_Target]:
    """Turn sites (or groups of sites ablated jointly) into targets with merged units per hook."""
    if sites is None or len(sites) == 0:
        raise SiteError("no sites to ablate; pass at least one pp.Site (or a list of Sites ablated jointly)")
    groups: list[list[Site]] = []
    for s in sites:
        if isinstance(s, Site):
            groups.append([s])
        elif isinstance(s, Sequence) and s and all(isinstance(x, Site) for x in s):
            groups.append(list(s))
        else:
            raise SiteError(
                f"expected a pyvene_plot.Site or a non-empty list of Sites (ablated jointly), got {s!r}"
            )
    bases_t = {k: torch.as_tensor(np.asarray(v), dtype=torch.float32) for k, v in (bases or {}).items()}
    flat = [s for g in groups for s in g]
    spec = validate_sites(model, flat, {k: int(v.shape[0]) for k, v in bases_t.items()})
    targets = []
    for g in groups:
        by_unit: dict[tuple, list[Site]] = {}
        for s in g:
            by_unit.setdefault(s.unit, []).append(s)
        units = []
        for (layer, comp, pos, basis), ss in by_unit.items():
            d = spec.dim(comp)
            if basis is None:
                dims = None if any(s.dims is None for s in ss) else tuple(sorted({i for s in ss for i in s.dims}))
                if dims is not None and dims == tuple(range(d)):
                    dims = None
                units.append(_Unit(layer, comp, pos, d, dims=dims))
            else:
                B = bases_t[basis]
                if B.shape[1] != d:
                    raise SiteError(f"basis {basis!r} has width {B.shape[1]} but {comp} has width {d}")
                rows = sorted({i for s in ss for i in s.dims})
                units.append(_Unit(layer, comp, pos, d, V=B[rows].clone()))
        targets.append(_Target(_group_label(g), list(g), units))
    labels = [t.label for t in targets]
    if len(set(labels)) != len(labels):
        dup = sorted({x for x in labels if labels.count(x) > 1})
        raise SiteError(f"sites listed twice: {dup}; pass each site (or site group) once")
    return targets


# ============================================================================ losses
def _per_row_loss(loss: str, logits: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-row loss ``(M,)``; ``ref`` is clean log-probs (kl), labels (ce) or clean logits (mse)."""
    if loss == "kl":
        logq = F.log_softmax(logits.float(), -1)
        return F.kl_div(logq, ref, log_target=True, reduction="none").sum(-1)
    if loss == "ce":
        return F.cross_entropy(logits.float(), ref, reduction="none")
    return ((logits.float() - ref) ** 2).sum(-1)


def _reference(loss: str, clean_logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    if loss == "kl":
        return F.log_softmax(clean_logits.float(), -1)
    if loss == "ce":
        return labels
    return clean_logits.float()


# ============================================================================ runner
class _BatchedAblation(pv.SourcelessIntervention, pv.TrainableIntervention, pv.LocalistRepresentationIntervention):
    """Internal: one hook, many sites, one row each (the parallel-training vehicle of :func:`optimal_ablation`).

    Every call receives, as its ``subspaces`` entry, ``{"native": (vals (B, d), mask (B, d)) or None,
    "span": [(rows (B,) bool, V (k, d), a (k,) or (n_rows, k)), ...], "pos": LongTensor (B,) or
    None}``: rows take ``vals`` where ``mask`` is set (native coordinates; a row is ablated for at
    most one site) and, for span sites, ``h + (a − h Vᵀ) V``. With ``pos`` the intervention receives
    the whole ``(B, T, d)`` output (pyvene ``unit_locations`` None) and edits row ``b`` at position
    ``pos[b]`` only. Never saved (results hand out :class:`OptimalAblationIntervention` s).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.is_source_constant = True
        self.keep_last_dim = True

    def forward(self, base: torch.Tensor, source: Any = None, subspaces: Any = None, **kwargs: Any) -> torch.Tensor:
        spec = subspaces or {}
        pos = spec.get("pos")
        if pos is None or base.dim() < 3:  # gathered rows (B, 1, d), or a model without a sequence axis
            return self._edit(base, spec)
        # the whole (B, T, d) tensor: rows are edited at their own positions only
        ar = torch.arange(base.shape[0], device=base.device)
        pos = pos.to(base.device)
        return base.index_put((ar, pos), self._edit(base[ar, pos], spec))

    @staticmethod
    def _edit(h: torch.Tensor, spec: Mapping) -> torch.Tensor:
        out = h
        native = spec.get("native")
        if native is not None:
            vals, mask = native
            shape = (h.shape[0],) + (1,) * (h.dim() - 2) + (h.shape[-1],)
            out = torch.where(mask.view(shape), vals.to(h.dtype).view(shape), out)
        for rows, V, a in spec.get("span", ()):
            if not bool(rows.any()):
                continue
            sel = out[rows]
            a = a.to(sel.dtype)
            if a.dim() == 2:
                a = a.reshape(a.shape[0], *([1] * (sel.dim() - 2)), a.shape[1])
            out = out.index_put((rows,), sel + (a - sel @ V.T) @ V)
        return out


class _Runner:
    """One pyvene ``IntervenableModel`` with a :class:`_BatchedAblation` per hook used by a chunk of targets.

    Row ``r`` of a batch is ablated for target ``target_of_row[r]`` (-1: none) at every unit of that
    target; each target's native unit at a hook is a *slot* of that hook's value table (S, d).
    """

    def __init__(self, model: torch.nn.Module, targets: Sequence[_Target], readout: Readout) -> None:
        self.model = model
        self.readout = readout
        self.device = model_device(model)
        self.targets = list(targets)
        T = len(targets)
        self.hooks: list[tuple] = list(dict.fromkeys(u.raw for t in targets for u in t.units))
        self.d = {h: next(u.d for t in targets for u in t.units if u.raw == h) for h in self.hooks}
        self.native: dict[tuple, list[tuple[int, int]]] = {h: [] for h in self.hooks}
        self.span: dict[tuple, list[tuple[int, int]]] = {h: [] for h in self.hooks}
        for t, tg in enumerate(targets):
            for j, u in enumerate(tg.units):
                (self.span if u.V is not None else self.native)[u.raw].append((t, j))
        # slot lookup: target -> slot of its native unit at the hook (index T maps "no target" to -1)
        self.slot_of: dict[tuple, torch.Tensor] = {}
        self.mask: dict[tuple, torch.Tensor] = {}
        for h in self.hooks:
            lut = torch.full((T + 1,), -1, dtype=torch.long)
            m = torch.zeros(max(1, len(self.native[h])), self.d[h], dtype=torch.bool)
            for s, (t, j) in enumerate(self.native[h]):
                lut[t] = s
                u = targets[t].units[j]
                m[s, list(u.dims) if u.dims is not None else slice(None)] = True
            self.slot_of[h] = lut.to(self.device)
            self.mask[h] = m.to(self.device)
        # (slot, coordinate) of every entry of the concatenated native constants, per hook
        self._scatter_index: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        for h in self.hooks:
            r, c = [], []
            for s, (t, j) in enumerate(self.native[h]):
                u = targets[t].units[j]
                cols = list(u.dims) if u.dims is not None else list(range(self.d[h]))
                r += [s] * len(cols)
                c += cols
            self._scatter_index[h] = (torch.tensor(r, dtype=torch.long, device=self.device),
                                      torch.tensor(c, dtype=torch.long, device=self.device))
        # hooks whose pyvene card entry has no split function hand the whole (B, T, d) tensor to the
        # intervention (unit_locations None), which edits each row at its position: no per-row Python
        # lists on the hot path. Split components (q/k/v, heads) use pyvene's per-row locations.
        card = pv.type_to_module_mapping.get(type(model), {})
        self.whole = {h: len(card.get(h[1], ())) == 2 for h in self.hooks}
        ivs = {h: _BatchedAblation(embed_dim=self.d[h]) for h in self.hooks}
        reps = [Site(h[0], h[1], h[2]).to_representation(intervention=ivs[h]) for h in self.hooks]
        self.im = pv.IntervenableModel(reps, model, use_fast=False)
        self.im.disable_model_gradients()
        self.im.set_device(self.device)
        hook_of = {id(iv): h for h, iv in ivs.items()}
        self.keys = list(self.im.sorted_keys)
        self.key_hook = [hook_of[id(self.im.interventions[k])] for k in self.keys]

    # ------------------------------------------------------------------ value tables
    def tables(self, values: Mapping[tuple[int, int], torch.Tensor]) -> dict[tuple, torch.Tensor]:
        """Per hook, the (S, d) table holding every native slot's constant at its coordinates."""
        out = {}
        for h in self.hooks:
            if not self.native[h]:
                continue
            flat = torch.cat([values[u].to(self.device).reshape(-1) for u in self.native[h]])
            rows, cols = self._scatter_index[h]
            out[h] = torch.zeros(len(self.native[h]), self.d[h], device=self.device, dtype=flat.dtype).index_put(
                (rows, cols), flat)
        return out

    def logits(
        self,
        kw: Mapping[str, torch.Tensor],
        positions: Mapping[tuple, torch.Tensor],
        target_of_row: torch.Tensor,
        values: Mapping[tuple[int, int], torch.Tensor] | None = None,
        tables: Mapping[tuple, torch.Tensor] | None = None,
        row_acts: Mapping[tuple, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Read-out logits ``(M, C)`` (on device; differentiable in ``values`` / ``tables``).

        Constants come from ``values[(t, j)]`` (k,) (native ones through ``tables``, built from
        ``values`` when not given), or, for resampling, every ablated row takes the hook's
        activation ``row_acts[hook]`` (M, d) of another example.
        """
        T = len(self.targets)
        tor = torch.where(target_of_row < 0, torch.full_like(target_of_row, T), target_of_row)
        if row_acts is None and tables is None:
            tables = self.tables(values)
        locs, subsp = [], []
        for key, h in zip(self.keys, self.key_hook):
            if self.whole[h]:
                locs.append(None)
                entry: dict[str, Any] = {"native": None, "span": [], "pos": positions[h]}
            else:
                locs.append(_row_locations(positions[h]))
                entry = {"native": None, "span": [], "pos": None}
            slot = self.slot_of[h][tor]
            if self.native[h]:
                has = slot >= 0
                safe = slot.clamp_min(0)
                vals = row_acts[h] if row_acts is not None else tables[h][safe]
                entry["native"] = (vals, self.mask[h][safe] & has.unsqueeze(1))
            for (t, j) in self.span[h]:
                rows = target_of_row == t
                u = self.targets[t].units[j]
                V = u.V.to(self.device)
                if row_acts is not None:
                    a = row_acts[h][rows] @ V.T
                else:
                    a = values[(t, j)].to(self.device)
                entry["span"].append((rows, V, a))
            subsp.append(entry)
        self.im.use_fast = False
        # ("sources->base": (None, base locations)) is pyvene's base-only form without its list-depth scan
        _, cf = self.im(dict(kw), unit_locations={"sources->base": (None, locs)}, subspaces=subsp)
        return self.readout(cf, kw)


# ============================================================================ main entry point
def _as_inputs_and_labels(bank: Any, what: str) -> tuple[dict, torch.Tensor | None, str]:
    if isinstance(bank, PairBank):
        return as_model_kwargs(bank.base), bank.base_labels, bank.name
    if isinstance(bank, (torch.Tensor, Mapping)):
        kw = as_model_kwargs(bank)
        if not kw or any(not isinstance(v, torch.Tensor) for v in kw.values()):
            raise BankError(f"{what} must be a PairBank or model inputs (a Tensor or a dict of Tensors)")
        if any(v.dim() == 0 or v.shape[0] == 0 for v in kw.values()):
            raise BankError(f"{what} is empty (no examples); pass at least two examples")
        return kw, None, "inputs"
    raise BankError(f"{what} must be a PairBank or model inputs (a Tensor or a dict of Tensors), got {type(bank).__name__}")


def _index(kw: Mapping[str, torch.Tensor], idx: torch.Tensor) -> dict:
    return {k: v[idx] for k, v in kw.items()}


def optimal_ablation(
    model: torch.nn.Module,
    sites: Sequence[SiteLike],
    bank: PairBank | Inputs,
    *,
    readout: Readout | None = None,
    eval_bank: PairBank | Inputs | None = None,
    bases: Mapping[str, Any] | None = None,
    config: OptimalAblationConfig | None = None,
    progress: bool = True,
    **overrides: Any,
) -> OptimalAblationResult:
    """Optimal-ablation gap Δ_opt of every site, next to the zero-, mean- and resample-ablation gaps.

    Parameters
    ----------
    model : torch.nn.Module
        A model pyvene can hook (frozen; only the constants are trained).
    sites : sequence of Site, or of lists of Site
        One record per element. A list of sites is ablated *jointly* (one constant per hook, the
        union of their coordinates / basis rows; e.g. all sites of a PLOT handle).
    bank : PairBank or model inputs
        Examples ``x ~ D``: the bank's base inputs (``PairBank.base``), or raw model inputs
        (Tensor ``(N, ...)`` or dict of Tensors). ``loss="ce"`` needs a PairBank (its
        ``base_labels``).
    readout : Readout, optional
        Output -> logits ``(B, C)``; default the bank's readout, else :class:`Readout` (last
        token's logits for LMs).
    eval_bank : PairBank or model inputs, optional
        Evaluate every gap on these examples (then all of ``bank`` is used for training).
    bases : dict of str to array (r, d), optional
        Orthonormal bases of span sites (``Site(basis=...)``).
    config : OptimalAblationConfig, optional
        Settings; keyword ``overrides`` replace its fields (e.g. ``steps=500, loss="ce"``).
    progress : bool
        tqdm bar over training steps.

    Returns
    -------
    OptimalAblationResult
        ``records``: one dict per site with ``delta_opt``, ``delta_zero``, ``delta_mean``,
        ``delta_resample`` (evaluation data; see ``evaluated_on``), flip rates, training losses,
        steps, learning rates, sizes; ``constants``: the fitted ``a*`` per site.

    Raises
    ------
    SiteError
        Sites outside the model, or whose constant receives no gradient (the hook never fires or
        the read-out does not depend on the site).
    BankError
        Empty banks, too few examples for the held-out split, ``loss="ce"`` without labels.
    ModelError
        NaN / inf outputs or activations.
    PlotError
        Unknown loss or invalid settings.

    Notes
    -----
    Parallel training: sites are processed in chunks of ``max(1, max_rows // batch_size)``. In a
    chunk the mini-batch is replicated once per site and copy ``t`` is ablated at site ``t`` only
    (one pyvene intervention per hook holds the constants of every site at that hook). The summed
    loss separates over sites and AdamW is per-coordinate, so this equals training each site alone
    on the same mini-batches.
    """
    t0 = time.perf_counter()
    cfg = config or OptimalAblationConfig()
    if overrides:
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(OptimalAblationConfig)})
        if unknown:
            raise PlotError(f"unknown optimal_ablation option(s) {unknown}; see OptimalAblationConfig")
        cfg = dataclasses.replace(cfg, **overrides)
    if readout is None:
        readout = getattr(bank, "readout", None) if isinstance(bank, PairBank) else None
        readout = readout or Readout()
    targets = _build_targets(model, sites, bases)
    kw_all, labels_all, bank_name = _as_inputs_and_labels(bank, "bank")
    n_all = inputs_len(kw_all)
    g = torch.Generator().manual_seed(int(cfg.seed))

    # ---------------------------------------------------------------- data split
    if eval_bank is not None:
        kw_tr, y_tr = kw_all, labels_all
        kw_ev, y_ev, ev_name = _as_inputs_and_labels(eval_bank, "eval_bank")
        eval_index = None
        evaluated_on = f"eval_bank {ev_name!r} ({inputs_len(kw_ev)} examples); trained on {bank_name!r}"
        same = False
    elif cfg.holdout > 0:
        n_ev = round(cfg.holdout * n_all)
        if n_ev < 1 or n_all - n_ev < 1:
            raise BankError(
                f"bank {bank_name!r} has {n_all} example(s): too few for a held-out split with holdout="
                f"{cfg.holdout}; pass more examples, eval_bank=, or holdout=0 (evaluate on the training data)"
            )
        perm = torch.randperm(n_all, generator=g)
        eval_index, train_index = perm[:n_ev].sort().values, perm[n_ev:].sort().values
        kw_tr, kw_ev = _index(kw_all, train_index), _index(kw_all, eval_index)
        y_tr = labels_all[train_index] if labels_all is not None else None
        y_ev = labels_all[eval_index] if labels_all is not None else None
        evaluated_on = (f"held-out {cfg.holdout:.0%} of bank {bank_name!r} ({n_ev} examples; constants and "
                        f"statistics from the other {n_all - n_ev})")
        same = False
    else:
        kw_tr, kw_ev, y_tr, y_ev = kw_all, kw_all, labels_all, labels_all
        eval_index = torch.arange(n_all)
        evaluated_on = f"the training examples themselves (bank {bank_name!r}, {n_all} examples; holdout=0)"
        same = True
    if cfg.loss == "ce" and (y_tr is None or y_ev is None):
        raise BankError("loss='ce' needs labels: pass a PairBank (its base_labels are the targets) or use loss='kl'")
    n_tr, n_ev = inputs_len(kw_tr), inputs_len(kw_ev)

    # ---------------------------------------------------------------- clean runs and activations
    raw_units = list(dict.fromkeys(u.raw for t in targets for u in t.units))
    engine = InterchangeEngine(model, [(*r, None) for r in raw_units], readout)
    device = model_device(model)
    clean_tr = _clean_logits(model, kw_tr, readout, cfg.max_rows).to(device)
    clean_ev = _clean_logits(model, kw_ev, readout, cfg.max_rows).to(device)
    if cfg.loss == "ce":
        nc = clean_tr.shape[1]
        mx = int(torch.cat([y_tr, y_ev]).max())
        if mx >= nc:
            raise BankError(f"label {mx} is outside the read-out's {nc} classes; labels must index the read-out logits")
    try:
        acts_tr = {r: a.float() for r, a in engine.collect(kw_tr).items()}
    except KeyError as exc:  # pyvene's collect hook never fired
        raise SiteError(
            f"pyvene's hook {exc} never fired during a forward pass: that component is not computed by this model "
            "under the current transformers version / settings (e.g. GPT-2 'attention_weight' needs eager "
            "attention); choose another component"
        ) from exc
    for r, a in acts_tr.items():
        if not torch.isfinite(a).all():
            raise ModelError(f"non-finite activations (NaN or inf) at layer {r[0]} {r[1]} position {r[2]}")
    pos_tr = {r: p.to(device) for r, p in engine.positions(kw_tr).items()}
    pos_ev = {r: p.to(device) for r, p in engine.positions(kw_ev).items()}
    del engine
    ref_tr = _reference(cfg.loss, clean_tr, y_tr.to(device) if y_tr is not None else None)
    ref_ev = _reference(cfg.loss, clean_ev, y_ev.to(device) if y_ev is not None else None)
    base_loss_ev = _per_row_loss(cfg.loss, clean_ev, ref_ev).mean().item() if cfg.loss == "ce" else 0.0
    base_loss_tr = _per_row_loss(cfg.loss, clean_tr, ref_tr).mean().item() if cfg.loss == "ce" else 0.0
    pred_tr, pred_ev = clean_tr.argmax(-1), clean_ev.argmax(-1)
    kw_tr_d = {k: v.to(device) for k, v in kw_tr.items()}
    kw_ev_d = {k: v.to(device) for k, v in kw_ev.items()}

    # per unit: statistics on the training examples
    stats: list[list[dict]] = []
    for t in targets:
        row = []
        for u in t.units:
            c = u.coords(acts_tr[u.raw])
            mean = c.mean(0)
            std = c.std(0, unbiased=False) if c.shape[0] > 1 else torch.zeros_like(mean)
            rms = float(std.pow(2).mean().sqrt())
            if cfg.lr == "auto":
                # whitened steps: a = a0 + s * z with z trained at lr = lr_scale (in standard deviations);
                # coordinates that never vary get a floor of 10 % of the unit's RMS spread
                floor = 0.1 * rms if rms > 0 else 0.1 * (float(mean.pow(2).mean().sqrt()) or 1.0)
                s_vec, lr = (std.pow(2) + floor**2).sqrt(), float(cfg.lr_scale)
            else:
                s_vec, lr = torch.ones_like(mean), float(cfg.lr)
            row.append({"mean": mean.to(device), "lr": lr, "step_scale": s_vec.to(device), "rms_std": rms})
        stats.append(row)

    # resample sources: training examples (never the evaluation example itself when they coincide)
    R = int(cfg.resample_draws)
    src = torch.randint(0, n_tr, (R, n_ev), generator=g)
    if same and n_tr > 1:
        clash = src == torch.arange(n_ev).unsqueeze(0)
        src[clash] = (src[clash] + 1) % n_tr

    # ---------------------------------------------------------------- chunks of targets
    b = min(int(cfg.batch_size), n_tr)
    copies = 1 + int(cfg.restarts) if cfg.steps > 0 else 1
    per_chunk = max(1, int(cfg.max_rows) // (b * copies))
    records: list[dict] = []
    constants: dict[str, list[np.ndarray]] = {}
    total_steps = int(cfg.steps) * math.ceil(len(targets) / per_chunk)
    bar = None
    if progress and total_steps > 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, desc=f"optimal ablation ({len(targets)} sites)", leave=False)
    try:
        for c0 in range(0, len(targets), per_chunk):
            chunk = list(range(c0, min(c0 + per_chunk, len(targets))))
            tg = [targets[i] for i in chunk]
            st = [stats[i] for i in chunk]
            runner = _Runner(model, tg, readout)  # one copy per site: evaluation
            units = [(t, j) for t in range(len(tg)) for j in range(len(tg[t].units))]
            mean_v = {(t, j): st[t][j]["mean"] for t, j in units}
            zero_v = {(t, j): torch.zeros_like(st[t][j]["mean"]) for t, j in units}
            args_tr = (runner, cfg.loss, kw_tr_d, pos_tr, ref_tr, pred_tr, cfg.max_rows)
            args_ev = (runner, cfg.loss, kw_ev_d, pos_ev, ref_ev, pred_ev, cfg.max_rows)
            t_chunk = time.perf_counter()
            restart_deltas: list[list[float]] = [[] for _ in tg]
            if cfg.steps > 0:
                # training copies: copy (t, 0) starts at cfg.init, copies (t, c >= 1) at the site's
                # activation on a random training example (on-distribution restarts)
                cp = [(t, c) for t in range(len(tg)) for c in range(copies)]
                trainer = _Runner(model, [tg[t] for t, _ in cp], readout)
                init_v, st_cp = {}, []
                starts = {t: _restart_examples(tg[t].label, cfg.seed, copies - 1, n_tr) for t in range(len(tg))}
                for q, (t, c) in enumerate(cp):
                    st_cp.append(st[t])
                    ex = starts[t][c - 1] if c > 0 else None
                    for j, u in enumerate(tg[t].units):
                        if c == 0:
                            init_v[(q, j)] = (mean_v if cfg.init == "mean" else zero_v)[(t, j)]
                        else:
                            init_v[(q, j)] = u.coords(acts_tr[u.raw][ex : ex + 1])[0].to(device)
                fitted_cp, final_cp = _train_chunk(trainer, cfg, st_cp, init_v, kw_tr_d, pos_tr, ref_tr, n_tr, b, bar)
                tr_cp = _evaluate(trainer, cfg.loss, kw_tr_d, pos_tr, ref_tr, pred_tr, cfg.max_rows, fitted_cp)
                del trainer
                tr_mean = _evaluate(*args_tr, mean_v)
                fitted, chosen, final_loss, tr_best = {}, [], [], []
                for t in range(len(tg)):
                    qs = [q for q, (tt, _c) in enumerate(cp) if tt == t]
                    losses = [tr_cp["loss"][q] for q in qs]
                    restart_deltas[t] = [x - base_loss_tr for x in losses]
                    best = qs[int(np.argmin(losses))]
                    # keep the best trained constant unless the mean has a lower *training* loss
                    # (beyond float noise: ties keep the trained constant)
                    if tr_mean["loss"][t] < min(losses) - 1e-6 * abs(min(losses)):
                        tag, best_loss = "mean", tr_mean["loss"][t]
                        fitted.update({(t, j): mean_v[(t, j)] for j in range(len(tg[t].units))})
                    else:
                        c = cp[best][1]
                        tag = "trained" if c == 0 else f"trained:restart{c}"
                        best_loss = min(losses)
                        fitted.update({(t, j): fitted_cp[(best, j)] for j in range(len(tg[t].units))})
                    chosen.append(tag)
                    final_loss.append(final_cp[best])
                    tr_best.append(best_loss)
            else:
                fitted = dict(mean_v if cfg.init == "mean" else zero_v)
                tr_mean, tr_best = None, None
                chosen = [f"init:{cfg.init}"] * len(tg)
                final_loss = [float("nan")] * len(tg)
            train_s = time.perf_counter() - t_chunk
            ev: dict[str, dict] = {}
            if "mean" in cfg.baselines:
                ev["mean"] = _evaluate(*args_ev, mean_v)
            if "zero" in cfg.baselines:
                ev["zero"] = _evaluate(*args_ev, zero_v)
            if cfg.steps == 0 and cfg.init in ev:  # the constant is still its initial value
                ev["opt"] = ev[cfg.init]
            else:
                ev["opt"] = _evaluate(*args_ev, fitted)
            if "resample" in cfg.baselines:
                ev["resample"] = _evaluate_resample(*args_ev, acts_tr, src)
            for t, i in enumerate(chunk):
                rec: dict[str, Any] = {
                    "site": tg[t].label,
                    "sites": [s.to_dict() for s in tg[t].sites],
                    "width": int(sum(u.width for u in tg[t].units)),
                    "loss": cfg.loss,
                    "delta_opt": ev["opt"]["loss"][t] - base_loss_ev,
                }
                for kind in ABLATION_KINDS:
                    rec[f"delta_{kind}"] = (ev[kind]["loss"][t] - base_loss_ev) if kind in ev else None
                rec["flip_opt"] = ev["opt"]["flip"][t]
                for kind in ABLATION_KINDS:
                    rec[f"flip_{kind}"] = ev[kind]["flip"][t] if kind in ev else None
                rec.update({
                    "train_delta_opt": None if tr_best is None else tr_best[t] - base_loss_tr,
                    "train_delta_mean": None if tr_mean is None else tr_mean["loss"][t] - base_loss_tr,
                    "train_delta_restarts": restart_deltas[t],
                    "chosen": chosen[t],
                    "final_batch_loss": final_loss[t],
                    "steps": int(cfg.steps),
                    "restarts": copies - 1,
                    "lr": [s["lr"] for s in st[t]],
                    "n_train": n_tr,
                    "n_eval": n_ev,
                    "chunk_seconds": train_s,
                    "parallel_sites": len(chunk),
                })
                records.append(rec)
                constants[tg[t].label] = [fitted[(t, j)].detach().cpu().numpy().copy() for j in range(len(tg[t].units))]
            del runner
    finally:
        if bar is not None:
            bar.close()
    runtime = time.perf_counter() - t0
    bases_np = {k: np.asarray(v, dtype=np.float32) for k, v in (bases or {}).items()
                if any(s.basis == k for t in targets for s in t.sites)}
    res = OptimalAblationResult(
        records=records,
        sites=[t.sites for t in targets],
        constants=constants,
        config={**cfg.to_dict(), "readout": readout.to_dict() if hasattr(readout, "to_dict") else str(readout)},
        runtime_s=runtime,
        evaluated_on=evaluated_on,
        bases=bases_np,
        eval_index=None if eval_index is None else eval_index.tolist(),
        model=model,
    )
    logger.info("optimal ablation of %d site(s) in %.2fs (%s)", len(targets), runtime, evaluated_on)
    return res


def _pack_saved(t: torch.Tensor) -> torch.Tensor:
    return t.clone() if t.grad_fn is not None else t


def _unpack_saved(t: torch.Tensor) -> torch.Tensor:
    return t


def _restart_examples(label: str, seed: int, n: int, n_tr: int) -> list[int]:
    """Training examples whose activations start the restarts of a site (depends on the site and seed only)."""
    if n <= 0:
        return []
    gen = torch.Generator().manual_seed((zlib.crc32(label.encode("utf-8")) * 1_000_003 + int(seed)) % (2**63))
    return [int(i) for i in torch.randint(0, n_tr, (n,), generator=gen)]


def _train_chunk(runner: _Runner, cfg: OptimalAblationConfig, st, init_v, kw_tr, pos_tr, ref_tr, n_tr: int, b: int,
                 bar) -> tuple[dict, list[float]]:
    """AdamW on every constant of the chunk at once (batch replicated once per target).

    Every chunk draws the same mini-batch sequence (seeded by ``cfg.seed``), so a site's training
    does not depend on which other sites share its chunk. Returns the fitted constants
    ``{(t, j): (k,)}`` and the last mini-batch loss per target.
    """
    g = torch.Generator().manual_seed(int(cfg.seed) + 1)
    T = len(runner.targets)
    units = list(init_v)
    if int(cfg.steps) == 0:
        return {u: v.detach().clone() for u, v in init_v.items()}, [float("nan")] * T
    # a = a0 + s * z, z trained (s = 1 and lr = lr for an explicit lr; whitened steps for "auto")
    zs = {u: torch.zeros_like(init_v[u], requires_grad=True) for u in units}
    by_lr: dict[float, list] = {}
    for (t, j) in units:
        by_lr.setdefault(st[t][j]["lr"], []).append(zs[(t, j)])
    opt = torch.optim.AdamW([{"params": ps, "lr": lr} for lr, ps in by_lr.items()], weight_decay=0.0, foreach=True)
    steps = int(cfg.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, steps) / steps)))

    def values() -> dict:
        return {(t, j): init_v[(t, j)] + st[t][j]["step_scale"] * zs[(t, j)] for (t, j) in units}

    target_of_row = torch.arange(T).repeat_interleave(b).to(runner.device)
    full = b >= n_tr
    last = [float("nan")] * T
    for step in range(steps):
        idx = torch.arange(n_tr) if full else torch.randperm(n_tr, generator=g)[:b]
        rows = idx.repeat(T).to(runner.device)
        kw = _index(kw_tr, rows)
        pos = {r: p[rows] for r, p in pos_tr.items()}
        # pyvene writes interventions *in place* into module outputs; when a later site's hook
        # overwrites a tensor that an earlier op saved for its backward (e.g. a ReLU's output),
        # autograd refuses. Saving copies of the activations that depend on the constants (never
        # of weights or inputs) keeps every site's gradient exact.
        with torch.autograd.graph.saved_tensors_hooks(_pack_saved, _unpack_saved):
            logits = runner.logits(kw, pos, target_of_row, values())
            per_row = _per_row_loss(cfg.loss, logits, ref_tr[rows])
        per_target = per_row.view(T, b).mean(1)
        if not torch.isfinite(per_target).all():
            bad = [runner.targets[t].label for t in range(T) if not torch.isfinite(per_target[t])]
            raise ModelError(
                f"optimal ablation loss became non-finite (NaN or inf) at step {step} for {bad[:5]}; "
                "check the model for NaN outputs or lower lr= / lr_scale="
            )
        opt.zero_grad(set_to_none=True)
        total = per_target.sum()
        if total.requires_grad:
            total.backward()
        if step == 0:
            # a constant off the autograd graph does not reach the read-out (an exactly zero gradient is
            # legitimate: a site the output does not depend on has Δ = 0)
            dead = [runner.targets[t].label for t in range(T)
                    if any(zs[(t, j)].grad is None for j in range(len(runner.targets[t].units)))]
            if dead:
                raise SiteError(
                    f"site(s) {dead[:5]} receive no gradient: their constant is not on the path to the read-out "
                    "(the hooked module's output is discarded, or its hook did not fire when intervening). Choose "
                    "a component whose output feeds the model's output"
                )
        opt.step()
        sched.step()
        last = per_target.detach().cpu().tolist()
        if bar is not None:
            bar.update(1)
    with torch.no_grad():
        fitted = {u: v.detach().clone() for u, v in values().items()}
    return fitted, last


@torch.no_grad()
def _evaluate(runner: _Runner, loss: str, kw, pos, ref, pred, max_rows: int, values: Mapping) -> dict:
    """Mean per-target loss and flip rate on ``kw`` (each target ablated on its own copy of the data)."""
    T = len(runner.targets)
    n = inputs_len(kw)
    tables = runner.tables(values)
    sums = torch.zeros(T, dtype=torch.float64)
    flips = torch.zeros(T, dtype=torch.float64)
    total = T * n
    step = max(1, int(max_rows))
    for s in range(0, total, step):
        flat = torch.arange(s, min(s + step, total))
        t_of = flat // n
        ex = (flat % n).to(runner.device)
        logits = runner.logits(_index(kw, ex), {r: p[ex] for r, p in pos.items()}, t_of.to(runner.device),
                               values, tables=tables)
        _check_finite(logits, "an ablated forward pass")
        sums.index_add_(0, t_of, _per_row_loss(loss, logits, ref[ex]).double().cpu())
        flips.index_add_(0, t_of, (logits.argmax(-1) != pred[ex]).double().cpu())
    return {"loss": (sums / n).tolist(), "flip": (flips / n).tolist()}


@torch.no_grad()
def _evaluate_resample(runner: _Runner, loss: str, kw, pos, ref, pred, max_rows: int, acts_tr,
                       src: torch.Tensor) -> dict:
    """Resample ablation: each evaluation example gets the site's activation of ``R`` training examples."""
    T = len(runner.targets)
    R, n = src.shape
    sums = torch.zeros(T, dtype=torch.float64)
    flips = torch.zeros(T, dtype=torch.float64)
    total = T * R * n
    step = max(1, int(max_rows))
    src_flat = src.reshape(-1)  # (R*n,), index r*n + i
    for s in range(0, total, step):
        flat = torch.arange(s, min(s + step, total))
        t_of = flat // (R * n)
        rem = flat % (R * n)
        ex = (rem % n).to(runner.device)
        sx = src_flat[rem]
        row_acts = {h: acts_tr[h][sx.to(acts_tr[h].device)].to(runner.device) for h in runner.hooks}
        logits = runner.logits(_index(kw, ex), {r: p[ex] for r, p in pos.items()}, t_of.to(runner.device),
                               row_acts=row_acts)
        _check_finite(logits, "a resample-ablated forward pass")
        sums.index_add_(0, t_of, _per_row_loss(loss, logits, ref[ex]).double().cpu())
        flips.index_add_(0, t_of, (logits.argmax(-1) != pred[ex]).double().cpu())
    return {"loss": (sums / (R * n)).tolist(), "flip": (flips / (R * n)).tolist()}


# ============================================================================ result
@dataclasses.dataclass
class OptimalAblationResult:
    """What :func:`optimal_ablation` returns.

    Attributes
    ----------
    records : list of dict
        One per site (or site group), in input order: ``site`` (label), ``sites`` (dicts),
        ``delta_opt``, ``delta_zero``, ``delta_mean``, ``delta_resample`` (loss gaps on the
        evaluation data, in the loss's units: nats for KL / CE), ``flip_*`` (fraction of
        evaluation examples whose read-out argmax changes), ``train_delta_*`` (on the training
        examples), ``chosen`` (``"trained"``, or ``"mean"`` when the initial mean had the lower
        training loss), ``steps``, ``lr``, ``final_batch_loss``, ``n_train``, ``n_eval``, ``width``.
    sites : list of list of Site
        The ablated sites of each record.
    constants : dict of str to list of ndarray
        ``a*`` per record label: one array ``(k,)`` per hook of the record.
    config : dict
        The :class:`OptimalAblationConfig` used (plus the readout).
    runtime_s : float
    evaluated_on : str
        Which examples the gaps were measured on.
    bases : dict of str to ndarray
        Bases of span sites.
    eval_index : list of int, optional
        Rows of the bank used for evaluation (None when ``eval_bank`` was given).
    """

    records: list[dict]
    sites: list[list[Site]]
    constants: dict[str, list[np.ndarray]]
    config: dict
    runtime_s: float
    evaluated_on: str
    bases: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    eval_index: list[int] | None = None
    model: Any = dataclasses.field(default=None, repr=False, compare=False)

    def __repr__(self) -> str:
        return (f"OptimalAblationResult({len(self.records)} site(s), loss={self.config.get('loss')!r}, "
                f"runtime_s={self.runtime_s:.2f}, evaluated_on={self.evaluated_on!r})")

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> list[str]:
        return [r["site"] for r in self.records]

    def deltas(self, kind: str = "opt") -> np.ndarray:
        """Gaps of one ablation type per record, ``(n_records,)`` (NaN where not computed)."""
        if kind not in ("opt",) + ABLATION_KINDS:
            raise PlotError(f"unknown ablation kind {kind!r}; choose one of {('opt',) + ABLATION_KINDS}")
        return np.array([np.nan if r[f"delta_{kind}"] is None else r[f"delta_{kind}"] for r in self.records],
                        dtype=np.float64)

    def record(self, site: str | Site | int) -> dict:
        """The record of a site (label, Site, or index)."""
        if isinstance(site, int):
            return self.records[site]
        label = site.label if isinstance(site, Site) else str(site)
        for r in self.records:
            if r["site"] == label:
                return r
        raise PlotError(f"no record for site {label!r}; records: {self.labels[:10]}")

    def table(self, digits: int = 4) -> str:
        """Markdown table of the four gaps per site."""
        head = "| site | Δ_opt | Δ_mean | Δ_zero | Δ_resample | chosen |\n|---|---|---|---|---|---|"
        rows = []
        for r in self.records:
            cells = [r["site"]] + [("–" if r[f"delta_{k}"] is None else f"{r[f'delta_{k}']:.{digits}g}")
                                   for k in ("opt", "mean", "zero", "resample")] + [r["chosen"]]
            rows.append("| " + " | ".join(cells) + " |")
        return "\n".join([head] + rows)

    # -------------------------------------------------------------- pyvene objects
    def intervenable(self, site: str | Site | int, model: torch.nn.Module | None = None) -> pv.IntervenableModel:
        """A ready ``pyvene.IntervenableModel`` ablating one record's sites with the fitted ``a*``.

        Run it with :func:`run_ablated`; ``im.save(dir)`` / ``pyvene.IntervenableModel.load(dir, model)``
        round-trip.
        """
        m = model if model is not None else self.model
        if m is None:
            raise PlotError("this result is not attached to a model; pass model=")
        rec = self.record(site)
        i = self.records.index(rec)
        target = _build_targets(m, [self.sites[i]], self.bases)[0]
        vals = [torch.as_tensor(v) for v in self.constants[rec["site"]]]
        reps = [u.representation(u.intervention(v)) for u, v in zip(target.units, vals)]
        im = pv.IntervenableModel(reps, m, use_fast=False)
        im.set_device(model_device(m))
        im.disable_model_gradients()
        return im

    # -------------------------------------------------------------- io
    def to_dict(self) -> dict:
        return {
            "kind": "OptimalAblationResult",
            "records": self.records,
            "sites": [[s.to_dict() for s in g] for g in self.sites],
            "constants": {k: [np.asarray(v).tolist() for v in vs] for k, vs in self.constants.items()},
            "config": self.config,
            "runtime_s": self.runtime_s,
            "evaluated_on": self.evaluated_on,
            "bases": {k: np.asarray(v).tolist() for k, v in self.bases.items()},
            "eval_index": self.eval_index,
            "versions": package_versions(),
        }

    def to_json(self, path: str | Path) -> Path:
        """Write the result as JSON (atomically)."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, d: Mapping, model: torch.nn.Module | None = None) -> OptimalAblationResult:
        if d.get("kind", "OptimalAblationResult") != "OptimalAblationResult":
            raise PlotError(f"not an OptimalAblationResult payload (kind={d.get('kind')!r})")
        return cls(
            records=[dict(r) for r in d["records"]],
            sites=[[Site.from_dict(s) for s in g] for g in d["sites"]],
            constants={k: [np.asarray(v, dtype=np.float32) for v in vs] for k, vs in d["constants"].items()},
            config=dict(d.get("config", {})),
            runtime_s=float(d["runtime_s"]),
            evaluated_on=str(d.get("evaluated_on", "")),
            bases={k: np.asarray(v, dtype=np.float32) for k, v in d.get("bases", {}).items()},
            eval_index=d.get("eval_index"),
            model=model,
        )

    @classmethod
    def from_json(cls, path: str | Path, model: torch.nn.Module | None = None) -> OptimalAblationResult:
        """Read a result written by :meth:`to_json`."""
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh), model=model)

    # -------------------------------------------------------------- plot
    def plot(self, path: str | Path | None = None, ax: Any = None, log: bool = False, max_sites: int = 80) -> Any:
        """Grouped bar chart of Δ_opt, Δ_mean, Δ_zero and Δ_resample per site; writes a PNG if ``path``.

        Parameters
        ----------
        path : str or Path, optional
            Output PNG (written atomically; matplotlib's Agg backend).
        ax : matplotlib Axes, optional
        log : bool
            Symmetric-log y axis (gaps span orders of magnitude).
        max_sites : int
            Records beyond this are left out of the picture (the JSON keeps everything).
        """
        import io

        import matplotlib

        if ax is None and path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        recs = self.records[:max_sites]
        kinds = [k for k in ("opt", "mean", "zero", "resample") if any(r[f"delta_{k}"] is not None for r in recs)]
        colors = {"opt": "#1b9e77", "mean": "#7570b3", "zero": "#d95f02", "resample": "#e7298a"}
        own = ax is None
        if own:
            fig, ax = plt.subplots(figsize=(min(3.0 + 0.45 * len(recs) * len(kinds) / 2, 40.0), 3.8))
        else:
            fig = ax.figure
        x = np.arange(len(recs))
        w = 0.8 / max(1, len(kinds))
        for i, k in enumerate(kinds):
            vals = [np.nan if r[f"delta_{k}"] is None else r[f"delta_{k}"] for r in recs]
            ax.bar(x + (i - (len(kinds) - 1) / 2) * w, vals, w, label=f"Δ_{k}", color=colors[k])
        ax.set_xticks(x, [r["site"] for r in recs], rotation=90 if len(recs) > 6 else 0, fontsize=7)
        unit = {"kl": "KL (nats)", "ce": "Δ cross-entropy (nats)", "mse": "Δ squared error"}.get(
            self.config.get("loss", "kl"), "Δ loss")
        ax.set_ylabel(unit)
        if log:
            ax.set_yscale("symlog", linthresh=1e-3)
        ax.axhline(0.0, color="black", lw=0.5)
        ax.legend(fontsize=8, ncol=len(kinds))
        ax.set_title("ablation loss gaps per site (OA = optimal constant)", fontsize=9)
        fig.tight_layout()
        if path is not None:
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=110)
            atomic_write_bytes(path, buf.getvalue())
        if own and path is not None:
            plt.close(fig)
        return ax


# ============================================================================ necessity check
@dataclasses.dataclass
class NecessityResult:
    """What :func:`necessity_check` returns.

    Attributes
    ----------
    records : list of dict
        One per variable: ``variable``, ``sites`` (label of the handle's ablated sites),
        neural: ``delta_opt`` / ``delta_mean`` (CE gaps, nats), ``flip_opt`` / ``flip_mean``
        (fraction of predictions changed); causal (when a causal model was given):
        ``causal_delta_opt`` (nats; optimal *soft* value of V, see :func:`necessity_check`),
        ``causal_weights`` (that mixture over V's values), ``causal_flip_opt`` (best single value,
        0-1 loss), ``causal_value``, ``causal_flip_by_value``, and the gaps ``gap`` =
        ``delta_opt − causal_delta_opt`` and ``gap_flip`` = ``flip_opt − causal_flip_opt``, with a
        one-line ``reading``.
    ablation : OptimalAblationResult
        The underlying optimal-ablation run (constants, training record).
    tolerance : float
        ``|gap|`` below this reads as consistent.
    """

    records: list[dict]
    ablation: OptimalAblationResult
    tolerance: float = 0.05

    def __repr__(self) -> str:
        parts = [f"{r['variable']}: Δ_opt={r['delta_opt']:.3g}" + (
            f", causal={r['causal_delta_opt']:.3g}, gap={r['gap']:+.3g}" if r.get("causal_delta_opt") is not None
            else "") for r in self.records]
        return "NecessityResult(" + "; ".join(parts) + ")"

    def table(self, digits: int = 3) -> str:
        head = ("| variable | sites | Δ_opt neural | Δ_opt causal | gap | flips neural | flips causal | reading |\n"
                "|---|---|---|---|---|---|---|---|")
        rows = []
        for r in self.records:
            def f(x):
                return "–" if x is None else f"{x:.{digits}g}"
            rows.append(f"| {r['variable']} | {r['sites']} | {f(r['delta_opt'])} | {f(r.get('causal_delta_opt'))} | "
                        f"{f(r.get('gap'))} | {f(r['flip_opt'])} | {f(r.get('causal_flip_opt'))} | "
                        f"{r.get('reading', '')} |")
        return "\n".join([head] + rows)

    def to_dict(self) -> dict:
        return {"kind": "NecessityResult", "records": self.records, "tolerance": self.tolerance,
                "ablation": self.ablation.to_dict()}

    def to_json(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, d: Mapping, model: torch.nn.Module | None = None) -> NecessityResult:
        return cls(records=[dict(r) for r in d["records"]],
                   ablation=OptimalAblationResult.from_dict(d["ablation"], model=model),
                   tolerance=float(d.get("tolerance", 0.05)))

    @classmethod
    def from_json(cls, path: str | Path, model: torch.nn.Module | None = None) -> NecessityResult:
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh), model=model)


def _soft_value_ce(match: np.ndarray, iters: int = 2000, tol: float = 1e-12) -> tuple[float, np.ndarray]:
    """min over q in the simplex of mean_x −log Σ_v q_v match[x, v]  (EM; concave log-likelihood).

    ``match[x, v]`` = 1 if setting V ← v reproduces the causal output on x. Returns (value, q).
    """
    m = match.shape[1]
    q = np.full(m, 1.0 / m)
    prev = np.inf
    for _ in range(iters):
        mix = match @ q
        val = float(-np.mean(np.log(np.maximum(mix, 1e-300))))
        if prev - val < tol:
            break
        prev = val
        q = q * (match / np.maximum(mix, 1e-300)[:, None]).mean(0)
        q = q / q.sum()
    mix = match @ q
    return float(-np.mean(np.log(np.maximum(mix, 1e-300)))), q


def _reading(gap: float, tol: float) -> str:
    if abs(gap) <= tol:
        return "consistent: ablating the sites removes about as much as removing V in the causal model"
    if gap < 0:
        return "incomplete: removing these sites hurts less than removing V (V also flows through other routes)"
    return "excess: removing these sites hurts more than removing V (they carry more than V, or a* is off-manifold)"


def necessity_check(
    model: torch.nn.Module,
    handles: Mapping[str, Any] | Sequence[Any],
    bank: PairBank,
    causal_model: Any = None,
    *,
    settings: Sequence[Mapping] | None = None,
    output_var: str | None = None,
    readout: Readout | None = None,
    tolerance: float = 0.05,
    config: OptimalAblationConfig | None = None,
    progress: bool = False,
    **overrides: Any,
) -> NecessityResult:
    """OA necessity check of localised variables: Δ_opt of the handle's sites vs. the causal model's.

    For every handle (variable ``V`` at sites ``R``) the union of its sites is optimally ablated
    (one learned constant per hook, trained jointly) and the task cross-entropy gap is measured::

        Δ_opt^neural(R) = min_a E_x CE(M_{R←a}(x), O(x)) − E_x CE(M(x), O(x))

    where ``O(x)`` is the causal model's output (the bank's ``base_labels``). In the causal model
    ``V`` has a finite domain, so its optimal ablation is found exactly by enumeration. A learned
    constant can *hedge* (put the network between two values of V), so the matching causal
    quantity lets V take a soft value, a mixture ``q`` over its values::

        Δ_opt^causal(V) = min_q E_x −log Σ_v q_v 1[O(x; V←v) = O(x)]

    (a concave maximum-likelihood problem, solved exactly by EM; ``causal_weights`` is ``q``). The
    0-1 versions are reported too: ``flip_opt`` (predictions changed by the neural ablation) and
    ``causal_flip_opt = min_v P[O(x; V←v) ≠ O(x)]``. Reading the gap ``Δ^neural − Δ^causal``
    (other-seeds b.4): about 0: consistent with ``R`` carrying exactly V's causal role; strongly
    negative: V also flows through other routes (incomplete localisation); strongly positive:
    ``R`` carries more than V, or the constant is off-manifold. This is a deletion-style test that
    complements IIA (sufficiency) and needs no counterfactual pairs.

    Parameters
    ----------
    model : torch.nn.Module
    handles : dict of str to Handle, or list of Handle
        PLOT handles (their sites, and bases for span sites, are used; weights and strength are not:
        the ablation removes the whole support).
    bank : PairBank
        Examples (base inputs and ``base_labels``); split into training / held-out evaluation
        parts as in :func:`optimal_ablation` (``holdout``). The causal quantities are computed on
        the same evaluation examples.
    causal_model : pyvene CausalModel, optional
        When given, the causal columns are filled in. Needs the abstract input settings of the
        bank's bases (``settings=``, or ``bank.settings`` as attached by
        :meth:`PairBank.from_causal_model` and the built-in tasks).
    settings : list of dict, optional
        Input settings (dicts of input-variable values) of ``bank.base``, row by row.
    output_var : str, optional
        The causal model's output variable (default ``bank.meta["output_var"]`` or the single output).
    tolerance : float
        ``|gap|`` (nats) below which the reading is "consistent".
    config, overrides
        :class:`OptimalAblationConfig` settings; defaults here: ``loss="ce"``, ``restarts=8``,
        ``baselines=("mean",)``.
    """
    if not isinstance(bank, PairBank):
        raise BankError("necessity_check needs a PairBank (its base_labels are the causal outputs)")
    items = list(handles.items()) if isinstance(handles, Mapping) else [(getattr(h, "variable", f"h{i}"), h)
                                                                        for i, h in enumerate(handles)]
    if not items:
        raise PlotError("necessity_check needs at least one handle")
    if "eval_bank" in overrides:
        raise PlotError("necessity_check evaluates on a held-out part of bank (holdout=); it takes no eval_bank")
    overrides.setdefault("loss", "ce")
    overrides.setdefault("baselines", ("mean",))
    overrides.setdefault("restarts", 8)  # few targets: many on-distribution restarts are cheap
    groups, bases = [], {}
    for v, h in items:
        sites = list(getattr(h, "sites", []) or [])
        if not sites:
            raise PlotError(f"handle for {v!r} has no sites")
        groups.append(sites)
        for k, b in (getattr(h, "bases", None) or {}).items():
            bases[k] = b
    if readout is None:
        readout = getattr(items[0][1], "readout", None) or getattr(bank, "readout", None)
    abl = optimal_ablation(model, groups, bank, readout=readout, bases=bases, config=config, progress=progress,
                           **overrides)
    causal = None
    if causal_model is not None:
        causal = _causal_ablation(causal_model, bank, [v for v, _ in items], settings, output_var,
                                  abl.eval_index)
    records = []
    for (v, _h), rec in zip(items, abl.records):
        r = {
            "variable": v,
            "sites": rec["site"],
            "loss": rec["loss"],
            "delta_opt": rec["delta_opt"],
            "delta_mean": rec["delta_mean"],
            "flip_opt": rec["flip_opt"],
            "flip_mean": rec["flip_mean"],
            "n_eval": rec["n_eval"],
        }
        if causal is not None:
            c = causal[v]
            r.update(c)
            if rec["loss"] == "ce":
                r["gap"] = r["delta_opt"] - c["causal_delta_opt"]
                r["reading"] = _reading(r["gap"], tolerance)
            else:
                r["gap"] = None
                r["reading"] = "gap in nats needs loss='ce' (the causal model's outputs are labels)"
            r["gap_flip"] = r["flip_opt"] - c["causal_flip_opt"]
        records.append(r)
    return NecessityResult(records=records, ablation=abl, tolerance=float(tolerance))


def _causal_ablation(cm: Any, bank: PairBank, variables: Sequence[str], settings, output_var, eval_index) -> dict:
    """Exact optimal ablation of each variable in the causal model, on the evaluation rows."""
    if settings is None:
        st = getattr(bank, "settings", None)
        settings = st[0] if isinstance(st, tuple) else st
    if settings is None:
        raise BankError(
            f"bank {bank.name!r} carries no abstract input settings; pass settings=[{{input: value}}, ...] (one "
            "dict per base row) to compute the causal model's optimal ablation"
        )
    settings = list(settings)
    if len(settings) != len(bank):
        raise BankError(f"settings has {len(settings)} rows but bank {bank.name!r} has {len(bank)}")
    if output_var is None:
        output_var = bank.meta.get("output_var")
    if output_var is None:
        outs = list(getattr(cm, "outputs", []))
        if len(outs) != 1:
            raise PlotError(f"causal model has outputs {outs}; pass output_var=")
        output_var = outs[0]
    out_values = list(cm.values[output_var])
    rows = list(range(len(bank))) if eval_index is None else list(eval_index)
    inputs = list(cm.inputs)
    base_out = []
    for i in rows:
        s = {k: settings[i][k] for k in inputs}
        base_out.append(out_values.index(cm.run_forward(s)[output_var]))
    labels = bank.base_labels[rows].tolist()
    mism = sum(int(a != b) for a, b in zip(base_out, labels))
    if mism:
        raise BankError(
            f"the causal model's outputs on settings= disagree with bank {bank.name!r}'s base_labels on {mism} of "
            f"{len(rows)} rows; settings must list the bank's base inputs in row order"
        )
    out = {}
    for v in variables:
        if v not in cm.variables:
            raise PlotError(f"variable {v!r} is not in the causal model {list(cm.variables)}")
        vals = list(cm.values[v])
        match = np.zeros((len(rows), len(vals)))
        for a, i in enumerate(rows):
            s = {k: settings[i][k] for k in inputs}
            for b, val in enumerate(vals):
                o = cm.run_forward({**s, v: val})[output_var]
                match[a, b] = float(out_values.index(o) == base_out[a])
        flips = 1.0 - match.mean(0)
        best = int(np.argmin(flips))
        ce, q = _soft_value_ce(match)
        out[v] = {
            "causal_delta_opt": ce,
            "causal_weights": {str(val): float(w) for val, w in zip(vals, q)},
            "causal_flip_opt": float(flips[best]),
            "causal_value": str(vals[best]),
            "causal_flip_by_value": {str(val): float(f) for val, f in zip(vals, flips)},
        }
    return out


# ============================================================================ screeners
def _screen_threshold(scores: Sequence[float], threshold: float | None) -> tuple[float, str]:
    finite = [s for s in scores if s is not None and np.isfinite(s)]
    if threshold is not None:
        return float(threshold), f"drop if score <= {float(threshold):g} (given)"
    top = max(finite) if finite else 0.0
    tau = min(SCREEN_ABS_TOL, SCREEN_REL_TOL * top)
    return float(tau), (f"drop if score <= min({SCREEN_ABS_TOL:g}, {SCREEN_REL_TOL:g} x max score "
                        f"{top:.4g}) = {tau:.4g}")


def screen_mean(
    model: torch.nn.Module,
    sites: Sequence[Site],
    bank: PairBank,
    *,
    variables: Sequence[str] | None = None,
    threshold: float | None = None,
    readout: Readout | None = None,
    bases: Mapping[str, Any] | None = None,
    seed: int = 0,
    **options: Any,
):
    """Screen sites by their mean-ablation gap Δ_mean (no training: one evaluation pass).

    Δ_mean is an upper bound of Δ_opt, so a site dropped here would also be dropped by OA; but
    Δ_mean can be large for sites that do not matter (spoofing: the mean is off-distribution), so
    this screener keeps more than :func:`screen_oa`. Returns a
    :class:`~pyvene_plot.progressive.ScreenResult`.
    """

    opts = {"steps": 0, "baselines": ("mean",), "seed": seed, **options}
    res = optimal_ablation(model, list(sites), bank, readout=readout, bases=bases, progress=False, **opts)
    scores = [float(r["delta_mean"]) for r in res.records]
    tau, rule = _screen_threshold(scores, threshold)
    keep = [s > tau for s in scores]
    return ScreenResult(scores=scores, keep=keep, threshold=tau, rule=rule,
                        info={"score": "delta_mean", "loss": res.config["loss"], "evaluated_on": res.evaluated_on,
                              "runtime_s": res.runtime_s})


def screen_oa(
    model: torch.nn.Module,
    sites: Sequence[Site],
    bank: PairBank,
    *,
    variables: Sequence[str] | None = None,
    threshold: float | None = None,
    readout: Readout | None = None,
    bases: Mapping[str, Any] | None = None,
    seed: int = 0,
    **options: Any,
):
    """Screen sites by their optimal-ablation gap Δ_opt, fitting OA only where it can matter.

    1. Δ_mean of every site (one evaluation pass, no training).
    2. Sites with Δ_mean <= the absolute tolerance (``threshold`` if given, else
       ``SCREEN_ABS_TOL``) cannot pass the threshold (Δ_opt <= Δ_mean): dropped without fitting.
    3. OA is fitted on the shortlist; the threshold is ``min(SCREEN_ABS_TOL, SCREEN_REL_TOL x
       max Δ_opt)`` unless given. Pre-screened sites whose Δ_mean exceeds that final threshold
       are fitted too (a second round), so the decision equals fitting OA everywhere.

    A site is dropped iff its score is <= the threshold. Scores are Δ_opt for fitted sites and
    Δ_mean (an upper bound) for pre-screened ones. Returns a
    :class:`~pyvene_plot.progressive.ScreenResult`.
    """

    sites = list(sites)
    base_opts = {"seed": seed, **options}
    pre = optimal_ablation(model, sites, bank, readout=readout, bases=bases, progress=False,
                           **{**base_opts, "steps": 0, "baselines": ("mean",)})
    dmean = [float(r["delta_mean"]) for r in pre.records]
    abs_tol = float(threshold) if threshold is not None else SCREEN_ABS_TOL
    scores = list(dmean)
    fitted = [False] * len(sites)
    n_fits = 0

    def fit(idx: list[int]) -> None:
        nonlocal n_fits
        if not idx:
            return
        res = optimal_ablation(model, [sites[i] for i in idx], bank, readout=readout, bases=bases, progress=False,
                               **{**base_opts, "baselines": ()})
        n_fits += len(idx)
        for i, r in zip(idx, res.records):
            scores[i] = float(r["delta_opt"])
            fitted[i] = True

    fit([i for i, s in enumerate(dmean) if s > abs_tol])
    tau, rule = _screen_threshold([s for s, f in zip(scores, fitted) if f] or scores, threshold)
    fit([i for i, s in enumerate(dmean) if not fitted[i] and s > tau])
    tau, rule = _screen_threshold([s for s, f in zip(scores, fitted) if f] or scores, threshold)
    keep = [s > tau for s in scores]
    return ScreenResult(scores=scores, keep=keep, threshold=tau, rule=rule,
                        info={"score": "delta_opt (delta_mean where not fitted)", "loss": pre.config["loss"],
                              "n_prescreened": len(sites) - n_fits, "n_fitted": n_fits,
                              "evaluated_on": pre.evaluated_on})


register_screener("oa", screen_oa, overwrite=True)
register_screener("mean", screen_mean, overwrite=True)
