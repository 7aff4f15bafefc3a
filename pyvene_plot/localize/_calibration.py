"""Calibration: from a coupling row to an intervention handle, chosen on the calibration bank.

For each variable (a row of the coupling):

1. row-normalise the row (``weight_norm="sum"``: weights sum to 1; ``"max"``: the top site has
   weight 1) — the convention is explicit and recorded, the same for every solver;
2. for each ``k`` in the top-k grid keep the ``k`` largest entries and renormalise them. Ties
   (entries equal within a relative :data:`TIE_RTOL`) are broken by :func:`rank_sites`: the site
   with the better full-swap score on the fit bank (the score the free baseline ranks sites by, under
   the selection rule) first, then the earlier site in candidate order;
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

#: coupling entries within this relative difference count as tied (see :func:`rank_sites`)
TIE_RTOL = 1e-9


def rank_sites(values: np.ndarray, tiebreak: np.ndarray | None = None, rtol: float = TIE_RTOL) -> np.ndarray:
    """Order positions by decreasing value, breaking (near-)ties deterministically.

    Values are sorted in decreasing order; runs of values within ``rtol`` (relative to the run's
    largest value: ``top - x <= rtol * max(|top|, |x|)``) form a tie group, ordered by decreasing
    ``tiebreak`` and then by position (the earlier site first). NaN tie-break scores rank last.
    Without ``tiebreak``, tied positions keep their order.

    Parameters
    ----------
    values : ndarray, shape (n,)
    tiebreak : ndarray, shape (n,), optional
        Higher wins a tie (PLOT passes each site's full-swap score on the fit bank).
    rtol : float

    Returns
    -------
    ndarray of int, shape (n,)
        Positions into ``values``, best first.
    """
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(-values, kind="stable")
    if tiebreak is None:
        tb = np.zeros(values.shape[0])
    else:
        tb = np.nan_to_num(np.asarray(tiebreak, dtype=np.float64), nan=-np.inf)
    out: list[int] = []
    i = 0
    while i < order.size:
        top = values[order[i]]
        j = i + 1
        while j < order.size and top - values[order[j]] <= rtol * max(abs(top), abs(values[order[j]])):
            j += 1
        group = order[i:j]
        out.extend(sorted(group.tolist(), key=lambda p: (-tb[p], p)))
        i = j
    return np.asarray(out, dtype=int)


def truncate_row(
    row: np.ndarray, k: int, weight_norm: str = "sum", allowed: Sequence[int] | None = None,
    tiebreak: np.ndarray | None = None,
) -> tuple[list[int], list[float]]:
    """Top-``k`` entries of a coupling row, renormalised.

    Parameters
    ----------
    row : ndarray, shape (S,)
    k : int
    weight_norm : {"sum", "max"}
    allowed : sequence of int, optional
        Only these columns may be kept (progressive masking).
    tiebreak : ndarray, shape (S,), optional
        Per-site score that decides (near-)ties, higher first; remaining ties go to the earlier
        site (:func:`rank_sites`).

    Returns
    -------
    indices, weights : list of int, list of float
    """
    row = np.asarray(row, dtype=np.float64)
    cols = np.arange(row.shape[0]) if allowed is None else np.asarray(sorted(set(int(i) for i in allowed)))
    if cols.size == 0:
        raise PlotError("no allowed sites to calibrate over (empty support)")
    vals = row[cols]
    tb = None if tiebreak is None else np.asarray(tiebreak, dtype=np.float64)[cols]
    order = rank_sites(vals, tb)[: min(k, cols.size)]
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
    """Source activations and positions of one bank for one engine (computed once, reused).

    ``scores`` memoises candidate scores by (variable, the sites themselves, weights rounded to 12 digits, λ), so
    that a candidate met again in a sweep (e.g. the same top-1 site under another ε) is not rerun.
    """

    def __init__(self, engine: InterchangeEngine, bank: PairBank) -> None:
        self.bank = bank
        self.source_acts = engine.collect(bank.source)
        self.base_positions = engine.positions(bank.base)
        self.scores: dict[tuple, dict] = {}


def score_candidates(
    engine: InterchangeEngine,
    cache: BankCache,
    sites: Sequence[Site],
    candidates: Sequence[Candidate],
    progress: object = None,
) -> None:
    """Fill ``candidate.scores`` (IIA all / sensitive / invariant / balanced) on the cached bank.

    Candidates already scored on this cache (same variable, sites, weights and λ) reuse their scores.
    """
    todo = []
    for c in candidates:
        hit = cache.scores.get(_candidate_key(c, sites))
        if hit is None:
            todo.append(c)
        else:
            c.scores = dict(hit)
    candidates = todo
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
        cache.scores[_candidate_key(c, sites)] = dict(c.scores)


def _candidate_key(c: Candidate, sites: Sequence[Site]) -> tuple:
    return (c.variable, tuple(sites[int(i)] for i in c.indices), tuple(np.round(c.weights, 12).tolist()), float(c.strength))
