"""The parallel-training vehicle of Optimal Ablation: one pyvene model ablating many targets at once.

:class:`AblationRunner` wraps the model in one pyvene ``IntervenableModel`` holding a
:class:`_BatchedAblation` per hook; each row of a batch is ablated for (at most) one target, so one
forward pass evaluates or trains every target of a chunk. ``_BatchedAblation`` is a training-time
helper and is never saved (results hand out :class:`~pyvene_plot.OptimalAblationIntervention` s),
so it stays here rather than in :mod:`pyvene_plot.interventions`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pyvene as pv
import torch

from ...models import Readout, Site, model_device
from ._forward import row_locations
from ._targets import AblationTarget


class _BatchedAblation(pv.SourcelessIntervention, pv.TrainableIntervention, pv.LocalistRepresentationIntervention):
    """Internal: one hook, many sites, one row each (the parallel-training vehicle of :func:`~pyvene_plot.optimal_ablation`).

    Every call receives, as its ``subspaces`` entry, ``{"native": (vals (B, d), mask (B, d)) or None,
    "span": [(rows (B,) bool, V (k, d), a (k,) or (n_rows, k)), ...], "pos": LongTensor (B,) or
    None}``: rows take ``vals`` where ``mask`` is set (native coordinates; a row is ablated for at
    most one site) and, for span sites, ``h + (a − h Vᵀ) V``. With ``pos`` the intervention receives
    the whole ``(B, T, d)`` output (pyvene ``unit_locations`` None) and edits row ``b`` at position
    ``pos[b]`` only. Never saved (results hand out
    :class:`~pyvene_plot.interventions.OptimalAblationIntervention` s).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.is_source_constant = True
        self.keep_last_dim = True

    def forward(self, base: torch.Tensor, source: Any = None, subspaces: Any = None, **kwargs: Any) -> torch.Tensor:
        """``base`` ((B, 1, d) gathered rows, or (B, T, d) with ``pos``) with every row's ablation applied."""
        spec = subspaces or {}
        pos = spec.get("pos")
        if pos is None or base.dim() < 3:  # gathered rows (B, 1, d), or a model without a sequence axis
            return self._edit(base, spec)
        # the whole (B, T, d) tensor: rows are edited at their own positions only
        ar = torch.arange(base.shape[0], device=base.device)
        pos = pos.to(base.device)
        return base.index_put((ar, pos), self._edit(base[ar, pos], spec))

    @staticmethod
    def _edit(h: torch.Tensor, spec: Mapping) -> torch.Tensor:
        """Rows ``h`` (B, ..., d) with the native values and span constants of ``spec`` applied."""
        out = h
        native = spec.get("native")
        if native is not None:
            vals, mask = native
            shape = (h.shape[0],) + (1,) * (h.dim() - 2) + (h.shape[-1],)
            out = torch.where(mask.view(shape), vals.to(h.dtype).view(shape), out)
        for rows, V, a in spec.get("span", ()):
            if not bool(rows.any()):
                continue
            sel = out[rows]
            a = a.to(sel.dtype)
            if a.dim() == 2:
                a = a.reshape(a.shape[0], *([1] * (sel.dim() - 2)), a.shape[1])
            out = out.index_put((rows,), sel + (a - sel @ V.T) @ V)
        return out


