"""Bases for span sites: PCA and the Local Interaction Basis (LIB).

PLOT's fine stages can search over *bands of a basis* at a kept site instead of native neurons
(``Site(..., dims=band, basis=key)``). This module builds such bases from a model, a site and a bank:

* :func:`pca_basis` — centred principal components of the activations (the baseline);
* :func:`lib_basis` — the Local Interaction Basis of Bushnaq et al. (2024, arXiv 2405.10928), built
  from the activations *and* the Jacobian of what comes downstream of the site.

Both return a :class:`Basis`: direction rows ``(r, d)``, an encoder ``(r, d)``, per-direction
importances ``(r,)``, the mean ``(d,)`` and an ``info`` dict.

LIB in one screen
-----------------
Write ``f`` for the activations at the site (``d`` wide), ``μ = E[f]`` and ``J(x) = ∂y/∂f`` for the
Jacobian of a downstream quantity ``y``. In float64:

1. **Centre and whiten.** ``G = E[(f-μ)(f-μ)ᵀ] = U D Uᵀ``; drop eigenvalues ``D <= ε·max D``;
   whitened activations ``f' = D^{-1/2} Uᵀ (f-μ)`` have identity covariance.
2. **Jacobian Gram.** ``M' = E[JᵀJ]`` (``d × d``), summed over the outputs of ``y``.
3. **Rotate.** ``M = D^{1/2} Uᵀ M' U D^{1/2} = V Λ Vᵀ``: ``V`` holds the right singular vectors of the
   Jacobian w.r.t. the whitened activations, ``Λ`` their mean squared singular values. Drop
   ``Λ <= ε·max Λ``, sort descending.
4. **Scale.** ``C = U D^{-1/2} V Λ^{1/2}`` (``d × r``) and ``C⁺ = Λ^{-1/2} Vᵀ D^{1/2} Uᵀ`` (``r × d``).
   Features ``f̂ = Cᵀ (f-μ)``; reconstruction ``f ≈ μ + C⁺ᵀ f̂``.

In this module's row convention ``Basis.encoder = Cᵀ`` and ``Basis.rows = C⁺``, so
``features = (f - mean) @ encoder.T`` and ``f ≈ mean + features @ rows``. Identities that hold on
the data the basis was built on (and are tested): ``Cov(f̂) = Λ`` (a feature's variance is its
importance), ``E[Ĵᵀ Ĵ] = I`` for ``Ĵ = ∂y/∂f̂``, and the features are invariant (up to signs and
rotations inside degenerate eigenspaces) to any invertible linear re-parametrisation of ``f``,
which PCA features are not. For a linear map ``y = A f`` with isotropic ``f`` the LIB directions are
``A``'s right singular vectors and ``Λ = σ²``.

Two choices of ``y`` (``lib_basis(method=...)``):

* ``"output_jacobian"`` (default, "LIB-lite"): ``y`` = the readout logits (or ``output_fn`` of them,
  e.g. log-probabilities or a logit difference). One site, one Jacobian, works on any model pyvene
  can hook; the directions are ranked by how strongly they move the output PLOT's cost is built from.
* ``"lib"`` (faithful, layer-recursive): ``y`` = the next node layer's LIB features, computed
  backwards from the output through a chain of modules (:func:`lib_chain_bases`). Available for
  pyvene MLPs (the chain is derived with :func:`mlp_chain`) or any model given as ``chain=``.
  Directly before the output both variants coincide. When everything after the next node layer is
  linear, the faithful metric ``C^{l+1} C^{l+1 T}`` equals the output metric on that layer's data span,
  so the variants agree there too up to that projection (they did to three decimals on the
  modular-addition MLP of ``benchmarks/lib_modadd.py``).

Centring: the mean is kept separately (``Basis.mean``) and never rotated; this is the reference
implementation's "constant direction kept first" with the bias folded out. Node ablation
(:meth:`Basis.reconstruct`) keeps the top-``n`` features and replaces the others by their mean
(zero), so rib's count "n features" corresponds to ``n - 1`` here (rib counts the constant direction).

LIB is not an orthonormal basis
-------------------------------
Because of whitening, the rows ``C⁺`` are not orthogonal: interchanging LIB features ``S`` from a
source is the *oblique* projection ``f <- f + C⁺_Sᵀ (f̂_src,S - f̂_base,S)``, which leaves every other
LIB feature unchanged. :class:`~pyvene_plot.interventions.ObliqueSpanInterchangeIntervention`
(see :meth:`Basis.intervention`) implements exactly that and saves / loads like PLOT's other
interventions. PLOT's engine, handles and DAS specs, however, work with orthonormal spans; the
progressive scheduler's ``lib`` stage therefore uses :meth:`Basis.orthonormal_rows`: a Gram–Schmidt
(QR) orthonormalisation of the *encoder* rows ``Cᵀ`` in importance order, with nested spans
(``span(Q[:k]) = span(C[:, :k])`` for every ``k``). Interchanging the top ``k`` directions is then the
orthogonal projection onto the directions the top LIB features read: it has the same kernel as the
oblique projection (nothing moves unless those features differ between base and source) and sets
those features exactly to the source's, but it writes into ``span(Cᵀ_S)`` rather than ``span(C⁺_S)``,
so other features can move. Orthonormalising ``span(C⁺_S)`` instead (``side="rows"``) keeps the
range but not the kernel, and measurably loses LIB's advantage (see ``benchmarks/lib_modadd.py``).

References
----------
L. Bushnaq, S. Heimersheim, N. Goldowsky-Dill, D. Braun, J. Mendel, K. Hänni, A. Griffin,
J. Stöhler, M. Wache, M. Hobbhahn. "The Local Interaction Basis: Identifying
Computationally-Relevant and Sparsely Interacting Features in Neural Networks." arXiv 2405.10928
(2024). Reference implementation: ``ApolloResearch/rib`` (not a dependency).
"""


