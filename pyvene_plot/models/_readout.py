"""Readouts: how a model's output becomes class logits that are compared with bank labels.

One readout is used for every method (signatures, calibration, evaluation, DAS), so IIA has a
single definition everywhere: the argmax of the readout logits must equal the counterfactual label.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import ModelError, PlotError


def raw_logits(output: Any) -> torch.Tensor:
    """The logits tensor of a model output (``.logits``, a dict entry ``"logits"``, or element 0)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits") and output.logits is not None:
        return output.logits
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ModelError(
        f"cannot find logits in a model output of type {type(output).__name__}; the model must "
        "return a Tensor, an object with .logits, or a tuple whose first element is the logits "
        "(for a bare transformer body use the *LMHeadModel / *ForCausalLM class)"
    )


def last_token_index(model_inputs: Any, seq_len: int, batch: int, device: torch.device) -> torch.Tensor:
    """Index of the last real token of each row (uses ``attention_mask`` when present)."""
    mask = model_inputs.get("attention_mask") if isinstance(model_inputs, Mapping) else None
    if mask is None:
        return torch.full((batch,), seq_len - 1, dtype=torch.long, device=device)
    mask = mask.to(device)
    idx = torch.arange(mask.shape[1], device=device).expand_as(mask)
    return torch.where(mask.bool(), idx, torch.full_like(idx, -1)).max(dim=1).values.clamp_min(0)


@dataclasses.dataclass(frozen=True)
class Readout:
    """Turns model outputs into logits of shape ``(B, C)``.

    Parameters
    ----------
    position : "last" or int, default "last"
        For sequence outputs ``(B, T, V)``: the token whose logits are read. ``"last"`` is the last
        non-padding token (from ``attention_mask``), an int indexes the sequence directly.
        Ignored for ``(B, C)`` outputs.
    label_tokens : tuple of int, optional
        When given, the logits are restricted to these columns and label ``i`` means
        ``label_tokens[i]``. When omitted, labels index the logits' last dimension directly (for
        language models: labels are token ids and IIA is the full-vocabulary top-1).
    """

    position: int | str = "last"
    label_tokens: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not (self.position == "last" or isinstance(self.position, int)):
            raise PlotError(f"Readout.position must be 'last' or an int, got {self.position!r}")
        if self.label_tokens is not None:
            object.__setattr__(self, "label_tokens", tuple(int(t) for t in self.label_tokens))
            if not self.label_tokens:
                raise PlotError("Readout.label_tokens is empty; pass None or at least one token id")

    def __call__(self, output: Any, model_inputs: Any = None) -> torch.Tensor:
        """Logits ``(B, C)`` from a model output."""
        logits = raw_logits(output)
        if logits.dim() == 3:
            b, t, _ = logits.shape
            if self.position == "last":
                pos = last_token_index(model_inputs, t, b, logits.device)
            else:
                p = int(self.position)
                if not -t <= p < t:
                    raise PlotError(f"Readout.position {p} is outside a sequence of length {t}")
                pos = torch.full((b,), p % t, dtype=torch.long, device=logits.device)
            logits = logits[torch.arange(b, device=logits.device), pos]
        elif logits.dim() != 2:
            raise ModelError(
                f"model logits have shape {tuple(logits.shape)}; expected (B, C) or (B, T, V). "
                "Pass a custom readout that maps the output to (B, C) logits"
            )
        if self.label_tokens is not None:
            cols = torch.as_tensor(self.label_tokens, device=logits.device)
            if int(cols.max()) >= logits.shape[-1]:
                raise ModelError(
                    f"label token {int(cols.max())} is outside the model's {logits.shape[-1]} logits"
                )
            logits = logits.index_select(-1, cols)
        return logits

    def to_dict(self) -> dict:
        return {"kind": "Readout", "position": self.position, "label_tokens": self.label_tokens}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Readout":
        d = dict(d)
        kind = d.pop("kind", "Readout")
        if kind != "Readout":
            from .. import models as _mod

            klass = getattr(_mod, kind, None)
            if klass is None:
                raise PlotError(f"unknown readout kind {kind!r}")
            return klass.from_dict({**d, "kind": kind})
        lt = d.get("label_tokens")
        return cls(position=d.get("position", "last"), label_tokens=tuple(lt) if lt is not None else None)


@dataclasses.dataclass(frozen=True)
class BitsReadout(Readout):
    """Joint class over binary outputs read at several steps of a sequence model.

    The model emits logits ``(B, T, V)``; at step ``steps[i]`` columns ``columns`` hold the
    logits of bit ``i`` being 0 or 1. The readout returns ``(B, 2**n)`` joint log-probabilities,
    class ``c`` meaning bits ``(c >> i) & 1``; its argmax is the per-bit argmax, so IIA on these
    labels is exact match of every bit.
    """

    steps: tuple[int, ...] = (0,)
    columns: tuple[int, int] = (0, 1)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "steps", tuple(int(s) for s in self.steps))
        if not self.steps or len(self.steps) > 16:
            raise PlotError(f"BitsReadout needs 1..16 steps, got {self.steps}")

    def __call__(self, output: Any, model_inputs: Any = None) -> torch.Tensor:
        logits = raw_logits(output)
        if logits.dim() != 3:
            raise ModelError(f"BitsReadout expects (B, T, V) logits, got {tuple(logits.shape)}")
        lp = torch.log_softmax(logits[:, list(self.steps)][..., list(self.columns)].float(), -1)  # (B, n, 2)
        n = len(self.steps)
        codes = torch.arange(2**n, device=logits.device)
        bits = (codes.unsqueeze(1) >> torch.arange(n, device=logits.device)) & 1  # (2^n, n)
        return lp[:, torch.arange(n, device=logits.device).unsqueeze(0), bits].sum(-1)  # (B, 2^n)

    def to_dict(self) -> dict:
        return {"kind": "BitsReadout", "steps": list(self.steps), "columns": list(self.columns)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "BitsReadout":
        return cls(steps=tuple(d["steps"]), columns=tuple(d.get("columns", (0, 1))))
