"""Every pyvene intervention class the package defines.

=====================================  ==========================================================
class                                  what it does at its site
=====================================  ==========================================================
:class:`SoftInterchangeIntervention`   ``h + λ·w ⊙ (h_src − h)`` on coordinates (PLOT handles)
:class:`SoftSpanInterchangeIntervention`  the same inside the span of an orthonormal basis
:class:`ObliqueSpanInterchangeIntervention`  exact interchange of oblique (LIB) feature coordinates
:class:`LowRankDASIntervention`        pyvene's low-rank rotated-space interchange (DAS)
:class:`SupportRotatedSpaceIntervention`  DAS restricted to a support (coordinates or a basis span)
:class:`OptimalAblationIntervention`   ``h ← a``: a learned constant on the site (Optimal Ablation)
=====================================  ==========================================================

pyvene's ``IntervenableModel.save`` stores each intervention as ``module.Class`` and ``load`` imports
it back. Every class here reports ``pyvene_plot.interventions`` as its module, so saved configs name
this stable public path whatever private file defines the class.
"""

from __future__ import annotations

from ._ablation import OptimalAblationIntervention
from ._das import LowRankDASIntervention, SupportRotatedSpaceIntervention
from ._soft import (
    ObliqueSpanInterchangeIntervention,
    SoftInterchangeIntervention,
    SoftSpanInterchangeIntervention,
    intervention_position,
    set_intervention_position,
)

for _cls in (SoftInterchangeIntervention, SoftSpanInterchangeIntervention, ObliqueSpanInterchangeIntervention,
             LowRankDASIntervention, SupportRotatedSpaceIntervention, OptimalAblationIntervention):
    _cls.__module__ = __name__
del _cls

__all__ = [
    "SoftInterchangeIntervention", "SoftSpanInterchangeIntervention", "ObliqueSpanInterchangeIntervention",
    "LowRankDASIntervention", "SupportRotatedSpaceIntervention", "OptimalAblationIntervention",
    "intervention_position", "set_intervention_position",
]
