"""Starting from a backbone trained here, with the real train and export stages: one epoch
with the backbone frozen, then one with its top 2 blocks unfrozen. Layers that stayed frozen
do not move, unfrozen ones do, batch norm keeps the file's statistics, history.csv and
model.json say what trained when, the export agrees with the Keras model, and an ImageNet
download that cannot happen is one line.

Weight files come from a model trained on shapes in this test (no network here)."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import sys

import numpy as np
import pytest
import yaml

from tests.helpers import prepare_project, run, tiny_params
from visionpipe.config import parse_params
from visionpipe.models.saving import load_model
from visionpipe.stages import export, train

pytestmark = pytest.mark.slow

ARCH = {"backbone": "mobilenet_v2", "alpha": 0.35, "weights": None, "pooling": "avg",
        "dropout": 0.0}


@pytest.fixture(scope="module")
def project(tmp_path_factory, default_params_dict):
    """32x32 shapes; ``source`` trained from random weights and copied into weights/; then
    ``tuned``: 1 epoch with the backbone frozen, 1 with its top 2 blocks unfrozen."""
    root = tmp_path_factory.mktemp("pretrained")
    data = tiny_params(default_params_dict)
    data["prepare"]["classification"]["image_size"] = [32, 32]
    base = data["models"]["mlp"]["train"]
    entry = {"family": "applications", "task": "classification", "architecture": ARCH,
             "train": {**base, "epochs": 1}}
    data["models"] = {"source": entry}
    layout = prepare_project(root, data)
    train.run(parse_params(data), "source", layout)
    (root / "weights").mkdir()
    shutil.copy(root / "models/source/model.keras", root / "weights/source.keras")
    start = {**ARCH, "weights": "weights/source.keras"}
    data["models"]["tuned"] = {
        **entry, "architecture": start,
        "train": {**base, "epochs": 2, "freeze_epochs": 1, "unfreeze": 2,
                  "restore_best": False, "class_weights": "balanced"},
        # Every format of this family is checked in test_export_formats.py; here the ones a
        # model that started from a file and was fine-tuned could break first.
        "export_formats": ["keras", "tflite"]}
    data["export"]["parity_samples"] = 8
    # The fine-tuned model is tracked: MLflow on sqlite in the project (the default URI).
    data["tracking"].update(mlflow=True, system_metrics=False)
    (root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    params = parse_params(data)
    return root, params, layout, {"tuned": train.run(params, "tuned", layout)}


def _backbone(path):
    return {w.path: np.asarray(w) for w in load_model(path).get_layer("backbone").weights}


def test_frozen_layers_stay_the_files_unfrozen_ones_train_and_statistics_stay(project):
    root, *_ = project
    source = _backbone(root / "weights/source.keras")
    tuned = _backbone(root / "models/tuned/model.keras")
    assert source.keys() == tuned.keys() and len(source) > 100
    top = ("block_15_", "block_16_", "Conv_1/", "Conv_1_bn/")  # MobileNetV2's top 2 blocks
    kernels = [k for k in source if k.endswith("kernel")]
    stats = [k for k in source if k.endswith(("moving_mean", "moving_variance"))]
    unfrozen = [k for k in kernels if k.startswith(top)]
    frozen = [k for k in source if not k.startswith(top)]
    assert len(unfrozen) >= 6 and len(frozen) > 100 and stats
    # Never unfrozen: exactly the file's weights, through both epochs.
    assert [k for k in frozen if not np.array_equal(source[k], tuned[k])] == []
    # Unfrozen for the second epoch: every kernel moved.
    assert [k for k in unfrozen if np.array_equal(source[k], tuned[k])] == []
    # Pretrained: batch norm runs in inference mode, frozen or not (keras-io's advice).
    assert [k for k in stats if not np.array_equal(source[k], tuned[k])] == []
    head = [load_model(root / f"models/{m}/model.keras").get_layer("head_softmax").get_weights()
            for m in ("source", "tuned")]
    assert not np.array_equal(head[0][0], head[1][0])  # the new head trained


def test_history_and_model_json_say_what_trained_when(project):
    root, params, _, meta = project
    with open(root / "reports/train/tuned/history.csv") as f:
        rows = list(csv.DictReader(f))
    classes = len(meta["tuned"]["class_names"])
    head = 1280 * classes + classes  # MobileNetV2's 1280 features -> the softmax
    trainable = [float(r["trainable_params"]) for r in rows]
    assert trainable[0] == head
    # Then the head and the top 2 blocks' convolutions; batch norm's scale and offset stay
    # frozen with its statistics (keep_statistics).
    tuned = load_model(root / "models/tuned/model.keras")
    top = [layer for layer in tuned.get_layer("backbone").layers
           if layer.name.startswith(("block_15_", "block_16_", "Conv_1"))
           and type(layer).__name__ != "BatchNormalization"]
    assert trainable[1] == head + sum(layer.count_params() for layer in top) > 10 * head
    lr = params.models["tuned"].train.learning_rate
    assert [float(r["learning_rate"]) for r in rows] == pytest.approx([lr, lr / 10])
    digest = hashlib.sha256((root / "weights/source.keras").read_bytes()).hexdigest()
    saved = json.loads((root / "models/tuned/model.json").read_text())
    assert saved["start_weights"] == {"weights": "weights/source.keras", "sha256": digest}
    assert saved["fine_tuning"] == [
        {"epochs": [1, 1], "trainable": "backbone frozen", "learning_rate": lr},
        {"epochs": [2, 2], "trainable": "top 2 backbone blocks",
         "learning_rate": pytest.approx(lr / 10)}]
    assert meta["tuned"]["fine_tuning"] == saved["fine_tuning"]
    # class_weights: balanced, from the train split's images per class (n / (K * n_c)).
    # No augmented copies here: the train split as prepared, whose counts stats.json holds.
    stats = json.loads((root / "reports/prepare/classification/stats.json").read_text())
    images = {c: v["images"] for c, v in stats["splits"]["train"]["classes"].items()}
    n, k = sum(images.values()), len(images)
    assert list(saved["class_weights"]) == saved["class_names"]
    assert saved["class_weights"] == pytest.approx({c: n / (k * images[c]) for c in images})
    assert len(set(saved["class_weights"].values())) > 1  # the tiny split is not balanced
    # MLflow has the same: trainable params per epoch, the phases' params, the class weights.
    from mlflow import MlflowClient

    state = json.loads((root / "models/tuned/mlflow_run.json").read_text())
    client = MlflowClient(state["tracking_uri"])
    logged = client.get_run(state["run_id"])
    history = client.get_metric_history(state["run_id"], "trainable_params")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (1, trainable[0]), (2, trainable[1])]
    assert logged.data.params["model.train.freeze_epochs"] == "1"
    assert logged.data.params["model.train.unfreeze"] == "2"
    assert logged.data.params["class_weights_resolved"] == ", ".join(
        f"{c}={w:.6g}" for c, w in saved["class_weights"].items())
    # A model trained without a schedule records neither.
    source = json.loads((root / "models/source/model.json").read_text())
    assert "fine_tuning" not in source and "start_weights" not in source


def test_the_fine_tuned_model_exports_with_parity(project, tmp_path):
    _, params, layout, _ = project
    report = export._export(params, "tuned", layout, tmp_path)  # the files and parity only
    formats = report["formats"]
    assert set(formats) == {"keras", "tflite"} and (tmp_path / "model.tflite").is_file()
    for name, check in formats.items():
        assert check["passed"], (name, check)
        assert check["label_agreement"] == 1.0 and check["max_abs_diff"] < 1e-4, (name, check)


def test_an_imagenet_download_that_fails_is_one_line_naming_the_key(project, tmp_path):
    root, *_ = project
    data = yaml.safe_load((root / "params.yaml").read_text())
    data["models"]["imnet"] = {**data["models"]["tuned"],
                               "architecture": {**ARCH, "weights": "imagenet"}}
    (root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    # Whatever the network: a proxy that refuses, and an empty Keras cache.
    result = run([sys.executable, "-m", "visionpipe.cli", "train", "--model", "imnet"], root,
                 timeout=300, KERAS_HOME=str(tmp_path / "keras"),
                 HTTPS_PROXY="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("visionpipe:")]
    assert result.returncode == 2, lines
    assert len(errors) == 1 and "Traceback" not in result.stdout, lines
    line = errors[0]
    for part in ("models.imnet.architecture.weights = 'imagenet'",
                 "ImageNet weights of mobilenet_v2 could not be downloaded from https://",
                 "keras.applications.MobileNetV2(alpha=0.35, include_top=False, "
                 "weights='imagenet')", "weights/"):
        assert part in line, line
    assert not (root / "models/imnet/model.keras").exists()
