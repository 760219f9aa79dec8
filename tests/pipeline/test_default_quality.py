"""With the committed params, the stages learn: on shapes the MLP beats 0.80 test accuracy,
VGG and ResNet 0.95.

The stages run in this process, one after the other, as `dvc repro evaluate@mlp evaluate@vgg
evaluate@resnet` runs them. `dvc repro` itself (stage wiring, locks, params deps) is tested on
shrunk params in test_dvc_pipeline.py; here each of its 8 processes would add about 10 s of
TensorFlow start-up to a suite that must stay under 20 minutes.

The U-Net's default quality (mean IoU 0.993, docs/results.md) is not rerun here: it
would add about 3 minutes. Its stages are tested on membrane in
tests/pipeline/test_segmentation_membrane.py."""

from __future__ import annotations

import json

import pytest

from visionpipe.config import parse_params
from visionpipe.layout import Layout
from visionpipe.stages import augment, evaluate, prepare, train

pytestmark = pytest.mark.slow


MINIMUM = {"mlp": 0.80, "vgg": 0.95, "resnet": 0.95}


def test_default_params_reach_the_quality_targets(tmp_path, default_params_dict):
    data = json.loads(json.dumps(default_params_dict))
    # No stage depends on `tracking` (dvc.yaml): the models are the committed defaults'.
    # Tracking is tested on its own (test_tracking.py); here it would only add minutes.
    data["tracking"].update(mlflow=False, codecarbon=False)
    params = parse_params(data)
    assert {m: params.models[m].task for m in MINIMUM} == dict.fromkeys(MINIMUM,
                                                                       "classification")
    layout = Layout(tmp_path)
    prepare.run(params, "classification", layout)
    augment.run(params, "classification", layout)
    for model in MINIMUM:
        # Up to evaluate: export's formats and parity are tested in test_dvc_pipeline.py and
        # test_export_formats.py; here they would add minutes.
        train.run(params, model, layout)
        evaluate.run(params, model, layout)
    chance = 1 / 4
    for model, minimum in MINIMUM.items():
        metrics = json.loads((tmp_path / f"reports/metrics/{model}.json").read_text())
        test = metrics["test"]
        assert test["num_test_images"] == 500
        assert test["accuracy"] >= minimum, (model, test)
        assert test["accuracy"] > test["baseline"]["accuracy"] + 0.4
        assert test["macro_f1"] >= minimum - 0.05
        assert test["top_2_accuracy"] >= test["accuracy"]
        assert test["baseline"]["accuracy"] < chance + 0.1
        meta = json.loads((tmp_path / f"models/{model}/model.json").read_text())
        assert meta["epochs"] == params.models[model].train.epochs
