"""With the committed params, `dvc repro` learns: on shapes the MLP beats 0.80 test accuracy,
VGG and ResNet 0.95, and the U-Net 0.80 mean IoU."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from PIL import Image

from .conftest import copy_repo, run

pytestmark = pytest.mark.slow


MINIMUM = {"mlp": 0.80, "vgg": 0.95, "resnet": 0.95}


def _no_tracking(params: dict) -> None:
    # No stage depends on `tracking` (dvc.yaml): the models are the committed defaults'.
    # Tracking is tested on its own (test_tracking.py); here it would only add minutes.
    params["tracking"].update(mlflow=False, codecarbon=False)


def test_default_params_reach_the_quality_targets(tmp_path, repo_root):
    repo = copy_repo(repo_root, tmp_path, _no_tracking)
    # Up to evaluate: export's formats and parity are tested in test_dvc_pipeline.py and
    # test_export_formats.py; here they would add minutes.
    models = [*MINIMUM, "unet"]
    result = run(["dvc", "repro", *(f"evaluate@{m}" for m in models)], repo, timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:]
    ran = re.findall(r"Running stage '([^']+)'", result.stdout)
    assert sorted(ran) == sorted([*(f"{s}@{t}" for s in ("prepare", "augment")
                                    for t in ("classification", "segmentation")),
                                  *(f"{s}@{m}" for m in models
                                    for s in ("train", "evaluate"))])
    _check_segmentation(repo)
    chance = 1 / 4
    for model, minimum in MINIMUM.items():
        metrics = json.loads((repo / f"reports/metrics/{model}.json").read_text())
        test = metrics["test"]
        assert test["num_test_images"] == 500
        assert test["accuracy"] >= minimum, (model, test)
        assert test["accuracy"] > test["baseline"]["accuracy"] + 0.4
        assert test["macro_f1"] >= minimum - 0.05
        assert test["top_2_accuracy"] >= test["accuracy"]
        assert test["baseline"]["accuracy"] < chance + 0.1


def _check_segmentation(repo):
    metrics = json.loads((repo / "reports/metrics/unet.json").read_text())
    test = metrics["test"]
    assert test["num_test_images"] == 500 and test["num_test_pixels"] == 500 * 64 * 64
    assert test["mean_iou"] >= 0.80, test
    assert test["pixel_accuracy"] >= 0.95
    assert test["mean_iou"] > test["baseline"]["mean_iou"] + 0.5
    rows = json.loads((repo / "reports/plots/unet/per_class.json").read_text())
    assert [r["class"] for r in rows] == ["background", "circle", "square", "triangle", "star"]
    assert min(r["iou"] for r in rows) >= 0.5, rows
    assert abs(sum(r["iou"] for r in rows) / 5 - test["mean_iou"]) < 1e-9
    # The gallery: 16 worst test images, each image | truth | prediction (wider than tall).
    with Image.open(repo / "reports/plots/unet/misclassified.png") as png:
        assert png.width > 400 and png.height > 800
    history = (repo / "reports/train/unet/history.csv").read_text().splitlines()
    epochs = yaml.safe_load((repo / "params.yaml").read_text())["models"]["unet"]["train"][
        "epochs"]
    assert "val_mean_iou" in history[0] and len(history) == 1 + epochs
