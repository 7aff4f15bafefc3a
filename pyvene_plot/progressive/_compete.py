"""Never worse than the stage before: a refinement stage's handle competes with the handle in effect.

After every stage but the first, :func:`compete_stage` scores, per variable, the stage's calibrated
handle and the handle kept so far (the previous stage's, or an earlier one's if that stage lost too)
on the **calibration** bank with the searcher's selection rule (``balanced`` by default). The
refinement is kept if it scores strictly higher (by more than 1e-12), or if it scores the same and
intervenes on fewer dimensions (equal evidence, a narrower support: the point of refining); otherwise
the previous, coarser handle stays. Both handles are scored by :meth:`~pyvene_plot.localize.Handle.scores` (real source
runs through pyvene), so identical handles tie exactly; each handle is scored once. The test bank is
never read here.

:func:`support_width` is the number of dimensions a handle intervenes on: the whole vector's width
for a whole-vector site, the number of coordinates for coordinate sites, the span's rank for PCA /
LIB sites (unions per hook, summed over hooks).
"""

from __future__ import annotations

import dataclasses
import logging as _logging
import math
import time as _time
from collections.abc import Mapping as _Mapping
from collections.abc import Sequence as _Sequence

import numpy as _np

from ..data import PairBank
from ..localize import Handle
from ..models import model_spec

_log = _logging.getLogger(__name__)

#: scores closer than this tie (a tie goes to the narrower support, then to the coarser handle)
COMPETE_TOL = 1e-12


@dataclasses.dataclass
class InEffect:
    """The handle in effect for one variable: the stage it comes from, the handle, its calibration scores."""

    stage: int
    handle: Handle
    scores: dict | None = None


def support_width(handle: Handle, spec) -> int:
    """Dimensions ``handle`` intervenes on, summed over its hooks.

    Parameters
    ----------
    handle : Handle
    spec : ModelSpec
        :func:`~pyvene_plot.models.model_spec` of the model (widths of whole-vector sites).

    Returns
    -------
    int
        Per hook ``(layer, component, position, basis)``: the vector's width if a site covers the
        whole vector (for a basis: the basis rank), else the size of the union of the sites' dims.
    """
    by_unit: dict[tuple, set | None] = {}
    for s in handle.sites:
        if s.dims is None:
            by_unit[s.unit] = None
        elif by_unit.get(s.unit, set()) is not None:
            by_unit[s.unit] = by_unit.get(s.unit, set()) | set(s.dims)
    total = 0
    for (_layer, comp, _pos, basis), dims in by_unit.items():
        if dims is not None:
            total += len(dims)
        elif basis is not None:
            total += int(_np.asarray(handle.bases[basis]).shape[0])
        else:
            total += int(spec.dim(comp))
    return total


def same_handle(a: Handle, b: Handle) -> bool:
    """Whether two handles intervene identically (sites, weights, strength and any bases they use)."""
    if a.sites != b.sites or a.strength != b.strength or a.weights != b.weights:
        return False
    keys = {s.basis for s in a.sites if s.basis is not None}
    return all(_np.array_equal(_np.asarray(a.bases[k]), _np.asarray(b.bases[k])) for k in keys)


def _score(x: float) -> float:
    return -math.inf if x != x else float(x)


def compete_stage(stage: int, handles: _Mapping[str, Handle], current: dict[str, InEffect], bank: PairBank, model,
                  rule: str) -> dict:
    """Let each variable's new handle compete with the handle in effect; update ``current`` in place.

    Parameters
    ----------
    stage : int
        Index of the refinement stage.
    handles : dict of str to Handle
        The stage's calibrated handles.
    current : dict of str to InEffect
        The handle in effect per variable (updated where the refinement wins).
    bank : PairBank
        The calibration bank.
    model : torch.nn.Module
    rule : {"balanced", "iia", "sensitive"}
        The searcher's selection rule.

    Returns
    -------
    dict
        ``{"rule", "tolerance", "runtime_s", "variables": {v: {"kept": "refined" | "previous",
        "reason", "previous_stage", "refined_scores", "previous_scores"}}}``.
    """
    t0 = _time.perf_counter()
    spec = model_spec(model)
    per_var = {}
    for v, new in handles.items():
        cur = current[v]
        if cur.scores is None:
            cur.scores = cur.handle.scores(bank, model)
        identical = same_handle(new, cur.handle)
        new_scores = dict(cur.scores) if identical else new.scores(bank, model)
        a, b = _score(new_scores[rule]), _score(cur.scores[rule])
        w_new, w_cur = support_width(new, spec), support_width(cur.handle, spec)
        tie = abs(a - b) <= COMPETE_TOL
        wins = (not identical) and (a > b + COMPETE_TOL or (tie and w_new < w_cur))
        if identical:
            reason = f"the refined handle is the stage-{cur.stage} handle itself (a tie keeps the previous one)"
        elif wins and tie:
            reason = (f"calibration {rule} {a:.4f} ties the stage-{cur.stage} handle on a narrower support "
                      f"({w_new} < {w_cur} dimensions)")
        elif wins:
            reason = f"calibration {rule} {a:.4f} > {b:.4f} of the stage-{cur.stage} handle"
        else:
            reason = (f"calibration {rule} {a:.4f} <= {b:.4f} of the stage-{cur.stage} handle "
                      f"({w_new} vs {w_cur} dimensions; ties keep the narrower, then the coarser)")
        per_var[v] = {"kept": "refined" if wins else "previous", "reason": reason, "previous_stage": cur.stage,
                      "refined_scores": new_scores, "previous_scores": dict(cur.scores)}
        _log.info("stage %d, %s: %s", stage, v, reason)
        if wins:
            current[v] = InEffect(stage, new, new_scores)
    return {"rule": rule, "tolerance": COMPETE_TOL, "runtime_s": _time.perf_counter() - t0, "variables": per_var}


def keep_previous(kept: dict, reasons: dict, prev_kept: _Mapping[str, _Sequence], record: _Mapping) -> None:
    """Where the previous handle won, the next stage narrows to the previous stage's kept sites (in place)."""
    for v, rec in record["variables"].items():
        if rec["kept"] == "previous":
            kept[v] = list(prev_kept[v])
            reasons[v] = ["previous"] * len(kept[v])
