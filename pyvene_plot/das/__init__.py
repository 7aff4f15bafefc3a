"""Distributed Alignment Search on PLOT's sites: specs, trainers, runs and results.

=============  ==============================================================================
module         what it holds
=============  ==============================================================================
``_spec``      :class:`DASSpec` (where DAS may look, which sizes ``k``), :func:`full_das_specs`,
               :func:`clip_sizes`
``_train``     the two trainers (this package's loop with cached source activations, and
               pyvene's ``train_alignment``) and the batching/prediction helpers they share
``_run``       :func:`run_das` and its steps (work list, per-candidate training, selection)
``_result``    :class:`DASHandle`, :class:`DASBest`, :class:`DASResult` (``to_json`` / ``from_json``)
=============  ==============================================================================

::

    specs = pp.full_das_specs(model, positions=[-1], subspace_sizes=(1, 2, 4))   # Full DAS
    specs = loc.das_specs()                                                      # PLOT-guided DAS
    das = pp.run_das(model, specs, fit, calibration, readout=task.readout)
    das.best["WX"].iia(test)          # a DASHandle: trained pyvene.IntervenableModel + readout
    das.best["WX"].save(d); pyvene.IntervenableModel.load(d, model)   # round-trips
    das.to_json(p); pp.DASResult.from_json(p, model=model)             # round-trips, weights included
"""

from __future__ import annotations

# The DAS rotation classes live in :mod:`pyvene_plot.interventions`; they are re-exported here because
# pyvene configs saved before the restructure store them as ``pyvene_plot.das.<Class>``.
from ..interventions import LowRankDASIntervention, SupportRotatedSpaceIntervention
from ._result import DASBest, DASHandle, DASResult
from ._run import TRAINERS, run_das
from ._spec import DEFAULT_SIZES, DASSpec, clip_sizes, full_das_specs
from ._train import auto_lr

__all__ = [
    "DASSpec", "DASHandle", "DASBest", "DASResult", "run_das", "full_das_specs", "clip_sizes", "auto_lr",
    "TRAINERS", "DEFAULT_SIZES", "LowRankDASIntervention", "SupportRotatedSpaceIntervention",
]
