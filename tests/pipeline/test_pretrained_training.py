"""Starting from a backbone trained here, with the real train and export stages: the weights
load exactly, a frozen backbone does not move while the head trains, unfreezing moves it (and
batch norm keeps its statistics), history.csv and model.json say what trained when, the export
agrees with the Keras model, and an ImageNet download that cannot happen is one line.

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
from visionpipe.stages import evaluate, export, train

pytestmark = pytest.mark.slow

ARCH = {"backbone": "mobilenet_v2", "alpha": 0.35, "weights": None, "pooling": "avg",
        "dropout": 0.0}


@pytest.fixture(scope="module")
def project(tmp_path_factory, default_params_dict):
    """32x32 shapes; ``source`` trained from random weights and copied into weights/; then
    ``frozen`` (1 epoch, backbone frozen) and ``tuned`` (1 frozen epoch, 1 with all layers)."""
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
    data["models"]["frozen"] = {**entry, "architecture": start,
                                "train": {**base, "epochs": 1, "freeze_epochs": 1}}
    data["models"]["tuned"] = {
        **entry, "architecture": start,
        "train": {**base, "epochs": 2, "freeze_epochs": 1, "restore_best": False},
        "export_formats": ["keras", "saved_model", "tflite"]}
    data["export"]["parity_samples"] = 8
    (root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    params = parse_params(data)
    meta = {name: train.run(params, name, layout) for name in ("frozen", "tuned")}
    return root, params, layout, meta


def _backbone(path):
    return {w.path: np.asarray(w) for w in load_model(path).get_layer("backbone").weights}


def test_frozen_epochs_leave_the_backbone_and_its_statistics_unchanged(project):
    root, *_ = project
    source = _backbone(root / "weights/source.keras")
    frozen = _backbone(root / "models/frozen/model.keras")
    assert source.keys() == frozen.keys() and len(source) > 100
    assert all(np.array_equal(source[k], frozen[k]) for k in source)
    head = [load_model(root / f"models/{m}/model.keras").get_layer("head_softmax").get_weights()
            for m in ("source", "frozen")]
    assert not np.array_equal(head[0][0], head[1][0])  # the new head trained


def test_unfreezing_trains_the_backbone_but_batch_norm_keeps_its_statistics(project):
    root, *_ = project
    source = _backbone(root / "weights/source.keras")
    tuned = _backbone(root / "models/tuned/model.keras")
    kernels = [k for k in source if k.endswith("kernel")]
    stats = [k for k in source if k.endswith(("moving_mean", "moving_variance"))]
    assert kernels and stats
    assert sum(not np.array_equal(source[k], tuned[k]) for k in kernels) == len(kernels)
    # Pretrained: the backbone runs in inference mode, frozen or not (keras-io's advice).
    assert all(np.array_equal(source[k], tuned[k]) for k in stats)


def test_history_and_model_json_say_what_trained_when(project):
    root, params, _, meta = project
    with open(root / "reports/train/tuned/history.csv") as f:
        rows = list(csv.DictReader(f))
    classes = len(meta["tuned"]["class_names"])
    head = 1280 * classes + classes  # MobileNetV2's 1280 features -> the softmax
    trainable = [float(r["trainable_params"]) for r in rows]
    assert trainable[0] == head
    assert trainable[1] > 50 * head
    # Batch norm's scale and offset stay frozen with its statistics (keep_statistics).
    tuned = load_model(root / "models/tuned/model.keras")
    norms = [layer for layer in tuned.get_layer("backbone").layers
             if type(layer).__name__ == "BatchNormalization"]
    assert norms and trainable[1] == tuned.count_params() - sum(
        layer.count_params() for layer in norms)
    lr = params.models["tuned"].train.learning_rate
    assert [float(r["learning_rate"]) for r in rows] == pytest.approx([lr, lr / 10])
    digest = hashlib.sha256((root / "weights/source.keras").read_bytes()).hexdigest()
    saved = json.loads((root / "models/tuned/model.json").read_text())
    assert saved["start_weights"] == {"weights": "weights/source.keras", "sha256": digest}
    assert saved["fine_tuning"] == [
        {"epochs": [1, 1], "trainable": "backbone frozen", "learning_rate": lr},
        {"epochs": [2, 2], "trainable": "all layers", "learning_rate": pytest.approx(lr / 10)}]
    assert meta["tuned"]["fine_tuning"] == saved["fine_tuning"]
    # A model trained without a schedule records neither.
    source = json.loads((root / "models/source/model.json").read_text())
    assert "fine_tuning" not in source and "start_weights" not in source


def test_the_fine_tuned_model_exports_with_parity(project):
    _, params, layout, _ = project
    evaluate.run(params, "tuned", layout)  # the model card quotes its metrics
    report = export.run(params, "tuned", layout)
    formats = report["formats"]
    assert set(formats) == {"keras", "saved_model", "tflite"}
    for name, check in formats.items():
        assert check["passed"], (name, check)
        assert check["label_agreement"] == 1.0 and check["max_abs_diff"] < 1e-4, (name, check)


def test_an_imagenet_download_that_fails_is_one_line_naming_the_key(project, tmp_path):
    root, *_ = project
    data = yaml.safe_load((root / "params.yaml").read_text())
    data["models"]["imnet"] = {**data["models"]["frozen"],
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
