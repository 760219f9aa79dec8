"""The console script: --help on every stage, fast and without TensorFlow."""

from __future__ import annotations

import subprocess

import pytest

from visionpipe.cli import STAGES


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_has_help(stage):
    result = subprocess.run(["visionpipe", stage, "--help"], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert f"usage: visionpipe {stage}" in result.stdout
    flag = "--task" if STAGES[stage][0] == "task" else "--model"
    assert flag in result.stdout and "--params" in result.stdout


def test_top_level_help_lists_stages_in_pipeline_order():
    result = subprocess.run(["visionpipe", "--help"], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0
    positions = [result.stdout.index(f"    {name}") for name in STAGES]
    assert positions == sorted(positions)
    assert list(STAGES) == ["prepare", "augment", "train", "evaluate", "export"]


def test_missing_model_argument_is_a_usage_error():
    result = subprocess.run(["visionpipe", "train"], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 2 and "--model" in result.stderr


def test_predict_without_an_export_says_how_to_get_one(tmp_path):
    (tmp_path / "images").mkdir()
    result = subprocess.run(["visionpipe", "predict", "--model", "mlp", "--input", "images",
                             "--output", "out"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("visionpipe:")]
    assert lines == ["visionpipe: error: models/mlp/export/export.json: not found; "
                     "models/mlp/export is not a visionpipe export. Build it with "
                     "`dvc repro export@<model>` or fetch it with `dvc pull "
                     "models/<model>/export`"]
    assert not (tmp_path / "out").exists()
