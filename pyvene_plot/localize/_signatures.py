"""Effect signatures: how interchanging a variable (abstract) or a site (neural) changes the output.

For every variable ``Z`` and every pair of the fit bank, the causal model says which class the
output becomes when ``Z`` is taken from the source (``counterfactual_labels[Z]``). For every site
``S``, a full interchange of ``S`` (source activation copied into the base run, λ = 1) changes the
network's output distribution. Both effects are written as vectors over the same pairs and the
same output classes, so they can be compared:

================  =======================================  ============================================
mode              abstract signature of Z (per pair)       neural signature of S (per pair)
================  =======================================  ============================================
``prob_delta``    onehot(cf_Z) - onehot(base)              softmax(logits_S) - softmax(logits_base)
``logit_delta``   onehot(cf_Z) - onehot(base)              logits_S - logits_base
``margin_delta``  (2 cf_Z - 1) - (2 base - 1)              Δ(logit_1 - logit_0)   (two classes only)
``family_mean``   block_f(onehot(cf_Z) - onehot(base))     block_f(logits_S - logits_base)
================  =======================================  ============================================

Columns are restricted to the *label set* (the classes that occur as base or counterfactual labels
in the fit bank); probabilities are still normalised over every class of the readout. For language
models this is the label-restricted delta. Signatures are flattened to ``N * K`` and the cost is the
mean squared distance per pair, ``C[Z, S] = ||a_Z - n_S||^2 / N``.

``family_mean`` aggregates per *family* of pairs (``PairBank.family``: the kind of counterfactual,
e.g. which variables differ between base and source), as the reference does for binary addition
(mean output effect per source family, method-plot.md §2.2) and MCQA (family means of label-logit
deltas, centred and normalised per block, §2.3). For each family ``f`` (in the fixed order
``bank.families``, sorted labels) and per-pair delta ``d_i`` (K-vector, as in the table)::

    m_f     = mean_{i in f} d_i                 (K,)
    c_f     = m_f - mean_k(m_f)                 centred over the K label-set classes
    block_f = c_f / ||c_f||                     or 0 if ||c_f|| <= 1e-6 * max(1, scale)

and the signature is ``[block_f1, block_f2, ...]`` (``F * K``). A zero block means "no effect in this
family": on the abstract side, a variable whose interchange never changes the output in ``f`` (e.g.
``Z`` does not differ between base and source there, or the changes cancel exactly); on the neural
side, an effect at float noise level (``scale`` = largest base logit magnitude on the label set;
``scale`` = 1 on the abstract side). Zero blocks stay zero, never NaN. Every non-zero block has
unit norm, so magnitude is lost within a family: the searcher's ``min_effect`` floor (on
``||n_S|| / sqrt(N)``) then only removes sites silent in every family. The cost is computed as for
the other modes (``||a_Z - n_S||^2 / N``, a constant rescaling of the reference's sum over blocks).
Both sides need the fit bank's families (the neural side reads ``SiteEffects.family``, copied from
the bank by :func:`collect_site_effects`); a bank without families raises :class:`SignatureError`.

The full-swap sweep also yields each site's own full-swap IIA: the free brute-force baseline.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ..data import PairBank
from ..errors import BankError, SignatureError
from ..models import Readout, Site
from ._engine import InterchangeEngine

logger = logging.getLogger(__name__)


SIGNATURE_MODES = ("prob_delta", "logit_delta", "margin_delta", "family_mean")

# a family block whose norm is at most this times max(1, scale) is "no effect" and stays zero
_ZERO_BLOCK_RTOL = 1e-6


@dataclasses.dataclass
class SiteEffects:
    """Outputs of full interchanges at every site on one bank.

    Attributes
    ----------
    sites : list of Site
    label_set : list of int
        The K output classes used as signature columns.
    base_logits : Tensor, shape (N, C)
        Unintervened readout logits.
    logits : Tensor, shape (S, N, K)
        Readout logits on the label set after a full interchange at each site.
    probs : Tensor, shape (S, N, K)
        Probabilities (softmax over all C classes) on the label set.
    preds : LongTensor, shape (S, N)
        Argmax over all C classes after the interchange.
    runtime_s : float
        Wall time of the sweep (source collection and all forwards).
    n_rows : int
        Interchange rows run (S * N).
    bank_name : str
        Name of the bank the sweep ran on.
    family : list of str, optional
        The bank's per-pair families (``PairBank.family``), length N; needed by ``family_mean``.
    """

    sites: list[Site]
    label_set: list[int]
    base_logits: torch.Tensor
    logits: torch.Tensor
    probs: torch.Tensor
    preds: torch.Tensor
    runtime_s: float
    n_rows: int
    bank_name: str = ""
    family: list[str] | None = None

    @property
    def per_site_s(self) -> float:
        return self.runtime_s / max(1, len(self.sites))

    def subset(self, idx: Sequence[int]) -> "SiteEffects":
        idx = list(idx)
        return dataclasses.replace(
            self, sites=[self.sites[i] for i in idx], logits=self.logits[idx], probs=self.probs[idx],
            preds=self.preds[idx],
        )

    def full_swap_scores(self, bank: PairBank, variables: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
        """Per variable and site: IIA on all pairs, on changed pairs (sensitive) and unchanged (invariant)."""
        out = {}
        for v in variables:
            lab = bank.labels(v)
            ch = bank.changed(v)
            hit = (self.preds == lab.unsqueeze(0)).float()  # (S, N)
            iia = hit.mean(1).numpy()
            sens = hit[:, ch].mean(1).numpy() if ch.any() else np.full(len(self.sites), np.nan)
            inv = hit[:, ~ch].mean(1).numpy() if (~ch).any() else np.full(len(self.sites), np.nan)
            out[v] = {"iia": iia, "sensitive": sens, "invariant": inv, "balanced": _balanced(sens, inv)}
        return out


def _balanced(sens: np.ndarray, inv: np.ndarray) -> np.ndarray:
    if np.all(np.isnan(inv)):
        return sens
    if np.all(np.isnan(sens)):
        return inv
    return 0.5 * (sens + inv)


def site_masks(sites: Sequence[Site], widths: Mapping[tuple, int]) -> list[torch.Tensor]:
    """A 0/1 coefficient vector per site over its unit's width."""
    out = []
    for s in sites:
        w = widths[s.unit]
        m = torch.zeros(w)
        if s.dims is None:
            m[:] = 1
        else:
            m[list(s.dims)] = 1
        out.append(m)
    return out


