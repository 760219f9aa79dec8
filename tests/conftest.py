"""Shared fixtures: the repo root, real shared datasets, small params."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def default_params_dict() -> dict:
    """params.yaml as committed, as a plain mapping."""
    return yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    """Real datasets shared beside the repo (VISIONPIPE_DATASETS overrides)."""
    path = Path(os.environ.get("VISIONPIPE_DATASETS", REPO.parent / "shared" / "datasets"))
    if not path.is_dir():
        pytest.skip(f"shared datasets not found at {path}; set VISIONPIPE_DATASETS")
    return path
