"""PCA and Local Interaction Basis spans of a site."""

from __future__ import annotations

from ._bases import BASIS_KINDS, ArrayLike, Basis, pca_from_activations, lib_from_activations, site_activations, output_jacobian_gram, mlp_chain, lib_chain_bases, pca_basis, LIB_METHODS, lib_basis, fit_pca_basis

__all__ = ['BASIS_KINDS', 'ArrayLike', 'Basis', 'pca_from_activations', 'lib_from_activations', 'site_activations', 'output_jacobian_gram', 'mlp_chain', 'lib_chain_bases', 'pca_basis', 'LIB_METHODS', 'lib_basis', 'fit_pca_basis']
