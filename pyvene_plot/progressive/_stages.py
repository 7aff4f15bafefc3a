"""Stages of a progressive schedule (:class:`Stage`), the coarse stage kinds and the default DAS size grid."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..errors import PlotError
from .screening import screener_names

STAGE_KINDS = ("layer", "position", "coordinates", "pca", "lib")
#: stage kinds whose candidates are spans of a fitted basis
SPAN_KINDS = ("pca", "lib")
#: which fit-bank states a span stage's basis is fitted on
BASIS_INPUTS = ("base", "base+source")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of a progressive schedule.

    Parameters
    ----------
    kind : {"layer", "position", "coordinates", "pca", "lib"}
        ``layer``: one whole-vector site per layer (per timestep for recurrent models);
        ``position``: token positions inside the kept layers; ``coordinates``: contiguous
        coordinate groups inside the kept site (after a previous stage, the whole kept vector is
        always one more candidate, so the stage can reproduce the previous stage's handle);
        ``pca``: bands or nested prefixes (``prefixes``) of a centred PCA basis fitted on the fit
        bank's activations at the kept site; ``lib``: bands or prefixes of a Local Interaction Basis
        (:func:`pyvene_plot.methods.bases.lib_basis`, output-Jacobian variant on the searcher's readout
        logits) at the kept site. LIB directions are not orthogonal: the bands are taken from
        :meth:`~pyvene_plot.methods.bases.Basis.orthonormal_rows` (QR of the LIB encoder in importance
        order, so the union of the top bands spans exactly what the top LIB features read) and
        interchanged with PLOT's orthogonal span intervention, not LIB's oblique one.
    group_sizes : tuple of int
        Widths of the coordinate groups (``coordinates`` stages); several widths give overlapping
        candidates.
    bands : int, optional
        Number of equal bands of the basis, most important first (``pca`` and ``lib`` stages);
        default 8 unless ``prefixes`` is given (the two are mutually exclusive).
    prefixes : tuple of int, optional
        ``pca`` / ``lib`` only: nested candidates, the span of the top ``r`` directions of the
        basis for each ``r`` (clipped to the basis rank; the full rank is always included as the
        widest prefix), as the reference's default PCA site menu (top-r, r in 16, 8, 4, 2, 1).
        Nested spans must not be merged by top-k, so such a stage calibrates ``top_k=(1,)``
        unless ``top_k`` is set: each variable chooses one prefix (and λ).
    basis_inputs : {"base", "base+source"}, optional
        ``pca`` / ``lib``: the fit-bank states the basis is fitted on. Default ``"base"`` (the fit
        bank's bases, as the reference) for ``prefixes`` stages and ``"base+source"`` (every base
        and source state, this package's earlier behaviour) for ``bands`` stages.
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
    top_k, lambdas : tuple, optional
        Calibration grids for this stage. Coarse stages default to ``top_k=(1,)``, ``lambdas=(1.0,)``
        (a full swap of one site: only the choice of site matters there, as in the reference's
        Stage A); fine stages default to the searcher's grids.
    screen : str, optional
        Screener run on the stage's candidates *before* transport (see :func:`register_screener`):
        ``"oa"`` drops sites whose optimal-ablation gap Δ_opt is negligible, ``"mean"`` sites whose
        mean-ablation gap is (no training; more conservative), ``"attribution"`` keeps each
        variable's top share of sites by attribution patching (a first-order estimate of the
        interchange effect from one backward pass per variable; see
        :mod:`pyvene_plot.methods.attribution`). Candidates a screener drops are
        never measured; what was dropped, the threshold and every score are kept in
        ``Localization.screens``. A variable whose candidates would all be dropped keeps its
        best-scoring ``keep`` sites.
    screen_threshold : float, optional
        Score at or below which a site is dropped (loss units, e.g. nats); default: the
        screener's own conservative rule (``"oa"`` / ``"mean"``: below both 1e-4 and 1 % of the
        largest score). For ``"attribution"`` it is the share of candidates kept per variable
        (default 0.25, at least 4 sites).
    """

    kind: str
    group_sizes: tuple[int, ...] = (1,)
    bands: int | None = None
    keep: int | None = None
    method: str | None = None
    component: str = "block_output"
    positions: tuple[int, ...] | None = None
    top_k: tuple[int, ...] | None = None
    lambdas: tuple[float, ...] | None = None
    screen: str | None = None
    screen_threshold: float | None = None
    prefixes: tuple[int, ...] | None = None
    basis_inputs: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in STAGE_KINDS:
            raise PlotError(f"unknown stage kind {self.kind!r}; choose one of {STAGE_KINDS}")
        gs = tuple(int(g) for g in self.group_sizes)
        if not gs or min(gs) < 1:
            raise PlotError(f"group_sizes must be positive integers, got {self.group_sizes}")
        object.__setattr__(self, "group_sizes", gs)
        self._check_spans()
        if self.keep is not None and int(self.keep) < 1:
            raise PlotError(f"keep must be >= 1 (sites kept per variable), got {self.keep}")
        if self.positions is not None:
            object.__setattr__(self, "positions", tuple(int(p) for p in self.positions))
        if self.screen is not None and self.screen not in screener_names():
            raise PlotError(f"unknown screener {self.screen!r}; registered: {screener_names()} (see register_screener)")
        if self.screen_threshold is not None and not float(self.screen_threshold) >= 0:
            raise PlotError(f"screen_threshold must be >= 0, got {self.screen_threshold}")

    def _check_spans(self) -> None:
        """Validate ``bands`` / ``prefixes`` / ``basis_inputs`` and fill the default ``bands=8``."""
        if self.prefixes is not None:
            if self.bands is not None:
                raise PlotError(f"Stage({self.kind!r}): bands={self.bands} and prefixes={self.prefixes} are mutually "
                                "exclusive; pass bands= (a partition of the basis) or prefixes= (nested top-r spans)")
            if self.kind not in SPAN_KINDS:
                raise PlotError(f"prefixes apply to {SPAN_KINDS} stages only, not {self.kind!r}")
            ps = tuple(sorted({int(p) for p in self.prefixes}))
            if not ps or ps[0] < 1:
                raise PlotError(f"prefixes must be positive integers, got {self.prefixes}")
            object.__setattr__(self, "prefixes", ps)
        elif self.bands is None:
            object.__setattr__(self, "bands", 8)
        if self.bands is not None and int(self.bands) < 1:
            raise PlotError(f"bands must be >= 1, got {self.bands}")
        if self.basis_inputs is not None:
            if self.basis_inputs not in BASIS_INPUTS:
                raise PlotError(f"basis_inputs must be one of {BASIS_INPUTS}, got {self.basis_inputs!r}")
            if self.kind not in SPAN_KINDS:
                raise PlotError(f"basis_inputs applies to {SPAN_KINDS} stages only, not {self.kind!r}")

    @property
    def fit_states(self) -> str:
        """The fit-bank states a ``pca`` / ``lib`` basis is fitted on (``basis_inputs`` or its default)."""
        if self.basis_inputs is not None:
            return self.basis_inputs
        return "base" if self.prefixes is not None else "base+source"

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict (read back by :meth:`from_dict`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Stage":
        """Inverse of :meth:`to_dict`; JSON lists become the tuples the fields hold.

        Raises
        ------
        PlotError
            On a missing ``kind``, an unknown field or an invalid value.
        """
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in d if k not in fields]
        if unknown or "kind" not in d:
            raise PlotError(f"Stage fields {dict(d)!r}: unknown {unknown}, missing {['kind'] if 'kind' not in d else []}; "
                            f"valid fields: {fields}")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)

#: stage kinds that count as coarse (default solver one-sided UOT)
COARSE_KINDS = ("layer", "position")


def default_sizes(width: int) -> tuple[int, ...]:
    """Powers of two below ``width`` plus ``width`` (at most 8 values, largest kept)."""
    sizes = [k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if k < width] + [width]
    return tuple(sizes[-8:])
