"""Shared linear algebra and argument checks of the PCA and LIB builders (float64 NumPy)."""

from __future__ import annotations

import numpy as np

from ...errors import BankError, ModelError, PlotError, SiteError


def check_width(rank: int | None, width: int, what: str) -> None:
    """Refuse a ``rank`` that is not positive or exceeds the site width ``width`` (``what``: "PCA"/"LIB")."""
    if rank is None:
        return
    if int(rank) < 1:
        raise PlotError(f"rank must be a positive integer (directions to keep), got {rank}")
    if int(rank) > width:
        raise SiteError(
            f"rank {rank} is larger than the site's width d={width}; a {what} basis has at most d "
            f"directions — use rank <= {width}"
        )


def check_rank(rank: int | None, n_states: int, width: int, center: bool, what: str) -> None:
    """:func:`check_width`, and refuse a ``rank`` that ``n_states`` (centred) states cannot support."""
    if rank is None:
        return
    check_width(rank, width, what)
    limit = n_states - 1 if center else n_states
    if int(rank) > limit:
        raise BankError(
            f"{n_states} activation states can support at most {max(limit, 0)} {'centred ' if center else ''}"
            f"directions, but rank={rank} was requested; use a bigger bank (more pairs) or a smaller rank"
        )


def check_states(acts: np.ndarray, center: bool, what: str) -> None:
    """Activations must be a finite ``(n, d)`` matrix with at least 2 states (1 without centring)."""
    if acts.ndim != 2:
        raise PlotError(f"activations must be a matrix (n_states, d), got shape {acts.shape}")
    need = 2 if center else 1
    if acts.shape[0] < need:
        raise BankError(
            f"a {what} basis needs at least {need} activation states{' (it centres them)' if center else ''}; "
            f"got {acts.shape[0]} — use a bigger bank"
        )
    if not np.all(np.isfinite(acts)):
        raise ModelError("activations contain NaN or inf; check the model and its inputs")


def eigh_desc(S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues ``(d,)`` (descending) and eigenvectors ``(d, d)`` (columns) of the symmetrised ``S``."""
    w, U = np.linalg.eigh((S + S.T) / 2.0)
    order = np.argsort(w)[::-1]
    return w[order], U[:, order]


def fix_signs(rows: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, ...]:
    """Flip each direction so that its largest-magnitude entry in ``rows`` is positive."""
    j = np.argmax(np.abs(rows), axis=1)
    s = np.sign(rows[np.arange(rows.shape[0]), j])
    s[s == 0] = 1.0
    return tuple(a * s[:, None] if a.ndim == 2 else a for a in (rows, *others))


def keep_mask(w: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean mask of the eigenvalues ``w`` (descending) above ``threshold`` times the largest."""
    top = float(w[0]) if w.size else 0.0
    if not top > 0:
        return np.zeros_like(w, dtype=bool)
    return w > float(threshold) * top
