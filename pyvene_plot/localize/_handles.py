"""Handles: calibrated interventions for one variable, as ordinary pyvene objects.

A :class:`Handle` is a set of sites with weights ``w_S`` and a strength ``λ``. Sites at the same
hook (layer, component, position, basis) are merged into one per-coordinate weight vector
``w = Σ_S w_S · 1[coordinate ∈ S]`` (so overlapping sites add instead of compounding), and each
hook becomes one :class:`~pyvene_plot.interventions.SoftInterchangeIntervention` (or its span
variant) in a :class:`pyvene.IntervenableConfig`::

    handle.config                     # pyvene.IntervenableConfig
    im = handle.intervenable(model)   # pyvene.IntervenableModel
    logits = pp.run_intervenable(im, base_inputs, source_inputs)   # unit_locations filled in
    im.save(d); im2 = pyvene.IntervenableModel.load(d, model)      # round-trips, fresh process too
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyvene as pv
import torch

from ..data import Inputs, PairBank, as_model_kwargs, inputs_len, sequence_length
from ..errors import BankError, ModelError, PlotError, SiteError
from ..interventions import (
    SoftInterchangeIntervention,
    SoftSpanInterchangeIntervention,
    intervention_position,
)
from ..models import Readout, Site, model_device, model_spec, resolve_positions, validate_sites
from ._metrics import iia_scores

logger = logging.getLogger(__name__)


def unit_locations_for(im: pv.IntervenableModel, base: Mapping, source: Mapping) -> dict:
    """Full nested ``unit_locations`` for an IntervenableModel of PLOT interventions.

    Positions are read from each intervention's ``position`` buffer and resolved per row against
    each side's ``attention_mask`` (so padding is honoured); no pyvene shorthand is used, so the
    sticky ``use_fast`` trap cannot trigger.
    """
    spec = model_spec(im.model)
    b, s = inputs_len(dict(base)), inputs_len(dict(source))
    src_locs, base_locs = [], []
    for key in im.sorted_keys:
        iv = im.interventions[key]
        pos = intervention_position(iv)
        if not spec.has_positions:
            bp, sp = [0] * b, [0] * s
        else:
            if pos is None:
                raise SiteError(f"intervention {key} has no stored position; build it through a pyvene_plot Handle")
            bp = resolve_positions(pos, base, sequence_length(base), b)
            sp = resolve_positions(pos, source, sequence_length(source), s)
        base_locs.append([[p] for p in bp])
        src_locs.append([[p] for p in sp])
    return {"sources->base": (src_locs, base_locs)}


def run_intervenable(
    im: pv.IntervenableModel, base: Inputs, source: Inputs, readout: Readout | None = None, batch_size: int = 512
) -> torch.Tensor:
    """Run an IntervenableModel of PLOT interventions on (base, source) inputs; readout logits (N, C)."""
    readout = readout or Readout()
    bkw, skw = as_model_kwargs(base), as_model_kwargs(source)
    n = inputs_len(bkw)
    if inputs_len(skw) != n:
        raise PlotError(f"base has {n} rows but source has {inputs_len(skw)}")
    im.use_fast = False
    dev = model_device(im.model)
    out = []
    with torch.no_grad():
        for s in range(0, n, batch_size):
            bp = {k: v[s : s + batch_size].to(dev) for k, v in bkw.items()}
            sp = {k: v[s : s + batch_size].to(dev) for k, v in skw.items()}
            _, cf = im(bp, [sp], unit_locations_for(im, bp, sp))
            out.append(readout(cf, bp).float().cpu())
    logits = torch.cat(out, 0)
    if not torch.isfinite(logits).all():
        raise ModelError("non-finite logits (NaN or inf) from the intervened model; check λ and the model")
    return logits


@dataclasses.dataclass
class Handle:
    """A calibrated soft-interchange intervention for one variable.

    Parameters
    ----------
    variable : str
    sites : list of Site
    weights : list of float
        ``w_S`` per site (after truncation and renormalisation).
    strength : float
        ``λ``; the effective coefficient of site ``S`` is ``λ · w_S``.
    readout : Readout
    bases : dict of str to ndarray, optional
        ``basis_id -> V`` (r, d) for span sites.
    meta : dict
        Calibration record (top-k, calibration scores, ...).
    """

    variable: str
    sites: list[Site]
    weights: list[float]
    strength: float = 1.0
    readout: Readout = dataclasses.field(default_factory=Readout)
    bases: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    meta: dict = dataclasses.field(default_factory=dict)
    model: Any = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.sites) != len(self.weights):
            raise PlotError(f"handle for {self.variable!r}: {len(self.sites)} sites but {len(self.weights)} weights")
        if not self.sites:
            raise PlotError(f"handle for {self.variable!r} has no sites")
        self.weights = [float(w) for w in self.weights]
        self.strength = float(self.strength)

    # ------------------------------------------------------------------ structure
    def unit_weights(self, widths: Mapping[tuple, int]) -> dict[tuple, torch.Tensor]:
        """Merged per-coordinate weights ``w`` per unit (before multiplying by ``λ``)."""
        out: dict[tuple, torch.Tensor] = {}
        for s, w in zip(self.sites, self.weights):
            vec = out.setdefault(s.unit, torch.zeros(widths[s.unit]))
            if s.dims is None:
                vec += w
            else:
                vec[list(s.dims)] += w
        return out

    def _widths(self, model: torch.nn.Module) -> dict[tuple, int]:
        spec = model_spec(model)
        widths = {}
        for s in self.sites:
            if s.basis is not None:
                if s.basis not in self.bases:
                    raise SiteError(f"handle for {self.variable!r}: basis {s.basis!r} missing")
                widths[s.unit] = int(np.asarray(self.bases[s.basis]).shape[0])
            else:
                widths[s.unit] = spec.dim(s.component)
        return widths

    def _model(self, model: torch.nn.Module | None) -> torch.nn.Module:
        m = model if model is not None else self.model
        if m is None:
            raise PlotError(
                f"handle for {self.variable!r} is not attached to a model; pass model= (or attach one with "
                "result.attach(model) after AlignmentResult.from_json)"
            )
        return m

    def representations(self, model: torch.nn.Module | None = None) -> list[pv.RepresentationConfig]:
        """One pyvene ``RepresentationConfig`` per unit, each holding a fresh PLOT intervention."""
        m = self._model(model)
        spec = validate_sites(m, self.sites, {k: int(np.asarray(v).shape[0]) for k, v in self.bases.items()})
        widths = self._widths(m)
        reps = []
        for unit, w in self.unit_weights(widths).items():
            layer, comp, pos, basis = unit
            d = spec.dim(comp)
            if basis is None:
                iv = SoftInterchangeIntervention(embed_dim=d, weight=w, strength=self.strength, position=pos)
                r = None
            else:
                V = torch.as_tensor(np.asarray(self.bases[basis]), dtype=torch.float32)
                r = int(V.shape[0])
                iv = SoftSpanInterchangeIntervention(
                    embed_dim=d, low_rank_dimension=r, basis=V, weight=w, strength=self.strength, position=pos
                )
            reps.append(pv.RepresentationConfig(layer=layer, component=comp, unit="pos", max_number_of_units=1,
                                                low_rank_dimension=r, intervention=iv))
        return reps

    @property
    def config(self) -> pv.IntervenableConfig:
        """A pyvene ``IntervenableConfig`` whose intervention types come from ``pyvene_plot.interventions``."""
        return pv.IntervenableConfig(representations=self.representations())

    def config_for(self, model: torch.nn.Module) -> pv.IntervenableConfig:
        return pv.IntervenableConfig(representations=self.representations(model))

    def intervenable(self, model: torch.nn.Module | None = None) -> pv.IntervenableModel:
        """A ready-to-run ``pyvene.IntervenableModel`` (``use_fast=False``, on the model's device)."""
        m = self._model(model)
        im = pv.IntervenableModel(self.config_for(m), m, use_fast=False)
        im.set_device(model_device(m))
        im.disable_model_gradients()
        return im

    # ------------------------------------------------------------------ running
    def run(self, base: Inputs, source: Inputs, model: torch.nn.Module | None = None) -> torch.Tensor:
        """Readout logits (N, C) of the intervened model (real source forward, no cache)."""
        return run_intervenable(self.intervenable(model), base, source, self.readout)

    def scores(self, bank: PairBank, model: torch.nn.Module | None = None) -> dict[str, float]:
        """IIA on ``bank`` for this handle's variable: all pairs, sensitive, invariant, balanced."""
        bank.check_variables([self.variable])
        logits = self.run(bank.base, bank.source, model)
        if bank.max_label() >= logits.shape[1]:
            raise BankError(
                f"bank {bank.name!r} holds label {bank.max_label()} but the readout gives {logits.shape[1]} "
                "classes; labels must index the model's output classes"
            )
        preds = logits.argmax(-1)
        return iia_scores(preds, bank.labels(self.variable), bank.changed(self.variable))

    def iia(self, bank: PairBank, model: torch.nn.Module | None = None) -> float:
        """Exact-match IIA on every pair of ``bank``."""
        return self.scores(bank, model)["iia"]

    # ------------------------------------------------------------------ io
    def to_dict(self) -> dict:
        return {
            "variable": self.variable,
            "sites": [s.to_dict() for s in self.sites],
            "weights": self.weights,
            "strength": self.strength,
            "readout": self.readout.to_dict(),
            "bases": {k: np.asarray(v).tolist() for k, v in self.bases.items()},
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: Mapping, model: torch.nn.Module | None = None) -> "Handle":
        return cls(
            variable=d["variable"],
            sites=[Site.from_dict(s) for s in d["sites"]],
            weights=list(d["weights"]),
            strength=float(d["strength"]),
            readout=Readout.from_dict(d.get("readout", {})),
            bases={k: np.asarray(v, dtype=np.float32) for k, v in d.get("bases", {}).items()},
            meta=dict(d.get("meta", {})),
            model=model,
        )

    def describe(self) -> str:
        parts = [f"{s.label}×{w:.2f}" for s, w in zip(self.sites, self.weights)]
        return f"λ={self.strength:g}: " + ", ".join(parts)
