"""DAS (Distributed Alignment Search): Full DAS and PLOT-guided DAS with pyvene interventions.

A :class:`DASSpec` names *where* DAS may look (layer, component, token position, and a support:
the whole vector, a subset of native coordinates, or the span of an orthonormal basis such as PCA
rows) and *which* subspace sizes ``k`` to try. :func:`run_das` trains one rotated-subspace
interchange per (spec, k, variable) on the fit bank, scores every candidate on the calibration
bank and keeps the best per variable (the test bank is never looked at)::

    specs = pp.full_das_specs(model, positions=[-1], subspace_sizes=(1, 2, 4))   # Full DAS
    specs = loc.das_specs()                                                      # PLOT-guided DAS
    das = pp.run_das(model, specs, fit, calibration, readout=task.readout)
    das.best["WX"].iia(test)          # a DASHandle: trained pyvene.IntervenableModel + readout
    das.best["WX"].save(d); pyvene.IntervenableModel.load(d, model)   # round-trips

The intervention of a candidate with support basis ``P`` (m, d) (orthonormal rows; identity rows
for native coordinates) and rotation ``W`` (m, k) (orthonormal columns, learned) is::

    Q = P.T @ W                                   # (d, k), orthonormal columns
    h  <-  h + ((h_src - h) @ Q) @ Q.T            # swap the k-dim subspace span(Q), nothing else

For the whole vector (``P = I``) this is pyvene's own ``LowRankRotatedSpaceIntervention``
(householder-parametrised ``W``); restricted supports use :class:`SupportRotatedSpaceIntervention`.
Both store the token position as a buffer (``position``), so :func:`pyvene_plot.run_intervenable`
and ``IntervenableModel.save`` / ``load`` work on them.

Training (default ``trainer="loop"``; see :func:`run_das` for ``trainer="pyvene"``): Adam on the
cross-entropy of the intervened readout logits against the variable's counterfactual labels, the
model frozen, source activations collected once per bank and fed as pyvene
``source_representations``, full nested ``unit_locations``, and each step's forward + backward
inside ``torch.nn.utils.parametrize.cached()`` (same gradients, several times faster). Early
stopping: stop when the epoch's mean training loss has not improved on the best by a relative
``rel_tol`` for ``patience`` epochs (and at least ``min_epochs`` epochs ran). Every candidate's
initialisation and batch order is seeded and recorded.
"""


from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyvene as pv
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from .._constants import DEFAULT_SUBSPACE_SIZES, ORTHO_ATOL
from ..data import Inputs

from ..data import PairBank
from ..localize import SELECTION_RULES
from ..localize import InterchangeEngine
from ..data import as_model_kwargs
from ..models import model_device
from ..errors import ModelError, PlotError, SiteError
from ..localize import iia_scores
from ..localize import run_intervenable
from ..models import Readout
from ..models import Site
from ..models import model_spec
from .._utils import atomic_write_json, package_versions
from ..interventions import LowRankDASIntervention, SupportRotatedSpaceIntervention
from ..data import min_real_length

logger = logging.getLogger(__name__)



TRAINERS = ("auto", "loop", "pyvene")
DEFAULT_SIZES = DEFAULT_SUBSPACE_SIZES


# =============================================================================== specs
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

    # ------------------------------------------------------------------ identity / io
    @property
    def label(self) -> str:
        pos = "" if self.position is None else f"@{self.position}"
        b = f"{{basis {self.basis.shape[0]}x{self.basis.shape[1]}}}" if self.basis is not None else ""
        if self.dims is None:
            d = ""
        elif len(self.dims) == 1:
            d = f"[{self.dims[0]}]"
        elif self.dims == tuple(range(self.dims[0], self.dims[-1] + 1)):
            d = f"[{self.dims[0]}:{self.dims[-1] + 1}]"
        else:  # runs of consecutive coordinates as start:stop, e.g. [0:128,192:576]
            runs, start = [], self.dims[0]
            for prev, cur in zip(self.dims, self.dims[1:] + (None,)):
                if cur != prev + 1:
                    runs.append(str(start) if prev == start else f"{start}:{prev + 1}")
                    start = cur
            d = f"[{','.join(runs)}]"
        return f"L{self.layer}.{self.component}{pos}{b}{d}"

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


