"""Principal components of a site's activations: the one PCA of the package.

:func:`pca_from_activations` has two numerical conventions (``method``):

* ``"gram"`` (default; :func:`pca_basis`): eigen-decomposition of the ``1/n`` covariance in float64,
  components with variance ``<= truncation_threshold · max`` dropped, each direction's
  largest-magnitude entry positive;
* ``"svd"`` (the progressive scheduler's ``pca`` stage, through :func:`fit_pca_basis`): SVD of the
  centred data (torch, float64), singular values ``<= truncation_threshold · max(n, d) · σ₁`` dropped,
  variances with ``1/(n - 1)``, the signs LAPACK returns.

Both give a :class:`~pyvene_plot.methods.bases.Basis` with orthonormal rows.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ...data import Inputs, PairBank
from ...errors import PlotError, SiteError
from ...models import Site
from ._activations import site_activations
from ._basis import ArrayLike, Basis, to_numpy64
from ._linalg import check_rank, check_states, eigh_desc, fix_signs, keep_mask

#: numerical conventions of :func:`pca_from_activations`
PCA_METHODS = ("gram", "svd")


def _pca_gram(X: np.ndarray, center: bool, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Eigenbasis of the ``1/n`` covariance of ``X`` (n, d): rows (r, d), variances (r,), mean (d,), rank."""
    n, d = X.shape
    mean = X.mean(0) if center else np.zeros(d)
    Xc = X - mean
    G = Xc.T @ Xc / n
    w, U = eigh_desc(G)
    keep = keep_mask(w, threshold)
    if not keep.any():
        raise SiteError("activations at this site do not vary on the given states; a PCA basis cannot be fitted")
    w, U = w[keep], U[:, keep]
    rows, = fix_signs(U.T.copy())
    return rows, w, mean, int(keep.sum())


def _pca_svd(acts: ArrayLike, center: bool, rtol: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """SVD of the centred activations (torch float64): rows (r, d), variances ``S²/(n-1)`` (r,), mean (d,), rank."""
    X = torch.as_tensor(acts).double().cpu()
    mean = X.mean(0) if center else torch.zeros(X.shape[1], dtype=torch.float64)
    _U, S, Vh = torch.linalg.svd(X - mean, full_matrices=False)
    tol = rtol * max(X.shape) * (float(S[0]) if S.numel() else 0.0)
    r = int((S > tol).sum())
    if r == 0:
        raise SiteError("activations at this site do not vary on the fit bank; a PCA basis cannot be fitted")
    var = (S[:r] ** 2) / max(1, X.shape[0] - 1)
    return Vh[:r].numpy(), var.numpy(), mean.numpy(), r


def pca_from_activations(
    acts: ArrayLike,
    *,
    center: bool = True,
    rank: int | None = None,
    truncation_threshold: float = 1e-10,
    method: str = "gram",
) -> Basis:
    """Principal components of activations (float64).

    Parameters
    ----------
    acts : Tensor or ndarray, shape (n, d)
    center : bool, default True
        Subtract the mean first (PCA). ``False`` gives the eigenbasis of the raw Gram ``E[f fᵀ]``.
    rank : int, optional
        Keep at most this many components.
    truncation_threshold : float, default 1e-10
        ``method="gram"``: drop components whose variance is ``<= truncation_threshold * (largest
        variance)``. ``method="svd"``: drop singular values ``<= truncation_threshold · max(n, d) · σ₁``.
    method : {"gram", "svd"}, default "gram"
        Numerical convention (see the module docstring). ``"gram"``: importances with ``1/n``
        normalisation (``Cov(features) = diag(importances)``), largest entry of each row positive.
        ``"svd"``: the scheduler's ``pca`` stage (importances with ``1/(n-1)``, LAPACK signs).

    Returns
    -------
    Basis
        ``kind="pca"``; ``rows = encoder`` orthonormal ``(r, d)``; ``importances`` are the variances.

    Raises
    ------
    BankError
        Fewer states than the requested rank needs (or fewer than 2 with centring).
    SiteError
        ``rank`` larger than ``d``, or activations that do not vary.
    """
    t0 = time.perf_counter()
    if method not in PCA_METHODS:
        raise PlotError(f"unknown PCA method {method!r}; choose one of {PCA_METHODS}")
    X = to_numpy64(acts)
    check_states(X, center, "PCA")
    n, d = X.shape
    check_rank(rank, n, d, center, "PCA")
    if method == "gram":
        rows, w, mean, numerical_rank = _pca_gram(X, center, truncation_threshold)
    else:
        rows, w, mean, numerical_rank = _pca_svd(acts, center, truncation_threshold)
    if rank is not None:
        rows, w = rows[: int(rank)], w[: int(rank)]
    info = {"method": "pca", "n_states": n, "center": bool(center), "truncation_threshold": float(truncation_threshold),
            "numerical_rank": numerical_rank, "requested_rank": rank, "runtime_s": time.perf_counter() - t0}
    if method != "gram":
        info["pca_method"] = method
    return Basis(rows, rows, w, mean, "pca", info)


def pca_basis(
    model: torch.nn.Module,
    site: Site,
    bank: PairBank | Inputs,
    *,
    center: bool = True,
    rank: int | None = None,
    truncation_threshold: float = 1e-10,
    batch_size: int = 512,
) -> Basis:
    """PCA basis at a site, from the activations of a bank's states.

    Parameters
    ----------
    model : torch.nn.Module
        A model pyvene can hook.
    site : Site
        Whole-vector site (no ``dims`` / ``basis``).
    bank : PairBank or inputs
        A bank (its bases and sources, ``2N`` states) or model inputs.
    center, rank, truncation_threshold :
        See :func:`pca_from_activations` (``method="gram"``).
    batch_size : int, default 512

    Returns
    -------
    Basis
        ``kind="pca"``, orthonormal rows, importances = variances; ``info["site"]`` names the site.

    Examples
    --------
    >>> b = pp.bases.pca_basis(task.model, pp.Site(1), task.fit)          # doctest: +SKIP
    >>> b.rank, b.importances[:3]                                         # doctest: +SKIP
    """
    t0 = time.perf_counter()
    acts = site_activations(model, site, bank, batch_size=batch_size)
    check_rank(rank, int(acts.shape[0]), int(acts.shape[1]), center, "PCA")
    basis = pca_from_activations(acts, center=center, rank=rank, truncation_threshold=truncation_threshold)
    basis.info.update(site=site.to_dict(), runtime_s=time.perf_counter() - t0)
    return basis


def fit_pca_basis(acts: torch.Tensor, rtol: float = 1e-6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centred PCA of activations ``(n, d)`` as used by the scheduler's ``pca`` stage (float32 output).

    :func:`pca_from_activations` with ``method="svd"`` and ``truncation_threshold=rtol``, cast to float32.

    Returns
    -------
    V : ndarray, shape (r, d)
        Orthonormal principal directions (rows), ``r`` = numerical rank.
    mean : ndarray, shape (d,)
    explained : ndarray, shape (r,)
        Variance explained by each component (``1/(n-1)`` normalisation).

    See Also
    --------
    pca_from_activations : the float64 :class:`Basis` version.
    """
    basis = pca_from_activations(acts, method="svd", truncation_threshold=rtol)
    return (basis.rows.astype(np.float32), basis.mean.astype(np.float32),
            basis.importances.astype(np.float32))
