"""DAS specs: where Distributed Alignment Search may look, and which subspace sizes it tries.

A :class:`DASSpec` names a site (layer, component, token position) and a support there: the whole
vector, a subset of native coordinates, or the span of rows of an orthonormal basis (e.g. PCA). It
builds the pyvene intervention for a subspace size ``k`` (:meth:`DASSpec.to_representation`,
:meth:`DASSpec.build_intervenable`). :func:`full_das_specs` enumerates the whole-vector specs of
Full DAS; :func:`clip_sizes` fits a size grid to a support width.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyvene as pv
import torch

from .._constants import DEFAULT_SUBSPACE_SIZES, ORTHO_ATOL
from ..data import PairBank, min_real_length
from ..errors import PlotError, SiteError
from ..interventions import LowRankDASIntervention, SupportRotatedSpaceIntervention
from ..models import Site, model_device, model_spec, site_label

#: the subspace-size grid of :func:`full_das_specs` (:data:`pyvene_plot._constants.DEFAULT_SUBSPACE_SIZES`)
DEFAULT_SIZES = DEFAULT_SUBSPACE_SIZES


def clip_sizes(sizes: Sequence[int], width: int) -> tuple[int, ...]:
    """Subspace sizes clipped to ``width``: ``min(k, width)``, de-duplicated, order kept."""
    out: list[int] = []
    for k in sizes:
        k = min(int(k), int(width))
        if k >= 1 and k not in out:
            out.append(k)
    if not out:
        raise PlotError(f"no valid subspace size in {tuple(sizes)} for support width {width}")
    return tuple(out)


def _basis_key(basis: np.ndarray | None) -> str:
    if basis is None:
        return ""
    h = hashlib.sha1(np.ascontiguousarray(basis, dtype=np.float32).tobytes()).hexdigest()[:16]
    return f"{basis.shape[0]}x{basis.shape[1]}:{h}"


@dataclasses.dataclass(frozen=True)
class DASSpec:
    """Where DAS may look, and which subspace sizes to try.

    Parameters
    ----------
    variable : str or None
        The variable this spec is for; ``None`` = every variable (Full DAS specs are shared).
    layer : int
    component : str, default "block_output"
    position : int or None, default -1
        Token position among the real tokens of a row (negative counts from the last real
        token), as in :class:`pyvene_plot.Site`. Models without a sequence axis accept -1, 0 or None.
    dims : tuple of int, optional
        Support in native coordinates (``basis`` None), or rows of ``basis`` (``basis`` set);
        ``None`` = the whole vector (or every basis row). An empty tuple is an error.
    basis : ndarray (r, d), optional
        Orthonormal rows (e.g. PCA components); the support is the span of ``basis[dims]``.
        Excluded from the dataclass comparison itself; a digest of it (``basis_key``) is compared
        and hashed instead, so specs stay hashable.
    subspace_sizes : tuple of int, default (1,)
        The ``low_rank_dimension`` values to train. A size larger than the support width is an
        error (use :func:`clip_sizes`).
    source : str
        Provenance label, e.g. ``"plot:coordinates"`` or ``"full_das"``.
    """

    variable: str | None
    layer: int
    component: str = "block_output"
    position: int | None = -1
    dims: tuple[int, ...] | None = None
    basis: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
    subspace_sizes: tuple[int, ...] = (1,)
    source: str = ""
    basis_key: str = dataclasses.field(init=False, default="", repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, (int, np.integer)):
            raise PlotError(f"DASSpec.layer must be an int, got {self.layer!r}")
        object.__setattr__(self, "layer", int(self.layer))
        if self.position is not None:
            if isinstance(self.position, bool) or not isinstance(self.position, (int, np.integer)):
                raise PlotError(f"DASSpec.position must be an int or None, got {self.position!r}")
            object.__setattr__(self, "position", int(self.position))
        if self.variable is not None and not isinstance(self.variable, str):
            raise PlotError(f"DASSpec.variable must be a str or None, got {self.variable!r}")
        basis = None
        if self.basis is not None:
            basis = np.array(self.basis, dtype=np.float32, copy=True)
            if basis.ndim != 2 or basis.shape[0] < 1 or basis.shape[1] < 1:
                raise PlotError(f"DASSpec.basis must be an (r, d) matrix with r >= 1, got shape {basis.shape}")
            if not np.all(np.isfinite(basis)):
                raise PlotError("DASSpec.basis holds NaN or inf")
            gram = basis.astype(np.float64) @ basis.astype(np.float64).T
            if not np.allclose(gram, np.eye(basis.shape[0]), atol=ORTHO_ATOL):
                raise PlotError("DASSpec.basis rows must be orthonormal (V @ V.T == I); orthonormalise it (QR) first")
            basis.setflags(write=False)
            object.__setattr__(self, "basis", basis)
        if self.dims is not None:
            dims = tuple(int(d) for d in self.dims)
            if not dims:
                raise PlotError(
                    f"DASSpec for layer {self.layer}: dims=() is an empty support; DAS needs at least one "
                    "coordinate (use dims=None for the whole vector)"
                )
            if len(set(dims)) != len(dims):
                raise PlotError(f"DASSpec.dims has duplicates: {dims}")
            if min(dims) < 0:
                raise PlotError(f"DASSpec.dims must be non-negative, got {dims}")
            if basis is not None and max(dims) >= basis.shape[0]:
                raise PlotError(f"DASSpec.dims index basis row {max(dims)} but the basis has {basis.shape[0]} rows")
            object.__setattr__(self, "dims", dims)
        sizes = self.subspace_sizes
        if isinstance(sizes, (int, np.integer)):
            sizes = (sizes,)
        sizes = tuple(int(k) for k in sizes)
        if not sizes:
            raise PlotError("DASSpec.subspace_sizes is empty; pass at least one size k >= 1")
        if min(sizes) < 1:
            raise PlotError(f"DASSpec.subspace_sizes must be >= 1, got {sizes}")
        object.__setattr__(self, "subspace_sizes", tuple(dict.fromkeys(sizes)))
        object.__setattr__(self, "source", str(self.source))
        object.__setattr__(self, "basis_key", _basis_key(basis))
        w = self._known_width()
        if w is not None:
            self._check_sizes(w)

    # ------------------------------------------------------------------ support
    @property
    def whole_vector(self) -> bool:
        """True when the support is the whole native vector (no dims, no basis)."""
        return self.dims is None and self.basis is None

    def _known_width(self) -> int | None:
        if self.dims is not None:
            return len(self.dims)
        if self.basis is not None:
            return int(self.basis.shape[0])
        return None

    def _check_sizes(self, width: int) -> None:
        too_big = [k for k in self.subspace_sizes if k > width]
        if too_big:
            raise PlotError(
                f"DASSpec {self.label}: subspace size {max(too_big)} is larger than the support width {width}; "
                f"use sizes <= {width} (pyvene_plot.das.clip_sizes(sizes, {width}))"
            )

    def support_width(self, model: torch.nn.Module | None = None) -> int:
        """Support width ``m``; a whole-vector spec needs ``model`` to know the component width."""
        w = self._known_width()
        if w is not None:
            return w
        if model is None:
            raise PlotError(f"DASSpec {self.label} spans the whole vector; pass model= to know its width")
        return model_spec(model).dim(self.component)

    def width(self, model: torch.nn.Module) -> int:
        """Support width ``m`` for ``model`` (alias of ``support_width(model)``)."""
        return self.support_width(model)

    def sizes_for(self, model: torch.nn.Module) -> tuple[int, ...]:
        """The subspace sizes, validated against the support width (raises when one is too large)."""
        self._check_sizes(self.support_width(model))
        return self.subspace_sizes

    def support_matrix(self, embed_dim: int | None = None) -> torch.Tensor | None:
        """``P`` (m, d) with orthonormal rows, or ``None`` for the whole vector."""
        if self.basis is not None:
            V = torch.as_tensor(np.array(self.basis), dtype=torch.float32)
            if embed_dim is not None and V.shape[1] != int(embed_dim):
                raise PlotError(
                    f"DASSpec {self.label}: basis has width {V.shape[1]} but {self.component} has width {embed_dim}"
                )
            return V[list(self.dims)] if self.dims is not None else V
        if self.dims is not None:
            if embed_dim is None:
                raise PlotError(f"DASSpec {self.label}: native-coordinate supports need embed_dim (the component width)")
            if max(self.dims) >= int(embed_dim):
                raise PlotError(
                    f"DASSpec {self.label}: coordinate {max(self.dims)} is outside the {embed_dim}-dimensional "
                    f"{self.component}"
                )
            return torch.eye(int(embed_dim))[list(self.dims)]
        return None

    # ------------------------------------------------------------------ pyvene
    def build_intervention(self, k: int, embed_dim: int, seed: int | None = None) -> pv.TrainableIntervention:
        """A fresh trainable intervention for subspace size ``k`` (seeded when ``seed`` is given)."""
        k = int(k)
        m = self.support_width() if not self.whole_vector else int(embed_dim)
        if not 1 <= k <= m:
            raise PlotError(f"DASSpec {self.label}: subspace size {k} is larger than the support width {m}"
                            if k > m else f"subspace size must be >= 1, got {k}")
        P = self.support_matrix(embed_dim)
        ctx = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
        with ctx:
            if seed is not None:
                torch.manual_seed(int(seed))
            if P is None:
                return LowRankDASIntervention(embed_dim=int(embed_dim), low_rank_dimension=k, position=self.position)
            return SupportRotatedSpaceIntervention(
                embed_dim=int(embed_dim), latent_dim=int(P.shape[0]), low_rank_dimension=k, support=P,
                position=self.position,
            )

    def to_representation(self, k: int, model: torch.nn.Module | None = None, embed_dim: int | None = None,
                          seed: int | None = None, intervention: Any = None) -> dict:
        """The pyvene representation dict for subspace size ``k``.

        ``{"layer", "component", "unit": "pos", "max_number_of_units": 1, "low_rank_dimension": k,
        "latent_dim": m (restricted supports), "intervention": <instance>}``. The instance needs the
        component width: pass ``model`` (or ``embed_dim``) unless the spec has a basis.
        """
        if embed_dim is None:
            if model is not None:
                embed_dim = model_spec(model).dim(self.component)
            elif self.basis is not None:
                embed_dim = int(self.basis.shape[1])
            else:
                raise PlotError(f"DASSpec {self.label}: pass model= (or embed_dim=) to build its intervention")
        iv = intervention if intervention is not None else self.build_intervention(k, int(embed_dim), seed=seed)
        rep = {"layer": self.layer, "component": self.component, "unit": "pos", "max_number_of_units": 1,
               "low_rank_dimension": int(k), "intervention": iv}
        if not self.whole_vector:
            rep["latent_dim"] = self.support_width()
        return rep

    def build_intervenable(self, k: int, model: torch.nn.Module, seed: int | None = None,
                           device: torch.device | None = None) -> pv.IntervenableModel:
        """A ``pyvene.IntervenableModel`` on ``model`` holding one fresh intervention of size ``k``.

        The model's own parameters are frozen (``disable_model_gradients``); the intervention is
        initialised under ``seed`` (:meth:`build_intervention`) and moved to ``device`` (default:
        the model's device). Training (:mod:`pyvene_plot.das`) and loading a saved
        :class:`DASResult` both build their intervenable models here.
        """
        rep = self.to_representation(k, embed_dim=model_spec(model).dim(self.component), seed=seed)
        with contextlib.redirect_stdout(io.StringIO()):
            im = pv.IntervenableModel([rep], model, use_fast=False)
        im.disable_model_gradients()
        im.set_device(device if device is not None else model_device(model))
        return im

    # ------------------------------------------------------------------ identity / io
    @property
    def label(self) -> str:
        """``L0.block_output@5{basis 16x64}[0:8]``: the site format of :func:`pyvene_plot.models.site_label`."""
        b = f"{{basis {self.basis.shape[0]}x{self.basis.shape[1]}}}" if self.basis is not None else ""
        return site_label(self.layer, self.component, self.position, self.dims, b)

    def __str__(self) -> str:
        return self.label

    def applies_to(self, variable: str) -> bool:
        return self.variable is None or self.variable == variable

    @classmethod
    def from_site(cls, site: Site, variable: str | None = None, basis: np.ndarray | None = None,
                  subspace_sizes: Sequence[int] = (1,), source: str = "") -> DASSpec:
        """A spec on a :class:`pyvene_plot.Site` (``basis``: the matrix behind ``site.basis``)."""
        if site.basis is not None and basis is None:
            raise PlotError(f"site {site.label} lives in basis {site.basis!r}; pass basis= (its (r, d) matrix)")
        return cls(variable=variable, layer=site.layer, component=site.component, position=site.position,
                   dims=site.dims, basis=basis if site.basis is not None else None,
                   subspace_sizes=tuple(subspace_sizes), source=source)

    def to_dict(self) -> dict:
        return {
            "variable": self.variable,
            "layer": self.layer,
            "component": self.component,
            "position": self.position,
            "dims": list(self.dims) if self.dims is not None else None,
            "basis": self.basis.tolist() if self.basis is not None else None,
            "subspace_sizes": list(self.subspace_sizes),
            "source": self.source,
            "label": self.label,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> DASSpec:
        dims = d.get("dims")
        basis = d.get("basis")
        return cls(
            variable=d.get("variable"),
            layer=int(d["layer"]),
            component=d.get("component", "block_output"),
            position=d.get("position", -1),
            dims=tuple(dims) if dims is not None else None,
            basis=np.asarray(basis, dtype=np.float32) if basis is not None else None,
            subspace_sizes=tuple(d.get("subspace_sizes", (1,))),
            source=d.get("source", ""),
        )


def full_das_specs(
    model: torch.nn.Module,
    variables: Sequence[str] | None = None,
    component: str = "block_output",
    positions: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    subspace_sizes: Sequence[int] = DEFAULT_SIZES,
    bank: PairBank | None = None,
) -> list[DASSpec]:
    """Full DAS: one whole-vector spec per layer x position (x variable).

    Parameters
    ----------
    model : torch.nn.Module
    variables : sequence of str, optional
        One spec per variable per site; default one shared spec (``variable=None``) per site.
    component : str
    positions : sequence of int, optional
        Token positions. Models without positions: default ``(-1,)``. Models with positions: pass
        them, or pass ``bank=`` to use every position ``0 .. L-1`` of the shortest real row.
    layers : sequence of int, optional
        Default every layer.
    subspace_sizes : sequence of int
        Clipped to the component width (``min(k, d)``, duplicates dropped).
    bank : PairBank, optional
        Only used to infer ``positions``.
    """
    spec = model_spec(model)
    d = spec.dim(component)
    if positions is None:
        if not spec.has_positions:
            positions = (-1,)
        elif bank is not None:
            positions = tuple(range(min_real_length(bank)))
        else:
            raise PlotError(
                f"{spec.model_type.__name__} has token positions: pass positions=[...] (e.g. [-1]) or bank= to "
                "use every position of the bank's shortest row"
            )
    positions = [None if p is None else int(p) for p in positions]
    if not positions:
        raise PlotError("positions is empty; pass at least one token position")
    if not spec.has_positions and any(p not in (None, 0, -1) for p in positions):
        raise SiteError(f"{spec.model_type.__name__} has no token positions (only -1 / 0); got {positions}")
    layers = list(range(spec.n_layers)) if layers is None else [int(l) for l in layers]
    bad = [l for l in layers if not 0 <= l < spec.n_layers]
    if bad:
        raise SiteError(f"layers {bad} do not exist; {spec.model_type.__name__} has layers 0..{spec.n_layers - 1}")
    sizes = clip_sizes(subspace_sizes, d)
    var_list: list[str | None] = list(variables) if variables is not None else [None]
    return [
        DASSpec(variable=v, layer=l, component=component, position=p, subspace_sizes=sizes, source="full_das")
        for l in layers for p in positions for v in var_list
    ]
