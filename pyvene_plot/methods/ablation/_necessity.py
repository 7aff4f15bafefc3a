"""The OA necessity check of PLOT handles: Δ_opt of a handle's sites vs. the exact causal optimal ablation.

:func:`necessity_check` is the one way to run it (handles and alignment results have no method
for it, so the localisation layer does not depend on Optimal Ablation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..._utils import atomic_write_json, check_payload, read_json_object, writer_tag
from ...data import PairBank
from ...errors import BankError, PlotError
from ...localize import AlignmentResult
from ...models import Readout, Site
from ._config import OptimalAblationConfig
from ._fit import optimal_ablation
from ._result import FORMAT_VERSION, OptimalAblationResult, restore_nonfinite

#: record fields that hold text (every other ``"nan"`` / ``"inf"`` string is a non-finite float)
_STRING_FIELDS = ("variable", "sites", "loss", "reading", "causal_value")


@dataclasses.dataclass
class NecessityResult:
    """What :func:`necessity_check` returns.

    Attributes
    ----------
    records : list of dict
        One per variable: ``variable``, ``sites`` (label of the handle's ablated sites),
        neural: ``delta_opt`` / ``delta_mean`` (CE gaps, nats), ``flip_opt`` / ``flip_mean``
        (fraction of predictions changed); causal (when a causal model was given):
        ``causal_delta_opt`` (nats; optimal *soft* value of V, see :func:`necessity_check`),
        ``causal_weights`` (that mixture over V's values), ``causal_flip_opt`` (best single value,
        0-1 loss), ``causal_value``, ``causal_flip_by_value``, and the gaps ``gap`` =
        ``delta_opt − causal_delta_opt`` and ``gap_flip`` = ``flip_opt − causal_flip_opt``, with a
        one-line ``reading``.
    ablation : OptimalAblationResult
        The underlying optimal-ablation run (constants, training record).
    tolerance : float
        ``|gap|`` below this reads as consistent.
    """

    records: list[dict]
    ablation: OptimalAblationResult
    tolerance: float = 0.05

    def __repr__(self) -> str:
        parts = [f"{r['variable']}: Δ_opt={r['delta_opt']:.3g}" + (
            f", causal={r['causal_delta_opt']:.3g}, gap={r['gap']:+.3g}" if r.get("causal_delta_opt") is not None
            else "") for r in self.records]
        return "NecessityResult(" + "; ".join(parts) + ")"

    def table(self, digits: int = 3) -> str:
        """Markdown table: neural vs causal Δ_opt, the gap, flip rates and the reading per variable."""
        head = ("| variable | sites | Δ_opt neural | Δ_opt causal | gap | flips neural | flips causal | reading |\n"
                "|---|---|---|---|---|---|---|---|")
        rows = []
        for r in self.records:
            def f(x):
                return "–" if x is None else f"{x:.{digits}g}"
            rows.append(f"| {r['variable']} | {r['sites']} | {f(r['delta_opt'])} | {f(r.get('causal_delta_opt'))} | "
                        f"{f(r.get('gap'))} | {f(r['flip_opt'])} | {f(r.get('causal_flip_opt'))} | "
                        f"{r.get('reading', '')} |")
        return "\n".join([head] + rows)

    def to_dict(self) -> dict:
        """JSON-ready payload (``format_version``, ``writer``, the records and the underlying ablation run)."""
        return {"kind": "NecessityResult", "format_version": FORMAT_VERSION, "writer": writer_tag(),
                "records": self.records, "tolerance": self.tolerance, "ablation": self.ablation.to_dict()}

    def to_json(self, path: str | Path) -> Path:
        """Write the result as JSON (atomically)."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, d: Mapping, model: torch.nn.Module | None = None,
                  source: str = "NecessityResult payload") -> NecessityResult:
        """Rebuild a result from :meth:`to_dict`'s payload (``source`` names it in errors)."""
        check_payload(d, "NecessityResult", ("records", "tolerance", "ablation"), source, FORMAT_VERSION)
        return cls(records=[restore_nonfinite(r, _STRING_FIELDS) for r in d["records"]],
                   ablation=OptimalAblationResult.from_dict(d["ablation"], model=model,
                                                            source=f"the ablation run in {source}"),
                   tolerance=float(d["tolerance"]))

    @classmethod
    def from_json(cls, path: str | Path, model: torch.nn.Module | None = None) -> NecessityResult:
        """Read a result written by :meth:`to_json` (errors as :meth:`OptimalAblationResult.from_json`)."""
        d = read_json_object(path, "NecessityResult")
        return cls.from_dict(d, model=model, source=f"NecessityResult file {str(path)!r}")


