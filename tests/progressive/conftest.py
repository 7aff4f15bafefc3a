"""Fixtures shared by the progressive tests."""

from __future__ import annotations

import pytest

import pyvene_plot as pp


@pytest.fixture(scope="session")
def binary_task():
    """The trained binary-addition task (seed 0; tasks.load caches the training)."""
    return pp.tasks.load("binary_addition", seed=0)
