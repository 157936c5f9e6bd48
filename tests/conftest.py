"""Shared test helpers: fixture paths and the official fixture schedule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
# dynamic_resolution_h_w[1.0]['0.06M']: the schedule of the official Infinity fixtures.
FIXTURE_SCHEDULE = [(1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 6, 6), (1, 8, 8), (1, 12, 12), (1, 16, 16)]


def load_fixture(name: str) -> dict:
    """A golden file produced by the official code (see fixtures/OFFICIAL_README.md)."""
    return torch.load(FIXTURES / name, map_location="cpu", weights_only=True)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