def _soft_value_ce(match: np.ndarray, iters: int = 2000, tol: float = 1e-12) -> tuple[float, np.ndarray]:
    """min over q in the simplex of mean_x −log Σ_v q_v match[x, v]  (EM; concave log-likelihood).

    ``match[x, v]`` = 1 if setting V ← v reproduces the causal output on x. Returns (value, q).
    """
    m = match.shape[1]
    q = np.full(m, 1.0 / m)
    prev = np.inf
    for _ in range(iters):
        mix = match @ q
        val = float(-np.mean(np.log(np.maximum(mix, 1e-300))))
        if prev - val < tol:
            break
        prev = val
        q = q * (match / np.maximum(mix, 1e-300)[:, None]).mean(0)
        q = q / q.sum()
    mix = match @ q
    return float(-np.mean(np.log(np.maximum(mix, 1e-300)))), q


def _reading(gap: float, tol: float) -> str:
    """One-line reading of the neural − causal gap."""
    if abs(gap) <= tol:
        return "consistent: ablating the sites removes about as much as removing V in the causal model"
    if gap < 0:
        return "incomplete: removing these sites hurts less than removing V (V also flows through other routes)"
    return "excess: removing these sites hurts more than removing V (they carry more than V, or a* is off-manifold)"


def necessity_check(
    model: torch.nn.Module,
    handles: Mapping[str, Any] | Sequence[Any] | AlignmentResult,
    bank: PairBank,
    causal_model: Any = None,
    *,
    settings: Sequence[Mapping] | None = None,
    output_var: str | None = None,
    readout: Readout | None = None,
    tolerance: float = 0.05,
    config: OptimalAblationConfig | None = None,
    progress: bool = False,
    **overrides: Any,
) -> NecessityResult:
    """OA necessity check of localised variables: Δ_opt of the handle's sites vs. the causal model's.

    For every handle (variable ``V`` at sites ``R``) the union of its sites is optimally ablated
    (one learned constant per hook, trained jointly) and the task cross-entropy gap is measured::

        Δ_opt^neural(R) = min_a E_x CE(M_{R←a}(x), O(x)) − E_x CE(M(x), O(x))

    where ``O(x)`` is the causal model's output (the bank's ``base_labels``). In the causal model
    ``V`` has a finite domain, so its optimal ablation is found exactly by enumeration. A learned
    constant can *hedge* (put the network between two values of V), so the matching causal
    quantity lets V take a soft value, a mixture ``q`` over its values::

        Δ_opt^causal(V) = min_q E_x −log Σ_v q_v 1[O(x; V←v) = O(x)]

    (a concave maximum-likelihood problem, solved exactly by EM; ``causal_weights`` is ``q``). The
    0-1 versions are reported too: ``flip_opt`` (predictions changed by the neural ablation) and
    ``causal_flip_opt = min_v P[O(x; V←v) ≠ O(x)]``. Reading the gap ``Δ^neural − Δ^causal``
    (other-seeds b.4): about 0: consistent with ``R`` carrying exactly V's causal role; strongly
    negative: V also flows through other routes (incomplete localisation); strongly positive:
    ``R`` carries more than V, or the constant is off-manifold. This is a deletion-style test that
    complements IIA (sufficiency) and needs no counterfactual pairs.

    Parameters
    ----------
    model : torch.nn.Module
    handles : dict of str to Handle, list of Handle, or AlignmentResult
        PLOT handles: their sites (and bases of span sites) are ablated as a whole; weights and
        strength are not used. An :class:`~pyvene_plot.AlignmentResult` stands for its ``.handles``.
    bank : PairBank
        Examples (base inputs and ``base_labels``); split into training / held-out evaluation
        parts as in :func:`optimal_ablation` (``holdout``). The causal quantities are computed on
        the same evaluation examples.
    causal_model : pyvene CausalModel, optional
        When given, the causal columns are filled in. Needs the abstract input settings of the
        bank's bases (``settings=``, or ``bank.settings`` as attached by
        :meth:`PairBank.from_causal_model` and the built-in tasks).
    settings : list of dict, optional
        Input settings (dicts of input-variable values) of ``bank.base``, row by row.
    output_var : str, optional
        The causal model's output variable (default ``bank.meta["output_var"]`` or the single output).
    tolerance : float
        ``|gap|`` (nats) below which the reading is "consistent".
    config, overrides
        :class:`OptimalAblationConfig` settings; defaults here: ``loss="ce"``, ``restarts=8``,
        ``baselines=("mean",)``.
    """
    if not isinstance(bank, PairBank):
        raise BankError("necessity_check needs a PairBank (its base_labels are the causal outputs)")
    items = _handle_items(handles)
    if "eval_bank" in overrides:
        raise PlotError("necessity_check evaluates on a held-out part of bank (holdout=); it takes no eval_bank")
    overrides.setdefault("loss", "ce")
    overrides.setdefault("baselines", ("mean",))
    overrides.setdefault("restarts", 8)  # few targets: many on-distribution restarts are cheap
    groups, bases = _handle_sites(items)
    if readout is None:
        readout = getattr(items[0][1], "readout", None) or getattr(bank, "readout", None)
    abl = optimal_ablation(model, groups, bank, readout=readout, bases=bases, config=config, progress=progress,
                           **overrides)
    causal = None
    if causal_model is not None:
        causal = _causal_ablation(causal_model, bank, [v for v, _ in items], settings, output_var,
                                  abl.eval_index)
    records = [_necessity_record(v, rec, None if causal is None else causal[v], tolerance)
               for (v, _h), rec in zip(items, abl.records)]
    return NecessityResult(records=records, ablation=abl, tolerance=float(tolerance))


