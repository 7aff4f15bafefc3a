"""Named constants shared across the package: tolerances, default grids and batch budgets.

One place for numbers that would otherwise be repeated as literals. Changing one here changes it
everywhere it is used.
"""

from __future__ import annotations

#: max |Q Qᵀ - I| entry accepted for an orthonormal basis handed to an intervention or a DAS spec
ORTHO_ATOL = 1e-4
#: the same check for bases the package builds itself (PCA / QR of LIB), which are exact to float64
BASIS_ORTHO_ATOL = 1e-6
#: DAS subspace sizes tried when nothing narrower is known (guided and Full DAS share them)
DEFAULT_SUBSPACE_SIZES = (1, 2, 4, 8)
#: sites kept per variable, the calibration grid of the OT searcher (clipped to the number of sites)
DEFAULT_TOP_K = (1, 2, 4, 8)
#: activation memory per forward pass used to size ``batch_size="auto"`` (MiB)
AUTO_BATCH_MB = 256.0
#: bounds on the rows per forward pass chosen by ``batch_size="auto"``
AUTO_BATCH_MIN_ROWS = 32
AUTO_BATCH_MAX_ROWS = 8192

__all__ = [
    "ORTHO_ATOL", "BASIS_ORTHO_ATOL", "DEFAULT_SUBSPACE_SIZES", "DEFAULT_TOP_K", "AUTO_BATCH_MB",
    "AUTO_BATCH_MIN_ROWS", "AUTO_BATCH_MAX_ROWS",
]
