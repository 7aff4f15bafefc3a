"""What gets ablated: sites (or groups of sites ablated jointly) turned into targets of per-hook units."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ...errors import SiteError
from ...interventions import OptimalAblationIntervention
from ...models import Site, validate_sites


@dataclasses.dataclass
class AblationUnit:
    """One ablated hook of a target: native coordinates (``dims``) or basis rows ``V``.

    Attributes
    ----------
    layer, component, position
        The hook (pyvene's layer, component and token position).
    d : int
        Width of the hooked component.
    dims : tuple of int, optional
        Ablated coordinates (None: the whole vector).
    V : Tensor, shape (k, d), optional
        Orthonormal rows of an ablated span (span sites).
    """

    layer: int
    component: str
    position: int | None
    d: int
    dims: tuple[int, ...] | None = None
    V: torch.Tensor | None = None  # (k, d)

    @property
    def raw(self) -> tuple:
        """The hook ``(layer, component, position)``."""
        return (self.layer, self.component, self.position)

    @property
    def width(self) -> int:
        """Width ``k`` of the unit's constant."""
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
        """An :class:`OptimalAblationIntervention` setting this unit's support to ``value`` (k,)."""
        return OptimalAblationIntervention(
            embed_dim=self.d, low_rank_dimension=self.width, dims=self.dims, basis=self.V, value=value,
            position=self.position,
        )

    def representation(self, iv: OptimalAblationIntervention) -> dict:
        """pyvene representation config placing ``iv`` at this unit's hook."""
        site = Site(self.layer, self.component, self.position)
        return site.to_representation(low_rank_dimension=self.width, intervention=iv)


@dataclasses.dataclass
class AblationTarget:
    """One record of :func:`~pyvene_plot.optimal_ablation`: its label, sites and merged units (one per hook)."""

    label: str
    sites: list[Site]
    units: list[AblationUnit]


SiteLike = Site | Sequence[Site]


def _group_label(sites: Sequence[Site]) -> str:
    return sites[0].label if len(sites) == 1 else "+".join(s.label for s in sites)


def build_targets(
    model: torch.nn.Module, sites: Sequence[SiteLike], bases: Mapping[str, Any] | None
) -> list[AblationTarget]:
    """Turn sites (or groups of sites ablated jointly) into targets with merged units per hook.

    Parameters
    ----------
    model : torch.nn.Module
        The model the sites belong to (validated against its registered card).
    sites : sequence of Site, or of lists of Site
        One target per element; a list is ablated jointly (the union of its coordinates / basis
        rows per hook).
    bases : dict of str to array (r, d), optional
        Orthonormal bases of span sites.

    Returns
    -------
    list of AblationTarget
        In input order.

    Raises
    ------
    SiteError
        No sites, a malformed element, a site outside the model, a basis of the wrong width, or
        the same site (group) listed twice.
    """
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
    targets = [AblationTarget(_group_label(g), list(g), _group_units(g, spec, bases_t)) for g in groups]
    labels = [t.label for t in targets]
    if len(set(labels)) != len(labels):
        dup = sorted({x for x in labels if labels.count(x) > 1})
        raise SiteError(f"sites listed twice: {dup}; pass each site (or site group) once")
    return targets


def _group_units(group: Sequence[Site], spec: Any, bases_t: Mapping[str, torch.Tensor]) -> list[AblationUnit]:
    """The units of one site group: sites sharing a hook (and basis) are merged into one unit."""
    by_unit: dict[tuple, list[Site]] = {}
    for s in group:
        by_unit.setdefault(s.unit, []).append(s)
    units = []
    for (layer, comp, pos, basis), ss in by_unit.items():
        d = spec.dim(comp)
        if basis is None:
            dims = None if any(s.dims is None for s in ss) else tuple(sorted({i for s in ss for i in s.dims}))
            if dims is not None and dims == tuple(range(d)):
                dims = None
            units.append(AblationUnit(layer, comp, pos, d, dims=dims))
        else:
            B = bases_t[basis]
            if B.shape[1] != d:
                raise SiteError(f"basis {basis!r} has width {B.shape[1]} but {comp} has width {d}")
            rows = sorted({i for s in ss for i in s.dims})
            units.append(AblationUnit(layer, comp, pos, d, V=B[rows].clone()))
    return units
