"""Optimal Ablation: the intervention, fitting, necessity checks and screeners."""

from __future__ import annotations

from ._ablation import ABLATION_LOSSES, ABLATION_KINDS, SCREEN_ABS_TOL, SCREEN_REL_TOL, OptimalAblationIntervention, run_ablated, OptimalAblationConfig, SiteLike, optimal_ablation, OptimalAblationResult, NecessityResult, necessity_check, screen_mean, screen_oa

__all__ = ['ABLATION_LOSSES', 'ABLATION_KINDS', 'SCREEN_ABS_TOL', 'SCREEN_REL_TOL', 'OptimalAblationIntervention', 'run_ablated', 'OptimalAblationConfig', 'SiteLike', 'optimal_ablation', 'OptimalAblationResult', 'NecessityResult', 'necessity_check', 'screen_mean', 'screen_oa']
