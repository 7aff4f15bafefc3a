"""The :class:`Basis` object: directions, encoder, importances and mean of a site's basis, with JSON I/O.

PCA (:mod:`._pca`) and LIB (:mod:`._lib`) both return a :class:`Basis`; this module holds the class,
the float64 conversion they share (:func:`to_numpy64`) and the JSON reader used by the ``from_json``
methods of this area (:func:`read_json_payload`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..._constants import BASIS_ORTHO_ATOL
from ..._utils import atomic_write_json, read_json_object, require_keys, writer_tag
from ...errors import PlotError
from ...models import Site

BASIS_KINDS = ("pca", "lib")
#: version of the JSON layout written by :meth:`Basis.to_json`
BASIS_FORMAT_VERSION = 1

ArrayLike = Any  # numpy array or torch tensor


def to_numpy64(x: ArrayLike) -> np.ndarray:
    """``x`` as a float64 NumPy array on the CPU (tensors are detached first).

    Parameters
    ----------
    x : Tensor or array-like, any shape

    Returns
    -------
    ndarray, same shape, float64
    """
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def read_json_payload(path: str | Path, what: str, required: Sequence[str],
                      format_version: int | None = None) -> dict:
    """Read a JSON object written by a ``to_json`` method, with errors that name the file and the gap.

    :func:`pyvene_plot.localize.read_json_object` and :func:`~pyvene_plot.localize.require_keys`,
    plus a check of the ``format_version`` field.

    Parameters
    ----------
    path : str or Path
    what : str
        What the file should hold (e.g. ``"Basis"``), for the error messages.
    required : sequence of str
        Keys the object must have.
    format_version : int, optional
        The newest ``format_version`` the caller can read; a file claiming a newer one is refused.
        A file without the key is read as the oldest layout.

    Returns
    -------
    dict
        The parsed object.

    Raises
    ------
    PlotError
        The file is missing, empty, truncated or not JSON, not an object, lacks a required key, or
        was written by a newer format.
    """

    payload = read_json_object(path, what)
    require_keys(payload, required, f"{what} file {str(path)!r}")
    version = payload.get("format_version", 1)
    if format_version is not None and (not isinstance(version, int) or version > format_version):
        raise PlotError(f"{what} file {str(path)!r} has format_version {version!r}; this pyvene_plot reads "
                        f"up to {format_version} (upgrade pyvene_plot)")
    return payload


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
        return (to_numpy64(acts) - self.mean) @ self.encoder.T

    def inverse_transform(self, features: ArrayLike) -> ArrayLike:
        """Activations ``(n, d)`` from features ``(n, r)``: ``mean + features @ rows``."""
        if isinstance(features, torch.Tensor):
            R = torch.tensor(self.rows, dtype=features.dtype, device=features.device)
            m = torch.tensor(self.mean, dtype=features.dtype, device=features.device)
            return m + features @ R
        return self.mean + to_numpy64(features) @ self.rows

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
        a = to_numpy64(acts)
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
        """JSON-ready dict of every field (arrays as nested lists); :meth:`from_dict` reads it back."""
        from ..._utils import to_serializable

        return {"kind": self.kind, "rows": self.rows.tolist(), "encoder": self.encoder.tolist(),
                "importances": self.importances.tolist(), "mean": self.mean.tolist(),
                "info": to_serializable(self.info)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Basis":
        """Rebuild a basis from :meth:`to_dict` (``info`` optional)."""
        return cls(np.asarray(d["rows"]), np.asarray(d["encoder"]), np.asarray(d["importances"]),
                   np.asarray(d["mean"]), d["kind"], dict(d.get("info", {})))

    _JSON_KEYS = ("kind", "rows", "encoder", "importances", "mean")

    def to_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` (plus ``format_version`` and ``writer``) atomically as JSON; returns the path."""

        payload = {"format_version": BASIS_FORMAT_VERSION, "writer": writer_tag(), **self.to_dict()}
        return atomic_write_json(path, payload)

    @classmethod
    def from_json(cls, path: str | Path) -> "Basis":
        """Read a basis written by :meth:`to_json`.

        Raises
        ------
        PlotError
            The file is empty, truncated, lacks a field or holds inconsistent shapes.
        """
        payload = read_json_payload(path, "Basis", cls._JSON_KEYS, BASIS_FORMAT_VERSION)
        return cls.from_dict(payload)