# =============================================================================== handles
@dataclasses.dataclass
class DASHandle:
    """A trained DAS intervention for one variable: a ``pyvene.IntervenableModel`` plus its readout.

    Attributes
    ----------
    variable : str
    spec : DASSpec
    k : int
        Subspace size.
    intervenable : pyvene.IntervenableModel
        One representation holding the trained intervention (``LowRankDASIntervention`` or
        ``SupportRotatedSpaceIntervention``).
    readout : Readout
    meta : dict
        Training record (seed, epochs, losses, calibration scores, trainer).
    """

    variable: str
    spec: DASSpec
    k: int
    intervenable: pv.IntervenableModel = dataclasses.field(repr=False)
    readout: Readout = dataclasses.field(default_factory=Readout)
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def model(self) -> torch.nn.Module:
        return self.intervenable.model

    @property
    def intervention(self) -> torch.nn.Module:
        return next(iter(self.intervenable.interventions.values()))

    def directions(self) -> torch.Tensor:
        """The learned orthonormal directions ``Q`` (d, k) in the component's native coordinates."""
        iv = self.intervention
        with torch.no_grad():
            if isinstance(iv, SupportRotatedSpaceIntervention):
                return iv.directions().detach().clone()
            return iv.rotate_layer.weight.detach().clone()

    def run(self, base: Inputs, source: Inputs, batch_size: int = 512) -> torch.Tensor:
        """Readout logits (N, C) of the intervened model (a real source forward, no cache)."""
        return run_intervenable(self.intervenable, base, source, self.readout, batch_size=batch_size)

    def scores(self, bank: PairBank) -> dict[str, float]:
        """IIA on ``bank`` (all / sensitive / invariant / balanced), as :func:`pyvene_plot.localize.iia_scores`."""
        bank.check_variables([self.variable])
        preds = self.run(bank.base, bank.source).argmax(-1)
        return iia_scores(preds, bank.labels(self.variable), bank.changed(self.variable))

    def iia(self, bank: PairBank) -> float:
        """Exact-match IIA over every pair of ``bank``."""
        return self.scores(bank)["iia"]

    def describe(self) -> str:
        return f"DAS k={self.k} on {self.spec.label}"

    def to_dict(self) -> dict:
        return {"variable": self.variable, "spec": self.spec.to_dict(), "k": self.k,
                "readout": self.readout.to_dict(), "meta": self.meta}

    def save(self, directory: str | Path) -> Path:
        """``IntervenableModel.save(directory)`` plus ``das_handle.json`` (variable, spec, k, readout).

        ``pyvene.IntervenableModel.load(directory, model)`` restores the intervention on its own;
        :meth:`load` also restores the handle around it.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with contextlib.redirect_stdout(io.StringIO()):
            self.intervenable.save(str(directory))
        atomic_write_json(directory / "das_handle.json", self.to_dict())
        return directory

    @classmethod
    def load(cls, directory: str | Path, model: torch.nn.Module) -> DASHandle:
        """Inverse of :meth:`save` (uses ``pyvene.IntervenableModel.load``)."""
        directory = Path(directory)
        d = json.loads((directory / "das_handle.json").read_text())
        with contextlib.redirect_stdout(io.StringIO()):
            im = pv.IntervenableModel.load(str(directory), model)
        im.set_device(model_device(model))
        im.disable_model_gradients()
        return cls(variable=d["variable"], spec=DASSpec.from_dict(d["spec"]), k=int(d["k"]), intervenable=im,
                   readout=Readout.from_dict(d.get("readout", {})), meta=dict(d.get("meta", {})))


class DASBest(dict):
    """``{variable: DASHandle}``; ``.iia(bank)`` / ``.scores(bank)`` work directly when it holds one variable."""

    def _only(self) -> DASHandle:
        if len(self) != 1:
            raise PlotError(
                f"this DAS result holds {len(self)} variables {list(self)}; pick one, e.g. "
                f"best[{next(iter(self), 'VAR')!r}].iia(bank), or use best.evaluate(bank) for all of them"
            )
        return next(iter(self.values()))

    def iia(self, bank: PairBank) -> float:
        return self._only().iia(bank)

    def scores(self, bank: PairBank) -> dict[str, float]:
        return self._only().scores(bank)

    def run(self, base: Inputs, source: Inputs) -> torch.Tensor:
        return self._only().run(base, source)

    def evaluate(self, bank: PairBank, detail: bool = False) -> dict:
        """IIA per variable (``detail=True``: the full score dicts)."""
        return {v: (h.scores(bank) if detail else h.iia(bank)) for v, h in self.items()}


@dataclasses.dataclass
class DASResult:
    """What :func:`run_das` returns.

    Attributes
    ----------
    best : DASBest
        ``{variable: DASHandle}``, chosen on the calibration bank.
    candidates : list of dict
        One row per training: variable, spec label, layer, position, support width, k, seed,
        epochs, final loss, train seconds, calibration scores, trainer, selected.
    runtime_s : float
        Wall time of the whole sweep: source collection, every training and calibration scoring
        (no test evaluation).
    n_trained : int
        Number of (spec, k, variable) trainings.
    trainer : str
        ``"loop"`` or ``"pyvene"``: the trainer that ran.
    variables : list of str
    settings : dict
        Every training/selection setting (epochs, lr, seed, selection rule, ...).
    timings : dict
        ``collect_s``, ``train_s``, ``calibration_s`` (summed).
    """

    best: DASBest
    candidates: list[dict]
    runtime_s: float
    n_trained: int
    trainer: str
    variables: list[str]
    settings: dict = dataclasses.field(default_factory=dict)
    timings: dict = dataclasses.field(default_factory=dict)

    def evaluate(self, bank: PairBank, detail: bool = False) -> dict:
        """IIA of each variable's best handle on ``bank`` (not counted in ``runtime_s``)."""
        return self.best.evaluate(bank, detail=detail)

    def to_dict(self) -> dict:
        return {
            "kind": "DASResult",
            "variables": list(self.variables),
            "trainer": self.trainer,
            "runtime_s": self.runtime_s,
            "n_trained": self.n_trained,
            "timings": self.timings,
            "settings": self.settings,
            "best": {v: h.to_dict() for v, h in self.best.items()},
            "candidates": self.candidates,
            "versions": package_versions(),
        }

    def to_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` atomically as JSON."""
        return atomic_write_json(path, self.to_dict())

    def table(self) -> str:
        """Markdown table of every candidate (selected ones marked with ``*``)."""
        head = ("| variable | spec | width | k | epochs | final loss | train s | cal balanced | cal sens | "
                "cal inv | |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        lines = [head]

        def f(x: Any) -> str:
            return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"

        for c in self.candidates:
            cal = c["calibration"]
            lines.append(
                f"| {c['variable']} | {c['spec']} | {c['support_width']} | {c['k']} | {c['epochs']} | "
                f"{c['final_loss']:.4f} | {c['train_s']:.2f} | {f(cal['balanced'])} | {f(cal['sensitive'])} | "
                f"{f(cal['invariant'])} | {'*' if c['selected'] else ''} |"
            )
        lines.append("")
        lines.append(f"{self.n_trained} trainings ({self.trainer} trainer), {self.runtime_s:.2f} s; selection: "
                     f"{self.settings.get('selection', 'balanced')} IIA on calibration")
        return "\n".join(lines)


# =============================================================================== training
def _epoch_batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=gen)
    return [perm[s:s + batch_size] for s in range(0, n, batch_size)]


def auto_lr(width: int) -> float:
    """The ``lr="auto"`` rule: ``min(0.03, 0.25 / sqrt(width))``."""
    return float(min(0.03, 0.25 / math.sqrt(max(1, int(width)))))


def _candidate_seed(seed: int, spec_index: int, k: int, variable_index: int) -> int:
    return int(np.random.SeedSequence([int(seed) % (2**32), spec_index, k, variable_index]).generate_state(1)[0])


def _better(score: float, k: int, spec_index: int, current: tuple | None) -> bool:
    """Selection order: higher calibration score; ties (within 1e-12) go to smaller k, then earlier spec."""
    score = -math.inf if math.isnan(score) else float(score)
    if current is None:
        return True
    best = current[0]
    if score > best + 1e-12:
        return True
    return abs(score - best) <= 1e-12 and (k, spec_index) < (current[1], current[2])


class _Stopper:
    """Early stopping on the epoch's mean training loss (relative improvement over the best)."""

    def __init__(self, min_epochs: int, patience: int, rel_tol: float) -> None:
        self.min_epochs, self.patience, self.rel_tol = min_epochs, patience, rel_tol
        self.best = math.inf
        self.bad = 0
        self.epochs = 0

    def update(self, loss: float) -> bool:
        """Record an epoch; True when training should stop."""
        self.epochs += 1
        if not math.isfinite(loss):
            raise ModelError(f"DAS training loss became {loss} at epoch {self.epochs}; lower lr= or check the model")
        if loss < self.best * (1.0 - self.rel_tol) or self.best == math.inf:
            self.best = loss
            self.bad = 0
        else:
            self.bad += 1
        return self.epochs >= self.min_epochs and self.bad >= self.patience


class _StepCache:
    """``parametrize.cached()`` opened in pyvene's collator and closed once the forward is done.

    ``train_alignment`` runs collator -> forward -> compute_metrics -> compute_loss -> backward;
    the cached rotation is already part of the autograd graph when the window closes, so the
    backward pass is unaffected, and every optimizer step sees a freshly computed rotation.
    """

    def __init__(self) -> None:
        self._cm = None

    def open(self) -> None:
        self.close()
        self._cm = parametrize.cached()
        self._cm.__enter__()

    def close(self) -> None:
        if self._cm is not None:
            cm, self._cm = self._cm, None
            cm.__exit__(None, None, None)


class _Site:
    """Per-candidate plumbing: an IntervenableModel with one DAS intervention at a resolved site."""

    def __init__(self, model: torch.nn.Module, spec: DASSpec, k: int, seed: int, device: torch.device) -> None:
        d = model_spec(model).dim(spec.component)
        rep = spec.to_representation(k, embed_dim=d, seed=seed)
        with contextlib.redirect_stdout(io.StringIO()):
            self.im = pv.IntervenableModel([rep], model, use_fast=False)
        self.im.disable_model_gradients()
        self.im.set_device(device)
        self.key = self.im.sorted_keys[0]
        self.iv = self.im.interventions[self.key]
        self.params = [p for p in self.iv.parameters() if p.requires_grad]

    def forward(self, part: dict, positions: torch.Tensor, src: torch.Tensor) -> Any:
        """Intervened model output for a batch: base kwargs, base positions (B,), source acts (B, d)."""
        pos = positions.tolist()
        locs = [[[int(p)] for p in pos]]
        self.im.use_fast = all(p == pos[0] for p in pos)  # fast scatter only when all rows agree
        _, cf = self.im(part, unit_locations={"sources->base": (locs, locs)},
                        source_representations={self.key: src.unsqueeze(1)})
        return cf


def _loss_on_batch(site: _Site, kw: dict, bpos: torch.Tensor, src_acts: torch.Tensor, labels: torch.Tensor,
                   idx: torch.Tensor, readout: Readout, device: torch.device) -> torch.Tensor:
    part = {k: v[idx].to(device) for k, v in kw.items()}
    cf = site.forward(part, bpos[idx], src_acts[idx.to(src_acts.device)].to(device))
    logits = readout(cf, part).float()
    return F.cross_entropy(logits, labels[idx].to(device))


@torch.no_grad()
def _predict_cached(site: _Site, kw: dict, bpos: torch.Tensor, src_acts: torch.Tensor, readout: Readout,
                    batch_size: int, device: torch.device) -> torch.Tensor:
    n = int(bpos.shape[0])
    out = []
    with parametrize.cached():
        for s in range(0, n, batch_size):
            idx = torch.arange(s, min(n, s + batch_size))
            part = {k: v[idx].to(device) for k, v in kw.items()}
            cf = site.forward(part, bpos[idx], src_acts[idx.to(src_acts.device)].to(device))
            out.append(readout(cf, part).float().argmax(-1).cpu())
    return torch.cat(out)


def _train_loop(site: _Site, kw: dict, bpos: torch.Tensor, src_acts: torch.Tensor, labels: torch.Tensor,
                readout: Readout, opt_cfg: dict, seed: int, device: torch.device) -> list[float]:
    opt = torch.optim.Adam(site.params, lr=opt_cfg["lr"])
    gen = torch.Generator().manual_seed(seed)
    stop = _Stopper(opt_cfg["min_epochs"], opt_cfg["patience"], opt_cfg["rel_tol"])
    history = []
    n = int(labels.shape[0])
    for _ in range(opt_cfg["epochs"]):
        tot, cnt = 0.0, 0
        for idx in _epoch_batches(n, opt_cfg["batch_size"], gen):
            with parametrize.cached():
                loss = _loss_on_batch(site, kw, bpos, src_acts, labels, idx, readout, device)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(idx)
            cnt += len(idx)
        history.append(tot / cnt)
        if stop.update(history[-1]):
            break
    return history


def _pyvene_trainer_problem(model: torch.nn.Module, bank: PairBank) -> str | None:
    """Why ``IntervenableModel.train_alignment`` cannot train on this model/bank (None when it can)."""
    for side, x in (("base", bank.base), ("source", bank.source)):
        if isinstance(x, torch.Tensor):
            if x.dtype.is_floating_point:
                return (f"the bank's {side} inputs are float (passed as inputs_embeds), but train_alignment "
                        "hard-codes input_ids")
            continue
        extra = set(x) - {"input_ids", "attention_mask"}
        if "input_ids" not in x:
            return f"the bank's {side} inputs have no input_ids (keys {sorted(x)}); train_alignment passes only input_ids"
        if extra:
            return f"the bank's {side} inputs have keys {sorted(extra)} that train_alignment cannot pass to the model"
        if "attention_mask" in x and not bool(x["attention_mask"].bool().all()):
            return f"the bank's {side} inputs are padded; train_alignment passes no attention_mask"
        if x["input_ids"].dtype.is_floating_point:
            return f"the bank's {side} input_ids are float"
    try:
        ids = as_model_kwargs(bank.base)["input_ids"][:1].to(model_device(model))
        with torch.no_grad():
            out = model(input_ids=ids)
    except Exception as exc:  # noqa: BLE001 - any failure means the contract does not fit
        return f"the model cannot be called as model(input_ids=...): {type(exc).__name__}: {exc}"
    if getattr(out, "logits", None) is None:
        return (f"the model output ({type(out).__name__}) has no .logits, which train_alignment reads "
                "(use a *LMHeadModel / *ForCausalLM class)")
    return None


def _train_pyvene(site: _Site, bank: PairBank, bpos: torch.Tensor, spos: torch.Tensor, labels: torch.Tensor,
                  readout: Readout, opt_cfg: dict, seed: int, device: torch.device, progress: bool) -> list[float]:
    """One ``IntervenableModel.train_alignment`` call per epoch (so early stopping can run in between)."""
    ids_b = as_model_kwargs(bank.base)["input_ids"]
    ids_s = as_model_kwargs(bank.source)["input_ids"]
    opt = torch.optim.Adam(site.params, lr=opt_cfg["lr"])
    # constant learning rate: without it train_alignment builds a fresh warm-up/decay schedule per call
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _step: 1.0)
    gen = torch.Generator().manual_seed(seed)
    stop = _Stopper(opt_cfg["min_epochs"], opt_cfg["patience"], opt_cfg["rel_tol"])
    cache = _StepCache()
    state: dict[str, Any] = {}
    losses: list[tuple[float, int]] = []

    def collator(idx: torch.Tensor) -> dict:
        idx = torch.as_tensor(idx, dtype=torch.long)
        batch = {
            "input_ids": ids_b[idx].to(device),
            "source_input_ids": ids_s[idx].to(device),
            "labels": labels[idx].to(device),
            "source_0->base.0.pos": [[int(p)] for p in spos[idx].tolist()],  # source side
            "source_0->base.1.pos": [[int(p)] for p in bpos[idx].tolist()],  # base side
        }
        state["inputs"] = {"input_ids": batch["input_ids"]}
        cache.open()
        return batch

    def compute_metrics(logits_list: list, labels_list: list) -> float:
        cache.close()
        with torch.no_grad():
            pred = readout(logits_list[0], state["inputs"]).argmax(-1)
            return float((pred == labels_list[0]).float().mean())

    def compute_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cache.close()
        loss = F.cross_entropy(readout(logits, state["inputs"]).float(), y)
        losses.append((float(loss.detach()), int(y.shape[0])))
        return loss

    history = []
    n = int(labels.shape[0])
    site.im.use_fast = False
    try:
        for _ in range(opt_cfg["epochs"]):
            losses.clear()
            loader = torch.utils.data.DataLoader(_epoch_batches(n, opt_cfg["batch_size"], gen), batch_size=None)
            sink = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
            with sink:
                site.im.train_alignment(loader, compute_loss, compute_metrics, collator, epochs=1,
                                        lr=opt_cfg["lr"], optimizer=opt, scheduler=sched)
            history.append(sum(l * b for l, b in losses) / max(1, sum(b for _, b in losses)))
            if stop.update(history[-1]):
                break
    finally:
        cache.close()
    return history


# =============================================================================== run_das
def _resolve_variables(specs: Sequence[DASSpec], fit: PairBank, cal: PairBank,
                       variables: Sequence[str] | None) -> list[str]:
    if variables is None:
        if any(s.variable is None for s in specs):
            variables = list(fit.variables)
        else:
            variables = list(dict.fromkeys(s.variable for s in specs))
    variables = [str(v) for v in variables]
    if not variables:
        raise PlotError("no variables to train DAS for")
    fit.check_variables(variables)
    cal.check_variables(variables)
    missing = [v for v in variables if not any(s.applies_to(v) for s in specs)]
    if missing:
        raise PlotError(f"no DASSpec applies to variable(s) {missing}; specs name {sorted({str(s.variable) for s in specs})}")
    return variables


def _validate_spec(spec: DASSpec, mspec: Any) -> int:
    """Check a spec against the model; return its support width."""
    if not 0 <= spec.layer < mspec.n_layers:
        raise SiteError(f"DASSpec {spec.label}: layer {spec.layer} does not exist; "
                        f"{mspec.model_type.__name__} has layers 0..{mspec.n_layers - 1}")
    d = mspec.dim(spec.component)
    if mspec.has_positions:
        if spec.position is None:
            raise SiteError(f"DASSpec {spec.label}: {mspec.model_type.__name__} has token positions; give position=")
    elif spec.position not in (None, 0, -1):
        raise SiteError(f"DASSpec {spec.label}: {mspec.model_type.__name__} has no token positions (only -1 / 0)")
    if spec.whole_vector:
        width = d
    else:
        P = spec.support_matrix(d)  # raises on coordinates / basis width outside the component
        width = int(P.shape[0])
    spec._check_sizes(width)
    return width


def run_das(
    model: torch.nn.Module,
    specs: Sequence[DASSpec],
    fit_bank: PairBank,
    calibration_bank: PairBank,
    variables: Sequence[str] | None = None,
    *,
    readout: Readout | None = None,
    epochs: int = 10,
    min_epochs: int = 2,
    patience: int = 2,
    rel_tol: float = 1e-3,
    lr: float | str = "auto",
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    trainer: str = "auto",
    selection: str = "balanced",
    eval_batch_size: int = 512,
) -> DASResult:
    """Train DAS for every (spec, k, variable), select the best per variable on calibration.

    Parameters
    ----------
    model : torch.nn.Module
        A model pyvene can hook (frozen here: ``disable_model_gradients``).
    specs : sequence of DASSpec
        Where to look (:func:`full_das_specs` for Full DAS, ``loc.das_specs()`` for PLOT-guided DAS).
    fit_bank : PairBank
        Training pairs.
    calibration_bank : PairBank
        Selection pairs (every candidate is scored here; the test bank is never used).
    variables : sequence of str, optional
        Default: every bank variable when a spec is shared (``variable=None``), else the specs'
        variables. Specs for other variables are skipped.
    readout : Readout, optional
        The same readout as evaluation (loss and IIA share it); default ``Readout()``.
    epochs, min_epochs, patience, rel_tol : early stopping on the epoch's mean training loss.
    lr : float or "auto"
        Adam learning rate (constant). ``"auto"`` (default): ``min(0.03, 0.25 / sqrt(m))`` for a
        support of width ``m`` (0.03 up to m = 69, 0.009 at m = 768): enough to converge in ~10
        epochs on small banks, gentler on wide vectors. The value used is recorded per candidate.
    batch_size : int
        Training batch size.
    seed : int
        Base seed; every candidate's seed is derived from (seed, spec index, k, variable index)
        and recorded.
    progress : bool
        tqdm bar over candidates.
    trainer : {"auto", "loop", "pyvene"}
        ``"loop"``: this module's loop (cached source activations, ``parametrize.cached()``).
        ``"pyvene"``: ``IntervenableModel.train_alignment`` (one call per epoch, constant-lr Adam,
        source forward every step); only for banks of plain ``input_ids`` (all-ones
        ``attention_mask``) and models whose output has ``.logits``. ``"auto"``: ``"pyvene"`` when
        it fits, else ``"loop"``.
    selection : {"balanced", "iia", "sensitive"}
        Calibration criterion; ties go to the smaller ``k``, then to the earlier spec.
    eval_batch_size : int
        Batch size of source collection and calibration scoring.

    Returns
    -------
    DASResult
    """
    t_start = time.perf_counter()
    specs = list(specs) if specs is not None else []
    if not specs:
        raise PlotError("run_das needs at least one DASSpec (see pp.full_das_specs or loc.das_specs())")
    for s in specs:
        if not isinstance(s, DASSpec):
            raise PlotError(f"run_das expects DASSpec objects, got {type(s).__name__}")
    for b, what in ((fit_bank, "fit_bank"), (calibration_bank, "calibration_bank")):
        if not isinstance(b, PairBank):
            raise PlotError(f"{what} must be a PairBank, got {type(b).__name__}")
    if trainer not in TRAINERS:
        raise PlotError(f"unknown trainer {trainer!r}; choose one of {TRAINERS}")
    if selection not in SELECTION_RULES:
        raise PlotError(f"unknown selection rule {selection!r}; choose one of {SELECTION_RULES}")
    if int(epochs) < 1 or int(min_epochs) < 1 or int(patience) < 1:
        raise PlotError(f"epochs, min_epochs and patience must be >= 1 (got {epochs}, {min_epochs}, {patience})")
    if not (lr == "auto" or (isinstance(lr, (int, float)) and not isinstance(lr, bool)
                             and float(lr) > 0 and math.isfinite(float(lr)))):
        raise PlotError(f"lr must be a positive number or 'auto', got {lr!r}")
    if int(batch_size) < 1 or int(eval_batch_size) < 1:
        raise PlotError("batch sizes must be >= 1")
    if float(rel_tol) < 0:
        raise PlotError(f"rel_tol must be >= 0, got {rel_tol}")
    readout = readout or getattr(fit_bank, "readout", None) or Readout()
    opt_cfg = {"epochs": int(epochs), "min_epochs": int(min_epochs), "patience": int(patience),
               "rel_tol": float(rel_tol), "lr": lr if lr == "auto" else float(lr),
               "batch_size": int(batch_size)}

    mspec = model_spec(model)
    widths = [_validate_spec(s, mspec) for s in specs]
    variables = _resolve_variables(specs, fit_bank, calibration_bank, variables)

    problem = _pyvene_trainer_problem(model, fit_bank) if trainer in ("auto", "pyvene") else None
    if trainer == "pyvene" and problem is not None:
        raise PlotError(
            f"trainer='pyvene' cannot run here: {problem}. pyvene's IntervenableModel.train_alignment only "
            "passes input_ids / source_input_ids (no attention_mask, no inputs_embeds) and reads .logits; "
            "use trainer='loop' (the default adapter) instead"
        )
    used = "pyvene" if (trainer == "pyvene" or (trainer == "auto" and problem is None)) else "loop"

    device = model_device(model)
    # ---- source activations and positions, once per bank
    t0 = time.perf_counter()
    raw_units = list(dict.fromkeys((s.layer, s.component, s.position, None) for s in specs))
    engine = InterchangeEngine(model, raw_units, readout=readout, batch_size=eval_batch_size)
    fit_kw, cal_kw = as_model_kwargs(fit_bank.base), as_model_kwargs(calibration_bank.base)
    fit_bpos = engine.positions(fit_bank.base)
    cal_bpos = engine.positions(calibration_bank.base)
    cal_src = engine.collect(calibration_bank.source)
    if used == "loop":
        fit_src = engine.collect(fit_bank.source)
        fit_spos = None
    else:
        fit_src = None
        fit_spos = engine.positions(fit_bank.source)
    collect_s = time.perf_counter() - t0

    jobs = [(si, spec, k, vi, v) for si, spec in enumerate(specs) for k in spec.subspace_sizes
            for vi, v in enumerate(variables) if spec.applies_to(v)]
    if not jobs:
        raise PlotError("no (spec, size, variable) combination to train")
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(jobs), desc=f"DAS ({used})", leave=False)
        except ImportError:  # pragma: no cover
            bar = None

    candidates: list[dict] = []
    best: dict[str, tuple] = {}  # variable -> (score, k, spec index, row index, _Site)
    train_total = cal_total = 0.0
    try:
        for si, spec, k, vi, v in jobs:
            ru = (spec.layer, spec.component, spec.position)
            cseed = _candidate_seed(seed, si, k, vi)
            site = _Site(model, spec, k, cseed, device)
            cfg = dict(opt_cfg, lr=auto_lr(widths[si]) if opt_cfg["lr"] == "auto" else opt_cfg["lr"])
            t1 = time.perf_counter()
            if used == "loop":
                hist = _train_loop(site, fit_kw, fit_bpos[ru], fit_src[ru], fit_bank.labels(v), readout, cfg,
                                   cseed, device)
            else:
                hist = _train_pyvene(site, fit_bank, fit_bpos[ru], fit_spos[ru], fit_bank.labels(v), readout,
                                     cfg, cseed, device, progress)
            train_s = time.perf_counter() - t1
            t2 = time.perf_counter()
            preds = _predict_cached(site, cal_kw, cal_bpos[ru], cal_src[ru], readout, eval_batch_size, device)
            cal = iia_scores(preds, calibration_bank.labels(v), calibration_bank.changed(v))
            cal_s = time.perf_counter() - t2
            train_total += train_s
            cal_total += cal_s
            row = {
                "variable": v, "spec": spec.label, "spec_index": si, "source": spec.source, "layer": spec.layer,
                "component": spec.component, "position": spec.position, "support_width": widths[si], "k": int(k),
                "seed": cseed, "lr": cfg["lr"], "epochs": len(hist), "final_loss": hist[-1], "best_loss": min(hist),
                "loss_history": hist, "stopped_early": len(hist) < opt_cfg["epochs"], "train_s": train_s,
                "calibration_s": cal_s, "calibration": cal, "trainer": used, "selected": False,
            }
            candidates.append(row)
            score = cal[selection]
            score = -math.inf if math.isnan(score) else float(score)
            if _better(score, int(k), si, best.get(v)):
                best[v] = (score, int(k), si, len(candidates) - 1, site)
            logger.info("DAS %s %s k=%d: %d epochs, loss %.4f, cal %s %.3f (%.2fs)", v, spec.label, k, len(hist),
                        hist[-1], selection, score, train_s)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({"var": v, "site": spec.label, "k": k, "cal": round(score, 3)})
    finally:
        if bar is not None:
            bar.close()

    handles = DASBest()
    for v in variables:
        _score, k, si, ri, site = best[v]
        candidates[ri]["selected"] = True
        row = candidates[ri]
        handles[v] = DASHandle(
            variable=v, spec=specs[si], k=k, intervenable=site.im, readout=readout,
            meta={key: row[key] for key in ("seed", "lr", "epochs", "final_loss", "best_loss", "loss_history", "train_s",
                                            "calibration", "trainer", "support_width", "spec_index")}
            | {"selection": selection},
        )
    runtime = time.perf_counter() - t_start
    settings = {**opt_cfg, "seed": int(seed), "selection": selection, "trainer_requested": trainer,
                "trainer": used, "pyvene_trainer_unavailable": problem if used == "loop" else None,
                "eval_batch_size": int(eval_batch_size), "readout": readout.to_dict(),
                "n_specs": len(specs), "fit_bank": fit_bank.name, "calibration_bank": calibration_bank.name,
                "n_fit": len(fit_bank), "n_calibration": len(calibration_bank),
                "threads": torch.get_num_threads(), "device": str(device)}
    return DASResult(best=handles, candidates=candidates, runtime_s=runtime, n_trained=len(candidates),
                     trainer=used, variables=variables, settings=settings,
                     timings={"collect_s": collect_s, "train_s": train_total, "calibration_s": cal_total})
