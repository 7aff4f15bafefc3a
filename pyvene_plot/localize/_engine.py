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

import numpy as np
import pyvene as pv
import torch

from .._constants import AUTO_BATCH_MAX_ROWS, AUTO_BATCH_MB, AUTO_BATCH_MIN_ROWS
from ..data import Inputs, as_model_kwargs, inputs_len, sequence_length
from ..errors import ModelError, SiteError
from ..interventions import SoftInterchangeIntervention, SoftSpanInterchangeIntervention
from ..models import Readout, model_device, model_spec, resolve_positions

logger = logging.getLogger(__name__)


Unit = tuple  # (layer, component, position, basis_id)


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
    batch_size : int or "auto", default "auto"
        Rows per forward pass. ``"auto"`` sizes batches from a memory budget (``batch_mb``) using
        the sequence length, the widest hooked component and the output width: thousands of rows
        for small models (where per-call overhead dominates), tens to hundreds for language models.
    batch_mb : float
        Activation budget per forward for ``batch_size="auto"``.
    prefix_cache : bool or "auto", default "auto"
        Prefix caching: when every active unit of a run sits at or after layer ``l`` of a chain of
        blocks (``block_output`` of layer ``l``, or a component inside block ``l + 1``), blocks
        ``0..l`` are replayed from the clean base run instead of recomputed: their ``forward`` is
        temporarily replaced by a lookup of the cached outputs, so only the part of the network
        after the site runs. pyvene's hooks still fire on the replayed blocks, so interventions are
        unchanged and outputs are identical (tested). ``"auto"`` enables it for models in eval mode
        with token positions whose blocks are each called once per forward and return a tensor (or a
        tuple whose other entries are ``None``), within ``prefix_cache_mb`` of memory; ``True``
        forces it on for any block chain (MLPs, step RNNs), where it is exact but saves little.
    prefix_cache_mb : float
        Memory cap for the cached block outputs of one bank.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        units: Sequence[Unit],
        readout: Readout | None = None,
        bases: Mapping[str, torch.Tensor] | None = None,
        batch_size: int | str = "auto",
        prefix_cache: bool | str = "auto",
        prefix_cache_mb: float = 2048.0,
        batch_mb: float = AUTO_BATCH_MB,
    ) -> None:
        self.model = model
        self.spec = model_spec(model)
        self.readout = readout or Readout()
        if batch_size != "auto" and (not isinstance(batch_size, int) or batch_size < 1):
            raise SiteError(f"batch_size must be a positive int or 'auto', got {batch_size!r}")
        self._batch_opt = batch_size
        self.batch_mb = float(batch_mb)
        self.batch_size = 512 if batch_size == "auto" else int(batch_size)  # resolved per inputs by rows_per_batch
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
        if prefix_cache not in (True, False, "auto"):
            raise SiteError(f"prefix_cache must be True, False or 'auto', got {prefix_cache!r}")
        self.prefix_cache_mb = float(prefix_cache_mb)
        # "auto": token-sequence models only; for small position-less models (MLPs, step RNNs whose
        # cells run anyway) replaying saves nothing and its hooks cost time (measured)
        wanted = prefix_cache is True or (prefix_cache == "auto" and self.spec.has_positions)
        self._blocks, self._depth = self._replay_plan() if wanted else ([], {})
        self._prefix: dict | None = None  # {"key": ..., "outs": [Tensor (N, ...)], "tuple": [bool]}
        self._replay_rows: torch.Tensor | None = None
        self._keep_last_logits = self._accepts_logits_to_keep()

    @staticmethod
    def _representation_keys(im: pv.IntervenableModel, n: int) -> list[str]:
        keys = list(im.representations.keys())
        if len(keys) != n:  # pragma: no cover - pyvene invariant
            raise RuntimeError("unexpected pyvene representation bookkeeping")
        return keys

    # ------------------------------------------------------------------ prefix caching
    def _replay_plan(self) -> tuple[list[torch.nn.Module], dict[Unit, int]]:
        """Block modules (the chain hooked by ``block_output``) and, per unit, the last replayable block."""
        from pyvene.models.modeling_utils import get_module_hook

        if self.spec.n_layers < 2:
            return [], {}
        try:
            blocks = [
                get_module_hook(self.model, pv.RepresentationConfig(layer, "block_output", "pos", 1), backend="ndif")[0]
                for layer in range(self.spec.n_layers)
            ]
        except Exception:  # no block chain this engine understands: no replay
            return [], {}
        if len({id(b) for b in blocks}) != len(blocks):
            return [], {}
        depth: dict[Unit, int] = {}
        for u in self.units:
            layer, comp = int(u[0]), u[1]
            if comp == "block_output":
                depth[u] = layer
                continue
            try:
                mod = get_module_hook(self.model, pv.RepresentationConfig(layer, comp, "pos", 1), backend="ndif")[0]
            except Exception:
                depth[u] = -1
                continue
            inside = 0 <= layer < len(blocks) and any(m is mod for m in blocks[layer].modules())
            depth[u] = layer - 1 if inside else -1
        return blocks, depth

    def _accepts_logits_to_keep(self) -> bool:
        import inspect

        try:
            return "logits_to_keep" in inspect.signature(self.model.forward).parameters
        except (TypeError, ValueError):  # pragma: no cover
            return False

    def _run_depth(self, units) -> int:
        if not self._blocks or not units or self.model.training:  # dropout: outputs are not replayable
            return -1
        return min(self._depth.get(u, -1) for u in units)

    @staticmethod
    def _inputs_key(kw: Mapping[str, torch.Tensor]) -> tuple:
        return tuple((k, v.data_ptr(), tuple(v.shape)) for k, v in sorted(kw.items()))

    def _build_prefix(self, kw: Mapping[str, torch.Tensor], depth: int) -> bool:
        """Cache the outputs of blocks ``0..depth`` on the clean run of ``kw``; False if not replayable."""
        key = self._inputs_key(kw)
        if self._prefix is not None and self._prefix["key"] == key and self._prefix["depth"] >= depth:
            return self._prefix["ok"]
        n = inputs_len(dict(kw))
        outs: list[list[torch.Tensor]] = [[] for _ in range(depth + 1)]
        is_tuple = [False] * (depth + 1)
        calls = [0] * (depth + 1)
        ok = True

        def recorder(i):
            def hook(_m, _inp, out):
                nonlocal ok
                calls[i] += 1
                if isinstance(out, torch.Tensor):
                    outs[i].append(out.detach())
                elif isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor) and all(o is None for o in out[1:]):
                    outs[i].append(out[0].detach())
                    is_tuple[i] = True
                else:
                    ok = False
            return hook

        handles = [self._blocks[i].register_forward_hook(recorder(i)) for i in range(depth + 1)]
        n_batches = 0
        logits: list[torch.Tensor] = []
        try:
            with torch.no_grad():
                for s in range(0, n, self.batch_size):
                    part = {k: v[s : s + self.batch_size].to(self.device) for k, v in kw.items()}
                    fwd, rin = self._lm_kwargs(part)
                    logits.append(self.readout(self.model(**fwd), rin).float().cpu())
                    n_batches += 1
                    mb = sum(t.numel() * t.element_size() for o in outs for t in o) / 2**20
                    if mb > self.prefix_cache_mb:
                        logger.info("prefix cache over %.0f MB: running full forwards instead", self.prefix_cache_mb)
                        ok = False
                        break
        finally:
            for h in handles:
                h.remove()
        ok = ok and all(c == n_batches for c in calls)
        self._prefix = {
            "key": key, "depth": depth, "ok": ok, "keep": dict(kw),
            "outs": [torch.cat(o, 0) for o in outs] if ok else [], "tuple": is_tuple,
            "logits": torch.cat(logits, 0) if len(logits) == n_batches and n_batches else None,
        }
        return ok

    def _install_replay(self, depth: int) -> list[torch.nn.Module]:
        patched = []
        for i in range(depth + 1):
            blk = self._blocks[i]
            cached, as_tuple = self._prefix["outs"][i], self._prefix["tuple"][i]

            def replay(*_a, _c=cached, _t=as_tuple, **_k):
                h = _c[self._replay_rows]  # advanced indexing: a fresh tensor pyvene may write into
                return (h,) if _t else h

            blk.forward = replay
            patched.append(blk)
        return patched

    # ----------------------------------------------------------------- helpers
    def rows_per_batch(self, inputs: Inputs) -> int:
        """Rows per forward for ``inputs`` (``batch_size``, or the memory-budget estimate for "auto")."""
        if self._batch_opt != "auto":
            return int(self._batch_opt)
        kw = as_model_kwargs(inputs)
        seq = sequence_length(kw) if self.spec.has_positions else 1
        width = max(self.spec.dim(u[1]) for u in self.units)
        vocab = int(getattr(getattr(self.model, "config", None), "vocab_size", 0) or 0)
        out_w = 0 if (self._keep_last_logits and getattr(self.readout, "position", None) == "last") else vocab * seq
        row_bytes = 4 * (seq * 8 * width + out_w + vocab)
        return int(min(AUTO_BATCH_MAX_ROWS, max(AUTO_BATCH_MIN_ROWS, self.batch_mb * 2**20 // max(row_bytes, 1))))

    def _positions(self, kwargs: Mapping[str, torch.Tensor], position: int | None) -> list[int]:
        n = inputs_len(dict(kwargs))
        if not self.spec.has_positions:
            if position not in (None, 0, -1):
                raise SiteError(f"{self.spec.model_type.__name__} has a single position; got {position}")
            return [0] * n
        return resolve_positions(position, kwargs, sequence_length(kwargs), n)

    def positions(self, inputs: Inputs) -> dict[tuple, torch.Tensor]:
        """Absolute per-row positions of every raw unit for ``inputs`` (LongTensor[N] each)."""
        kw = as_model_kwargs(inputs)
        return {ru: torch.tensor(self._positions(kw, ru[2]), dtype=torch.long) for ru in self.raw_units}

    def forward_clean(self, inputs: Inputs) -> torch.Tensor:
        """Readout logits of the unintervened model, (N, C), float32 on CPU."""
        kw = as_model_kwargs(inputs)
        self.batch_size = self.rows_per_batch(kw)
        n = inputs_len(kw)
        depth = max(self._depth.values(), default=-1) if self._blocks and not self.model.training else -1
        if depth >= 0:  # the clean pass also fills the prefix cache for runs on these inputs
            self._build_prefix(kw, depth)
            if self._prefix["logits"] is not None:
                _check_finite(self._prefix["logits"], "the unintervened model")
                return self._prefix["logits"]
        out = []
        with torch.no_grad():
            for s in range(0, n, self.batch_size):
                part = {k: v[s : s + self.batch_size].to(self.device) for k, v in kw.items()}
                fwd, rin = self._lm_kwargs(part)
                out.append(self.readout(self.model(**fwd), rin).float().cpu())
        logits = torch.cat(out, 0)
        _check_finite(logits, "the unintervened model")
        return logits

    def collect(self, inputs: Inputs) -> dict[tuple, torch.Tensor]:
        """Activations of every raw unit, ``{(layer, component, position): Tensor (N, d)}`` on device."""
        kw = as_model_kwargs(inputs)
        self.batch_size = self.rows_per_batch(kw)
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
        self.batch_size = self.rows_per_batch(kw)
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
        depth = self._run_depth([u for u in coefs])
        patched = self._install_replay(depth) if depth >= 0 and self._build_prefix(kw, depth) else []
        try:
            self._run_rows(kw, index, coefs, bpos, keys, unit_of_key, source_acts, out, progress, bool(patched))
        finally:
            for blk in patched:
                del blk.forward  # back to the class's forward
            self._replay_rows = None
        logits = torch.cat(out, 0) if out else torch.zeros(0, 0)
        _check_finite(logits, "an interchange run")
        return logits

    def _lm_kwargs(self, part: Mapping[str, torch.Tensor]) -> tuple[dict, Any]:
        """Forward kwargs and readout inputs; asks a causal LM for last-token logits only when that is all the readout reads."""
        if self._keep_last_logits and getattr(self.readout, "position", None) == "last":
            mask = part.get("attention_mask")
            if mask is None or bool(mask[:, -1].all()):
                return {**part, "logits_to_keep": 1}, None
        return dict(part), part

    def _run_rows(self, kw, index, coefs, bpos, keys, unit_of_key, source_acts, out, progress, replay: bool) -> None:
        m = int(index.shape[0])
        with torch.no_grad():
            for s in range(0, m, self.batch_size):
                idx = index[s : s + self.batch_size]
                b = int(idx.shape[0])
                if replay:
                    self._replay_rows = idx.to(self.device)
                part = {k: v[idx].to(self.device) for k, v in kw.items()}
                locs, subsp, reps = [], [], {}
                uniform = True
                for key in keys:
                    u = unit_of_key[key]
                    ru = (u[0], u[1], u[2])
                    c = coefs.get(u)
                    if c is None:  # inactive unit: pyvene skips keys without source activations
                        locs.append(np.zeros((b, 1), dtype=np.int64))
                        subsp.append(None)
                        continue
                    p = bpos[ru][idx]
                    if bool((p == p[0]).all()):
                        locs.append(np.full((b, 1), int(p[0]), dtype=np.int64))
                    else:
                        uniform = False
                        locs.append(p.numpy().astype(np.int64).reshape(b, 1))
                    subsp.append(c[s : s + b].to(self.device))
                    reps[key] = source_acts[ru][idx.to(source_acts[ru].device)].to(self.device).unsqueeze(1)
                # pyvene's fast scatter writes every row at row 0's positions: only correct (and
                # only used) when all rows share their positions; reset before every call.
                self.im.use_fast = uniform
                fwd, rin = self._lm_kwargs(part)
                if not reps:
                    out.append(self.readout(self.model(**fwd), rin).float().cpu())
                    if progress is not None:
                        progress.update(b)
                    continue
                _, cf = self.im(
                    fwd,
                    unit_locations={"sources->base": (locs, locs)},
                    source_representations=dict(reps),
                    subspaces=subsp,
                )
                out.append(self.readout(cf, rin).float().cpu())
                if progress is not None:
                    progress.update(b)


def _check_finite(logits: torch.Tensor, where: str) -> None:
    if logits.numel() and not torch.isfinite(logits).all():
        bad = (~torch.isfinite(logits)).any(-1).nonzero().flatten()[:5].tolist()
        raise ModelError(
            f"non-finite logits (NaN or inf) from {where} (first bad rows {bad}); check the model's "
            "weights and inputs (and the intervention strength: very large λ can overflow)"
        )
