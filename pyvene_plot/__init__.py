"""pyvene_plot: PLOT (Progressive Localization via Optimal Transport) for pyvene.

Localise the variables of a high-level causal model inside a network with optimal transport, and
get ordinary pyvene interventions back. The pipeline, one subpackage per step::

    data/           pair banks and model inputs
    models/         sites, the model registry, readouts, hookable GRUs, offline LM loaders
    interventions/  the pyvene intervention classes (soft, span, oblique, DAS rotations)
    localize/       engine -> signatures -> transport -> calibration -> handles (OTAlignmentSearcher)
    progressive/    coarse-to-fine stages, screening, the scheduler (Localization)
    das/            DAS specs, trainers and runs (guided and Full DAS)
    comparison.py   PLOT vs guided DAS vs Full DAS on a task
    methods/        Optimal Ablation, PCA/LIB bases, attribution patching, L3D, toy models
    tasks/          built-in tasks (trained in-process, no download)

Everything a user needs is importable from here; the heavy optional parts (``tasks``, ``l3d``,
``toys``, ``bases``, the LM loaders) are imported on first use.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
from typing import Any

with contextlib.redirect_stdout(io.StringIO()):  # pyvene prints a banner on import
    import pyvene  # noqa: F401

from ._utils import seed_everything
from .comparison import Comparison, compare
from .das import DASBest, DASHandle, DASResult, DASSpec, full_das_specs, run_das
from .data import PairBank
from .errors import BankError, ModelError, PlotError, SignatureError, SiteError, TransportError
from .interventions import (
    LowRankDASIntervention,
    ObliqueSpanInterchangeIntervention,
    SoftInterchangeIntervention,
    SoftSpanInterchangeIntervention,
    SupportRotatedSpaceIntervention,
)
from .localize import (
    AlignmentResult,
    Handle,
    InterchangeEngine,
    OTAlignmentSearcher,
    SiteEffects,
    TransportPlan,
    collect_site_effects,
    run_intervenable,
    solve_transport,
    unit_locations_for,
)
from .methods import attribution  # registers the "attribution" screener
from .methods.ablation import (
    NecessityResult,
    OptimalAblationConfig,
    OptimalAblationIntervention,
    OptimalAblationResult,
    necessity_check,
    optimal_ablation,
    run_ablated,
)
from .models import (
    BitsReadout,
    Readout,
    Site,
    StepGRUForClassification,
    StepGRULMHeadModel,
    StepGRUModel,
    coordinate_sites,
    layer_sites,
    model_spec,
    neuron_sites,
    register_model,
    steppable_gru,
)
from .progressive import Localization, ProgressiveScheduler, ScreenResult, Stage, register_screener

#: public name -> module that defines it, imported on first access (PEP 562)
_LAZY = {
    "tasks": "pyvene_plot.tasks",
    "bases": "pyvene_plot.methods.bases",
    "l3d": "pyvene_plot.methods.l3d",
    "toys": "pyvene_plot.methods.toys",
    "Basis": "pyvene_plot.methods.bases",
    "lib_basis": "pyvene_plot.methods.bases",
    "pca_basis": "pyvene_plot.methods.bases",
    "L3D": "pyvene_plot.methods.l3d",
    "L3DConfig": "pyvene_plot.methods.l3d",
    "load_smollm2": "pyvene_plot.models",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        value = module if module.__name__.rsplit(".", 1)[-1] == name else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pyvene_plot' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


try:
    from importlib.metadata import version as _version

    __version__ = _version("pyvene-plot")
except Exception:  # pragma: no cover
    __version__ = "0.0.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    # data
    "PairBank",
    # models and sites
    "Site", "layer_sites", "coordinate_sites", "neuron_sites", "model_spec", "register_model",
    "Readout", "BitsReadout", "StepGRUModel", "StepGRUForClassification", "StepGRULMHeadModel",
    "steppable_gru", "load_smollm2",
    # interventions
    "SoftInterchangeIntervention", "SoftSpanInterchangeIntervention", "ObliqueSpanInterchangeIntervention",
    "LowRankDASIntervention", "SupportRotatedSpaceIntervention",
    # one localisation stage
    "InterchangeEngine", "SiteEffects", "collect_site_effects", "TransportPlan", "solve_transport",
    "Handle", "run_intervenable", "unit_locations_for", "OTAlignmentSearcher", "AlignmentResult",
    # progressive
    "Stage", "ProgressiveScheduler", "Localization", "ScreenResult", "register_screener",
    # DAS
    "DASSpec", "DASHandle", "DASBest", "DASResult", "full_das_specs", "run_das",
    # comparison
    "compare", "Comparison",
    # related methods
    "optimal_ablation", "necessity_check", "run_ablated", "OptimalAblationIntervention",
    "OptimalAblationConfig", "OptimalAblationResult", "NecessityResult",
    "Basis", "lib_basis", "pca_basis", "L3D", "L3DConfig",
    # namespaces
    "tasks", "bases", "l3d", "toys", "attribution", "models",
    # errors and utilities
    "PlotError", "BankError", "SiteError", "ModelError", "TransportError", "SignatureError",
    "seed_everything", "__version__",
]
