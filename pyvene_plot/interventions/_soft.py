"""PLOT intervention types for pyvene.

Both classes are ordinary pyvene interventions: use them as ``intervention_types`` or as
``intervention`` instances in an :class:`pyvene.IntervenableConfig`. They subclass
:class:`pyvene.TrainableIntervention`, keep every hyper-parameter in buffers (or in the
``low_rank_dimension`` field of the ``RepresentationConfig``), and therefore survive
``IntervenableModel.save`` / ``IntervenableModel.load`` in a fresh process with identical outputs.

``SoftInterchangeIntervention`` (native coordinates)::

    h  <-  h + strength * weight ⊙ (h_src - h)            weight: (d,)

``SoftSpanInterchangeIntervention`` (inside the span of the rows of a basis ``V``, shape (r, d)
with orthonormal rows, e.g. PCA components)::

    z = (h_src - h) @ V.T                                  # (r,) coordinates of the difference
    h  <-  h + (strength * weight ⊙ z) @ V                 weight: (r,)

Only the span moves; the orthogonal complement of ``span(V)`` is untouched. With
``strength = 1`` and ``weight = 1`` the first is pyvene's vanilla interchange.

``ObliqueSpanInterchangeIntervention`` (features of a non-orthogonal basis, e.g. LIB: decoder rows
``R`` and encoder rows ``E``, both (r, d), with ``E @ R.T = I``)::

    z = (h_src - h) @ E.T                                  # (r,) feature differences
    h  <-  h + (strength * weight ⊙ z) @ R                 # an oblique projection

It changes the chosen features to the source's and leaves every other feature of the basis
unchanged; with ``E = R`` orthonormal it equals ``SoftSpanInterchangeIntervention``.

Per-call overrides (used by pyvene_plot's batched sweeps): pass, as this intervention's
``subspaces`` entry, a float Tensor of shape ``(B, d)`` (or ``(B, r)``) holding per-row effective
coefficients ``strength * weight``; or the usual pyvene list of per-row coordinate lists, which
restricts the intervention to those coordinates.
"""

from __future__ import annotations

from typing import Any

import pyvene as pv
import torch

from .._constants import ORTHO_ATOL
from ..errors import PlotError


