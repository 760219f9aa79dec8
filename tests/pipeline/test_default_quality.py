"""With the committed params, `dvc repro` learns: the MLP beats 0.80 test accuracy on shapes."""

from __future__ import annotations

import json
import re

import pytest

from .conftest import copy_repo, run

pytestmark = pytest.mark.slow


def test_default_params_mlp_reaches_080(tmp_path, repo_root):
    repo = copy_repo(repo_root, tmp_path)
    result = run(["dvc", "repro"], repo, timeout=1500)
    assert result.returncode == 0, result.stdout[-4000:]
    assert len(re.findall(r"Running stage '", result.stdout)) == 5
    metrics = json.loads((repo / "reports/metrics/mlp.json").read_text())
    chance = 1 / 4
    assert metrics["test"]["num_test_images"] == 500
    assert metrics["test"]["accuracy"] >= 0.80, metrics["test"]
    assert metrics["test"]["accuracy"] > metrics["test"]["baseline"]["accuracy"] + 0.4
    assert metrics["test"]["macro_f1"] >= 0.75
    assert metrics["test"]["baseline"]["accuracy"] < chance + 0.1
    export = json.loads((repo / "reports/export/mlp.json").read_text())
    assert export["passed"] is True
