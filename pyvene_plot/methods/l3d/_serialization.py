"""JSON I/O of a fitted L3D: ``to_dict``/``from_dict``, ``to_json``/``from_json`` (``save``/``load``).

:class:`FittedStateIO` is a base class of :class:`~pyvene_plot.methods.l3d.L3D`; it reads and writes
the fitted state (``config_``, ``param_names_``, ``param_shapes_``, ``ranks_``, ``decoder_``,
``encoder_``, ``p_act_``, ``history_``, ``train_error_``, ``n_samples_``, ``fit_seconds_``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..._utils import atomic_write_json, package_versions, writer_tag
from ...errors import PlotError
from ..bases import read_json_payload
from ._config import L3D_FORMAT_VERSION, SCHEMA, L3DConfig, L3DInputError

#: keys a file written by :meth:`FittedStateIO.to_json` must have
_JSON_KEYS = ("schema", "config", "param_names", "param_shapes", "ranks", "decoder", "encoder", "p_act",
              "history", "train_error", "n_samples", "fit_seconds")


class FittedStateIO:
    """Serialisation of a fitted :class:`~pyvene_plot.methods.l3d.L3D` (a mixin)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fitted state: config, tensors decomposed, ``V_in``/``V_out``, ``p_act``, history, versions."""

        self._require_fit()
        return {
            "schema": SCHEMA,
            "format_version": L3D_FORMAT_VERSION,
            "writer": writer_tag(),
            "config": self.config_.to_dict(),
            "param_names": self.param_names_,
            "param_shapes": [list(s) for s in self.param_shapes_],
            "ranks": {n: list(r) for n, r in self.ranks_.items()},
            "decoder": {n: t.tolist() for n, t in self.decoder_.items()},  # type: ignore[union-attr]
            "encoder": {n: t.tolist() for n, t in self.encoder_.items()},  # type: ignore[union-attr]
            "p_act": self.p_act_.tolist(),
            "history": self.history_,
            "train_error": self.train_error_,
            "n_samples": self.n_samples_,
            "fit_seconds": self.fit_seconds_,
            "versions": package_versions(),
        }

    def to_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON atomically; returns the path (read back with :meth:`from_json`)."""
        return atomic_write_json(path, self.to_dict())

    def save(self, path: str | Path) -> Path:
        """Same as :meth:`to_json`."""
        return self.to_json(path)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], model: nn.Module | None = None,
                  output_fn: Callable[[Any], torch.Tensor] | None = None) -> Any:
        """Rebuild a fitted L3D from :meth:`to_dict`; pass ``model`` to use the model-dependent methods."""
        if d.get("schema") != SCHEMA:
            raise L3DInputError(f"not an L3D result (schema {d.get('schema')!r}, expected {SCHEMA!r})")
        self = cls(L3DConfig.from_dict(d["config"]))
        self.config_ = self.resolved_config
        self.param_names_ = list(d["param_names"])
        self.param_shapes_ = [tuple(s) for s in d["param_shapes"]]
        self.ranks_ = {n: tuple(r) for n, r in d["ranks"].items()}
        self.decoder_ = {n: torch.tensor(d["decoder"][n], dtype=torch.float32).reshape(-1, *s)
                         for n, s in zip(self.param_names_, self.param_shapes_)}
        self.encoder_ = {n: torch.tensor(d["encoder"][n], dtype=torch.float32).reshape(-1, *s)
                         for n, s in zip(self.param_names_, self.param_shapes_)}
        self.p_act_ = torch.tensor(d["p_act"], dtype=torch.float32)
        self.history_ = list(d["history"])
        self.train_error_ = float(d["train_error"])
        self.n_samples_ = int(d["n_samples"])
        self.fit_seconds_ = float(d["fit_seconds"])
        if model is not None:
            self.bind(model, output_fn)
        return self

    @classmethod
    def from_json(cls, path: str | Path, model: nn.Module | None = None,
                  output_fn: Callable[[Any], torch.Tensor] | None = None) -> Any:
        """Read a file written by :meth:`to_json` (or :meth:`save`); pass ``model`` to bind it.

        Raises
        ------
        PlotError
            The file is empty, truncated, not an L3D result, or lacks a field (the message names it).
        """
        payload = read_json_payload(path, "L3D", _JSON_KEYS, L3D_FORMAT_VERSION)
        try:
            return cls.from_dict(payload, model=model, output_fn=output_fn)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            if isinstance(exc, PlotError):
                raise
            raise PlotError(f"L3D file {str(path)!r} is incomplete or inconsistent: {type(exc).__name__}: {exc}") from None

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None,
             output_fn: Callable[[Any], torch.Tensor] | None = None) -> Any:
        """Same as :meth:`from_json`."""
        return cls.from_json(path, model=model, output_fn=output_fn)
