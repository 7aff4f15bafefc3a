"""Metrics."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import PlotError

logger = logging.getLogger(__name__)


SELECTION_RULES = ("balanced", "iia", "sensitive")


@dataclasses.dataclass
class Candidate:
    variable: str
    k: int
    strength: float
    indices: list[int]
    weights: list[float]
    scores: dict | None = None


def select(cands: Sequence[Candidate], rule: str) -> Candidate:
    """Best candidate by ``rule``; candidates must be in tie-break order (first wins ties)."""
    if rule not in SELECTION_RULES:
        raise PlotError(f"unknown selection rule {rule!r}; choose one of {SELECTION_RULES}")
    best, best_score = None, -np.inf
    for c in cands:
        s = c.scores[rule]
        s = -np.inf if s != s else s
        if s > best_score + 1e-12:
            best, best_score = c, s
    return best if best is not None else cands[0]


def iia_scores(preds: torch.Tensor, labels: torch.Tensor, changed: torch.Tensor) -> dict[str, float]:
    """IIA on all pairs, on changed (sensitive) and unchanged (invariant) pairs, and their mean."""
    hit = (preds == labels).float()
    sens = float(hit[changed].mean()) if changed.any() else float("nan")
    inv = float(hit[~changed].mean()) if (~changed).any() else float("nan")
    if np.isnan(inv):
        bal = sens
    elif np.isnan(sens):
        bal = inv
    else:
        bal = 0.5 * (sens + inv)
    return {"iia": float(hit.mean()), "sensitive": sens, "invariant": inv, "balanced": bal,
            "n": int(labels.numel()), "n_changed": int(changed.sum())}
