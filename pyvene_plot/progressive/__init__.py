"""Coarse-to-fine localisation: stages, candidate narrowing, screening, the scheduler."""

from __future__ import annotations

from ._compete import support_width
from ._localization import Localization
from ._scheduler import ProgressiveScheduler
from ._stages import BASIS_INPUTS, COARSE_KINDS, SPAN_KINDS, STAGE_KINDS, Stage, default_sizes

__all__ = ['Localization', 'ProgressiveScheduler', 'STAGE_KINDS', 'Stage', 'COARSE_KINDS', 'default_sizes',
           'SPAN_KINDS', 'BASIS_INPUTS', 'support_width']
from .screening import ScreenResult, get_screener, register_screener, screener_names

__all__ += ["ScreenResult", "get_screener", "register_screener", "screener_names"]
