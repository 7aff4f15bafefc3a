"""pyvene_plot: PLOT (Progressive Localization via Optimal Transport) for pyvene.

Localise the variables of a high-level causal model inside a network with optimal transport, and
get ordinary pyvene interventions back. See ``README.md`` and :mod:`pyvene_plot.search` for the method.
"""

from __future__ import annotations

import contextlib
import io
import logging

with contextlib.redirect_stdout(io.StringIO()):  # pyvene prints a banner on import
    import pyvene  # noqa: F401

from . import bases, tasks
from .bases import Basis, lib_basis, pca_basis
from .banks import PairBank
from .das import (
    DASBest,
    DASHandle,
    DASResult,
    DASSpec,
    LowRankDASIntervention,
    SupportRotatedSpaceIntervention,
    full_das_specs,
    run_das,
)
from .engine import InterchangeEngine
from .errors import BankError, ModelError, PlotError, SignatureError, SiteError, TransportError
from .handles import Handle, run_intervenable, unit_locations_for
from .interventions import (
    ObliqueSpanInterchangeIntervention,
    SoftInterchangeIntervention,
    SoftSpanInterchangeIntervention,
)
from .models import StepGRUForClassification, StepGRULMHeadModel, StepGRUModel, steppable_gru
from .readout import BitsReadout, Readout
from .results import AlignmentResult
from .compare import Comparison, compare
from .schedule import Localization, ProgressiveScheduler, ScreenResult, Stage, register_screener
from .search import OTAlignmentSearcher
from .signatures import SiteEffects, collect_site_effects
from .sites import Site, coordinate_sites, layer_sites, model_spec, neuron_sites, register_model
from .transport import TransportPlan, solve_transport
from .utils import seed_everything
from .ablation import (
    NecessityResult,
    OptimalAblationConfig,
    OptimalAblationIntervention,
    OptimalAblationResult,
    necessity_check,
    optimal_ablation,
    run_ablated,
)
from . import l3d, toys
from .l3d import L3D, L3DConfig

try:
    from importlib.metadata import version as _version

    __version__ = _version("pyvene-plot")
except Exception:  # pragma: no cover
    __version__ = "0.0.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "DASBest",
    "DASHandle",
    "DASResult",
    "DASSpec",
    "LowRankDASIntervention",
    "SupportRotatedSpaceIntervention",
    "full_das_specs",
    "run_das",
    "AlignmentResult",
    "BankError",
    "BitsReadout",
    "Handle",
    "InterchangeEngine",
    "ModelError",
    "OTAlignmentSearcher",
    "PairBank",
    "PlotError",
    "Readout",
    "SignatureError",
    "Site",
    "SiteEffects",
    "SiteError",
    "SoftInterchangeIntervention",
    "SoftSpanInterchangeIntervention",
    "Stage",
    "ScreenResult",
    "register_screener",
    "optimal_ablation",
    "necessity_check",
    "run_ablated",
    "OptimalAblationIntervention",
    "OptimalAblationConfig",
    "OptimalAblationResult",
    "NecessityResult",
    "ProgressiveScheduler",
    "Localization",
    "compare",
    "Comparison",
    "StepGRUForClassification",
    "StepGRULMHeadModel",
    "StepGRUModel",
    "TransportError",
    "TransportPlan",
    "collect_site_effects",
    "coordinate_sites",
    "layer_sites",
    "model_spec",
    "neuron_sites",
    "register_model",
    "run_intervenable",
    "seed_everything",
    "solve_transport",
    "steppable_gru",
    "tasks",
    "bases",
    "Basis",
    "lib_basis",
    "pca_basis",
    "ObliqueSpanInterchangeIntervention",
    "unit_locations_for",
    "l3d",
    "toys",
    "L3D",
    "L3DConfig",
    "__version__",
]