def label_set_of(bank: PairBank, variables: Sequence[str]) -> list[int]:
    labs = torch.cat([bank.base_labels, *[bank.labels(v) for v in variables]])
    return sorted(int(x) for x in torch.unique(labs))


def collect_site_effects(
    model: torch.nn.Module,
    sites: Sequence[Site],
    bank: PairBank,
    variables: Sequence[str],
    readout: Readout | None = None,
    bases: Mapping[str, torch.Tensor] | None = None,
    batch_size: int | str = "auto",
    progress: bool = False,
    engine: InterchangeEngine | None = None,
) -> SiteEffects:
    """Full interchange at every site on every pair of ``bank``.

    Source activations are collected once for the bank and reused by every site; sites are batched
    along the batch dimension (``sites x pairs`` rows per unit), with one pyvene model for all units.
    """
    t0 = time.perf_counter()
    sites = list(sites)
    readout = readout or getattr(bank, "readout", None)  # task banks carry their readout
    engine = engine or InterchangeEngine(model, [s.unit for s in sites], readout, bases=bases, batch_size=batch_size)
    n = len(bank)
    base_logits = engine.forward_clean(bank.base)
    n_classes = base_logits.shape[1]
    if bank.max_label() >= n_classes:
        raise BankError(
            f"bank {bank.name!r} holds label {bank.max_label()} but the readout gives {n_classes} classes; "
            "labels must index the model's output classes (for language models pass "
            "Readout(label_tokens=...) or use token ids as labels)"
        )
    labels = label_set_of(bank, variables)
    cols = torch.tensor(labels)
    src = engine.collect(bank.source)
    bpos = engine.positions(bank.base)
    masks = site_masks(sites, engine.widths)
    S = len(sites)
    logits_k = torch.zeros(S, n, len(labels))
    probs_k = torch.zeros(S, n, len(labels))
    preds = torch.zeros(S, n, dtype=torch.long)
    by_unit: dict[tuple, list[int]] = {}
    for i, s in enumerate(sites):
        by_unit.setdefault(s.unit, []).append(i)
    pbar = None
    if progress:
        from tqdm.auto import tqdm

        pbar = tqdm(total=S * n, desc="site signatures", unit="row", leave=False)
    chunk_sites = max(1, engine.rows_per_batch(bank.base) * 8 // n)
    try:
        for unit, idxs in by_unit.items():
            for c0 in range(0, len(idxs), chunk_sites):
                chunk = idxs[c0 : c0 + chunk_sites]
                index = torch.arange(n).repeat(len(chunk))
                coef = torch.cat([masks[i].expand(n, -1) for i in chunk], 0)
                lg = engine.run(bank.base, src, {unit: coef}, index=index, base_positions=bpos, progress=pbar)
                lg = lg.view(len(chunk), n, n_classes)
                bad = ~torch.isfinite(lg).all(-1).all(-1)
                if bad.any():
                    raise SignatureError(f"non-finite logits at site {sites[chunk[int(bad.nonzero()[0])]].label}")
                p = torch.softmax(lg, -1)
                for j, i in enumerate(chunk):
                    logits_k[i] = lg[j][:, cols]
                    probs_k[i] = p[j][:, cols]
                    preds[i] = lg[j].argmax(-1)
    finally:
        if pbar is not None:
            pbar.close()
    rt = time.perf_counter() - t0
    logger.info("site sweep: %d sites x %d pairs in %.2fs (%.4fs per site)", S, n, rt, rt / max(S, 1))
    eff = SiteEffects(sites, labels, base_logits, logits_k, probs_k, preds, rt, S * n, bank.name,
                      family=None if bank.family is None else list(bank.family))
    return eff


def abstract_signatures(bank: PairBank, variables: Sequence[str], label_set: Sequence[int], mode: str) -> np.ndarray:
    """Abstract signatures, shape (V, D): one row per variable."""
    _check_mode(mode)
    K = len(label_set)
    pos = {c: i for i, c in enumerate(label_set)}
    rows = []
    base = bank.base_labels
    if mode == "family_mean":
        _check_family(bank.family, f"bank {bank.name!r}")
    for v in variables:
        cf = bank.labels(v)
        if mode == "margin_delta":
            _check_binary(label_set)
            rows.append(((2 * cf - 1) - (2 * base - 1)).float().numpy())
            continue
        missing = set(cf.tolist()) - set(pos)
        if missing:
            raise SignatureError(f"labels {sorted(missing)} of {v!r} are outside the label set {list(label_set)}")
        oh_cf = torch.zeros(len(bank), K)
        oh_cf[torch.arange(len(bank)), torch.tensor([pos[int(x)] for x in cf])] = 1
        oh_b = torch.zeros(len(bank), K)
        oh_b[torch.arange(len(bank)), torch.tensor([pos[int(x)] for x in base])] = 1
        if mode == "family_mean":
            rows.append(_family_blocks((oh_cf - oh_b).double(), bank.family, scale=1.0).numpy())
            continue
        rows.append((oh_cf - oh_b).flatten().numpy())
    return np.stack(rows).astype(np.float64)


def neural_signatures(effects: SiteEffects, mode: str) -> np.ndarray:
    """Neural signatures, shape (S, D): one row per site."""
    _check_mode(mode)
    cols = torch.tensor(effects.label_set)
    if mode == "prob_delta":
        base_p = torch.softmax(effects.base_logits, -1)[:, cols]
        sig = effects.probs - base_p.unsqueeze(0)
    elif mode == "logit_delta":
        sig = effects.logits - effects.base_logits[:, cols].unsqueeze(0)
    elif mode == "family_mean":
        _check_family(effects.family, f"the site effects of bank {effects.bank_name!r}")
        base_l = effects.base_logits[:, cols].double()
        delta = effects.logits.double() - base_l.unsqueeze(0)
        scale = float(base_l.abs().max()) if base_l.numel() else 1.0
        return _family_blocks(delta, effects.family, scale=scale).numpy()
    else:
        _check_binary(effects.label_set)
        m_site = effects.logits[..., 1] - effects.logits[..., 0]
        m_base = effects.base_logits[:, 1] - effects.base_logits[:, 0]
        sig = (m_site - m_base.unsqueeze(0)).unsqueeze(-1)
    return sig.reshape(len(effects.sites), -1).double().numpy()


def _family_blocks(delta: torch.Tensor, family: Sequence[str], scale: float = 1.0) -> torch.Tensor:
    """Family-mean blocks of per-pair deltas, centred and L2-normalised per block (``family_mean``).

    Parameters
    ----------
    delta : Tensor, shape (..., N, K)
        Per-pair effect on the K label-set classes.
    family : sequence of str, length N
        Family of each pair; blocks follow ``sorted(set(family))``.
    scale : float
        Magnitude of the quantities behind ``delta``; a block with norm at most
        ``1e-6 * max(1, scale)`` is treated as no effect and stays zero (never NaN).

    Returns
    -------
    Tensor, shape (..., F * K)
        float64; every block has unit norm or is zero.
    """
    delta = delta.double()
    n = delta.shape[-2]
    if len(family) != n:
        raise SignatureError(f"{len(family)} family labels for {n} pairs; the effects and bank do not match")
    order = sorted(set(family))
    code = {f: j for j, f in enumerate(order)}
    idx = torch.tensor([code[f] for f in family])
    means = torch.stack([delta[..., idx == j, :].mean(-2) for j in range(len(order))], -2)  # (..., F, K)
    centred = means - means.mean(-1, keepdim=True)
    norm = centred.norm(dim=-1, keepdim=True)
    tol = _ZERO_BLOCK_RTOL * max(1.0, float(scale))
    blocks = torch.where(norm > tol, centred / norm.clamp_min(tol), torch.zeros_like(centred))
    return blocks.flatten(-2)


def _check_family(family: Sequence[str] | None, what: str) -> None:
    if family is None:
        raise SignatureError(
            f"signature 'family_mean' needs per-pair families, but {what} has none; build the fit bank "
            "with PairBank(..., family=[one label per pair]) or PairBank.from_causal_model (which derives "
            "them from the variables that differ between base and source), then collect effects on it"
        )


def cost_matrix(
    A: np.ndarray, Nsig: np.ndarray, n_pairs: int, normalize: bool = False, min_effect: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Squared-distance cost between abstract rows and neural rows.

    Parameters
    ----------
    A : ndarray, shape (V, D)
    Nsig : ndarray, shape (S, D)
    n_pairs : int
        Pairs behind the signatures; the cost is the mean squared distance per pair.
    normalize : bool
        L2-normalise every signature first (direction only). The magnitude floor is applied
        *before* normalising, so near-silent sites cannot win on direction alone.
    min_effect : float
        Magnitude floor: sites whose RMS effect per pair ``||n_S|| / sqrt(N)`` is below it get the
        worst cost of the matrix in every row.

    Returns
    -------
    C : ndarray, shape (V, S)
    magnitude : ndarray, shape (S,)
        RMS effect per pair of each site.
    floored : ndarray of bool, shape (S,)
    """
    mag = np.linalg.norm(Nsig, axis=1) / np.sqrt(max(n_pairs, 1))
    floored = mag < float(min_effect)
    if floored.all():
        raise SignatureError(
            f"every site's effect is below the magnitude floor min_effect={min_effect} (largest RMS "
            f"effect {mag.max():.3g}); no interchange moves the output — check the sites, or lower min_effect"
        )
    a_norm = np.linalg.norm(A, axis=1)
    if np.any(a_norm == 0):
        raise SignatureError(
            "a variable's abstract signature is all zero: interchanging it never changes the output on "
            "the fit bank; add pairs where it matters"
        )
    if normalize:
        A = A / a_norm[:, None]
        Nsig = Nsig / np.maximum(np.linalg.norm(Nsig, axis=1), 1e-12)[:, None]
        scale = 1.0
    else:
        scale = 1.0 / max(n_pairs, 1)
    C = (
        (A**2).sum(1)[:, None] + (Nsig**2).sum(1)[None, :] - 2.0 * A @ Nsig.T
    ) * scale
    C = np.maximum(C, 0.0)
    if floored.any():
        C[:, floored] = C[:, ~floored].max()
    return C, mag, floored


def _check_mode(mode: str) -> None:
    if mode not in SIGNATURE_MODES:
        raise SignatureError(f"unknown signature mode {mode!r}; choose one of {SIGNATURE_MODES}")


def _check_binary(label_set: Sequence[int]) -> None:
    if list(label_set) != [0, 1]:
        raise SignatureError(
            f"signature 'margin_delta' needs a two-class output with labels {{0, 1}}, got label set "
            f"{list(label_set)}; use 'prob_delta' or 'logit_delta'"
        )