class AblationRunner:
    """One pyvene ``IntervenableModel`` with a :class:`_BatchedAblation` per hook used by a chunk of targets.

    Row ``r`` of a batch is ablated for target ``target_of_row[r]`` (-1: none) at every unit of that
    target; each target's native unit at a hook is a *slot* of that hook's value table (S, d).

    Parameters
    ----------
    model : torch.nn.Module
        The frozen model.
    targets : sequence of AblationTarget
        The targets of the chunk (target ``t`` is ablated on the rows with ``target_of_row == t``).
    readout : Readout
        Output -> logits ``(B, C)``.
    """

    def __init__(self, model: torch.nn.Module, targets: Sequence[AblationTarget], readout: Readout) -> None:
        self.model = model
        self.readout = readout
        self.device = model_device(model)
        self.targets = list(targets)
        T = len(targets)
        self.hooks: list[tuple] = list(dict.fromkeys(u.raw for t in targets for u in t.units))
        self.d = {h: next(u.d for t in targets for u in t.units if u.raw == h) for h in self.hooks}
        self.native: dict[tuple, list[tuple[int, int]]] = {h: [] for h in self.hooks}
        self.span: dict[tuple, list[tuple[int, int]]] = {h: [] for h in self.hooks}
        for t, tg in enumerate(targets):
            for j, u in enumerate(tg.units):
                (self.span if u.V is not None else self.native)[u.raw].append((t, j))
        # slot lookup: target -> slot of its native unit at the hook (index T maps "no target" to -1)
        self.slot_of: dict[tuple, torch.Tensor] = {}
        self.mask: dict[tuple, torch.Tensor] = {}
        for h in self.hooks:
            lut = torch.full((T + 1,), -1, dtype=torch.long)
            m = torch.zeros(max(1, len(self.native[h])), self.d[h], dtype=torch.bool)
            for s, (t, j) in enumerate(self.native[h]):
                lut[t] = s
                u = targets[t].units[j]
                m[s, list(u.dims) if u.dims is not None else slice(None)] = True
            self.slot_of[h] = lut.to(self.device)
            self.mask[h] = m.to(self.device)
        # (slot, coordinate) of every entry of the concatenated native constants, per hook
        self._scatter_index: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        for h in self.hooks:
            r, c = [], []
            for s, (t, j) in enumerate(self.native[h]):
                u = targets[t].units[j]
                cols = list(u.dims) if u.dims is not None else list(range(self.d[h]))
                r += [s] * len(cols)
                c += cols
            self._scatter_index[h] = (torch.tensor(r, dtype=torch.long, device=self.device),
                                      torch.tensor(c, dtype=torch.long, device=self.device))
        # hooks whose pyvene card entry has no split function hand the whole (B, T, d) tensor to the
        # intervention (unit_locations None), which edits each row at its position: no per-row Python
        # lists on the hot path. Split components (q/k/v, heads) use pyvene's per-row locations.
        card = pv.type_to_module_mapping.get(type(model), {})
        self.whole = {h: len(card.get(h[1], ())) == 2 for h in self.hooks}
        ivs = {h: _BatchedAblation(embed_dim=self.d[h]) for h in self.hooks}
        reps = [Site(h[0], h[1], h[2]).to_representation(intervention=ivs[h]) for h in self.hooks]
        self.im = pv.IntervenableModel(reps, model, use_fast=False)
        self.im.disable_model_gradients()
        self.im.set_device(self.device)
        hook_of = {id(iv): h for h, iv in ivs.items()}
        self.keys = list(self.im.sorted_keys)
        self.key_hook = [hook_of[id(self.im.interventions[k])] for k in self.keys]

    # ------------------------------------------------------------------ value tables
    def tables(self, values: Mapping[tuple[int, int], torch.Tensor]) -> dict[tuple, torch.Tensor]:
        """Per hook, the (S, d) table holding every native slot's constant at its coordinates."""
        out = {}
        for h in self.hooks:
            if not self.native[h]:
                continue
            flat = torch.cat([values[u].to(self.device).reshape(-1) for u in self.native[h]])
            rows, cols = self._scatter_index[h]
            out[h] = torch.zeros(len(self.native[h]), self.d[h], device=self.device, dtype=flat.dtype).index_put(
                (rows, cols), flat)
        return out

    def logits(
        self,
        kw: Mapping[str, torch.Tensor],
        positions: Mapping[tuple, torch.Tensor],
        target_of_row: torch.Tensor,
        values: Mapping[tuple[int, int], torch.Tensor] | None = None,
        tables: Mapping[tuple, torch.Tensor] | None = None,
        row_acts: Mapping[tuple, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Read-out logits ``(M, C)`` (on device; differentiable in ``values`` / ``tables``).

        Constants come from ``values[(t, j)]`` (k,) (native ones through ``tables``, built from
        ``values`` when not given), or, for resampling, every ablated row takes the hook's
        activation ``row_acts[hook]`` (M, d) of another example.
        """
        T = len(self.targets)
        tor = torch.where(target_of_row < 0, torch.full_like(target_of_row, T), target_of_row)
        if row_acts is None and tables is None:
            tables = self.tables(values)
        locs, subsp = [], []
        for key, h in zip(self.keys, self.key_hook):
            if self.whole[h]:
                locs.append(None)
                entry: dict[str, Any] = {"native": None, "span": [], "pos": positions[h]}
            else:
                locs.append(row_locations(positions[h]))
                entry = {"native": None, "span": [], "pos": None}
            slot = self.slot_of[h][tor]
            if self.native[h]:
                has = slot >= 0
                safe = slot.clamp_min(0)
                vals = row_acts[h] if row_acts is not None else tables[h][safe]
                entry["native"] = (vals, self.mask[h][safe] & has.unsqueeze(1))
            for (t, j) in self.span[h]:
                rows = target_of_row == t
                u = self.targets[t].units[j]
                V = u.V.to(self.device)
                if row_acts is not None:
                    a = row_acts[h][rows] @ V.T
                else:
                    a = values[(t, j)].to(self.device)
                entry["span"].append((rows, V, a))
            subsp.append(entry)
        self.im.use_fast = False
        # ("sources->base": (None, base locations)) is pyvene's base-only form without its list-depth scan
        _, cf = self.im(dict(kw), unit_locations={"sources->base": (None, locs)}, subspaces=subsp)
        return self.readout(cf, kw)
