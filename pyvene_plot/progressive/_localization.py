"""What a progressive schedule returns: :class:`Localization` (per-stage results, kept sites, bases,
screening reports), its DAS menu (:meth:`Localization.das_specs`) and its JSON round trip."""

from __future__ import annotations

import copy as _copy
import logging as _logging
from collections.abc import Mapping as _Mapping
from collections.abc import Sequence as _Sequence
from pathlib import Path

import numpy as _np
import torch

from .._utils import atomic_write_json, load_json_as, require_keys, writer_tag
from ..data import PairBank
from ..errors import PlotError
from ..localize import AlignmentResult
from ..models import Site, model_spec
from ._stages import Stage, default_sizes

_log = _logging.getLogger(__name__)

#: layout of the JSON written by :meth:`Localization.to_json` (2: ``handle_stage``, ``competition``,
#: ``support_width`` and ``compete`` added; version-1 files are still read, each stage's own handle in effect)
FORMAT_VERSION = 2
#: versions :meth:`Localization.from_dict` reads
_READS = (1, 2)
#: keys :meth:`Localization.from_dict` cannot do without
_REQUIRED_KEYS = ("kind", "format_version", "variables", "stages", "results", "kept", "kept_reason", "runtime_s",
                  "pca_runtime_s", "pca_info", "candidates", "bases", "screens")
#: keys a version-2 file adds
_REQUIRED_KEYS_V2 = ("compete", "handle_stage", "competition", "support_width")


