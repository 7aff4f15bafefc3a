"""Calibration: from a coupling row to an intervention handle, chosen on the calibration bank.

For each variable (a row of the coupling):

1. row-normalise the row (``weight_norm="sum"``: weights sum to 1; ``"max"``: the top site has
   weight 1) — the convention is explicit and recorded, the same for every solver;
2. for each ``k`` in the top-k grid keep the ``k`` largest entries (stable order: ties go to the
   earlier site) and renormalise them;
3. for each ``λ`` in the λ grid the handle is ``h <- h + λ · w_S · (h_src - h)`` on every kept site;
4. score every (k, λ) candidate on the calibration bank and keep the best. Ties go to the smaller
   ``k``, then to the ``λ`` closest to 1.

All candidates of all variables are scored in one batched pass through the interchange engine,
reusing the calibration bank's cached source activations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..data import PairBank
from ..errors import PlotError
from ..models import Site
from ._engine import InterchangeEngine
from ._metrics import Candidate, iia_scores
from ._signatures import site_masks


def truncate_row(row: np.ndarray, k: int, weight_norm: str = "sum", allowed: Sequence[int] | None = None) -> tuple[list[int], list[float]]:
    """Top-``k`` entries of a coupling row, renormalised.

    Parameters
    ----------
    row : ndarray, shape (S,)
    k : int
    weight_norm : {"sum", "max"}
    allowed : sequence of int, optional
        Only these columns may be kept (progressive masking).

    Returns
    -------
    indices, weights : list of int, list of float
    """
    row = np.asarray(row, dtype=np.float64)
    cols = np.arange(row.shape[0]) if allowed is None else np.asarray(sorted(set(int(i) for i in allowed)))
    if cols.size == 0:
        raise PlotError("no allowed sites to calibrate over (empty support)")
    vals = row[cols]
    order = np.argsort(-vals, kind="stable")[: min(k, cols.size)]
    idx = cols[order]
    w = row[idx]
    if w.sum() <= 0:
        w = np.ones_like(w)
    if weight_norm == "sum":
        w = w / w.sum()
    elif weight_norm == "max":
        w = w / w.max()
    else:
        raise PlotError(f"weight_norm must be 'sum' or 'max', got {weight_norm!r}")
    return [int(i) for i in idx], [float(x) for x in w]


def lambda_order(lambdas: Sequence[float]) -> list[float]:
    """λ values ordered for tie-breaking: closest to 1 (in log scale) first."""
    return sorted((float(x) for x in lambdas), key=lambda x: (abs(math.log(x)), x))


class BankCache:
    """Source activations and positions of one bank for one engine (computed once, reused)."""

    def __init__(self, engine: InterchangeEngine, bank: PairBank) -> None:
        self.bank = bank
        self.source_acts = engine.collect(bank.source)
        self.base_positions = engine.positions(bank.base)


def score_candidates(
    engine: InterchangeEngine,
    cache: BankCache,
    sites: Sequence[Site],
    candidates: Sequence[Candidate],
    progress: object = None,
) -> None:
    """Fill ``candidate.scores`` (IIA all / sensitive / invariant / balanced) on the cached bank."""
    if not candidates:
        return
    bank = cache.bank
    n = len(bank)
    masks = site_masks(sites, engine.widths)
    units = sorted({sites[i].unit for c in candidates for i in c.indices}, key=repr)
    coefs = {u: torch.zeros(len(candidates) * n, engine.widths[u]) for u in units}
    for ci, c in enumerate(candidates):
        for i, w in zip(c.indices, c.weights):
            coefs[sites[i].unit][ci * n : (ci + 1) * n] += c.strength * w * masks[i]
    index = torch.arange(n).repeat(len(candidates))
    logits = engine.run(bank.base, cache.source_acts, coefs, index=index, base_positions=cache.base_positions,
                        progress=progress)
    preds = logits.argmax(-1).view(len(candidates), n)
    for ci, c in enumerate(candidates):
        c.scores = iia_scores(preds[ci], bank.labels(c.variable), bank.changed(c.variable))
