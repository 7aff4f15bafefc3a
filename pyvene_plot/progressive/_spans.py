"""Span candidates of ``pca`` / ``lib`` stages: the basis fitted at a kept site and its bands or prefixes.

A ``bands`` stage partitions the basis into near-equal contiguous bands, most important first; a
``prefixes`` stage offers the nested spans of the top ``r`` directions (the reference's default PCA
site menu). The basis is fitted on the fit bank's states at the kept site: its bases and sources
(``basis_inputs="base+source"``, the default of ``bands`` stages) or its bases only (``"base"``, the
default of ``prefixes`` stages, as the reference's ``fit_pca_rotations``).
"""

from __future__ import annotations

import logging as _logging

import numpy as _np

from ..data import PairBank
from ..methods.bases import fit_pca_basis, lib_basis, site_activations
from ..models import Site
from ._stages import Stage

_log = _logging.getLogger(__name__)

_STATES = {"base+source": "fit-bank bases and sources at the kept site",
           "base": "fit-bank bases at the kept site"}


def basis_key(st: Stage, par: Site) -> str:
    """Key of the basis a span stage fits at the kept site ``par``.

    ``"{kind}:L{layer}:{component}@{position}"`` for a basis of bases and sources (the key earlier
    versions used), ``"{kind}[base]:..."`` for a basis of the bases only, so that two stages fitting
    different bases at one site never share a key.
    """
    tag = "" if st.fit_states == "base+source" else f"[{st.fit_states}]"
    return f"{st.kind}{tag}:L{par.layer}:{par.component}@{par.position}"


def fit_lib_at(key: str, st: Stage, readout, model, par: Site, bank: PairBank, pca_info: dict) -> _np.ndarray:
    """LIB basis (output Jacobian of ``readout``) at a kept site; orthonormal rows for the engine."""
    states = bank if st.fit_states == "base+source" else bank.base
    basis = lib_basis(model, Site(par.layer, par.component, par.position), states, readout=readout)
    pca_info[key] = {"kind": "lib", "n_states": int(basis.info["n_states"]), "rank": basis.rank,
                     "importances": basis.importances.tolist(),
                     "jacobian_target": basis.info.get("jacobian_target"),
                     "orthonormalisation": "nested QR of the LIB encoder rows in importance order",
                     "states": _STATES[st.fit_states]}
    _log.info("LIB basis %s built on %d states (rank %d)", key, basis.info["n_states"], basis.rank)
    return basis.orthonormal_rows().astype(_np.float32)


def fit_pca_at(key: str, st: Stage, model, par: Site, bank: PairBank, pca_info: dict) -> _np.ndarray:
    """Centred PCA basis (rows) of the fit bank's states at a kept site; recorded in ``pca_info``."""
    site = Site(par.layer, par.component, par.position)
    # the one collector, called as the stage always collected: bases and sources in two passes, "auto"
    # batches, the model's dtype (the PCA works in float64 either way)
    if st.fit_states == "base+source":
        acts = site_activations(model, site, bank, batch_size="auto", split_bank=True, dtype=None)
    else:
        acts = site_activations(model, site, bank.base, batch_size="auto", dtype=None)
    V, _mean, _var = fit_pca_basis(acts)
    pca_info[key] = {"n_states": int(acts.shape[0]), "rank": int(V.shape[0]), "states": _STATES[st.fit_states]}
    _log.info("PCA basis %s fitted on %d states (rank %d)", key, acts.shape[0], V.shape[0])
    return V


def band_sites(par: Site, key: str, rank: int, bands: int) -> list[Site]:
    """``min(bands, rank)`` near-equal bands of the basis ``key`` at the kept site ``par``, most important first."""
    nb = min(bands, rank)
    edges = _np.linspace(0, rank, nb + 1).round().astype(int)
    return [Site(par.layer, par.component, par.position, dims=tuple(range(a, b)), basis=key)
            for a, b in zip(edges[:-1], edges[1:]) if b > a]


def prefix_sites(par: Site, key: str, rank: int, prefixes: tuple[int, ...]) -> list[Site]:
    """Nested spans of the top ``r`` directions of basis ``key``, narrowest first.

    Each ``r`` is clipped to ``rank``; the full rank is always included as the widest prefix.
    """
    rs = sorted({min(int(r), rank) for r in prefixes} | {rank})
    return [Site(par.layer, par.component, par.position, dims=tuple(range(r)), basis=key) for r in rs]


def span_sites(st: Stage, par: Site, key: str, rank: int) -> list[Site]:
    """The stage's candidates in basis ``key`` at ``par``: prefixes if the stage has them, else bands."""
    if st.prefixes is not None:
        return prefix_sites(par, key, rank, st.prefixes)
    return band_sites(par, key, rank, int(st.bands))
