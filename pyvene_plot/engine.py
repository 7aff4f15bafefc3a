"""The interchange engine: batched soft interchanges through one pyvene ``IntervenableModel``.

Every PLOT computation is an interchange at some set of sites with some coefficients. The engine
builds one :class:`pyvene.IntervenableModel` holding a PLOT intervention for every *unit*
(layer, component, position, basis) a computation needs, collects source activations once per bank
(pyvene ``CollectIntervention``), and then runs any number of interchange "rows": row ``r``
intervenes on example ``index[r]`` with per-unit coefficient vectors ``coef[unit][r]`` (passed to
the intervention through pyvene's ``subspaces`` channel) and precomputed source activations (pyvene's
``source_representations``). Sites, calibration candidates and handles are all rows, so a sweep over
48 sites x 1000 pairs is a handful of batched forwards with no per-site model rebuild.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import pyvene as pv
import torch

from .banks import Inputs, inputs_len
from .errors import ModelError, SiteError
from .interventions import SoftInterchangeIntervention, SoftSpanInterchangeIntervention
from .readout import Readout
from .sites import model_spec, resolve_positions

logger = logging.getLogger(__name__)

__all__ = ["InterchangeEngine", "as_model_kwargs", "Unit"]

Unit = tuple  # (layer, component, position, basis_id)


def as_model_kwargs(x: Inputs) -> dict[str, torch.Tensor]:
    """Model keyword arguments: integer tensors are ``input_ids``, float tensors ``inputs_embeds``."""
    if isinstance(x, torch.Tensor):
        return {"input_ids": x} if not x.dtype.is_floating_point else {"inputs_embeds": x}
    return dict(x)


def _seq_len(kwargs: Mapping[str, torch.Tensor]) -> int:
    for k in ("input_ids", "inputs_embeds", "attention_mask"):
        if k in kwargs:
            t = kwargs[k]
            return int(t.shape[1]) if t.dim() >= 2 else 1
    t = next(iter(kwargs.values()))
    return int(t.shape[1]) if t.dim() >= 2 else 1


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


class InterchangeEngine:
    """Batched interchange runner over a fixed set of units.

    Parameters
    ----------
    model : torch.nn.Module
        A model pyvene can hook.
    units : sequence of tuple
        ``(layer, component, position, basis_id)`` units; ``basis_id`` None for native coordinates.
    readout : Readout, optional
        Output -> logits ``(B, C)``.
    bases : dict of str to Tensor, optional
        ``basis_id -> V`` (r, d) with orthonormal rows, for span units.
    batch_size : int
        Rows per forward pass.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        units: Sequence[Unit],
        readout: Readout | None = None,
        bases: Mapping[str, torch.Tensor] | None = None,
        batch_size: int = 512,
    ) -> None:
        self.model = model
        self.spec = model_spec(model)
        self.readout = readout or Readout()
        self.batch_size = int(batch_size)
        self.units: list[Unit] = list(dict.fromkeys(tuple(u) for u in units))
        if not self.units:
            raise SiteError("the engine needs at least one unit (site)")
        self.bases = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in (bases or {}).items()}
        self.device = model_device(model)
        self.widths: dict[Unit, int] = {}
        reps, ivs = [], []
        for u in self.units:
            layer, comp, pos, basis = u
            d = self.spec.dim(comp)
            if basis is None:
                iv = SoftInterchangeIntervention(embed_dim=d, weight=torch.zeros(d))
                self.widths[u] = d
            else:
                if basis not in self.bases:
                    raise SiteError(f"unit {u}: basis {basis!r} was not provided to the engine")
                V = self.bases[basis]
                if V.shape[1] != d:
                    raise SiteError(f"basis {basis!r} has width {V.shape[1]} but {comp} has width {d}")
                iv = SoftSpanInterchangeIntervention(
                    embed_dim=d, low_rank_dimension=int(V.shape[0]), basis=V, weight=torch.zeros(V.shape[0])
                )
                self.widths[u] = int(V.shape[0])
            ivs.append(iv)
            reps.append({"layer": layer, "component": comp, "unit": "pos", "max_number_of_units": 1, "intervention": iv})
        self.im = pv.IntervenableModel(reps, model, use_fast=False)
        self.im.disable_model_gradients()
        self.im.set_device(self.device)
        key_of_iv = {id(iv): k for k, iv in self.im.interventions.items()}
        self.key: dict[Unit, str] = {u: key_of_iv[id(iv)] for u, iv in zip(self.units, ivs)}
        # raw activation units (the basis does not change what is collected)
        self.raw_units = list(dict.fromkeys((u[0], u[1], u[2]) for u in self.units))
        creps = [
            {"layer": l, "component": c, "unit": "pos", "max_number_of_units": 1, "intervention_type": pv.CollectIntervention}
            for (l, c, _p) in self.raw_units
        ]
        self.collector = pv.IntervenableModel(creps, model, use_fast=False)
        self.collector.disable_model_gradients()
        self.collector.set_device(self.device)
        # collector keys in representation order: pyvene numbers duplicates of (layer, comp) by #k
        self._collect_order = self._representation_keys(self.collector, len(creps))

    @staticmethod
    def _representation_keys(im: pv.IntervenableModel, n: int) -> list[str]:
        keys = list(im.representations.keys())
        if len(keys) != n:  # pragma: no cover - pyvene invariant
            raise RuntimeError("unexpected pyvene representation bookkeeping")
        return keys

    # ----------------------------------------------------------------- helpers
    def _positions(self, kwargs: Mapping[str, torch.Tensor], position: int | None) -> list[int]:
        n = inputs_len(dict(kwargs))
        if not self.spec.has_positions:
            if position not in (None, 0, -1):
                raise SiteError(f"{self.spec.model_type.__name__} has a single position; got {position}")
            return [0] * n
        return resolve_positions(position, kwargs, _seq_len(kwargs), n)

    def positions(self, inputs: Inputs) -> dict[tuple, torch.Tensor]:
        """Absolute per-row positions of every raw unit for ``inputs`` (LongTensor[N] each)."""
        kw = as_model_kwargs(inputs)
        return {ru: torch.tensor(self._positions(kw, ru[2]), dtype=torch.long) for ru in self.raw_units}

    def forward_clean(self, inputs: Inputs) -> torch.Tensor:
        """Readout logits of the unintervened model, (N, C), float32 on CPU."""
        kw = as_model_kwargs(inputs)
        n = inputs_len(kw)
        out = []
        with torch.no_grad():
            for s in range(0, n, self.batch_size):
                part = {k: v[s : s + self.batch_size].to(self.device) for k, v in kw.items()}
                out.append(self.readout(self.model(**part), part).float().cpu())
        logits = torch.cat(out, 0)
        _check_finite(logits, "the unintervened model")
        return logits

    def collect(self, inputs: Inputs) -> dict[tuple, torch.Tensor]:
        """Activations of every raw unit, ``{(layer, component, position): Tensor (N, d)}`` on device."""
        kw = as_model_kwargs(inputs)
        n = inputs_len(kw)
        pos = self.positions(inputs)
        chunks: dict[tuple, list[torch.Tensor]] = {ru: [] for ru in self.raw_units}
        with torch.no_grad():
            for s in range(0, n, self.batch_size):
                part = {k: v[s : s + self.batch_size].to(self.device) for k, v in kw.items()}
                b = inputs_len(part)
                locs = []
                for key in self.collector.sorted_keys:
                    ru = self.raw_units[self._collect_order.index(key)]
                    locs.append([[int(p)] for p in pos[ru][s : s + b]])
                (_, acts), _ = self.collector(part, unit_locations={"base": locs})
                for key, a in zip(self.collector.sorted_keys, acts):
                    ru = self.raw_units[self._collect_order.index(key)]
                    chunks[ru].append(a.reshape(b, -1).detach())
        return {ru: torch.cat(v, 0) for ru, v in chunks.items()}

    # --------------------------------------------------------------------- run
    def run(
        self,
        base: Inputs,
        source_acts: Mapping[tuple, torch.Tensor],
        coefs: Mapping[Unit, torch.Tensor],
        index: torch.Tensor | None = None,
        base_positions: Mapping[tuple, torch.Tensor] | None = None,
        progress: Any = None,
    ) -> torch.Tensor:
        """Run interchange rows and return readout logits ``(M, C)`` (float32, CPU).

        Parameters
        ----------
        base : inputs of N examples
        source_acts : dict raw unit -> Tensor (N, d)
            Source activations (from :meth:`collect` on the source inputs).
        coefs : dict unit -> Tensor (M, w)
            Per-row effective coefficients (``strength * weight``) of each unit; units left out get 0.
        index : LongTensor (M,), optional
            Example of each row; default ``arange(N)`` (then M = N).
        base_positions : dict, optional
            Precomputed :meth:`positions` of ``base``.
        progress : tqdm-like, optional
            Updated with the number of rows done.
        """
        kw = as_model_kwargs(base)
        n = inputs_len(kw)
        index = torch.arange(n) if index is None else torch.as_tensor(index, dtype=torch.long)
        m = int(index.shape[0])
        for u in coefs:
            if u not in self.key:
                raise SiteError(f"unit {u} is not part of this engine")
            if coefs[u].shape != (m, self.widths[u]):
                raise SiteError(f"coefficients of unit {u} have shape {tuple(coefs[u].shape)}, expected ({m}, {self.widths[u]})")
        bpos = base_positions or self.positions(base)
        keys = self.im.sorted_keys
        unit_of_key = {k: u for u, k in self.key.items()}
        out = []
        with torch.no_grad():
            for s in range(0, m, self.batch_size):
                idx = index[s : s + self.batch_size]
                b = int(idx.shape[0])
                part = {k: v[idx].to(self.device) for k, v in kw.items()}
                locs, subsp, reps = [], [], {}
                uniform = True
                for key in keys:
                    u = unit_of_key[key]
                    ru = (u[0], u[1], u[2])
                    c = coefs.get(u)
                    if c is None:  # inactive unit: pyvene skips keys without source activations
                        locs.append([[0]] * b)
                        subsp.append(None)
                        continue
                    p = bpos[ru][idx]
                    if bool((p == p[0]).all()):
                        locs.append([[int(p[0])]] * b)
                    else:
                        uniform = False
                        locs.append([[int(x)] for x in p.tolist()])
                    subsp.append(c[s : s + b].to(self.device))
                    reps[key] = source_acts[ru][idx.to(source_acts[ru].device)].to(self.device).unsqueeze(1)
                # pyvene's fast scatter writes every row at row 0's positions: only correct (and
                # only used) when all rows share their positions; reset before every call.
                self.im.use_fast = uniform
                if not reps:
                    out.append(self.readout(self.model(**part), part).float().cpu())
                    if progress is not None:
                        progress.update(b)
                    continue
                _, cf = self.im(
                    part,
                    unit_locations={"sources->base": (locs, locs)},
                    source_representations=dict(reps),
                    subspaces=subsp,
                )
                logits = self.readout(cf, part).float().cpu()
                out.append(logits)
                if progress is not None:
                    progress.update(b)
        logits = torch.cat(out, 0) if out else torch.zeros(0, 0)
        _check_finite(logits, "an interchange run")
        return logits


def _check_finite(logits: torch.Tensor, where: str) -> None:
    if logits.numel() and not torch.isfinite(logits).all():
        bad = (~torch.isfinite(logits)).any(-1).nonzero().flatten()[:5].tolist()
        raise ModelError(
            f"non-finite logits (NaN or inf) from {where} (first bad rows {bad}); check the model's "
            "weights and inputs (and the intervention strength: very large λ can overflow)"
        )
