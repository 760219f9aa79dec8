"""The detection stages prepare -> augment -> train -> evaluate -> export on tiny shapes, in
this process: metrics equal a recomputation from the saved model, every plot is written, and
the SavedModel returns boxes in the input images' pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from visionpipe.config import parse_params
from visionpipe.data import records
from visionpipe.layout import Layout


@pytest.fixture(scope="module")
def detection_run(tmp_path_factory, default_params_dict):
    """Tiny shapes detection through every stage, in this process."""
    from visionpipe.stages import augment, evaluate, export, prepare, train

    data = json.loads(json.dumps(default_params_dict))
    data["tracking"].update(mlflow=False, codecarbon=False)
    data["prepare"]["detection"].update(splits={"train": 48, "val": 16, "test": 24})
    data["augment"]["detection"]["preview"] = 4
    yolo = data["models"]["yolo"]
    yolo["architecture"].update(width_multiplier=0.25)
    yolo["train"].update(epochs=2, batch_size=16, warmup_epochs=0.5)
    data["evaluate"].update(latency_samples=2, latency_warmup=1, gallery=6)
    data["export"]["parity_samples"] = 8
    params = parse_params(data)
    root = tmp_path_factory.mktemp("detection")
    layout = Layout(root)
    prepare.run(params, "detection", layout)
    augment.run(params, "detection", layout)
    train.run(params, "yolo", layout)
    evaluate.run(params, "yolo", layout)
    export.run(params, "yolo", layout)
    return params, layout


@pytest.mark.slow
def test_evaluate_metrics_equal_a_recomputation_from_the_saved_model(detection_run):
    from visionpipe.models.saving import load_model
    from visionpipe.models.yolo import detect, set_nms
    from visionpipe.tasks.detection_metrics import detection_metrics

    params, layout = detection_run
    test = json.loads(layout.metrics("yolo").read_text())["test"]
    model = load_model(layout.model_file("yolo"))
    set_nms(model, params.evaluate.nms)
    truths, images = [], []
    for ex in records.read_split(layout.prepared("detection"), "test"):
        images.append(ex.image)
        truths.append({"boxes": ex.boxes, "class_ids": ex.box_labels.astype(np.int64)})
    again = detection_metrics(truths, detect(model, np.stack(images).astype(np.float32), 8),
                              ["circle", "square", "triangle", "star"])
    for key in ("map_50_95", "map_50", "map_75", "precision", "recall", "instances"):
        assert test[key] == pytest.approx(again[key]), key
    assert test["images"] == test["num_test_images"] == 24
    assert test["nms"] == {"iou_threshold": 0.7, "confidence_threshold": 0.001,
                           "max_detections": 100}
    assert test["instances"] == sum(len(t["class_ids"]) for t in truths)


@pytest.mark.slow
def test_evaluate_writes_curves_confusion_and_gallery(detection_run):
    _, layout = detection_run
    out = layout.plots("yolo")
    for name in ("pr_curve.png", "f1_curve.png", "confusion.png", "misclassified.png",
                 "learning_curves.png"):
        with Image.open(out / name) as image:
            assert min(image.size) > 100, name
    rows = json.loads((out / "per_class.json").read_text())
    assert [r["class"] for r in rows] == ["circle", "square", "triangle", "star"]
    assert all({"ap_50", "ap_50_95", "precision", "recall", "f1"} <= set(r) for r in rows)
    cells = json.loads((out / "confusion.json").read_text())
    names = {"circle", "square", "triangle", "star", "background"}
    assert {c["actual"] for c in cells} <= names and {c["predicted"] for c in cells} <= names
    test = json.loads(layout.metrics("yolo").read_text())["test"]
    # Every truth box appears once in the matrix: found, confused or missed.
    assert sum(c["actual"] != "background" for c in cells) == test["instances"]


@pytest.mark.slow
def test_export_serves_boxes_in_the_input_images_pixels(detection_run):
    params, layout = detection_run
    report = json.loads(layout.export_report("yolo").read_text())
    assert report["passed"] and set(report["formats"]) == {"keras", "saved_model"}
    assert report["formats"]["keras"]["max_abs_diff"] == 0.0
    assert report["formats"]["saved_model"]["anchor_agreement"] == 1.0
    assert report["resized_input"]["detection_agreement"] >= 0.95
    meta = json.loads((layout.export_dir("yolo") / "export.json").read_text())
    assert meta["task"] == "detection" and "num_detections" in meta["outputs"]
    served = tf.saved_model.load(str(layout.export_dir("yolo") / "saved_model"))
    image = np.zeros((1, 150, 90, 3), np.uint8)
    image[:, 40:100, 20:70] = 255
    out = served.signatures["serving_default"](images=tf.constant(image))
    n = int(out["num_detections"][0])
    boxes = out["boxes"][0].numpy()
    assert n <= 100 and np.all(boxes[n:] == -1)
    assert np.all((boxes[:n, 0::2] >= 0) & (boxes[:n, 0::2] <= 90))
    assert np.all((boxes[:n, 1::2] >= 0) & (boxes[:n, 1::2] <= 150))
    assert np.all(out["scores"][0, :n].numpy() >= params.export.nms.confidence_threshold)
    names = [s.decode() for s in out["class_name"][0].numpy()]
    assert set(names[:n]) <= {"circle", "square", "triangle", "star"}
    assert set(names[n:]) <= {""}
