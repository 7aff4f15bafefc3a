"""PCA and Local Interaction Basis spans of a site.

* :mod:`._basis` — the :class:`Basis` object (directions, encoder, importances, mean; JSON I/O);
* :mod:`._activations` — :func:`site_activations`, the one activation collector;
* :mod:`._pca` — :func:`pca_from_activations` (the one PCA), :func:`pca_basis`, :func:`fit_pca_basis`;
* :mod:`._jacobian` — :func:`output_jacobian_gram`;
* :mod:`._lib` — LIB: :func:`lib_from_activations`, :func:`lib_chain_bases`, :func:`mlp_chain`,
  :func:`lib_basis` (its module docstring explains LIB);
* :mod:`._linalg` — shared float64 linear algebra and argument checks.
"""

from __future__ import annotations

from ._activations import site_activations
from ._basis import BASIS_FORMAT_VERSION, BASIS_KINDS, ArrayLike, Basis, read_json_payload
from ._jacobian import output_jacobian_gram
from ._lib import LIB_METHODS, lib_basis, lib_chain_bases, lib_from_activations, mlp_chain
from ._pca import PCA_METHODS, fit_pca_basis, pca_basis, pca_from_activations

__all__ = ['BASIS_KINDS', 'ArrayLike', 'Basis', 'pca_from_activations', 'lib_from_activations', 'site_activations',
           'output_jacobian_gram', 'mlp_chain', 'lib_chain_bases', 'pca_basis', 'LIB_METHODS', 'lib_basis',
           'fit_pca_basis', 'PCA_METHODS', 'BASIS_FORMAT_VERSION', 'read_json_payload']