def _coefficients(
    default: torch.Tensor, subspaces: Any, batch: int, width: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Per-row coefficients, shape (B, width) or (width,)."""
    coef = default.to(device=device, dtype=dtype)
    if subspaces is None:
        return coef
    if isinstance(subspaces, torch.Tensor):
        if subspaces.dim() != 2 or subspaces.shape[-1] != width or subspaces.shape[0] not in (1, batch):
            raise PlotError(
                f"per-row coefficients must have shape (B={batch}, {width}), got {tuple(subspaces.shape)}"
            )
        return subspaces.to(device=device, dtype=dtype)
    # pyvene convention: per-row lists of coordinates to keep
    mask = torch.zeros(batch, width, device=device, dtype=dtype)
    rows = list(subspaces)
    if len(rows) != batch:
        raise PlotError(f"subspaces has {len(rows)} rows but the batch has {batch}")
    for i, idx in enumerate(rows):
        if idx is not None and len(idx) > 0:
            mask[i, torch.as_tensor(list(idx), device=device, dtype=torch.long)] = 1
    return mask * coef


_NO_POSITION = -(2**31)


def set_intervention_position(iv: torch.nn.Module, position: int | None) -> None:
    """Store the site's token position as a buffer so a saved handle knows where it acts."""
    iv.register_buffer("position", torch.tensor(_NO_POSITION if position is None else int(position), dtype=torch.long))


def intervention_position(iv: torch.nn.Module) -> int | None:
    """The token position stored on a PLOT intervention (None when unset)."""
    p = getattr(iv, "position", None)
    if p is None:
        return None
    p = int(p)
    return None if p == _NO_POSITION else p


def _broadcast_rows(coef: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Make a (B, w) coefficient broadcast against base of shape (B, ..., w)."""
    if coef.dim() == 2:
        while coef.dim() < base.dim():
            coef = coef.unsqueeze(-2)
    return coef


class SoftInterchangeIntervention(pv.TrainableIntervention, pv.LocalistRepresentationIntervention):
    """Soft interchange on native coordinates: ``h + strength * weight ⊙ (h_src - h)``.

    Parameters
    ----------
    embed_dim : int
        Width ``d`` of the hooked component (filled in by pyvene from the model card).
    weight : Tensor, shape (d,), optional
        Per-coordinate weights ``w``; default all ones.
    strength : float, default 1.0
        The scalar ``λ``.
    position : int, optional
        Token position of the site (stored so that saved handles know where they act; see
        :func:`pyvene_plot.run_intervenable`).

    Notes
    -----
    ``weight`` and ``strength`` are buffers, so they are saved in pyvene's ``intkey_*.bin`` files
    and restored by ``IntervenableModel.load``.
    """

    def __init__(self, **kwargs: Any) -> None:
        weight = kwargs.pop("weight", None)
        strength = kwargs.pop("strength", 1.0)
        position = kwargs.pop("position", None)
        super().__init__(**kwargs)
        set_intervention_position(self, position)
        if self.embed_dim is None:
            if weight is None:
                raise PlotError(
                    "SoftInterchangeIntervention needs embed_dim (from a registered model card) or an "
                    "explicit weight= vector"
                )
            d = int(torch.as_tensor(weight).numel())
            self.register_buffer("embed_dim", torch.tensor(d))
            self.register_buffer("interchange_dim", torch.tensor(d))
        d = int(self.embed_dim)
        w = torch.ones(d) if weight is None else torch.as_tensor(weight, dtype=torch.float32).flatten().clone()
        if w.numel() != d:
            raise PlotError(f"weight has {w.numel()} entries but the component has width {d}")
        self.register_buffer("weight", w.float())
        self.register_buffer("strength", torch.tensor(float(strength)))

    def forward(self, base: torch.Tensor, source: torch.Tensor, subspaces: Any = None, **kwargs: Any) -> torch.Tensor:
        d = base.shape[-1]
        coef = _coefficients(self.strength * self.weight, subspaces, base.shape[0], d, base.device, base.dtype)
        coef = _broadcast_rows(coef, base)
        # lerp is exact at coef = 1 (returns the source), so λ = 1, w = 1 equals a vanilla interchange bit for bit
        return torch.lerp(base, source.to(base.dtype), coef.expand_as(base))

    def __str__(self) -> str:
        return f"SoftInterchangeIntervention(strength={float(self.strength):g}, nonzero={int((self.weight != 0).sum())})"


class SoftSpanInterchangeIntervention(pv.TrainableIntervention, pv.DistributedRepresentationIntervention):
    """Soft interchange inside the span of the rows of a basis ``V`` (r, d).

    Parameters
    ----------
    embed_dim : int
        Width ``d`` of the hooked component.
    low_rank_dimension : int
        Rank ``r`` of the basis (a ``RepresentationConfig`` field, so it survives ``load``).
    basis : Tensor, shape (r, d), optional
        Orthonormal rows; default the first ``r`` standard basis vectors.
    weight : Tensor, shape (r,), optional
        Per-component weights; default all ones.
    strength : float, default 1.0
        The scalar ``λ``.
    """

    def __init__(self, **kwargs: Any) -> None:
        basis = kwargs.pop("basis", None)
        weight = kwargs.pop("weight", None)
        strength = kwargs.pop("strength", 1.0)
        position = kwargs.pop("position", None)
        super().__init__(**kwargs)
        set_intervention_position(self, position)
        self.keep_last_dim = True  # the basis acts on the last dimension; never flatten positions
        if basis is not None:
            basis = torch.as_tensor(basis, dtype=torch.float32)
        if self.embed_dim is None:
            if basis is None:
                raise PlotError("SoftSpanInterchangeIntervention needs embed_dim or an explicit basis=")
            self.register_buffer("embed_dim", torch.tensor(int(basis.shape[1])))
            self.register_buffer("interchange_dim", torch.tensor(int(basis.shape[1])))
        d = int(self.embed_dim)
        r = kwargs.get("low_rank_dimension")
        if r is None:
            r = int(basis.shape[0]) if basis is not None else d
        r = int(r)
        if basis is None:
            basis = torch.eye(d)[:r]
        self.register_buffer("basis", torch.zeros(r, d))
        self.set_basis(basis)
        w = torch.ones(r) if weight is None else torch.as_tensor(weight, dtype=torch.float32).flatten().clone()
        if w.numel() != r:
            raise PlotError(f"weight has {w.numel()} entries but the basis has rank {r}")
        self.register_buffer("weight", w.float())
        self.register_buffer("strength", torch.tensor(float(strength)))

    def set_basis(self, basis: torch.Tensor, atol: float = ORTHO_ATOL) -> None:
        """Replace the basis (rows must be orthonormal)."""
        basis = torch.as_tensor(basis, dtype=torch.float32)
        if basis.shape != self.basis.shape:
            raise PlotError(f"basis has shape {tuple(basis.shape)}, expected {tuple(self.basis.shape)}")
        gram = basis @ basis.T
        if not torch.allclose(gram, torch.eye(basis.shape[0]), atol=atol):
            raise PlotError("basis rows must be orthonormal (V @ V.T == I); orthonormalise it (e.g. QR) first")
        self.basis.copy_(basis.to(self.basis.device))

    @property
    def rank(self) -> int:
        return int(self.basis.shape[0])

    def forward(self, base: torch.Tensor, source: torch.Tensor, subspaces: Any = None, **kwargs: Any) -> torch.Tensor:
        V = self.basis.to(device=base.device, dtype=base.dtype)
        coef = _coefficients(self.strength * self.weight, subspaces, base.shape[0], V.shape[0], base.device, base.dtype)
        coef = _broadcast_rows(coef, base)
        z = (source.to(base.dtype) - base) @ V.T
        return base + (coef * z) @ V

    def __str__(self) -> str:
        return f"SoftSpanInterchangeIntervention(rank={self.rank}, strength={float(self.strength):g})"


class ObliqueSpanInterchangeIntervention(pv.TrainableIntervention, pv.DistributedRepresentationIntervention):
    """Soft interchange of the features of a non-orthogonal basis (an oblique projection).

    With decoder rows ``R`` (r, d) (e.g. LIB's ``C⁺``) and encoder rows ``E`` (r, d) (LIB's ``Cᵀ``),
    features are ``z = h @ E.T`` and the intervention is::

        h  <-  h + (strength * weight ⊙ ((h_src - h) @ E.T)) @ R

    With ``strength = weight = 1`` the features ``E`` of the result equal the source's and, because
    ``E @ R.T = I``, every other feature of a complete biorthogonal basis is the base's. Build it with
    :meth:`pyvene_plot.methods.bases.Basis.intervention`.

    Parameters
    ----------
    embed_dim : int
        Width ``d`` of the hooked component.
    low_rank_dimension : int
        Number ``r`` of features (a ``RepresentationConfig`` field, so it survives ``load``).
    basis : Tensor, shape (r, d), optional
        Decoder rows ``R``; default the first ``r`` standard basis vectors.
    encoder : Tensor, shape (r, d), optional
        Encoder rows ``E``; default ``basis`` (then it must be orthonormal).
    weight : Tensor, shape (r,), optional
        Per-feature weights; default all ones.
    strength : float, default 1.0
    position : int, optional
        Token position of the site (stored as a buffer).

    Notes
    -----
    ``basis``, ``encoder``, ``weight`` and ``strength`` are buffers: ``IntervenableModel.save`` /
    ``load`` restore them. Per-row coefficients can be passed through ``subspaces`` as for the other
    PLOT interventions.
    """

    def __init__(self, **kwargs: Any) -> None:
        basis = kwargs.pop("basis", None)
        encoder = kwargs.pop("encoder", None)
        weight = kwargs.pop("weight", None)
        strength = kwargs.pop("strength", 1.0)
        position = kwargs.pop("position", None)
        super().__init__(**kwargs)
        set_intervention_position(self, position)
        self.keep_last_dim = True
        if basis is not None:
            basis = torch.as_tensor(basis, dtype=torch.float32)
        if self.embed_dim is None:
            if basis is None:
                raise PlotError("ObliqueSpanInterchangeIntervention needs embed_dim or an explicit basis=")
            self.register_buffer("embed_dim", torch.tensor(int(basis.shape[1])))
            self.register_buffer("interchange_dim", torch.tensor(int(basis.shape[1])))
        d = int(self.embed_dim)
        r = kwargs.get("low_rank_dimension")
        r = int(r) if r is not None else (int(basis.shape[0]) if basis is not None else d)
        if basis is None:
            basis = torch.eye(d)[:r]
        encoder = basis if encoder is None else torch.as_tensor(encoder, dtype=torch.float32)
        self.register_buffer("basis", torch.zeros(r, d))
        self.register_buffer("encoder", torch.zeros(r, d))
        self.set_basis(basis, encoder)
        w = torch.ones(r) if weight is None else torch.as_tensor(weight, dtype=torch.float32).flatten().clone()
        if w.numel() != r:
            raise PlotError(f"weight has {w.numel()} entries but the basis has {r} features")
        self.register_buffer("weight", w.float())
        self.register_buffer("strength", torch.tensor(float(strength)))

    def set_basis(self, basis: torch.Tensor, encoder: torch.Tensor, atol: float = 1e-3) -> None:
        """Replace decoder and encoder rows; they must be biorthogonal (``encoder @ basis.T == I``)."""
        basis = torch.as_tensor(basis, dtype=torch.float32)
        encoder = torch.as_tensor(encoder, dtype=torch.float32)
        if basis.shape != self.basis.shape or encoder.shape != self.basis.shape:
            raise PlotError(
                f"basis and encoder must both have shape {tuple(self.basis.shape)}, got "
                f"{tuple(basis.shape)} and {tuple(encoder.shape)}"
            )
        cross = encoder.double() @ basis.double().T
        if not torch.allclose(cross, torch.eye(basis.shape[0], dtype=torch.float64), atol=atol):
            raise PlotError(
                "encoder and basis rows must be biorthogonal (encoder @ basis.T == I); build them with "
                "pyvene_plot.methods.bases (Basis.intervention) or pass an orthonormal basis without encoder"
            )
        self.basis.copy_(basis.to(self.basis.device))
        self.encoder.copy_(encoder.to(self.encoder.device))

    @property
    def rank(self) -> int:
        return int(self.basis.shape[0])

    def forward(self, base: torch.Tensor, source: torch.Tensor, subspaces: Any = None, **kwargs: Any) -> torch.Tensor:
        R = self.basis.to(device=base.device, dtype=base.dtype)
        E = self.encoder.to(device=base.device, dtype=base.dtype)
        coef = _coefficients(self.strength * self.weight, subspaces, base.shape[0], R.shape[0], base.device, base.dtype)
        coef = _broadcast_rows(coef, base)
        z = (source.to(base.dtype) - base) @ E.T
        return base + (coef * z) @ R

    def __str__(self) -> str:
        return f"ObliqueSpanInterchangeIntervention(rank={self.rank}, strength={float(self.strength):g})"
