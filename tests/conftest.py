"""Shared fixtures for the pyvene_plot test suite.

The machine running the suite is small and shared: the tiny models used here are fastest with a
single intra-op thread, so the thread count is fixed at import time (before any test runs).
"""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)

import pyvene_plot as pp  # noqa: E402  (after the thread setting on purpose)


@pytest.fixture(scope="session")
def heq_task():
    """The trained HEQ task (seed 0); training happens once per process (tasks.load caches)."""
    return pp.tasks.load("heq", seed=0)


@pytest.fixture(scope="session")
def planted_task():
    """The hand-weighted planted task (seed 0)."""
    return pp.tasks.load("planted", seed=0)