from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..._constants import BASIS_ORTHO_ATOL
from ...data import Inputs, concat_inputs, inputs_len

from ...data import PairBank
from ...errors import BankError, ModelError, PlotError, SiteError
from ...models import Readout
from ...models import Site
from ...models import model_spec, validate_sites

logger = logging.getLogger(__name__)



BASIS_KINDS = ("pca", "lib")

ArrayLike = Any  # numpy array or torch tensor


def _to_numpy64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


# ================================================================================ the Basis object
@dataclasses.dataclass(frozen=True, eq=False)
class Basis:
    """A basis of a site's activation space, ordered by importance.

    Parameters
    ----------
    rows : ndarray, shape (r, d)
        Directions in activation space (the decoder): ``f ≈ mean + features @ rows``. LIB: ``C⁺``;
        PCA: the principal axes (orthonormal).
    encoder : ndarray, shape (r, d)
        Feature read-out: ``features = (f - mean) @ encoder.T``. LIB: ``Cᵀ``; PCA: equal to ``rows``.
        ``encoder @ rows.T = I_r`` (biorthogonal).
    importances : ndarray, shape (r,)
        Non-increasing. LIB: ``Λ`` (mean squared singular values of the whitened Jacobian, equal to
        the features' variances); PCA: the variances of the components.
    mean : ndarray, shape (d,)
        Mean activation the features are centred on (zeros with ``center=False``).
    kind : {"pca", "lib"}
    info : dict
        How the basis was built: method, number of states, ranks after each truncation, threshold,
        Jacobian target, runtime.
    """

    rows: np.ndarray
    encoder: np.ndarray
    importances: np.ndarray
    mean: np.ndarray
    kind: str
    info: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        rows = np.array(self.rows, dtype=np.float64)
        enc = np.array(self.encoder, dtype=np.float64)
        imp = np.array(self.importances, dtype=np.float64).reshape(-1)
        mean = np.array(self.mean, dtype=np.float64).reshape(-1)
        if rows.ndim != 2 or enc.shape != rows.shape:
            raise PlotError(f"Basis.rows and Basis.encoder must both be (r, d); got {rows.shape} and {enc.shape}")
        if imp.shape[0] != rows.shape[0] or mean.shape[0] != rows.shape[1]:
            raise PlotError(
                f"Basis: importances have {imp.shape[0]} entries and mean {mean.shape[0]} but rows are {rows.shape}"
            )
        if self.kind not in BASIS_KINDS:
            raise PlotError(f"unknown basis kind {self.kind!r}; choose one of {BASIS_KINDS}")
        for a in (rows, enc, imp, mean):
            a.setflags(write=False)
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "encoder", enc)
        object.__setattr__(self, "importances", imp)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "info", dict(self.info))

    # ------------------------------------------------------------------ shape
    @property
    def rank(self) -> int:
        """Number of directions ``r``."""
        return int(self.rows.shape[0])

    @property
    def width(self) -> int:
        """Width ``d`` of the site."""
        return int(self.rows.shape[1])

    @property
    def is_orthonormal(self) -> bool:
        """True when ``rows`` are orthonormal and equal to ``encoder`` (PCA; LIB only by accident)."""
        return bool(
            np.allclose(self.rows, self.encoder, atol=1e-8)
            and np.allclose(self.rows @ self.rows.T, np.eye(self.rank), atol=BASIS_ORTHO_ATOL)
        )

    def __repr__(self) -> str:
        head = ", ".join(f"{x:.3g}" for x in self.importances[:3])
        return (f"Basis(kind={self.kind!r}, rank={self.rank}, width={self.width}, "
                f"importances=[{head}{', ...' if self.rank > 3 else ''}])")

    # ------------------------------------------------------------------ maps
    def _keep_index(self, keep: int | Sequence[int] | None) -> np.ndarray:
        if keep is None:
            return np.arange(self.rank)
        if isinstance(keep, (int, np.integer)):
            n = int(keep)
            if not 0 <= n <= self.rank:
                raise PlotError(f"keep={n} must lie in [0, {self.rank}] (the basis has {self.rank} directions)")
            return np.arange(n)
        idx = np.asarray(list(keep), dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.rank):
            raise PlotError(f"keep indexes directions {idx.tolist()} outside range(0, {self.rank})")
        return idx

    def transform(self, acts: ArrayLike) -> ArrayLike:
        """Features ``(n, r)`` of activations ``(n, d)``: ``(acts - mean) @ encoder.T``.

        Torch tensors in give torch tensors out (same dtype and device), arrays give float64 arrays.
        """
        if isinstance(acts, torch.Tensor):
            E = torch.tensor(self.encoder, dtype=acts.dtype, device=acts.device)
            m = torch.tensor(self.mean, dtype=acts.dtype, device=acts.device)
            return (acts - m) @ E.T
        return (_to_numpy64(acts) - self.mean) @ self.encoder.T

    def inverse_transform(self, features: ArrayLike) -> ArrayLike:
        """Activations ``(n, d)`` from features ``(n, r)``: ``mean + features @ rows``."""
        if isinstance(features, torch.Tensor):
            R = torch.tensor(self.rows, dtype=features.dtype, device=features.device)
            m = torch.tensor(self.mean, dtype=features.dtype, device=features.device)
            return m + features @ R
        return self.mean + _to_numpy64(features) @ self.rows

    def reconstruct(self, acts: ArrayLike, keep: int | Sequence[int] | None = None) -> ArrayLike:
        """Node ablation: keep some features, set the others to their mean (zero).

        Parameters
        ----------
        acts : Tensor or ndarray, shape (n, d)
        keep : int or sequence of int, optional
            ``n`` keeps the ``n`` most important directions; a sequence keeps those indices; ``None``
            keeps every direction (the reconstruction ``mean + C⁺ᵀ Cᵀ (f - mean)``).

        Returns
        -------
        Tensor or ndarray, shape (n, d)
            ``mean + features[:, keep] @ rows[keep]``. The part of ``acts`` outside the basis span
            (directions truncated for zero variance or zero downstream effect) is dropped as well.
        """
        idx = self._keep_index(keep)
        if isinstance(acts, torch.Tensor):
            E = torch.tensor(self.encoder[idx], dtype=acts.dtype, device=acts.device)
            R = torch.tensor(self.rows[idx], dtype=acts.dtype, device=acts.device)
            m = torch.tensor(self.mean, dtype=acts.dtype, device=acts.device)
            return m + ((acts - m) @ E.T) @ R
        a = _to_numpy64(acts)
        return self.mean + ((a - self.mean) @ self.encoder[idx].T) @ self.rows[idx]

    def truncate(self, n: int) -> "Basis":
        """The ``n`` most important directions as a new basis."""
        idx = self._keep_index(int(n))
        info = dict(self.info, truncated_from=self.rank)
        return Basis(self.rows[idx], self.encoder[idx], self.importances[idx], self.mean, self.kind, info)

    def orthonormal_rows(self, side: str = "encoder") -> np.ndarray:
        """Orthonormal rows ``Q`` (r, d) with nested spans, for PLOT's orthogonal span interventions.

        Gram–Schmidt (QR) in importance order: ``span(Q[:k]) = span(M[:k])`` for every ``k``, where
        ``M`` is ``encoder`` (default) or ``rows``; signs are chosen so that ``Q[i] · M[i] > 0``. For
        an orthonormal basis (PCA) both give ``rows`` itself (up to rounding).

        ``side="encoder"`` (used by the scheduler's ``lib`` stage): the orthogonal projection onto
        ``span(encoder[S])`` has the same kernel as LIB's oblique projection (it moves nothing unless
        the features ``S`` differ) and sets the features ``S`` exactly; it writes into
        ``span(encoder[S])`` instead of ``span(C⁺_S)``. ``side="rows"`` orthonormalises ``span(C⁺_S)``
        (right range, wrong kernel: high-variance, low-importance directions leak into the kept span).
        On the modular-addition benchmark (``benchmarks/lib_modadd.py``) node ablation with the
        encoder side matches oblique LIB within one direction, the rows side does not.

        Parameters
        ----------
        side : {"encoder", "rows"}, default "encoder"

        Raises
        ------
        PlotError
            If those rows are numerically linearly dependent, or ``side`` is unknown.
        """
        if side not in ("encoder", "rows"):
            raise PlotError(f"side must be 'encoder' or 'rows', got {side!r}")
        M = self.encoder if side == "encoder" else self.rows
        Q, R = np.linalg.qr(M.T)  # (d, r), (r, r)
        diag = np.diag(R)
        scale = np.linalg.norm(M, axis=1)
        if np.any(np.abs(diag) <= 1e-10 * np.maximum(scale, 1e-300)):
            raise PlotError("basis rows are linearly dependent; cannot orthonormalise (truncate the basis first)")
        return (Q * np.sign(diag)).T.copy()

    def bands(self, n_bands: int) -> list[tuple[int, ...]]:
        """Contiguous, near-equal groups of direction indices in importance order (at most ``rank``)."""
        if int(n_bands) < 1:
            raise PlotError(f"n_bands must be >= 1, got {n_bands}")
        nb = min(int(n_bands), self.rank)
        edges = np.linspace(0, self.rank, nb + 1).round().astype(int)
        return [tuple(range(a, b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]

    def intervention(self, dims: Sequence[int] | None = None, strength: float = 1.0, position: int | None = None):
        """A pyvene intervention interchanging the features ``dims`` (default: all) from the source.

        Returns an :class:`~pyvene_plot.interventions.ObliqueSpanInterchangeIntervention` with this
        basis' encoder and rows: ``h <- h + strength * ((h_src - h) @ encoder[dims].T) @ rows[dims]``,
        i.e. LIB's oblique feature interchange (every other feature of the base is left unchanged).
        For an orthonormal basis it equals :class:`~pyvene_plot.SoftSpanInterchangeIntervention`.
        """
        from ...interventions import ObliqueSpanInterchangeIntervention

        idx = self._keep_index(None if dims is None else list(dims))
        if idx.size == 0:
            raise PlotError("dims is empty; name at least one direction to interchange")
        return ObliqueSpanInterchangeIntervention(
            embed_dim=self.width, low_rank_dimension=int(idx.size),
            basis=torch.tensor(self.rows[idx], dtype=torch.float32),
            encoder=torch.tensor(self.encoder[idx], dtype=torch.float32),
            strength=strength, position=position,
        )

    def representation(self, site: Site, dims: Sequence[int] | None = None, strength: float = 1.0):
        """A pyvene ``RepresentationConfig`` interchanging the features ``dims`` at ``site``.

        Holds :meth:`intervention` (position stored from ``site``) and sets ``low_rank_dimension`` so
        that ``IntervenableModel.save`` / ``load`` rebuild the intervention with the right shapes.

        >>> im = pv.IntervenableModel([basis.representation(pp.Site(1), dims=[0, 1])], model)  # doctest: +SKIP
        >>> pp.run_intervenable(im, base, source)                                                # doctest: +SKIP
        """
        import pyvene as pv

        iv = self.intervention(dims=dims, strength=strength, position=site.position)
        return pv.RepresentationConfig(layer=site.layer, component=site.component, unit="pos", max_number_of_units=1,
                                       low_rank_dimension=iv.rank, intervention=iv)

    # ------------------------------------------------------------------ io
    def to_dict(self) -> dict:
        from ..._utils import to_serializable

        return {"kind": self.kind, "rows": self.rows.tolist(), "encoder": self.encoder.tolist(),
                "importances": self.importances.tolist(), "mean": self.mean.tolist(),
                "info": to_serializable(self.info)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Basis":
        return cls(np.asarray(d["rows"]), np.asarray(d["encoder"]), np.asarray(d["importances"]),
                   np.asarray(d["mean"]), d["kind"], dict(d.get("info", {})))


# ============================================================================== linear algebra
def _check_width(rank: int | None, width: int, what: str) -> None:
    if rank is None:
        return
    if int(rank) < 1:
        raise PlotError(f"rank must be a positive integer (directions to keep), got {rank}")
    if int(rank) > width:
        raise SiteError(
            f"rank {rank} is larger than the site's width d={width}; a {what} basis has at most d "
            f"directions — use rank <= {width}"
        )


def _check_rank(rank: int | None, n_states: int, width: int, center: bool, what: str) -> None:
    if rank is None:
        return
    _check_width(rank, width, what)
    limit = n_states - 1 if center else n_states
    if int(rank) > limit:
        raise BankError(
            f"{n_states} activation states can support at most {max(limit, 0)} {'centred ' if center else ''}"
            f"directions, but rank={rank} was requested; use a bigger bank (more pairs) or a smaller rank"
        )


def _check_states(acts: np.ndarray, center: bool, what: str) -> None:
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


def _eigh_desc(S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w, U = np.linalg.eigh((S + S.T) / 2.0)
    order = np.argsort(w)[::-1]
    return w[order], U[:, order]


def _fix_signs(rows: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, ...]:
    """Flip each direction so that its largest-magnitude entry in ``rows`` is positive."""
    j = np.argmax(np.abs(rows), axis=1)
    s = np.sign(rows[np.arange(rows.shape[0]), j])
    s[s == 0] = 1.0
    return tuple(a * s[:, None] if a.ndim == 2 else a for a in (rows, *others))


def _keep_mask(w: np.ndarray, threshold: float) -> np.ndarray:
    top = float(w[0]) if w.size else 0.0
    if not top > 0:
        return np.zeros_like(w, dtype=bool)
    return w > float(threshold) * top


def pca_from_activations(
    acts: ArrayLike,
    *,
    center: bool = True,
    rank: int | None = None,
    truncation_threshold: float = 1e-10,
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
        Drop components whose variance is ``<= truncation_threshold * (largest variance)``.

    Returns
    -------
    Basis
        ``kind="pca"``; ``rows = encoder`` orthonormal ``(r, d)``; ``importances`` are the variances
        (``1/n`` normalisation, so ``Cov(features) = diag(importances)``).

    Raises
    ------
    BankError
        Fewer states than the requested rank needs (or fewer than 2 with centring).
    SiteError
        ``rank`` larger than ``d``, or activations that do not vary.
    """
    t0 = time.perf_counter()
    X = _to_numpy64(acts)
    _check_states(X, center, "PCA")
    n, d = X.shape
    _check_rank(rank, n, d, center, "PCA")
    mean = X.mean(0) if center else np.zeros(d)
    Xc = X - mean
    G = Xc.T @ Xc / n
    w, U = _eigh_desc(G)
    keep = _keep_mask(w, truncation_threshold)
    if not keep.any():
        raise SiteError("activations at this site do not vary on the given states; a PCA basis cannot be fitted")
    w, U = w[keep], U[:, keep]
    if rank is not None:
        w, U = w[: int(rank)], U[:, : int(rank)]
    rows, = _fix_signs(U.T.copy())
    info = {"method": "pca", "n_states": n, "center": bool(center), "truncation_threshold": float(truncation_threshold),
            "numerical_rank": int(keep.sum()), "requested_rank": rank, "runtime_s": time.perf_counter() - t0}
    return Basis(rows, rows, w, mean, "pca", info)


def lib_from_activations(
    acts: ArrayLike,
    jacobian_gram: ArrayLike,
    *,
    center: bool = True,
    rank: int | None = None,
    truncation_threshold: float = 1e-10,
    mean: ArrayLike | None = None,
) -> Basis:
    """LIB basis from activations and the Jacobian Gram ``M' = E[JᵀJ]`` (steps 1 and 3–5, float64).

    Parameters
    ----------
    acts : Tensor or ndarray, shape (n, d)
        Activations at the site.
    jacobian_gram : Tensor or ndarray, shape (d, d)
        ``E_x[J(x)ᵀ J(x)]`` over the same states, ``J(x) = ∂y/∂f`` (outputs x site width), summed
        over the outputs of ``y``.
    center : bool, default True
        Centre the activations (the mean is kept separately and never rotated).
    rank : int, optional
        Keep at most this many directions.
    truncation_threshold : float, default 1e-10
        Relative threshold for both eigen-truncations: whitening drops ``D <= ε·max D``, the
        rotation drops ``Λ <= ε·max Λ``.
    mean : array, shape (d,), optional
        Use this mean instead of the sample mean (with ``center=True``).

    Returns
    -------
    Basis
        ``kind="lib"``, ``encoder = Cᵀ``, ``rows = C⁺``, ``importances = Λ``.

    Raises
    ------
    BankError, SiteError
        As :func:`pca_from_activations`.
    ModelError
        ``M'`` is zero (the downstream quantity does not depend on the site) or not finite.
    """
    t0 = time.perf_counter()
    X = _to_numpy64(acts)
    _check_states(X, center, "LIB")
    n, d = X.shape
    Mp = _to_numpy64(jacobian_gram)
    if Mp.shape != (d, d):
        raise PlotError(f"jacobian_gram must be ({d}, {d}) to match activations of width {d}, got {Mp.shape}")
    if not np.all(np.isfinite(Mp)):
        raise ModelError("the Jacobian Gram contains NaN or inf; check the model (and the output function)")
    if not np.any(Mp != 0):
        raise ModelError(
            "the downstream output does not depend on the activations at this site (zero Jacobian): no "
            "gradient path — choose a site upstream of the read-out (earlier layer / position) or another output"
        )
    _check_rank(rank, n, d, center, "LIB")
    mu = (_to_numpy64(mean).reshape(d) if mean is not None else X.mean(0)) if center else np.zeros(d)
    Xc = X - mu
    G = Xc.T @ Xc / n
    D, U = _eigh_desc(G)
    keep = _keep_mask(D, truncation_threshold)
    if not keep.any():
        raise SiteError("activations at this site do not vary on the given states; a LIB basis cannot be fitted")
    D, U = D[keep], U[:, keep]
    sqrtD = np.sqrt(D)
    M = (U * sqrtD).T @ ((Mp + Mp.T) / 2.0) @ (U * sqrtD)  # D^{1/2} Uᵀ M' U D^{1/2}
    lam, V = _eigh_desc(M)
    lkeep = _keep_mask(lam, truncation_threshold)
    if not lkeep.any():
        raise ModelError(
            "the downstream Jacobian is zero on every direction the activations vary in: no gradient path "
            "from this site to the output — choose another site or output"
        )
    lam, V = lam[lkeep], V[:, lkeep]
    if rank is not None:
        lam, V = lam[: int(rank)], V[:, : int(rank)]
    sl = np.sqrt(lam)
    C = (U / sqrtD) @ V * sl  # (d, r) = U D^{-1/2} V Λ^{1/2}
    Cp = (V / sl[None, :]).T @ (U * sqrtD).T  # (r, d) = Λ^{-1/2} Vᵀ D^{1/2} Uᵀ
    rows, enc = _fix_signs(Cp, C.T.copy())
    info = {"method": "lib", "n_states": n, "center": bool(center), "truncation_threshold": float(truncation_threshold),
            "whitened_rank": int(keep.sum()), "numerical_rank": int(lkeep.sum()), "requested_rank": rank,
            "runtime_s": time.perf_counter() - t0}
    return Basis(rows, enc, lam, mu, "lib", info)


# ========================================================================= activations at a site
def _states(bank: PairBank | Inputs) -> Inputs:
    """Model inputs whose activations a basis is fitted on: bases and sources of a bank, or raw inputs."""
    if isinstance(bank, PairBank):
        return concat_inputs([bank.base, bank.source])
    return bank


def _whole_site(model: torch.nn.Module, site: Site) -> Site:
    if not isinstance(site, Site):
        raise SiteError(f"expected a pyvene_plot.Site, got {type(site).__name__}")
    if site.dims is not None or site.basis is not None:
        raise SiteError(
            f"site {site.label}: a basis is fitted on a whole activation vector; pass the site without "
            "dims/basis (e.g. site.with_(dims=None, basis=None))"
        )
    validate_sites(model, [site])
    return site


def site_activations(
    model: torch.nn.Module, site: Site, bank: PairBank | Inputs, batch_size: int = 512
) -> torch.Tensor:
    """Activations at a whole-vector site, shape ``(n, d)`` (float, CPU).

    ``bank`` is a :class:`PairBank` (every base and then every source state: ``n = 2N``) or model
    inputs (a Tensor or dict of Tensors).
    """
    from ...localize import InterchangeEngine

    site = _whole_site(model, site)
    eng = InterchangeEngine(model, [site.unit], batch_size=batch_size)
    return eng.collect(_states(bank))[(site.layer, site.component, site.position)].float().cpu()


def _output_values(out: torch.Tensor, output_fn: str | Callable | None) -> torch.Tensor:
    if output_fn is None or output_fn == "logits":
        return out
    if output_fn == "log_probs":
        return torch.log_softmax(out, dim=-1)
    if callable(output_fn):
        y = output_fn(out)
        if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[0] != out.shape[0]:
            raise PlotError("output_fn must map readout logits (B, C) to a tensor (B, K)")
        return y
    raise PlotError(f"unknown output_fn {output_fn!r}; use 'logits', 'log_probs' or a callable (B, C) -> (B, K)")


def _accumulate_jacobian_gram(
    y: torch.Tensor, f: torch.Tensor, n_sources: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """Σ_b J_bᵀ J_b for ``y`` (B, K) depending row-wise on the leaf ``f`` (B, d); float64 on CPU."""
    B, K = y.shape
    d = f.shape[1]
    out = torch.zeros(d, d, dtype=torch.float64)
    if n_sources is None:  # exact: one vector-Jacobian product per output coordinate
        for k in range(K):
            g = torch.autograd.grad(y[:, k].sum(), f, retain_graph=True, allow_unused=True)[0]
            if g is not None:
                g = g.detach().double().cpu()
                out += g.T @ g
        return out
    for _ in range(int(n_sources)):  # Rademacher sources: E[s sᵀ] = I, unbiased for Σ JᵀJ
        s = torch.randint(0, 2, (B, K), generator=generator).to(y.dtype).mul_(2).sub_(1).to(y.device)
        g = torch.autograd.grad((y * s).sum(), f, retain_graph=True, allow_unused=True)[0]
        if g is not None:
            g = g.detach().double().cpu()
            out += g.T @ g
    return out / int(n_sources)


def output_jacobian_gram(
    model: torch.nn.Module,
    site: Site,
    bank: PairBank | Inputs,
    *,
    readout: Readout | None = None,
    output_fn: str | Callable[[torch.Tensor], torch.Tensor] | None = None,
    n_stochastic_sources: int | None = None,
    batch_size: int = 256,
    progress: bool = False,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations at a site and ``M' = E[JᵀJ]`` of the readout output w.r.t. them.

    The site's activation is replaced by a leaf tensor through a pyvene interchange (coefficient 1,
    so the forward pass is the clean one), and ``J = ∂y/∂f`` is obtained by vector-Jacobian products.

    Parameters
    ----------
    model : torch.nn.Module
        A model pyvene can hook (its parameters are not modified; no gradients are stored on them).
    site : Site
        Whole-vector site.
    bank : PairBank or inputs
        States: a bank's bases then sources, or raw model inputs.
    readout : Readout, optional
        Output -> logits ``(B, C)``; default the bank's readout or :class:`Readout`.
    output_fn : {"logits", "log_probs"} or callable, optional
        ``y``: raw readout logits (default, as LIB's output node), their log-softmax, or any map
        ``(B, C) -> (B, K)`` (e.g. a logit difference).
    n_stochastic_sources : int, optional
        Estimate the sum over outputs with this many Rademacher projections per batch instead of
        ``K`` exact products (for large ``K``, e.g. a full vocabulary).
    batch_size : int, default 256
    progress : bool, default False
        tqdm bar over batches.
    seed : int, default 0
        Seed of the stochastic sources.

    Returns
    -------
    acts : Tensor, shape (n, d), float32
    jacobian_gram : Tensor, shape (d, d), float64

    Raises
    ------
    ModelError
        The readout output does not depend on the site (no gradient path).
    """
    import pyvene as pv

    from ...localize import InterchangeEngine

    from ...data import as_model_kwargs

    from ...models import model_device
    from ...interventions import SoftInterchangeIntervention

    site = _whole_site(model, site)
    states = _states(bank)
    readout = readout or getattr(bank, "readout", None) or Readout()
    eng = InterchangeEngine(model, [site.unit], readout, batch_size=batch_size)
    ru = (site.layer, site.component, site.position)
    acts = eng.collect(states)[ru].float()
    positions = eng.positions(states)[ru]
    d = int(acts.shape[1])
    iv = SoftInterchangeIntervention(embed_dim=d)  # weight 1, strength 1: the leaf replaces the activation
    im = pv.IntervenableModel(
        [{"layer": site.layer, "component": site.component, "unit": "pos", "max_number_of_units": 1,
          "intervention": iv}],
        model,
        use_fast=False,
    )
    device = model_device(model)
    im.set_device(device)
    key = im.sorted_keys[0]
    kw = as_model_kwargs(states)
    n = inputs_len(kw)
    gen = torch.Generator().manual_seed(int(seed))
    M = torch.zeros(d, d, dtype=torch.float64)
    starts = range(0, n, int(batch_size))
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"Jacobian at {site.label}", leave=False)
    for s in starts:
        part = {k: v[s : s + batch_size].to(device) for k, v in kw.items()}
        b = inputs_len(part)
        f = acts[s : s + b].to(device).clone().requires_grad_(True)
        p = positions[s : s + b]
        locs = [[[int(x)] for x in p.tolist()]]
        im.use_fast = False
        with torch.enable_grad():
            _, cf = im(part, unit_locations={"sources->base": (locs, locs)},
                       source_representations={key: f.unsqueeze(1)})
            y = _output_values(readout(cf, part), output_fn)
            if not y.requires_grad:
                raise ModelError(
                    f"the readout output does not depend on site {site.label} (no gradient path); choose a "
                    "site upstream of the read-out"
                )
            M += _accumulate_jacobian_gram(y, f, n_stochastic_sources, gen)
    return acts.cpu(), M / n


# ================================================================================ module chains
def mlp_chain(
    model: torch.nn.Module, site: Site, readout: Readout | None = None
) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """Downstream module chain of a pyvene MLP site, for the faithful (layer-recursive) LIB.

    Parameters
    ----------
    model : pyvene ``MLPForClassification``
    site : Site
        ``block_output`` / ``mlp_activation`` of layer ``l`` or ``block_input`` of layer ``l``.
    readout : Readout, optional
        Appended to the last module (selects ``label_tokens``).

    Returns
    -------
    list of callable
        ``F_0, F_1, ...`` mapping the site's activations ``(n, d)`` to the next node layer's, the
        last one to the readout logits ``(n, C)``.
    """
    from pyvene.models.mlp.modelings_mlp import MLPForClassification

    if not isinstance(model, MLPForClassification):
        raise ModelError(
            f"the faithful LIB chain is derived automatically only for pyvene MLPForClassification, not "
            f"{type(model).__name__}; pass chain=[module, ...] (callables from the site to the logits) or use "
            "method='output_jacobian'"
        )
    blocks = list(model.mlp.h)
    l = int(site.layer)
    if site.component in ("block_output", "mlp_activation"):
        rest = blocks[l + 1 :]
    elif site.component == "block_input":
        rest = blocks[l:]
    else:
        raise SiteError(
            f"no module chain for component {site.component!r}; use block_input, block_output or mlp_activation"
        )
    ro = readout or Readout()
    score = model.score

    def head(h: torch.Tensor) -> torch.Tensor:
        return ro(score(h))

    chain: list[Callable[[torch.Tensor], torch.Tensor]] = list(rest) + [head]
    if site.component == "mlp_activation":  # the block's dropout sits between the activation and the next step
        drop, first = blocks[l].dropout, chain[0]

        def step(h: torch.Tensor) -> torch.Tensor:
            return first(drop(h))

        chain[0] = step
    return chain


def lib_chain_bases(
    chain: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    inputs: ArrayLike,
    *,
    center: bool = True,
    rank: int | None = None,
    truncation_threshold: float = 1e-10,
    batch_size: int = 512,
    progress: bool = False,
) -> list[Basis]:
    """Faithful LIB: bases at every node layer of a module chain, built backwards from the output.

    Node layers are ``f^0 = inputs`` and ``f^{l+1} = chain[l](f^l)``; the last node ``f^L`` is the
    output and is not rotated. For ``l = L-1, ..., 0`` the Jacobian is taken to the next layer's LIB
    features, ``J_l = ∂f̂^{l+1}/∂f^l = C^{l+1 T} ∂F_l/∂f^l`` (``∂f^L/∂f^{L-1}`` at the output), and
    :func:`lib_from_activations` builds ``C^l``.

    Parameters
    ----------
    chain : sequence of callable
        Modules ``F_0..F_{L-1}``, each mapping a batch ``(B, d_l)`` to ``(B, d_{l+1})`` row by row.
    inputs : Tensor or ndarray, shape (n, d_0)
        Activations at the first node layer.
    center, rank, truncation_threshold :
        As in :func:`lib_from_activations` (``rank`` applies to every layer).
    batch_size : int, default 512
    progress : bool, default False

    Returns
    -------
    list of Basis
        One per node layer ``0..L-1`` (the first is the basis at ``inputs``).
    """
    if len(chain) == 0:
        raise PlotError("the chain is empty; pass at least one module from the site to the output")
    if isinstance(inputs, torch.Tensor):
        x0 = inputs.detach()
    else:
        x0 = torch.as_tensor(_to_numpy64(inputs), dtype=torch.float32)
    if x0.dim() != 2:
        raise PlotError(f"inputs must be (n_states, d), got shape {tuple(x0.shape)}")
    try:
        dtype = next(p for m in chain if isinstance(m, torch.nn.Module) for p in m.parameters()).dtype
        device = next(p for m in chain if isinstance(m, torch.nn.Module) for p in m.parameters()).device
    except StopIteration:
        dtype, device = x0.dtype if x0.dtype.is_floating_point else torch.float32, x0.device
    n = int(x0.shape[0])
    acts = [x0.to(device=device, dtype=dtype)]
    with torch.no_grad():
        for F in chain:
            acts.append(torch.cat([F(acts[-1][s : s + batch_size]) for s in range(0, n, batch_size)], 0))
    bases: list[Basis | None] = [None] * len(chain)
    enc_next: torch.Tensor | None = None  # encoder of layer l+1 (None at the output: unrotated)
    mean_next: torch.Tensor | None = None
    layers = range(len(chain) - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm

        layers = tqdm(layers, desc="LIB layers", leave=False)
    for l in layers:
        F = chain[l]
        d = int(acts[l].shape[1])
        M = torch.zeros(d, d, dtype=torch.float64)
        for s in range(0, n, batch_size):
            f = acts[l][s : s + batch_size].clone().requires_grad_(True)
            with torch.enable_grad():
                y = F(f)
                if enc_next is not None:
                    y = (y - mean_next) @ enc_next.T
                if not y.requires_grad:
                    raise ModelError(f"module {l} of the chain does not depend on its input (no gradient path)")
                M += _accumulate_jacobian_gram(y, f, None, None)
        basis = lib_from_activations(acts[l], M / n, center=center, rank=rank,
                                     truncation_threshold=truncation_threshold)
        basis.info.update(method="lib", jacobian_target="next-layer LIB features" if enc_next is not None else "output",
                          node_layer=l, n_node_layers=len(chain))
        bases[l] = basis
        enc_next = torch.tensor(basis.encoder, dtype=dtype, device=device)
        mean_next = torch.tensor(basis.mean, dtype=dtype, device=device)
    return [b for b in bases if b is not None]


# ============================================================================ public builders
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
        See :func:`pca_from_activations`.
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
    _check_rank(rank, int(acts.shape[0]), int(acts.shape[1]), center, "PCA")
    basis = pca_from_activations(acts, center=center, rank=rank, truncation_threshold=truncation_threshold)
    basis.info.update(site=site.to_dict(), runtime_s=time.perf_counter() - t0)
    return basis


LIB_METHODS = ("output_jacobian", "lib")


def lib_basis(
    model: torch.nn.Module,
    site: Site,
    bank: PairBank | Inputs,
    *,
    method: str = "output_jacobian",
    readout: Readout | None = None,
    output_fn: str | Callable[[torch.Tensor], torch.Tensor] | None = None,
    chain: Sequence[Callable[[torch.Tensor], torch.Tensor]] | None = None,
    center: bool = True,
    rank: int | None = None,
    truncation_threshold: float = 1e-10,
    n_stochastic_sources: int | None = None,
    batch_size: int = 256,
    progress: bool = False,
    seed: int = 0,
) -> Basis:
    """Local Interaction Basis at a site (whitened activations rotated by the downstream Jacobian).

    Parameters
    ----------
    model : torch.nn.Module
        A model pyvene can hook.
    site : Site
        Whole-vector site (no ``dims`` / ``basis``).
    bank : PairBank or inputs
        States the basis is built on: a bank's bases and sources (``2N`` states) or model inputs.
    method : {"output_jacobian", "lib"}, default "output_jacobian"
        ``"output_jacobian"``: Jacobian of the readout output w.r.t. the site (any model).
        ``"lib"``: faithful layer-recursive LIB through the downstream module chain (``chain=`` or a
        pyvene ``MLPForClassification``, see :func:`mlp_chain`); ``output_fn`` and stochastic
        sources do not apply there.
    readout : Readout, optional
        Default: the bank's readout, else :class:`Readout`.
    output_fn : {"logits", "log_probs"} or callable, optional
        The output ``y`` whose Jacobian is used (``output_jacobian`` only); default raw logits.
    chain : sequence of callable, optional
        For ``method="lib"`` on other models: modules from the site's activations to the logits.
    center : bool, default True
    rank : int, optional
        Keep at most this many directions.
    truncation_threshold : float, default 1e-10
        Relative eigenvalue threshold of the whitening and of the rotation.
    n_stochastic_sources : int, optional
        Rademacher estimate of the sum over outputs (large output spaces).
    batch_size : int, default 256
    progress : bool, default False
    seed : int, default 0

    Returns
    -------
    Basis
        ``kind="lib"``: ``rows = C⁺`` (not orthonormal), ``encoder = Cᵀ``, ``importances = Λ``.

    Raises
    ------
    SiteError
        Unknown site, a site with dims/basis, or ``rank`` larger than the site's width.
    BankError
        Too few states for ``rank``.
    ModelError
        No gradient path from the site to the output, or no module chain for ``method="lib"``.

    Examples
    --------
    >>> b = pp.bases.lib_basis(task.model, pp.Site(1), task.fit)          # doctest: +SKIP
    >>> feats = b.transform(acts); b.reconstruct(acts, keep=4)            # doctest: +SKIP
    """
    t0 = time.perf_counter()
    if method not in LIB_METHODS:
        raise PlotError(f"unknown LIB method {method!r}; choose one of {LIB_METHODS}")
    site = _whole_site(model, site)
    d = model_spec(model).dim(site.component)
    _check_width(rank, d, "LIB")
    readout = readout or getattr(bank, "readout", None) or Readout()
    if method == "output_jacobian":
        acts, M = output_jacobian_gram(model, site, bank, readout=readout, output_fn=output_fn,
                                       n_stochastic_sources=n_stochastic_sources, batch_size=batch_size,
                                       progress=progress, seed=seed)
        _check_rank(rank, int(acts.shape[0]), d, center, "LIB")
        basis = lib_from_activations(acts, M, center=center, rank=rank, truncation_threshold=truncation_threshold)
        if output_fn in (None, "logits"):
            target = "readout logits"
        else:
            target = output_fn if isinstance(output_fn, str) else "output_fn"
        basis.info.update(method="output_jacobian", jacobian_target=target,
                          n_stochastic_sources=n_stochastic_sources)
    else:
        if output_fn not in (None, "logits") or n_stochastic_sources is not None:
            raise PlotError("output_fn and n_stochastic_sources apply to method='output_jacobian' only")
        chain = list(chain) if chain is not None else mlp_chain(model, site, readout)
        acts = site_activations(model, site, bank, batch_size=batch_size)
        _check_rank(rank, int(acts.shape[0]), d, center, "LIB")
        bases = lib_chain_bases(chain, acts, center=center, rank=rank, truncation_threshold=truncation_threshold,
                                batch_size=batch_size, progress=progress)
        basis = bases[0]
        basis.info.update(method="lib", jacobian_target="next-layer LIB features" if len(chain) > 1 else "output",
                          downstream_ranks=[b.rank for b in bases[1:]])
    basis.info.update(site=site.to_dict(), runtime_s=time.perf_counter() - t0)
    logger.info("LIB basis at %s (%s): rank %d from %d states in %.2fs", site.label, basis.info["method"],
                basis.rank, basis.info["n_states"], basis.info["runtime_s"])
    return basis


# ================================================================ the scheduler's legacy helper
def fit_pca_basis(acts: torch.Tensor, rtol: float = 1e-6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centred PCA of activations ``(n, d)`` as used by the scheduler's ``pca`` stage (float32 output).

    Returns
    -------
    V : ndarray, shape (r, d)
        Orthonormal principal directions (rows), ``r`` = numerical rank.
    mean : ndarray, shape (d,)
    explained : ndarray, shape (r,)
        Variance explained by each component.

    See Also
    --------
    pca_from_activations : the float64 :class:`Basis` version.
    """
    X = torch.as_tensor(acts).double().cpu()
    mean = X.mean(0)
    _U, S, Vh = torch.linalg.svd(X - mean, full_matrices=False)
    tol = rtol * max(X.shape) * (float(S[0]) if S.numel() else 0.0)
    r = int((S > tol).sum())
    if r == 0:
        raise SiteError("activations at this site do not vary on the fit bank; a PCA basis cannot be fitted")
    var = (S[:r] ** 2) / max(1, X.shape[0] - 1)
    return Vh[:r].float().numpy(), mean.float().numpy(), var.float().numpy()
