"""One localisation stage: interchange engine, signatures, transport, calibration, handles, the searcher."""

from __future__ import annotations

from ._calibration import truncate_row, lambda_order, BankCache, score_candidates
from ._engine import Unit, InterchangeEngine
from ._handles import unit_locations_for, run_intervenable, Handle
from ._metrics import SELECTION_RULES, Candidate, select, iia_scores
from ._results import SCHEMA_VERSION, AlignmentResult
from ._search import DEFAULT_TOP_K, DEFAULT_LAMBDAS, AUTO_EPSILON_FACTORS, AUTO_BETA_FACTORS, AUTO_EPSILON_FIXED, OTAlignmentSearcher
from ._signatures import SIGNATURE_MODES, SiteEffects, site_masks, label_set_of, collect_site_effects, abstract_signatures, neural_signatures, cost_matrix
from ._transport import METHODS, TransportPlan, row_softmax, intra_geometry, solve_transport

__all__ = ['truncate_row', 'lambda_order', 'BankCache', 'score_candidates', 'Unit', 'InterchangeEngine', 'unit_locations_for', 'run_intervenable', 'Handle', 'SELECTION_RULES', 'Candidate', 'select', 'iia_scores', 'SCHEMA_VERSION', 'AlignmentResult', 'DEFAULT_TOP_K', 'DEFAULT_LAMBDAS', 'AUTO_EPSILON_FACTORS', 'AUTO_BETA_FACTORS', 'AUTO_EPSILON_FIXED', 'OTAlignmentSearcher', 'SIGNATURE_MODES', 'SiteEffects', 'site_masks', 'label_set_of', 'collect_site_effects', 'abstract_signatures', 'neural_signatures', 'cost_matrix', 'METHODS', 'TransportPlan', 'row_softmax', 'intra_geometry', 'solve_transport']
