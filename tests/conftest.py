"""Shared test helpers: fixture paths and the official fixture schedule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
# A short, quiet training run: the base of every test that calls run(cfg).
FAST_RUN = ("debug=fast", "callbacks=minimal", "logger=csv")
# dynamic_resolution_h_w[1.0]['0.06M']: the schedule of the official Infinity fixtures.
FIXTURE_SCHEDULE = [(1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 6, 6), (1, 8, 8), (1, 12, 12), (1, 16, 16)]


def load_fixture(name: str) -> dict:
    """A golden file produced by the official code (see fixtures/OFFICIAL_README.md)."""
    return torch.load(FIXTURES / name, map_location="cpu", weights_only=True)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def compose_config(name: str, run_dir: Path, cache: Path, *overrides: str):
    """A composed Hydra config (train / sample / evaluate) with the run dir and synthetic-data cache set."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(name, overrides=[f"paths.run_dir={run_dir}", f"paths.cache_dir={cache}", *overrides])


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One synthetic-shard cache per test module."""
    return tmp_path_factory.mktemp("synthetic-cache")
