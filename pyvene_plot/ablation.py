"""Compatibility alias for pyvene configs saved before the package was split into subpackages.

pyvene's ``IntervenableModel.save`` writes each intervention's class as ``module.Class`` into
``config.json`` and ``IntervenableModel.load`` imports that path. Handles saved by earlier versions
name ``pyvene_plot.ablation.OptimalAblationIntervention``; this module keeps that path importable.
New code imports the class from :mod:`pyvene_plot.interventions` (and new configs name that path).
"""

from __future__ import annotations

from .interventions import OptimalAblationIntervention

__all__ = ["OptimalAblationIntervention"]
