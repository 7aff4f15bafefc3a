"""Progressive localisation: coarse-to-fine stages of OT alignment (layers -> positions -> coordinates / PCA)."""

from __future__ import annotations

import dataclasses
from typing import Any

from .errors import PlotError

__all__ = ["Stage", "STAGE_KINDS"]

STAGE_KINDS = ("layer", "position", "coordinates", "pca")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of a progressive schedule.

    Parameters
    ----------
    kind : {"layer", "position", "coordinates", "pca"}
        ``layer``: one whole-vector site per layer (per timestep for recurrent models);
        ``position``: token positions inside the kept layers; ``coordinates``: contiguous
        coordinate groups inside the kept site; ``pca``: bands of a centred PCA basis fitted on the
        fit bank's activations at the kept site.
    group_sizes : tuple of int
        Widths of the coordinate groups (``coordinates`` stages); several widths give overlapping
        candidates.
    bands : int
        Number of equal PCA bands (``pca`` stages).
    keep : int, optional
        Sites kept per variable after this stage; default the scheduler's ``keep``.
    method : str, optional
        Transport method for this stage; default one-sided ``"uot"`` for coarse stages
        (``layer``, ``position``) and the searcher's method otherwise.
    component : str
        pyvene component of the candidate sites.
    positions : tuple of int, optional
        Candidate positions for ``layer``/``position`` stages; default: last token for ``layer``,
        every position of the shortest fit example for ``position``.
    """

    kind: str
    group_sizes: tuple[int, ...] = (1,)
    bands: int = 8
    keep: int | None = None
    method: str | None = None
    component: str = "block_output"
    positions: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in STAGE_KINDS:
            raise PlotError(f"unknown stage kind {self.kind!r}; choose one of {STAGE_KINDS}")
        gs = tuple(int(g) for g in self.group_sizes)
        if not gs or min(gs) < 1:
            raise PlotError(f"group_sizes must be positive integers, got {self.group_sizes}")
        object.__setattr__(self, "group_sizes", gs)
        if int(self.bands) < 1:
            raise PlotError(f"bands must be >= 1, got {self.bands}")
        if self.keep is not None and int(self.keep) < 1:
            raise PlotError(f"keep must be >= 1 (sites kept per variable), got {self.keep}")
        if self.positions is not None:
            object.__setattr__(self, "positions", tuple(int(p) for p in self.positions))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
