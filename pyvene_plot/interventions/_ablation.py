"""The Optimal Ablation intervention: a trainable, sourceless pyvene intervention holding a constant.

:class:`OptimalAblationIntervention` replaces a site's activation (the whole vector, selected
coordinates, or the span of orthonormal rows) by a learned constant ``a``. It is what
:func:`pyvene_plot.optimal_ablation` hands out and what ``IntervenableModel.save`` writes; the
fitting, the evaluation and :func:`pyvene_plot.run_ablated` live in
:mod:`pyvene_plot.methods.ablation`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyvene as pv
import torch

from .._constants import ORTHO_ATOL
from ..errors import PlotError
from ._soft import set_intervention_position

# modes, stored in the ``mode`` buffer (saved configs hold these integers)
_FULL, _COORDS, _SPAN = 0, 1, 2
_MODE_NAMES = {_FULL: "full", _COORDS: "coords", _SPAN: "span"}


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
        Token position of the site (stored as a buffer, read by :func:`~pyvene_plot.run_ablated`).

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
    per ablated row). (:func:`~pyvene_plot.optimal_ablation` trains many sites at once through an internal
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
        """``"full"``, ``"coords"`` or ``"span"``."""
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
        """``base`` (B, ..., d) with the support of the selected rows (all by default) set to the constant."""
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
