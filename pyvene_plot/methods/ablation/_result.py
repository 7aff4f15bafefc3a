"""What :func:`~pyvene_plot.optimal_ablation` returns, and the payload checks shared with the necessity result."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyvene as pv
import torch

from ..._utils import (
    atomic_write_json,
    atomic_write_png,
    check_payload,
    package_versions,
    read_json_object,
    writer_tag,
)
from ...errors import PlotError
from ...models import Site, model_device
from ._config import ABLATION_KINDS
from ._targets import build_targets

#: version of the JSON written by :meth:`OptimalAblationResult.to_json` and
#: :meth:`~pyvene_plot.NecessityResult.to_json` (files without the field are version 1)
FORMAT_VERSION = 1
#: top-level fields every OptimalAblationResult file holds
_REQUIRED = ("records", "sites", "constants", "config", "runtime_s", "evaluated_on", "bases", "eval_index")
#: record fields that hold text (every other ``"nan"`` / ``"inf"`` string is a non-finite float)
_STRING_FIELDS = ("site", "sites", "loss", "chosen")
_NONFINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def restore_nonfinite(record: Mapping, string_fields: Iterable[str]) -> dict:
    """A copy of ``record`` with the ``"nan"`` / ``"inf"`` / ``"-inf"`` strings JSON needed turned back into floats.

    Fields in ``string_fields`` hold text and are kept as they are; lists and dicts (values) of the
    other fields are restored element by element.
    """
    keep = set(string_fields)

    def restore(v: Any) -> Any:
        if isinstance(v, str):
            return _NONFINITE.get(v, v)
        if isinstance(v, list):
            return [restore(x) for x in v]
        if isinstance(v, dict):
            return {k: restore(x) for k, x in v.items()}
        return v

    return {k: (v if k in keep else restore(v)) for k, v in record.items()}


@dataclasses.dataclass
class OptimalAblationResult:
    """What :func:`optimal_ablation` returns.

    Attributes
    ----------
    records : list of dict
        One per site (or site group), in input order: ``site`` (label), ``sites`` (dicts),
        ``delta_opt``, ``delta_zero``, ``delta_mean``, ``delta_resample`` (loss gaps on the
        evaluation data, in the loss's units: nats for KL / CE), ``flip_*`` (fraction of
        evaluation examples whose read-out argmax changes), ``train_delta_*`` (on the training
        examples), ``chosen`` (``"trained"``, or ``"mean"`` when the initial mean had the lower
        training loss), ``steps``, ``lr``, ``final_batch_loss``, ``n_train``, ``n_eval``, ``width``.
    sites : list of list of Site
        The ablated sites of each record.
    constants : dict of str to list of ndarray
        ``a*`` per record label: one array ``(k,)`` per hook of the record.
    config : dict
        The :class:`OptimalAblationConfig` used (plus the readout).
    runtime_s : float
    evaluated_on : str
        Which examples the gaps were measured on.
    bases : dict of str to ndarray
        Bases of span sites.
    eval_index : list of int, optional
        Rows of the bank used for evaluation (None when ``eval_bank`` was given).
    """

    records: list[dict]
    sites: list[list[Site]]
    constants: dict[str, list[np.ndarray]]
    config: dict
    runtime_s: float
    evaluated_on: str
    bases: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    eval_index: list[int] | None = None
    model: Any = dataclasses.field(default=None, repr=False, compare=False)

    def __repr__(self) -> str:
        return (f"OptimalAblationResult({len(self.records)} site(s), loss={self.config.get('loss')!r}, "
                f"runtime_s={self.runtime_s:.2f}, evaluated_on={self.evaluated_on!r})")

    def __len__(self) -> int:
        """Number of records."""
        return len(self.records)

    @property
    def labels(self) -> list[str]:
        """The record labels, in record order."""
        return [r["site"] for r in self.records]

    def deltas(self, kind: str = "opt") -> np.ndarray:
        """Gaps of one ablation type per record, ``(n_records,)`` (NaN where not computed)."""
        if kind not in ("opt",) + ABLATION_KINDS:
            raise PlotError(f"unknown ablation kind {kind!r}; choose one of {('opt',) + ABLATION_KINDS}")
        return np.array([np.nan if r[f"delta_{kind}"] is None else r[f"delta_{kind}"] for r in self.records],
                        dtype=np.float64)

    def record(self, site: str | Site | int) -> dict:
        """The record of a site (label, Site, or index)."""
        if isinstance(site, int):
            return self.records[site]
        label = site.label if isinstance(site, Site) else str(site)
        for r in self.records:
            if r["site"] == label:
                return r
        raise PlotError(f"no record for site {label!r}; records: {self.labels[:10]}")

    def table(self, digits: int = 4) -> str:
        """Markdown table of the four gaps per site."""
        head = "| site | Δ_opt | Δ_mean | Δ_zero | Δ_resample | chosen |\n|---|---|---|---|---|---|"
        rows = []
        for r in self.records:
            cells = [r["site"]] + [("–" if r[f"delta_{k}"] is None else f"{r[f'delta_{k}']:.{digits}g}")
                                   for k in ("opt", "mean", "zero", "resample")] + [r["chosen"]]
            rows.append("| " + " | ".join(cells) + " |")
        return "\n".join([head] + rows)

    # -------------------------------------------------------------- pyvene objects
    def intervenable(self, site: str | Site | int, model: torch.nn.Module | None = None) -> pv.IntervenableModel:
        """A ready ``pyvene.IntervenableModel`` ablating one record's sites with the fitted ``a*``.

        Run it with :func:`~pyvene_plot.run_ablated`; ``im.save(dir)`` / ``pyvene.IntervenableModel.load(dir, model)``
        round-trip.
        """
        m = model if model is not None else self.model
        if m is None:
            raise PlotError("this result is not attached to a model; pass model=")
        rec = self.record(site)
        i = self.records.index(rec)
        target = build_targets(m, [self.sites[i]], self.bases)[0]
        vals = [torch.as_tensor(v) for v in self.constants[rec["site"]]]
        reps = [u.representation(u.intervention(v)) for u, v in zip(target.units, vals)]
        im = pv.IntervenableModel(reps, m, use_fast=False)
        im.set_device(model_device(m))
        im.disable_model_gradients()
        return im

    # -------------------------------------------------------------- io
    def to_dict(self) -> dict:
        """JSON-ready payload (``format_version``, ``writer``, every field but the model)."""
        return {
            "kind": "OptimalAblationResult",
            "format_version": FORMAT_VERSION,
            "writer": writer_tag(),
            "records": self.records,
            "sites": [[s.to_dict() for s in g] for g in self.sites],
            "constants": {k: [np.asarray(v).tolist() for v in vs] for k, vs in self.constants.items()},
            "config": self.config,
            "runtime_s": self.runtime_s,
            "evaluated_on": self.evaluated_on,
            "bases": {k: np.asarray(v).tolist() for k, v in self.bases.items()},
            "eval_index": self.eval_index,
            "versions": package_versions(),
        }

    def to_json(self, path: str | Path) -> Path:
        """Write the result as JSON (atomically)."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, d: Mapping, model: torch.nn.Module | None = None,
                  source: str = "OptimalAblationResult payload") -> OptimalAblationResult:
        """Rebuild a result from :meth:`to_dict`'s payload (``source`` names it in errors)."""
        check_payload(d, "OptimalAblationResult", _REQUIRED, source, FORMAT_VERSION)
        if len(d["sites"]) != len(d["records"]):
            raise PlotError(f"{source} is inconsistent: {len(d['records'])} records but {len(d['sites'])} site groups")
        config = dict(d["config"])
        if "baselines" in config:  # a tuple in OptimalAblationConfig, a list in JSON
            config["baselines"] = tuple(config["baselines"])
        return cls(
            records=[restore_nonfinite(r, _STRING_FIELDS) for r in d["records"]],
            sites=[[Site.from_dict(s) for s in g] for g in d["sites"]],
            constants={k: [np.asarray(v, dtype=np.float32) for v in vs] for k, vs in d["constants"].items()},
            config=config,
            runtime_s=float(d["runtime_s"]),
            evaluated_on=str(d["evaluated_on"]),
            bases={k: np.asarray(v, dtype=np.float32) for k, v in d["bases"].items()},
            eval_index=d["eval_index"],
            model=model,
        )

    @classmethod
    def from_json(cls, path: str | Path, model: torch.nn.Module | None = None) -> OptimalAblationResult:
        """Read a result written by :meth:`to_json`.

        Raises
        ------
        PlotError
            The file is empty, truncated (not complete JSON), of another kind, written by a newer
            format, or lacks fields (named in the message).
        """
        d = read_json_object(path, "OptimalAblationResult")
        return cls.from_dict(d, model=model, source=f"OptimalAblationResult file {str(path)!r}")

    # -------------------------------------------------------------- plot
    def plot(self, path: str | Path | None = None, ax: Any = None, log: bool = False, max_sites: int = 80) -> Any:
        """Grouped bar chart of Δ_opt, Δ_mean, Δ_zero and Δ_resample per site; writes a PNG if ``path``.

        Parameters
        ----------
        path : str or Path, optional
            Output PNG (written atomically; matplotlib's Agg backend).
        ax : matplotlib Axes, optional
        log : bool
            Symmetric-log y axis (gaps span orders of magnitude).
        max_sites : int
            Records beyond this are left out of the picture (the JSON keeps everything).
        """
        import matplotlib

        if ax is None and path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        recs = self.records[:max_sites]
        kinds = [k for k in ("opt", "mean", "zero", "resample") if any(r[f"delta_{k}"] is not None for r in recs)]
        colors = {"opt": "#1b9e77", "mean": "#7570b3", "zero": "#d95f02", "resample": "#e7298a"}
        own = ax is None
        if own:
            fig, ax = plt.subplots(figsize=(min(3.0 + 0.45 * len(recs) * len(kinds) / 2, 40.0), 3.8))
        else:
            fig = ax.figure
        x = np.arange(len(recs))
        w = 0.8 / max(1, len(kinds))
        for i, k in enumerate(kinds):
            vals = [np.nan if r[f"delta_{k}"] is None else r[f"delta_{k}"] for r in recs]
            ax.bar(x + (i - (len(kinds) - 1) / 2) * w, vals, w, label=f"Δ_{k}", color=colors[k])
        ax.set_xticks(x, [r["site"] for r in recs], rotation=90 if len(recs) > 6 else 0, fontsize=7)
        unit = {"kl": "KL (nats)", "ce": "Δ cross-entropy (nats)", "mse": "Δ squared error"}.get(
            self.config.get("loss", "kl"), "Δ loss")
        ax.set_ylabel(unit)
        if log:
            ax.set_yscale("symlog", linthresh=1e-3)
        ax.axhline(0.0, color="black", lw=0.5)
        ax.legend(fontsize=8, ncol=len(kinds))
        ax.set_title("ablation loss gaps per site (OA = optimal constant)", fontsize=9)
        fig.tight_layout()
        if path is not None:
            atomic_write_png(path, fig, dpi=110, close=own)
        return ax