class Localization:
    """What :meth:`ProgressiveScheduler.run` returns.

    Attributes
    ----------
    stages : list of AlignmentResult
        One result per stage, in order, each with its own ``runtime_s``.
    kept : list of dict
        Per stage, ``variable -> list of kept Site`` (what the next stage narrows to): the sites
        of the handle in effect; where a refinement lost the competition, the previous stage's.
    kept_reason : list of dict
        Per stage and variable, for each kept site: ``"handle"`` (a site of the calibrated handle),
        ``"ranking"`` (fallback from the coupling ranking when the handle had fewer sites) or
        ``"previous"`` (the refinement lost the competition; the previous stage's kept site).
    handle_stage : list of dict
        Per stage, ``variable -> index of the stage whose handle is in effect`` after it (its own
        index unless the refinement lost the competition).
    competition : list of dict or None
        Per stage, None (the first stage, or ``compete=False``) or the competition record
        ``{"rule", "tolerance", "runtime_s", "variables": {v: {"kept": "refined" | "previous",
        "reason", "previous_stage", "refined_scores", "previous_scores"}}}`` (calibration scores).
    support_width : list of dict
        Per stage, ``variable -> {"refined": width of the stage's own handle, "kept": width of the
        handle in effect}``; the width is the number of dimensions a handle intervenes on (whole
        vector width, number of coordinates, or span rank; summed over hooks).
    compete : bool
        Whether the schedule ran with competition.
    bases : dict of str to ndarray
        Orthonormal bases (rows) fitted by ``pca`` and ``lib`` stages, keyed ``"pca:..."`` / ``"lib:..."``.
    runtime_s : float
        Total wall time: all stages plus PCA fits.
    """

    def __init__(self, model, variables, stages, kept, kept_reason, bases, runtime_s, stage_specs, extra_s,
                 candidates=None, pca_info=None, screens=None, handle_stage=None, competition=None,
                 support_width=None, compete=False):
        self.model = model
        self.variables = list(variables)
        self.stages: list[AlignmentResult] = stages
        self.kept = kept
        self.kept_reason = kept_reason
        self.bases = bases
        self.runtime_s = runtime_s
        self.stage_specs: list[Stage] = stage_specs
        self.extra_s = extra_s
        #: per stage, ``variable -> list of Site`` it was allowed to use
        self.candidates: list[dict[str, list[Site]]] = candidates or []
        #: per PCA / LIB basis: number of states it was fitted on and its rank (LIB: ``kind``, importances)
        self.pca_info: dict[str, dict] = pca_info or {}
        #: per stage, None or the screening report (screener, threshold, rule, scores, dropped sites, ...)
        self.screens: list[dict | None] = screens or [None] * len(stages)
        self.handle_stage: list[dict[str, int]] = (handle_stage if handle_stage is not None
                                                   else [{v: i for v in self.variables} for i in range(len(stages))])
        self.competition: list[dict | None] = competition if competition is not None else [None] * len(stages)
        #: per stage, ``variable -> {"refined": int, "kept": int}`` (empty dicts when unknown)
        self.support_width: list[dict[str, dict]] = support_width if support_width is not None else [{} for _ in stages]
        self.compete = bool(compete)

    def __repr__(self) -> str:
        kinds = "→".join(s.kind for s in self.stage_specs)
        return f"Localization({kinds}, runtime_s={self.runtime_s:.2f}, final={ {v: [s.label for s in k] for v, k in self.kept[-1].items()} })"

    @property
    def final(self) -> AlignmentResult:
        """The last stage's result (its own handles; :attr:`handles` are the handles in effect)."""
        return self.stages[-1]

    def kept_handles(self, stage: int = -1) -> dict:
        """``variable -> Handle`` in effect after ``stage``: the stage's own, or an earlier one it did not beat."""
        st_i = stage if stage >= 0 else len(self.stages) + stage
        return {v: self.stages[j].handles[v] for v, j in self.handle_stage[st_i].items()}

    @property
    def handles(self) -> dict:
        """The final handles: ``variable -> Handle`` in effect after the last stage."""
        return self.kept_handles(-1)

    def n_sites_evaluated(self) -> int:
        return int(sum(len(r.sites) for r in self.stages))

    def runtime_until(self, n_stages: int) -> float:
        """Wall time of the first ``n_stages`` stages (PCA fits and screening of those stages included)."""
        screen_s = sum((sc or {}).get("runtime_s", 0.0) for sc in self.screens[:n_stages])
        compete_s = sum((c or {}).get("runtime_s", 0.0) for c in self.competition[:n_stages])
        return float(sum(r.runtime_s for r in self.stages[:n_stages]) + sum(self.extra_s[:n_stages]) + screen_s
                     + compete_s)

    def evaluate(self, bank: PairBank, stage: int = -1, detail: bool = False, own: bool = False) -> dict:
        """Transport-only IIA of the handles in effect after ``stage`` (default: the final handles).

        ``own=True`` evaluates the stage's own handles instead (what the stage calibrated, whether
        or not they won the competition).
        """
        if own:
            return self.stages[stage].evaluate(bank, detail=detail)
        bank.check_variables(self.variables)
        out = {v: h.scores(bank, self.model) for v, h in self.kept_handles(stage).items()}
        return out if detail else {v: s["iia"] for v, s in out.items()}

    def das_specs(self, subspace_sizes: _Sequence[int] | None = None, stage: int = -1,
                  include_handle: bool = True, include_parent: bool = True) -> list:
        """Narrowed :class:`~pyvene_plot.das.DASSpec` menu per variable for pyvene DAS training.

        Per variable, at most three supports (deduplicated), among which :func:`~pyvene_plot.run_das`
        chooses on the calibration bank:

        1. ``kept``: the union of the sites kept after the stage (after a ``coordinates`` stage the
           union of the kept coordinate groups; after ``pca`` the span of the kept bands or prefix;
           after ``layer``/``position`` the whole vector);
        2. ``handle``: the union of the sites of the handle in effect (:meth:`kept_handles`: the
           stage's calibrated handle, or the earlier handle it did not beat), per hook;
        3. ``parent``: the whole vector at the hook of the kept sites (the coarse site the fine
           stage refined), the reference's fallback support.

        Each spec's ``source`` is ``plot:{kind}:{tag}`` with the kind of the stage whose handle is in
        effect. Subspace sizes default to powers of two below the support width plus the width (at
        most 8 values); pass ``subspace_sizes`` to use one grid everywhere (clipped to each width).
        """
        from ..das import DASSpec

        st_i = stage if stage >= 0 else len(self.stages) + stage
        specs, seen = [], set()

        def add(v, res, kind, layer, comp, pos, basis, dims, tag):
            if basis is not None:
                V = _np.asarray(res.bases[basis] if basis in res.bases else self.bases[basis])
                rows = list(dims) if dims is not None else list(range(V.shape[0]))
                width = len(rows)
                spec_basis, spec_dims, key_b = V[rows], None, (basis, tuple(rows))
            else:
                full = model_spec(self.model).dim(comp)
                if dims is not None and tuple(dims) == tuple(range(full)):
                    dims = None  # a support covering every coordinate is the whole vector
                width = len(dims) if dims is not None else full
                spec_basis, spec_dims, key_b = None, (tuple(dims) if dims is not None else None), None
            key = (v, layer, comp, pos, spec_dims, key_b)
            if key in seen:
                return
            seen.add(key)
            sizes = tuple(subspace_sizes) if subspace_sizes is not None else default_sizes(width)
            sizes = tuple(k for k in sizes if k <= width) or (width,)
            specs.append(DASSpec(variable=v, layer=layer, component=comp, position=pos, dims=spec_dims,
                                 basis=spec_basis, subspace_sizes=sizes, source=f"plot:{kind}:{tag}"))

        for v in self.variables:
            j = self.handle_stage[st_i][v]
            res, kind = self.stages[j], self.stage_specs[j].kind
            kept = self.kept[st_i][v]
            for (layer, comp, pos, basis), dims in _grouped(kept):
                add(v, res, kind, layer, comp, pos, basis, dims, "kept")
            if include_handle:
                for (layer, comp, pos, basis), dims in _grouped(res.handles[v].sites):
                    add(v, res, kind, layer, comp, pos, basis, dims, "handle")
            if include_parent:
                for (layer, comp, pos, _basis), _dims in _grouped(kept):
                    add(v, res, kind, layer, comp, pos, None, None, "parent")
        return specs

    def to_dict(self) -> dict:
        """A JSON-ready dict (read back by :meth:`from_dict`)."""
        return {
            "kind": "Localization",
            "format_version": FORMAT_VERSION,
            "writer": writer_tag(),
            "variables": self.variables,
            "stages": [s.to_dict() for s in self.stage_specs],
            "results": [r.to_dict() for r in self.stages],
            "kept": [_sites_by_variable(k) for k in self.kept],
            "kept_reason": self.kept_reason,
            "runtime_s": self.runtime_s,
            "stage_runtime_s": [r.runtime_s for r in self.stages],
            "pca_runtime_s": self.extra_s,
            "pca_info": self.pca_info,
            "n_candidates": [{v: len(c) for v, c in cs.items()} for cs in self.candidates],
            "candidates": [_sites_by_variable(cs) for cs in self.candidates],
            "bases": {k: _np.asarray(v).tolist() for k, v in self.bases.items()},
            "screens": self.screens,
            "compete": self.compete,
            "handle_stage": [dict(hs) for hs in self.handle_stage],
            "competition": _copy.deepcopy(self.competition),
            "support_width": [{v: dict(w) for v, w in sw.items()} for sw in self.support_width],
        }

    def to_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` atomically as JSON (read back by :meth:`from_json`)."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, d: _Mapping, model: torch.nn.Module | None = None) -> "Localization":
        """Inverse of :meth:`to_dict`; with ``model`` every stage's handles come back runnable.

        Raises
        ------
        PlotError
            On a missing field, another kind of object or an unsupported ``format_version``.
        """
        require_keys(d, _REQUIRED_KEYS, "Localization")
        if d["kind"] != "Localization":
            raise PlotError(f"not a Localization (kind={d['kind']!r})")
        if d["format_version"] not in _READS:
            raise PlotError(f"unsupported Localization format_version {d['format_version']!r}; "
                            f"this version reads {list(_READS)}")
        if d["format_version"] >= 2:
            require_keys(d, _REQUIRED_KEYS_V2, "Localization")
        results = [AlignmentResult.from_dict(r, model=model) for r in d["results"]]
        try:
            stage_specs = [Stage.from_dict(s) for s in d["stages"]]
            kept = [_sites_from_dicts(k) for k in d["kept"]]
            candidates = [_sites_from_dicts(c) for c in d["candidates"]]
            bases = {k: _np.asarray(v, dtype=_np.float32) for k, v in d["bases"].items()}
            kept_reason = [{v: list(r) for v, r in k.items()} for k in d["kept_reason"]]
            extra_s = [float(x) for x in d["pca_runtime_s"]]
            new = _new_fields(d, len(d["results"]))
        except KeyError as exc:
            raise PlotError(f"Localization is incomplete: a stage or site lacks {exc}") from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise PlotError(f"Localization is malformed: {exc}") from None
        n = len(results)
        lengths = {"stages": len(stage_specs), "kept": len(kept), "kept_reason": len(kept_reason),
                   "pca_runtime_s": len(extra_s), "screens": len(d["screens"]),
                   **{k: len(new[k]) for k in ("handle_stage", "competition", "support_width")}}
        short = {k: m for k, m in lengths.items() if m != n}
        if short:
            raise PlotError(f"Localization is incomplete: {n} stage results but {short} entries")
        return cls(model, [str(v) for v in d["variables"]], results, kept, kept_reason, bases, float(d["runtime_s"]),
                   stage_specs, extra_s, candidates=candidates, pca_info=dict(d["pca_info"]),
                   screens=list(d["screens"]), **new)

    @classmethod
    def from_json(cls, path: str | Path, model: torch.nn.Module | None = None) -> "Localization":
        """Inverse of :meth:`to_json`; ``model`` makes every stage's handles runnable.

        An empty, truncated or incomplete file raises :class:`PlotError` naming the file and the gap.
        """
        return load_json_as(cls, path, model=model)

    def plot(self, folder: str | Path) -> list[Path]:
        """One coupling heatmap per stage (``stage{i}_{kind}.png``); returns the paths."""
        out = []
        for i, (st, r) in enumerate(zip(self.stage_specs, self.stages)):
            p = Path(folder) / f"stage{i}_{st.kind}.png"
            r.plot(p)
            out.append(p)
        return out


def _new_fields(d: _Mapping, n: int) -> dict:
    """``handle_stage``, ``competition``, ``support_width``, ``compete`` of a dict (version-1 defaults)."""
    if d["format_version"] < 2:  # before competition: each stage's own handle was in effect
        variables = [str(v) for v in d["variables"]]
        return {"handle_stage": [{v: i for v in variables} for i in range(n)], "competition": [None] * n,
                "support_width": [{} for _ in range(n)], "compete": False}
    handle_stage = [{str(v): int(j) for v, j in hs.items()} for hs in d["handle_stage"]]
    bad = [(i, v, j) for i, hs in enumerate(handle_stage) for v, j in hs.items() if not 0 <= j <= i]
    if bad:
        raise PlotError(f"Localization handle_stage names stages that do not precede their stage: {bad[:3]}")
    return {"handle_stage": handle_stage,
            "competition": list(d["competition"]),
            "support_width": [{str(v): {k: int(w) for k, w in ws.items()} for v, ws in sw.items()}
                              for sw in d["support_width"]],
            "compete": bool(d["compete"])}


def _grouped(sites: _Sequence[Site]):
    """``((layer, component, position, basis), dims)`` per hook: the union of the sites' dims (None: whole)."""
    by_unit: dict[tuple, list[Site]] = {}
    for s in sites:
        by_unit.setdefault((s.layer, s.component, s.position, s.basis), []).append(s)
    for unit, group in by_unit.items():
        dims = None if any(s.dims is None for s in group) else tuple(sorted({d for s in group for d in s.dims}))
        yield unit, dims


def _sites_by_variable(sites: _Mapping[str, _Sequence[Site]]) -> dict[str, list[dict]]:
    """``variable -> list of Site`` as JSON-ready dicts."""
    return {v: [s.to_dict() for s in ks] for v, ks in sites.items()}


def _sites_from_dicts(d: _Mapping[str, _Sequence[_Mapping]]) -> dict[str, list[Site]]:
    """Inverse of :func:`_sites_by_variable`."""
    return {str(v): [Site.from_dict(s) for s in ks] for v, ks in d.items()}
