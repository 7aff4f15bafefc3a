"""Every pyvene intervention class the package defines (soft, span, oblique, DAS rotations).

The classes report this package as their module, so pyvene's ``config.json`` stores
``pyvene_plot.interventions.<Class>`` whatever private file defines them."""

from __future__ import annotations

from ._das import LowRankDASIntervention, SupportRotatedSpaceIntervention
from ._soft import set_intervention_position, intervention_position, SoftInterchangeIntervention, SoftSpanInterchangeIntervention, ObliqueSpanInterchangeIntervention

__all__ = ['LowRankDASIntervention', 'SupportRotatedSpaceIntervention', 'set_intervention_position', 'intervention_position', 'SoftInterchangeIntervention', 'SoftSpanInterchangeIntervention', 'ObliqueSpanInterchangeIntervention']
