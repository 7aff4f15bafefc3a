"""Model inputs: a tensor or a dict of tensors with the examples on the first axis.

One helper each for the length questions the package asks:

- :func:`sequence_length` -- the padded length of the token axis (1 for models without one);
- :func:`min_real_length` -- the shortest *real* (non-padding) length over a bank's base and
  source rows, i.e. how many leading positions exist in every example.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Union

import torch

from ..errors import BankError

logger = logging.getLogger(__name__)


Inputs = Union[torch.Tensor, Mapping[str, torch.Tensor]]


def inputs_len(x: Inputs) -> int:
    """First-dimension size of a tensor or of every tensor of a dict (which must agree)."""
    if isinstance(x, torch.Tensor):
        if x.dim() == 0:
            raise BankError("model inputs must have a first (batch) dimension; got a 0-d tensor")
        return int(x.shape[0])
    if isinstance(x, Mapping):
        if not x:
            raise BankError("model inputs are an empty dict; pass at least one tensor")
        sizes = {k: int(v.shape[0]) for k, v in x.items() if isinstance(v, torch.Tensor)}
        if len(sizes) != len(x):
            bad = [k for k, v in x.items() if not isinstance(v, torch.Tensor)]
            raise BankError(f"model input entries {bad} are not tensors; every value must be a Tensor")
        if len(set(sizes.values())) != 1:
            raise BankError(f"model input tensors have different lengths {sizes}; they must share N")
        return next(iter(sizes.values()))
    raise BankError(f"model inputs must be a Tensor or a dict of Tensors, got {type(x).__name__}")


def index_inputs(x: Inputs, idx: torch.Tensor | slice | Sequence[int]) -> Inputs:
    """Select rows of a tensor or of every tensor of a dict."""
    if isinstance(idx, Sequence) and not isinstance(idx, torch.Tensor):
        idx = torch.as_tensor(list(idx), dtype=torch.long)
    if isinstance(x, torch.Tensor):
        return x[idx]
    return {k: v[idx] for k, v in x.items()}


def concat_inputs(parts: Sequence[Inputs]) -> Inputs:
    """Concatenate inputs along the first dimension."""
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(list(parts), 0)
    return {k: torch.cat([p[k] for p in parts], 0) for k in parts[0]}


def repeat_inputs(x: Inputs, times: int) -> Inputs:
    """Tile inputs ``times`` times along the first dimension (block-major: [x, x, ..., x])."""
    if isinstance(x, torch.Tensor):
        return x.repeat(times, *([1] * (x.dim() - 1)))
    return {k: v.repeat(times, *([1] * (v.dim() - 1))) for k, v in x.items()}


def inputs_to(x: Inputs, device: torch.device | str) -> Inputs:
    """Move inputs to a device."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    return {k: v.to(device) for k, v in x.items()}


def same_structure(a: Inputs, b: Inputs) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape[1:] == b.shape[1:] and a.dtype.is_floating_point == b.dtype.is_floating_point
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return set(a) == set(b) and all(
            a[k].dtype.is_floating_point == b[k].dtype.is_floating_point for k in a
        )
    return False


def as_model_kwargs(x: Inputs) -> dict[str, torch.Tensor]:
    """Model keyword arguments: integer tensors are ``input_ids``, float tensors ``inputs_embeds``."""
    if isinstance(x, torch.Tensor):
        return {"input_ids": x} if not x.dtype.is_floating_point else {"inputs_embeds": x}
    return dict(x)


def sequence_length(kwargs: Mapping[str, torch.Tensor]) -> int:
    """Padded length of the token axis of model keyword arguments (1 when inputs have no such axis)."""
    for k in ("input_ids", "inputs_embeds", "attention_mask"):
        if k in kwargs:
            t = kwargs[k]
            return int(t.shape[1]) if t.dim() >= 2 else 1
    t = next(iter(kwargs.values()))
    return int(t.shape[1]) if t.dim() >= 2 else 1


def min_real_length(bank: Any) -> int:
    """Shortest real (non-padding) length over the base and source rows of a bank.

    Parameters
    ----------
    bank : PairBank
        Anything with ``.base`` and ``.source`` inputs.

    Returns
    -------
    int
        ``min`` over rows of ``attention_mask.sum()`` when a mask is given, else the token-axis length.
    """
    lengths = []
    for x in (bank.base, bank.source):
        kw = as_model_kwargs(x)
        mask = kw.get("attention_mask")
        if mask is not None:
            lengths.append(int(mask.bool().sum(1).min()))
        else:
            t = kw.get("input_ids", kw.get("inputs_embeds"))
            if t is None:
                t = next(iter(kw.values()))
            lengths.append(int(t.shape[1]) if t.dim() >= 2 else 1)
    return min(lengths)
