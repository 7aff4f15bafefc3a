"""The DAS rotation interventions: :class:`LowRankDASIntervention` (whole vector) and
:class:`SupportRotatedSpaceIntervention` (a support of coordinates or basis rows).

Both carry the site's token position as a buffer. :mod:`pyvene_plot.interventions` reports itself
as their module, so pyvene configs name ``pyvene_plot.interventions.<Class>``; configs saved before
the restructure name ``pyvene_plot.das.<Class>``, which :mod:`pyvene_plot.das` still re-exports.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyvene as pv
import torch
from pyvene.models.layers import LowRankRotateLayer

from .._constants import ORTHO_ATOL
from ..errors import PlotError
from ._soft import set_intervention_position

logger = logging.getLogger(__name__)


# =============================================================================== interventions
class LowRankDASIntervention(pv.LowRankRotatedSpaceIntervention):
    """pyvene's ``LowRankRotatedSpaceIntervention`` plus the site's token position as a buffer.

    The maths is pyvene's, unchanged (``W`` (d, k), householder-parametrised orthonormal columns,
    ``h + ((h_src - h) W) Wᵀ``). The only addition is the ``position`` buffer that
    :func:`pyvene_plot.unit_locations_for` reads; a plain pyvene instance carrying an extra buffer
    would not reload (``load_state_dict`` rejects the unexpected key), so the buffer needs a class
    that declares it. ``keep_last_dim=True``: the rotation always acts on the last dimension.
    """

    def __init__(self, **kwargs: Any) -> None:
        position = kwargs.pop("position", None)
        if kwargs.get("low_rank_dimension") is None:
            raise PlotError("LowRankDASIntervention needs low_rank_dimension (the subspace size k)")
        if kwargs.get("embed_dim") is None:
            raise PlotError("LowRankDASIntervention needs embed_dim (the width of the hooked component)")
        super().__init__(**kwargs)
        set_intervention_position(self, position)
        self.keep_last_dim = True

    def __str__(self) -> str:
        return f"LowRankDASIntervention(d={int(self.embed_dim)}, k={int(self.rotate_layer.weight.shape[1])})"


class SupportRotatedSpaceIntervention(pv.TrainableIntervention, pv.DistributedRepresentationIntervention):
    """Rotated-subspace interchange restricted to a support ``span(P)``.

    Parameters (keyword arguments, as pyvene passes them)
    ----------------------------------------------------
    embed_dim : int
        Width ``d`` of the hooked component (from the model card, or from ``support``).
    latent_dim : int
        Support width ``m`` (a ``RepresentationConfig`` field, so it survives ``load``).
    low_rank_dimension : int
        Subspace size ``k <= m`` (a ``RepresentationConfig`` field).
    support : Tensor (m, d), optional
        Orthonormal rows spanning the support: rows of the identity for native coordinates, or
        basis rows (e.g. PCA components). Stored as the buffer ``support``; on ``load`` it comes
        back from the saved state dict.
    position : int, optional
        Token position of the site (buffer ``position``).

    Notes
    -----
    ``W`` (m, k) is ``torch.nn.utils.parametrizations.orthogonal`` over pyvene's
    ``LowRankRotateLayer`` (householder for k < m, matrix exponential for k = m). The forward is
    ``h + ((h_src - h) Q) Qᵀ`` with ``Q = Pᵀ W``: only ``span(Q) ⊆ span(P)`` moves. ``subspaces``
    may be a per-row list of rotated-coordinate indices (0..k-1) to restrict the swap.
    """

    def __init__(self, **kwargs: Any) -> None:
        support = kwargs.pop("support", None)
        position = kwargs.pop("position", None)
        super().__init__(**kwargs)
        set_intervention_position(self, position)
        self.keep_last_dim = True
        if support is not None:
            support = torch.as_tensor(np.asarray(support) if not isinstance(support, torch.Tensor) else support,
                                      dtype=torch.float32)
            if support.dim() != 2 or support.shape[0] < 1:
                raise PlotError(f"support must be an (m, d) matrix with m >= 1, got shape {tuple(support.shape)}")
        if self.embed_dim is None:
            if support is None:
                raise PlotError("SupportRotatedSpaceIntervention needs embed_dim (model card) or support=")
            self.register_buffer("embed_dim", torch.tensor(int(support.shape[1])))
            self.register_buffer("interchange_dim", torch.tensor(int(support.shape[1])))
        d = int(self.embed_dim)
        m = kwargs.get("latent_dim")
        if m is None:
            if support is None:
                raise PlotError("SupportRotatedSpaceIntervention needs latent_dim (support width) or support=")
            m = int(support.shape[0])
        m = int(m)
        k = kwargs.get("low_rank_dimension")
        k = 1 if k is None else int(k)
        if not 1 <= k <= m:
            raise PlotError(f"subspace size k={k} must lie in [1, support width {m}]")
        self.register_buffer("support", torch.zeros(m, d))
        if support is not None:
            self.set_support(support)
        self.rotate_layer = torch.nn.utils.parametrizations.orthogonal(LowRankRotateLayer(m, k))

    def set_support(self, support: torch.Tensor, atol: float = ORTHO_ATOL) -> None:
        """Replace the support basis (rows must be orthonormal)."""
        support = torch.as_tensor(support, dtype=torch.float32)
        if tuple(support.shape) != tuple(self.support.shape):
            raise PlotError(f"support has shape {tuple(support.shape)}, expected {tuple(self.support.shape)}")
        gram = support.double() @ support.double().T
        if not torch.allclose(gram, torch.eye(support.shape[0], dtype=torch.float64), atol=atol):
            raise PlotError("support rows must be orthonormal (P @ P.T == I); orthonormalise it (e.g. QR) first")
        with torch.no_grad():
            self.support.copy_(support.to(self.support.device))

    @property
    def support_width(self) -> int:
        return int(self.support.shape[0])

    @property
    def k(self) -> int:
        return int(self.rotate_layer.weight.shape[1])

    def directions(self) -> torch.Tensor:
        """``Q = Pᵀ W`` (d, k): the orthonormal directions that are swapped."""
        return self.support.T @ self.rotate_layer.weight

    def forward(self, base: torch.Tensor, source: torch.Tensor, subspaces: Any = None, **kwargs: Any) -> torch.Tensor:
        Q = self.directions().to(device=base.device, dtype=base.dtype)  # (d, k)
        z = (source.to(base.dtype) - base) @ Q  # (..., k)
        if subspaces is not None:
            rows = list(subspaces)
            if len(rows) != base.shape[0]:
                raise PlotError(f"subspaces has {len(rows)} rows but the batch has {base.shape[0]}")
            mask = torch.zeros(base.shape[0], Q.shape[1], device=base.device, dtype=base.dtype)
            for i, idx in enumerate(rows):
                if idx is not None and len(idx) > 0:
                    mask[i, torch.as_tensor(list(idx), device=base.device, dtype=torch.long)] = 1
            while mask.dim() < z.dim():
                mask = mask.unsqueeze(-2)
            z = z * mask
        return base + z @ Q.T

    def __str__(self) -> str:
        return f"SupportRotatedSpaceIntervention(d={int(self.embed_dim)}, m={self.support_width}, k={self.k})"
