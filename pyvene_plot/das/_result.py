"""What :func:`pyvene_plot.das.run_das` returns: trained handles, the per-variable best, the sweep record.

- :class:`DASHandle`: one trained DAS intervention for one variable (a ``pyvene.IntervenableModel``
  plus its readout); ``save`` / ``load`` go through pyvene's own directory format.
- :class:`DASBest`: ``{variable: DASHandle}``, usable directly when it holds one variable.
- :class:`DASResult`: the best handles plus every candidate's training and calibration record;
  ``to_json`` / ``from_json`` round-trip it, trained rotation weights included (stored inline as
  base64 little-endian bytes, so they come back bit for bit).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyvene as pv
import torch

from .._utils import atomic_write_json, package_versions, read_json_object, require_keys, writer_tag
from ..data import Inputs, PairBank
from ..errors import PlotError
from ..interventions import SupportRotatedSpaceIntervention
from ..localize import iia_scores, run_intervenable
from ..models import Readout, model_device
from ._spec import DASSpec

#: version of the JSON layout written by :meth:`DASResult.to_json`
FORMAT_VERSION = 1
_RESULT_KEYS = ("variables", "trainer", "runtime_s", "n_trained", "timings", "settings", "best", "candidates")
_HANDLE_KEYS = ("variable", "spec", "k", "readout", "meta")


# =============================================================================== (de)serialisation helpers
@contextlib.contextmanager
def _malformed(where: str):
    """Turn a ``KeyError`` / ``TypeError`` / ``ValueError`` raised while decoding into a :class:`PlotError`."""
    try:
        yield
    except PlotError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise PlotError(f"{where} is malformed: {type(exc).__name__}: {exc}") from exc


def _encode_tensors(state: Mapping[str, torch.Tensor]) -> dict:
    """``{name: {"dtype", "shape", "data"}}`` with ``data`` the base64 of the little-endian bytes."""
    out = {}
    for name, t in state.items():
        arr = t.detach().cpu().numpy()
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        out[name] = {"dtype": arr.dtype.str, "shape": list(arr.shape),
                     "data": base64.b64encode(np.ascontiguousarray(arr).tobytes()).decode("ascii")}
    return out


def _decode_tensors(d: Mapping, where: str) -> dict[str, torch.Tensor]:
    """Inverse of :func:`_encode_tensors` (raises :class:`PlotError` on a malformed entry)."""
    out = {}
    for name, e in d.items():
        require_keys(e, ("dtype", "shape", "data"), f"{where}[{name!r}]")
        try:
            dtype = np.dtype(e["dtype"])
            arr = np.frombuffer(base64.b64decode(e["data"], validate=True), dtype=dtype).reshape(e["shape"])
        except (TypeError, ValueError) as exc:
            raise PlotError(f"{where}[{name!r}] is not a valid tensor encoding: {exc}") from exc
        out[name] = torch.from_numpy(arr.astype(dtype.newbyteorder("="), copy=True))
    return out


def _restore_scores(scores: Mapping) -> dict:
    """A score dict read from JSON: the non-finite floats that JSON stores as strings back as floats."""
    return {k: float(v) if isinstance(v, str) and v in ("nan", "inf", "-inf") else v for k, v in scores.items()}


def _restore_record(row: Mapping) -> dict:
    """A candidate row or handle ``meta`` read from JSON (its ``calibration`` scores restored)."""
    row = dict(row)
    if isinstance(row.get("calibration"), Mapping):
        row["calibration"] = _restore_scores(row["calibration"])
    return row


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
    intervenable : pyvene.IntervenableModel or None
        One representation holding the trained intervention (``LowRankDASIntervention`` or
        ``SupportRotatedSpaceIntervention``). ``None`` for a handle read back without a model
        (:meth:`DASResult.from_json`); :meth:`attach` builds it.
    readout : Readout
    meta : dict
        Training record (seed, epochs, losses, calibration scores, trainer).
    weights : dict of str to Tensor, optional
        The intervention's state dict while no model is attached (``None`` once attached: the
        weights then live in ``intervenable``).
    """

    variable: str
    spec: DASSpec
    k: int
    intervenable: pv.IntervenableModel | None = dataclasses.field(repr=False)
    readout: Readout = dataclasses.field(default_factory=Readout)
    meta: dict = dataclasses.field(default_factory=dict)
    weights: dict[str, torch.Tensor] | None = dataclasses.field(default=None, repr=False, compare=False)

    def _im(self) -> pv.IntervenableModel:
        if self.intervenable is None:
            raise PlotError(f"DAS handle for {self.variable!r} has no model; call handle.attach(model) "
                            "(or DASResult.from_json(path, model=model)) first")
        return self.intervenable

    @property
    def model(self) -> torch.nn.Module:
        return self._im().model

    @property
    def intervention(self) -> torch.nn.Module:
        return next(iter(self._im().interventions.values()))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained intervention's state (name -> tensor), attached or not."""
        if self.intervenable is None:
            if self.weights is None:
                raise PlotError(f"DAS handle for {self.variable!r} has neither a model nor weights")
            return dict(self.weights)
        return {k: v.detach().clone() for k, v in self.intervention.state_dict().items()}

    def attach(self, model: torch.nn.Module) -> DASHandle:
        """Build the ``IntervenableModel`` on ``model`` from the stored :attr:`weights`; returns self."""
        if self.intervenable is not None:
            return self
        state = self.state_dict()
        im = self.spec.build_intervenable(self.k, model, seed=0)  # seeded (forked RNG); weights overwrite it
        iv = next(iter(im.interventions.values()))
        try:
            iv.load_state_dict({k: v.to(model_device(model)) for k, v in state.items()}, strict=True)
        except RuntimeError as exc:
            raise PlotError(f"the stored weights of the DAS handle for {self.variable!r} do not fit "
                            f"{self.describe()}: {exc}") from exc
        self.intervenable, self.weights = im, None
        return self

    def directions(self) -> torch.Tensor:
        """The learned orthonormal directions ``Q`` (d, k) in the component's native coordinates."""
        iv = self.intervention
        with torch.no_grad():
            if isinstance(iv, SupportRotatedSpaceIntervention):
                return iv.directions().detach().clone()
            return iv.rotate_layer.weight.detach().clone()

    def run(self, base: Inputs, source: Inputs, batch_size: int = 512) -> torch.Tensor:
        """Readout logits (N, C) of the intervened model (a real source forward, no cache)."""
        return run_intervenable(self._im(), base, source, self.readout, batch_size=batch_size)

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

    def to_dict(self, include_weights: bool = False) -> dict:
        """Variable, spec, k, readout and meta; ``include_weights``: also the intervention's state."""
        d = {"variable": self.variable, "spec": self.spec.to_dict(), "k": self.k,
             "readout": self.readout.to_dict(), "meta": self.meta}
        if include_weights:
            d["weights"] = _encode_tensors(self.state_dict())
        return d

    @classmethod
    def from_dict(cls, d: Mapping, model: torch.nn.Module | None = None, where: str = "DAS handle") -> DASHandle:
        """Inverse of ``to_dict(include_weights=True)``; with ``model`` the handle comes back attached."""
        require_keys(d, _HANDLE_KEYS + ("weights",), where)
        require_keys(d["weights"], (), f"{where}.weights")
        with _malformed(where):
            h = cls(variable=str(d["variable"]), spec=DASSpec.from_dict(d["spec"]), k=int(d["k"]),
                    intervenable=None, readout=Readout.from_dict(d["readout"]), meta=_restore_record(d["meta"]),
                    weights=_decode_tensors(d["weights"], f"{where}.weights"))
        return h.attach(model) if model is not None else h

    def save(self, directory: str | Path) -> Path:
        """``IntervenableModel.save(directory)`` plus ``das_handle.json`` (variable, spec, k, readout).

        ``pyvene.IntervenableModel.load(directory, model)`` restores the intervention on its own;
        :meth:`load` also restores the handle around it.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with contextlib.redirect_stdout(io.StringIO()):
            self._im().save(str(directory))
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


# =============================================================================== result
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

    def attach(self, model: torch.nn.Module) -> DASResult:
        """Attach every best handle to ``model`` (see :meth:`DASHandle.attach`); returns self."""
        for h in self.best.values():
            h.attach(model)
        return self

    def to_dict(self, include_weights: bool = False) -> dict:
        """A JSON-ready dict; ``include_weights``: also each best handle's trained intervention state."""
        return {
            "kind": "DASResult",
            "format_version": FORMAT_VERSION,
            "writer": writer_tag(),
            "variables": list(self.variables),
            "trainer": self.trainer,
            "runtime_s": self.runtime_s,
            "n_trained": self.n_trained,
            "timings": self.timings,
            "settings": self.settings,
            "best": {v: h.to_dict(include_weights=include_weights) for v, h in self.best.items()},
            "candidates": self.candidates,
            "versions": package_versions(),
        }

    def to_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` with the trained weights atomically as JSON (read back by :meth:`from_json`)."""
        return atomic_write_json(path, self.to_dict(include_weights=True))

    @classmethod
    def from_dict(cls, d: Mapping, model: torch.nn.Module | None = None) -> DASResult:
        """Inverse of ``to_dict(include_weights=True)``; with ``model`` the handles come back runnable."""
        require_keys(d, ("kind", "format_version") + _RESULT_KEYS, "DASResult")
        if d["kind"] != "DASResult":
            raise PlotError(f"not a DASResult (kind={d['kind']!r})")
        if d["format_version"] != FORMAT_VERSION:
            raise PlotError(f"DASResult format_version {d['format_version']!r} is not supported "
                            f"(this version reads {FORMAT_VERSION})")
        require_keys(d["best"], d["variables"], "DASResult.best")  # one handle per variable
        best = DASBest({str(v): DASHandle.from_dict(h, model, where=f"DASResult.best[{v!r}]")
                        for v, h in d["best"].items()})
        with _malformed("DASResult"):
            settings = dict(d["settings"])
            if isinstance(settings.get("readout"), Mapping):  # JSON turned its tuples into lists
                settings["readout"] = Readout.from_dict(settings["readout"]).to_dict()
            return cls(best=best, candidates=[_restore_record(c) for c in d["candidates"]],
                       runtime_s=float(d["runtime_s"]), n_trained=int(d["n_trained"]), trainer=str(d["trainer"]),
                       variables=[str(v) for v in d["variables"]], settings=settings, timings=dict(d["timings"]))

    @classmethod
    def from_json(cls, path: str | Path, model: torch.nn.Module | None = None) -> DASResult:
        """Read a result written by :meth:`to_json`; pass ``model`` to make the handles runnable.

        Raises
        ------
        PlotError
            When the file is empty, truncated, or lacks a field (the message names the file and
            what is missing).
        """
        path = Path(path)
        d = read_json_object(path, "DASResult")
        try:
            return cls.from_dict(d, model=model)
        except PlotError as exc:
            raise PlotError(f"{path}: {exc}") from exc

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
