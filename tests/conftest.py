"""Shared fixtures: the repo root, real shared datasets, default params; tests under
tests/pipeline marked slow. Helpers shared by test files live in tests/helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
PIPELINE = REPO / "tests" / "pipeline"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/pipeline runs real stages: mark it slow, so `-m "not slow"`
    leaves exactly the fast unit tests (tests/unit/test_layout_of_tests.py keeps stages out of
    tests/unit)."""
    for item in items:
        if PIPELINE in Path(item.path).parents:
            item.add_marker(pytest.mark.slow)


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
