"""Alignment results: the coupling, the calibrated handles, diagnostics, and their serialisation."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._utils import (
    atomic_write_bytes,
    atomic_write_json,
    load_json_as,
    package_versions,
    require_keys,
    writer_tag,
)
from ..data import PairBank
from ..errors import PlotError
from ..models import Site
from ._calibration import rank_sites
from ._handles import Handle

logger = logging.getLogger(__name__)


#: layout of the JSON written by :meth:`AlignmentResult.to_json` (files from before ``format_version``
#: carry the same layout under ``"schema_version": 1`` and are still read)
FORMAT_VERSION = 1
#: the old name of :data:`FORMAT_VERSION`
SCHEMA_VERSION = FORMAT_VERSION
#: keys :meth:`AlignmentResult.from_dict` cannot do without
_REQUIRED_KEYS = ("variables", "sites", "coupling", "cost", "handles", "runtime_s", "method", "epsilon")


@dataclasses.dataclass
class AlignmentResult:
    """What :meth:`OTAlignmentSearcher.fit` returns.

    Attributes
    ----------
    variables : list of str
        Rows of the coupling.
    sites : list of Site
        Columns of the coupling.
    coupling : ndarray, shape (n_variables, n_sites)
        The selected transport plan.
    cost : ndarray, shape (n_variables, n_sites)
        The cost it was solved on.
    handles : dict of str to Handle
        Calibrated intervention per variable.
    baseline : dict of str to Handle
        The free baseline: the single site with the best full-swap score on the fit bank
        (measured during signature collection), as a λ=1 full-swap handle.
    runtime_s : float
        Wall time of the whole fit: signatures, every solve of the sweep, every calibration.
    method, epsilon, beta, signature : selected configuration.
    trials : list of dict
        Every (ε, β) configuration tried, with calibration scores, solver diagnostics (including each
        row's contrast) or the failure reason.
    calibration : dict
        Per variable: chosen k, λ, kept sites with weights, calibration scores of every candidate.
    diagnostics : dict
        Signature magnitudes, floored sites, full-swap scores on the fit bank, timings, bank summaries,
        the cost's range and spread and the selected plan's ``row_contrast`` (per variable:
        normalised ``entropy`` and ``max_over_median`` weight of its coupling row).
    config : dict
        The searcher's parameters.
    """

    variables: list[str]
    sites: list[Site]
    coupling: np.ndarray
    cost: np.ndarray
    handles: dict[str, Handle]
    baseline: dict[str, Handle]
    runtime_s: float
    method: str
    epsilon: float
    beta: float | None
    signature: str
    trials: list[dict] = dataclasses.field(default_factory=list)
    calibration: dict = dataclasses.field(default_factory=dict)
    diagnostics: dict = dataclasses.field(default_factory=dict)
    config: dict = dataclasses.field(default_factory=dict)
    bases: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    model: Any = dataclasses.field(default=None, repr=False, compare=False)

    def __repr__(self) -> str:
        return (
            f"AlignmentResult(method={self.method!r}, coupling={self.coupling.shape}, epsilon={self.epsilon:.3g}, "
            f"handles={{{', '.join(f'{v}: {len(h.sites)} site(s)' for v, h in self.handles.items())}}}, "
            f"runtime_s={self.runtime_s:.2f})"
        )

    # ------------------------------------------------------------------ queries
    def _row(self, variable: str) -> int:
        if variable not in self.variables:
            raise PlotError(f"unknown variable {variable!r}; this result has {self.variables}")
        return self.variables.index(variable)

    def ranking(self, variable: str) -> list[Site]:
        """Sites by coupling mass for ``variable``, most first.

        Entries equal within a relative 1e-9 are ordered as calibration orders them
        (:func:`rank_sites`): better fit-bank full-swap score under the selection rule first (when
        the diagnostics hold it), then the earlier site.
        """
        row = self.coupling[self._row(variable)]
        rule = self.config.get("selection", "balanced")
        tb = self.diagnostics.get("fit_full_swap", {}).get(variable, {}).get(rule)
        tb = None if tb is None or len(tb) != row.shape[0] else np.asarray(tb, dtype=np.float64)
        return [self.sites[i] for i in rank_sites(row, tb)]

    def site_scores(self, variable: str) -> np.ndarray:
        """Row-normalised coupling of ``variable`` (sums to 1)."""
        row = self.coupling[self._row(variable)]
        return row / row.sum()

    def attach(self, model: torch.nn.Module) -> "AlignmentResult":
        """Attach a model (e.g. after :meth:`from_json`) so that handles can run."""
        self.model = model
        for h in list(self.handles.values()) + list(self.baseline.values()):
            h.model = model
        return self

    def evaluate(self, bank: PairBank, detail: bool = False) -> dict:
        """IIA per variable on a bank the search never saw.

        Parameters
        ----------
        bank : PairBank
        detail : bool
            If True, each value is a dict with ``iia`` (all pairs), ``sensitive`` (pairs where the
            variable changes the output), ``invariant`` and ``balanced``, plus counts.
        """
        bank.check_variables(self.variables)
        out = {v: self.handles[v].scores(bank, self.model) for v in self.variables}
        return out if detail else {v: s["iia"] for v, s in out.items()}

    def evaluate_baseline(self, bank: PairBank, detail: bool = False) -> dict:
        """Same as :meth:`evaluate` for the best-single-site full-swap baseline."""
        out = {v: self.baseline[v].scores(bank, self.model) for v in self.variables}
        return out if detail else {v: s["iia"] for v, s in out.items()}

    def n_sites_selected(self) -> dict[str, int]:
        return {v: len(h.sites) for v, h in self.handles.items()}

    # ------------------------------------------------------------------ io
    def to_dict(self) -> dict:
        """A JSON-ready dict (read back by :meth:`from_dict`)."""
        return {
            "format_version": FORMAT_VERSION,
            "writer": writer_tag(),
            "variables": self.variables,
            "sites": [s.to_dict() for s in self.sites],
            "site_labels": [s.label for s in self.sites],
            "coupling": self.coupling.tolist(),
            "cost": self.cost.tolist(),
            "handles": {v: h.to_dict() for v, h in self.handles.items()},
            "baseline": {v: h.to_dict() for v, h in self.baseline.items()},
            "runtime_s": self.runtime_s,
            "method": self.method,
            "epsilon": self.epsilon,
            "beta": self.beta,
            "signature": self.signature,
            "trials": self.trials,
            "calibration": self.calibration,
            "diagnostics": self.diagnostics,
            "config": self.config,
            "bases": {k: np.asarray(v).tolist() for k, v in self.bases.items()},
            "versions": package_versions(),
        }

    def to_json(self, path: str | Path) -> Path:
        """Write the result as JSON (atomically)."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, d: Mapping, model: torch.nn.Module | None = None) -> "AlignmentResult":
        """Inverse of :meth:`to_dict` (also reads dicts with the old ``schema_version`` key).

        Raises
        ------
        PlotError
            On a missing field or an unsupported ``format_version``.
        """
        require_keys(d, (), "AlignmentResult")
        version = d.get("format_version", d.get("schema_version"))
        if version is None:
            raise PlotError("AlignmentResult is incomplete: missing ['format_version']")
        if version != FORMAT_VERSION:
            raise PlotError(f"unsupported AlignmentResult format_version {version!r}; this version reads {FORMAT_VERSION}")
        require_keys(d, _REQUIRED_KEYS, "AlignmentResult")
        try:
            res = cls(
                variables=list(d["variables"]),
                sites=[Site.from_dict(s) for s in d["sites"]],
                coupling=np.asarray(d["coupling"], dtype=np.float64),
                cost=np.asarray(d["cost"], dtype=np.float64),
                handles={v: Handle.from_dict(h) for v, h in d["handles"].items()},
                baseline={v: Handle.from_dict(h) for v, h in d.get("baseline", {}).items()},
                runtime_s=float(d["runtime_s"]),
                method=d["method"],
                epsilon=float(d["epsilon"]),
                beta=None if d.get("beta") is None else float(d["beta"]),
                signature=d.get("signature", ""),
                trials=list(d.get("trials", [])),
                calibration=dict(d.get("calibration", {})),
                diagnostics=dict(d.get("diagnostics", {})),
                config=dict(d.get("config", {})),
                bases={k: np.asarray(v, dtype=np.float32) for k, v in d.get("bases", {}).items()},
            )
        except KeyError as exc:
            raise PlotError(f"AlignmentResult is incomplete: a site or handle lacks {exc}") from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise PlotError(f"AlignmentResult is malformed: {exc}") from None
        if model is not None:
            res.attach(model)
        return res

    @classmethod
    def from_json(cls, path: str | Path, model: torch.nn.Module | None = None) -> "AlignmentResult":
        """Read a result written by :meth:`to_json`; pass ``model`` to make the handles runnable.

        Raises
        ------
        PlotError
            When the file is empty, truncated or lacks a field (the message names the file and
            what is missing).
        """
        return load_json_as(cls, path, model=model)

    # ------------------------------------------------------------------ plots
    def plot(self, path: str | Path | None = None, normalize: str = "row", ax: Any = None, max_sites: int = 200) -> Any:
        """Heatmap of the coupling (variables x sites) with labelled axes; writes a PNG if ``path``.

        Parameters
        ----------
        path : str or Path, optional
            Output PNG (written atomically).
        normalize : {"row", "none"}
            Show each variable's row-normalised mass (default) or the raw plan.
        ax : matplotlib Axes, optional
        max_sites : int
            Columns beyond this are dropped from the picture (the JSON keeps everything).
        """
        import io

        import matplotlib

        if ax is None and path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        P = np.asarray(self.coupling, dtype=np.float64)
        if normalize == "row":
            P = P / np.maximum(P.sum(1, keepdims=True), 1e-300)
        elif normalize != "none":
            raise PlotError(f"normalize must be 'row' or 'none', got {normalize!r}")
        P = P[:, :max_sites]
        labels = [s.label for s in self.sites[:max_sites]]
        comps = {s.component for s in self.sites[:max_sites]}
        if len(comps) == 1:  # one component everywhere: say it once in the axis title
            comp = next(iter(comps))
            labels = [lab.replace(f".{comp}", "") for lab in labels]
        own = ax is None
        if own:
            width = min(3.0 + 0.22 * P.shape[1], 40.0)
            fig, ax = plt.subplots(figsize=(width, 2.6 + 0.45 * P.shape[0]))
        else:
            fig = ax.figure
        im = ax.imshow(P, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(len(self.variables)), self.variables)
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        ax.set_xlabel("site" + (f" ({next(iter(comps))})" if len(comps) == 1 else ""))
        ax.set_ylabel("variable")
        for r, v in enumerate(self.variables):
            for s in self.handles[v].sites:
                if s in self.sites[:max_sites]:
                    c = self.sites.index(s)
                    ax.add_patch(matplotlib.patches.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.5))
        ax.set_title(f"PLOT coupling ({self.method}, ε={self.epsilon:.3g}); red: calibrated handle sites")
        fig.colorbar(im, ax=ax, label="row-normalised mass" if normalize == "row" else "mass", fraction=0.03, pad=0.01)
        fig.tight_layout()
        if path is not None:
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=110)
            atomic_write_bytes(path, buf.getvalue())
        if own and path is not None:
            plt.close(fig)
        return ax