def _handle_items(handles: Any) -> list[tuple[str, Any]]:
    """``(variable, handle)`` pairs of a dict of handles, a list of handles or an AlignmentResult."""
    if isinstance(handles, AlignmentResult):
        handles = handles.handles
    items = list(handles.items()) if isinstance(handles, Mapping) else [(getattr(h, "variable", f"h{i}"), h)
                                                                        for i, h in enumerate(handles)]
    if not items:
        raise PlotError("necessity_check needs at least one handle")
    return items


def _handle_sites(items: Sequence[tuple[str, Any]]) -> tuple[list[list[Site]], dict[str, Any]]:
    """The site group of every handle (ablated jointly) and the bases of their span sites."""
    groups, bases = [], {}
    for v, h in items:
        sites = list(getattr(h, "sites", []) or [])
        if not sites:
            raise PlotError(f"handle for {v!r} has no sites")
        groups.append(sites)
        for k, b in (getattr(h, "bases", None) or {}).items():
            bases[k] = b
    return groups, bases


def _necessity_record(variable: str, rec: Mapping, causal: Mapping | None, tolerance: float) -> dict:
    """One :class:`NecessityResult` record: the neural gaps of ``rec``, the causal ones and their reading."""
    r = {
        "variable": variable,
        "sites": rec["site"],
        "loss": rec["loss"],
        "delta_opt": rec["delta_opt"],
        "delta_mean": rec["delta_mean"],
        "flip_opt": rec["flip_opt"],
        "flip_mean": rec["flip_mean"],
        "n_eval": rec["n_eval"],
    }
    if causal is not None:
        r.update(causal)
        if rec["loss"] == "ce":
            r["gap"] = r["delta_opt"] - causal["causal_delta_opt"]
            r["reading"] = _reading(r["gap"], tolerance)
        else:
            r["gap"] = None
            r["reading"] = "gap in nats needs loss='ce' (the causal model's outputs are labels)"
        r["gap_flip"] = r["flip_opt"] - causal["causal_flip_opt"]
    return r


def _causal_ablation(cm: Any, bank: PairBank, variables: Sequence[str], settings, output_var, eval_index) -> dict:
    """Exact optimal ablation of each variable in the causal model, on the evaluation rows."""
    if settings is None:
        st = getattr(bank, "settings", None)
        settings = st[0] if isinstance(st, tuple) else st
    if settings is None:
        raise BankError(
            f"bank {bank.name!r} carries no abstract input settings; pass settings=[{{input: value}}, ...] (one "
            "dict per base row) to compute the causal model's optimal ablation"
        )
    settings = list(settings)
    if len(settings) != len(bank):
        raise BankError(f"settings has {len(settings)} rows but bank {bank.name!r} has {len(bank)}")
    if output_var is None:
        output_var = bank.meta.get("output_var")
    if output_var is None:
        outs = list(getattr(cm, "outputs", []))
        if len(outs) != 1:
            raise PlotError(f"causal model has outputs {outs}; pass output_var=")
        output_var = outs[0]
    out_values = list(cm.values[output_var])
    rows = list(range(len(bank))) if eval_index is None else list(eval_index)
    inputs = list(cm.inputs)
    base_out = []
    for i in rows:
        s = {k: settings[i][k] for k in inputs}
        base_out.append(out_values.index(cm.run_forward(s)[output_var]))
    labels = bank.base_labels[rows].tolist()
    mism = sum(int(a != b) for a, b in zip(base_out, labels))
    if mism:
        raise BankError(
            f"the causal model's outputs on settings= disagree with bank {bank.name!r}'s base_labels on {mism} of "
            f"{len(rows)} rows; settings must list the bank's base inputs in row order"
        )
    out = {}
    for v in variables:
        if v not in cm.variables:
            raise PlotError(f"variable {v!r} is not in the causal model {list(cm.variables)}")
        vals = list(cm.values[v])
        match = np.zeros((len(rows), len(vals)))
        for a, i in enumerate(rows):
            s = {k: settings[i][k] for k in inputs}
            for b, val in enumerate(vals):
                o = cm.run_forward({**s, v: val})[output_var]
                match[a, b] = float(out_values.index(o) == base_out[a])
        flips = 1.0 - match.mean(0)
        best = int(np.argmin(flips))
        ce, q = _soft_value_ce(match)
        out[v] = {
            "causal_delta_opt": ce,
            "causal_weights": {str(val): float(w) for val, w in zip(vals, q)},
            "causal_flip_opt": float(flips[best]),
            "causal_value": str(vals[best]),
            "causal_flip_by_value": {str(val): float(f) for val, f in zip(vals, flips)},
        }
    return out
