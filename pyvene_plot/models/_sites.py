"""Candidate sites: where in the network an interchange can happen.

A :class:`Site` is a layer, a pyvene component name (``"block_output"``, ``"mlp_activation"``, ...),
a token position and optionally a subset of coordinates (``dims``). A site may also live in the
span of a basis (``basis="pca:..."``): its ``dims`` then index rows of that basis (e.g. a band of
PCA components) and interventions move only those coordinates.

Positions follow Python indexing over the *real* tokens of each row: ``-1`` is the last
non-padding token (read from ``attention_mask``), ``0`` the first. Models without a sequence axis
(pyvene's MLP) have a single position, reachable as ``0`` or ``-1``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from ..errors import SiteError
from ._registry import ModelSpec, model_spec


def format_dims(dims: Sequence[int] | None) -> str:
    """Coordinates as a label suffix: ``""`` (whole vector), ``[3]``, ``[0:16]`` or runs ``[0:128,192:576]``."""
    if dims is None:
        return ""
    dims = tuple(int(x) for x in dims)
    runs, start = [], dims[0]
    for prev, cur in zip(dims, dims[1:] + (None,)):
        if cur != prev + 1:
            runs.append(str(start) if prev == start else f"{start}:{prev + 1}")
            start = cur
    return f"[{','.join(runs)}]"


def site_label(layer: int, component: str, position: int | None, dims: Sequence[int] | None = None,
               basis_tag: str = "") -> str:
    """The one label format of a site: ``L{layer}.{component}@{position}{basis_tag}{dims}``.

    Used by :attr:`Site.label` and by DAS specs, so a site prints the same everywhere.
    """
    pos = "" if position is None else f"@{position}"
    return f"L{layer}.{component}{pos}{basis_tag}{format_dims(dims)}"


@dataclasses.dataclass(frozen=True, order=True)
class Site:
    """One candidate intervention site.

    Parameters
    ----------
    layer : int
        Layer index (the ``%s`` of pyvene's module template; for recurrent models with
        one hook per step, the step).
    component : str, default "block_output"
        A component of the model's pyvene card.
    position : int or None, default -1
        Token position among the real tokens of each row (negative counts from the end).
        ``None`` means position 0 on models without a sequence.
    dims : tuple of int, optional
        Coordinates of the component (or of the basis, when ``basis`` is set); ``None`` is the
        whole vector.
    basis : str, optional
        Identifier of a basis (rows ``V``) registered with the result that owns this site; when
        set the site is the span of ``V[dims]``.
    """

    layer: int
    component: str = "block_output"
    position: int | None = -1
    dims: tuple[int, ...] | None = None
    basis: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.layer, (int,)) or isinstance(self.layer, bool):
            raise SiteError(f"Site.layer must be an int, got {self.layer!r}")
        if self.dims is not None:
            dims = tuple(int(d) for d in self.dims)
            if not dims:
                raise SiteError("Site.dims is empty; use dims=None for the whole vector")
            if len(set(dims)) != len(dims):
                raise SiteError(f"Site.dims has duplicates: {dims}")
            if min(dims) < 0:
                raise SiteError(f"Site.dims must be non-negative coordinates, got {dims}")
            object.__setattr__(self, "dims", dims)
        if self.basis is not None and self.dims is None:
            raise SiteError("a basis site needs dims= naming which basis rows it spans")

    # -- identity ------------------------------------------------------------
    @property
    def unit(self) -> tuple:
        """(layer, component, position, basis): sites sharing a unit share one hook."""
        return (self.layer, self.component, self.position, self.basis)

    @property
    def label(self) -> str:
        """``L3.block_output@-1[0:16]``; see :func:`site_label`."""
        b = f"{{{self.basis}}}" if self.basis else ""
        return site_label(self.layer, self.component, self.position, self.dims, b)

    def __str__(self) -> str:
        return self.label

    def with_(self, **changes: Any) -> "Site":
        return dataclasses.replace(self, **changes)

    def to_representation(self, **extra: Any) -> dict:
        """The pyvene representation dict for this site (``dims`` go to ``subspaces`` at call time)."""
        rep = {"layer": self.layer, "component": self.component, "unit": "pos", "max_number_of_units": 1}
        rep.update(extra)
        return rep

    def to_dict(self) -> dict:
        return {
            "layer": self.layer,
            "component": self.component,
            "position": self.position,
            "dims": list(self.dims) if self.dims is not None else None,
            "basis": self.basis,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "Site":
        dims = d.get("dims")
        return cls(
            layer=int(d["layer"]),
            component=d.get("component", "block_output"),
            position=d.get("position", -1),
            dims=tuple(dims) if dims is not None else None,
            basis=d.get("basis"),
        )


def layer_sites(
    model: torch.nn.Module,
    component: str = "block_output",
    positions: Iterable[int | None] = (-1,),
    layers: Iterable[int] | None = None,
) -> list[Site]:
    """One whole-vector site per layer x position."""
    spec = model_spec(model)
    spec.dim(component)
    layers = list(range(spec.n_layers)) if layers is None else list(layers)
    sites = [Site(layer=l, component=component, position=p) for l in layers for p in positions]
    validate_sites(model, sites)
    return sites


def coordinate_sites(
    layer: int, dim: int, group_size: int = 1, component: str = "block_output", position: int | None = -1,
    basis: str | None = None,
) -> list[Site]:
    """Contiguous coordinate groups of width ``group_size`` covering ``range(dim)`` (last may be short)."""
    if group_size < 1:
        raise SiteError(f"group_size must be >= 1, got {group_size}")
    return [
        Site(layer=layer, component=component, position=position,
             dims=tuple(range(s, min(s + group_size, dim))), basis=basis)
        for s in range(0, dim, group_size)
    ]


def neuron_sites(
    model: torch.nn.Module,
    layers: Iterable[int] | None = None,
    component: str = "block_output",
    group_size: int = 1,
    position: int | None = -1,
) -> list[Site]:
    """Contiguous coordinate groups (``group_size`` neurons) of a component at each layer."""
    spec = model_spec(model)
    d = spec.dim(component)
    layers = list(range(spec.n_layers)) if layers is None else list(layers)
    sites = [s for l in layers for s in coordinate_sites(l, d, group_size, component, position)]
    validate_sites(model, sites)
    return sites


def resolve_positions(position: int | None, model_inputs: Any, seq_len: int, batch: int) -> list[int]:
    """Per-row absolute positions for a site position, honouring ``attention_mask`` padding."""
    if position is None:
        return [0] * batch
    mask = model_inputs.get("attention_mask") if isinstance(model_inputs, Mapping) else None
    if mask is None:
        if not -seq_len <= position < seq_len:
            raise SiteError(f"position {position} does not exist in a sequence of length {seq_len}")
        return [position % seq_len] * batch
    out = []
    for row in mask.detach().cpu().bool():
        real = torch.nonzero(row, as_tuple=False).flatten().tolist()
        if not -len(real) <= position < len(real):
            raise SiteError(f"position {position} does not exist in a row with {len(real)} real tokens")
        out.append(real[position])
    return out


def validate_sites(model: torch.nn.Module, sites: Sequence[Site], basis_ranks: Mapping[str, int] | None = None) -> ModelSpec:
    """Raise :class:`SiteError` for any site that does not exist in ``model``."""
    if len(sites) == 0:
        raise SiteError("no candidate sites; pass at least one Site (see pp.layer_sites / pp.neuron_sites)")
    spec = model_spec(model)
    for s in sites:
        if not isinstance(s, Site):
            raise SiteError(f"expected pyvene_plot.Site objects, got {type(s).__name__}")
        if not 0 <= s.layer < spec.n_layers:
            raise SiteError(
                f"site {s.label}: layer {s.layer} does not exist; {spec.model_type.__name__} has "
                f"layers 0..{spec.n_layers - 1}"
            )
        d = spec.dim(s.component)
        if not spec.has_positions and s.position not in (None, 0, -1):
            raise SiteError(
                f"site {s.label}: {spec.model_type.__name__} has no token positions (only position 0 / -1)"
            )
        if s.dims is not None:
            limit = d
            if s.basis is not None:
                if basis_ranks is None or s.basis not in basis_ranks:
                    raise SiteError(f"site {s.label}: basis {s.basis!r} is unknown here")
                limit = basis_ranks[s.basis]
            if max(s.dims) >= limit:
                raise SiteError(
                    f"site {s.label}: coordinate {max(s.dims)} is outside the {limit}-dimensional "
                    f"{'basis' if s.basis else s.component}"
                )
    return spec
