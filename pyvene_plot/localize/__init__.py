"""One localisation stage: interchange engine → signatures → transport → calibration → handles.

:class:`OTAlignmentSearcher` runs the whole stage and returns an :class:`AlignmentResult`; the steps
are importable on their own for users who want one of them (e.g. :func:`collect_site_effects`).
"""

from __future__ import annotations

from ._calibration import (
    TIE_RTOL,
    BankCache,
    lambda_order,
    rank_sites,
    score_candidates,
    truncate_row,
)
from ._engine import InterchangeEngine, Unit
from ._handles import Handle, run_intervenable, unit_locations_for
from ._metrics import SELECTION_RULES, Candidate, iia_scores, select
from ._results import FORMAT_VERSION, SCHEMA_VERSION, AlignmentResult
from ._search import (
    AUTO_BETA_FACTORS,
    AUTO_EPSILON_FACTORS,
    AUTO_EPSILON_FIXED,
    AUTO_EPSILON_MIN_RANGE_RATIO,
    AUTO_RANGE_BETA_FACTORS,
    AUTO_RANGE_EPSILON_FACTORS,
    DEFAULT_LAMBDAS,
    DEFAULT_TOP_K,
    UNINFORMATIVE_ROW_CONTRAST,
    OTAlignmentSearcher,
)
from ._signatures import (
    SIGNATURE_MODES,
    SiteEffects,
    abstract_signatures,
    collect_site_effects,
    cost_matrix,
    label_set_of,
    neural_signatures,
    site_masks,
)
from ._transport import (
    METHODS,
    ROW_CONTRAST_CAP,
    TransportPlan,
    cost_spread,
    intra_geometry,
    row_contrast,
    row_softmax,
    solve_transport,
)

__all__ = [
    "InterchangeEngine", "Unit",
    "SIGNATURE_MODES", "SiteEffects", "collect_site_effects", "abstract_signatures", "neural_signatures",
    "cost_matrix", "label_set_of", "site_masks",
    "METHODS", "TransportPlan", "solve_transport", "row_softmax", "intra_geometry", "cost_spread",
    "row_contrast", "ROW_CONTRAST_CAP",
    "BankCache", "truncate_row", "lambda_order", "score_candidates", "rank_sites", "TIE_RTOL",
    "SELECTION_RULES", "Candidate", "select", "iia_scores",
    "Handle", "run_intervenable", "unit_locations_for",
    "DEFAULT_TOP_K", "DEFAULT_LAMBDAS", "AUTO_EPSILON_FACTORS", "AUTO_BETA_FACTORS", "AUTO_EPSILON_FIXED",
    "AUTO_RANGE_EPSILON_FACTORS", "AUTO_RANGE_BETA_FACTORS", "AUTO_EPSILON_MIN_RANGE_RATIO", "UNINFORMATIVE_ROW_CONTRAST",
    "OTAlignmentSearcher", "AlignmentResult", "FORMAT_VERSION", "SCHEMA_VERSION",
]
