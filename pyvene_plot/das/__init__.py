"""Distributed Alignment Search on PLOT's sites: specs, trainers, runs and results."""

from __future__ import annotations

from ._run import TRAINERS, DEFAULT_SIZES, clip_sizes, DASSpec, full_das_specs, DASHandle, DASBest, DASResult, auto_lr, run_das

__all__ = ['TRAINERS', 'DEFAULT_SIZES', 'clip_sizes', 'DASSpec', 'full_das_specs', 'DASHandle', 'DASBest', 'DASResult', 'auto_lr', 'run_das']
