"""Shared test configuration.

Tests run on the CPU in float32. Statistical tests use fixed seeds and tolerances
derived from Monte Carlo standard errors (see each test's comment).
"""

from __future__ import annotations

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data_dir() -> pathlib.Path:
    """``../shared/data`` next to the project root (GSM8K, MATH-500, AIME24, AMC23)."""
    return SHARED_DATA
