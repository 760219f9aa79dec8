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

FORMATS = ("keras", "saved_model", "tflite", "tflite_int8", "onnx")
INT8_LIMITS = {"tflite_int8": {"max_abs_diff": 50.0, "min_agreement": 0.6, "max_map_drop": 0.1}}


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
    data["export"].update(parity_samples=8, parity_min_boxes=30, representative_samples=16)
    yolo["export_formats"] = list(FORMATS)
    # A 2-epoch detector: loose int8 limits (the default model's are in params.yaml).
    yolo["export_parity"] = {fmt: dict(limit) for fmt, limit in INT8_LIMITS.items()}
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
    assert report["passed"] and set(report["formats"]) == set(FORMATS)
    assert report["formats"]["keras"]["max_abs_diff"] == 0.0
    assert report["formats"]["saved_model"]["anchor_agreement"] == 1.0
    assert report["resized_input"]["detection_agreement"] >= 0.95
    meta = json.loads((layout.export_dir("yolo") / "export.json").read_text())
    assert meta["task"] == "detection" and "num_detections" in meta["outputs"]
    assert meta["decoder"] == {"kind": "yolov8_dfl", "box_channels": 64, "strides": [8, 16, 32]}
    assert meta["nms"] == {"iou_threshold": 0.7, "confidence_threshold": 0.25,
                           "max_detections": 100}
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


@pytest.mark.slow
def test_export_parity_is_judged_on_enough_boxes_with_map_and_box_agreement(detection_run):
    params, layout = detection_run
    report = json.loads(layout.export_report("yolo").read_text())
    truths = [len(ex.box_labels) for ex in records.read_split(layout.prepared("detection"),
                                                               "test")]
    # parity_samples (8) images hold fewer than parity_min_boxes (30): the first n that do.
    n = int(np.searchsorted(np.cumsum(truths), 30)) + 1
    assert sum(truths[:8]) < 30 <= sum(truths[:n]) and report["samples"] == n
    assert report["resized_input"]["images"] == n
    for fmt, result in report["formats"].items():
        assert result["images"] == n and result["truth_boxes"] == sum(truths[:n]), fmt
        assert result["map_50_drop"] == pytest.approx(result["map_50_keras"] - result["map_50"])
        assert result["failed"] == [] and result["passed"], (fmt, result)
        key = params.parity_key("yolo", fmt)
        assert result["limits"] == {
            "max_abs_diff": {"key": f"{key}.max_abs_diff", "max": params.parity("yolo", fmt)
                             .max_abs_diff},
            "box_agreement": {"key": f"{key}.min_agreement",
                              "min": params.parity("yolo", fmt).min_agreement},
            "map_50_drop": {"key": f"{key}.max_map_drop",
                            "max": params.parity("yolo", fmt).max_map_drop}}, fmt
    assert report["formats"]["tflite_int8"]["limits"]["map_50_drop"]["key"] == (
        "models.yolo.export_parity.tflite_int8.max_map_drop")
    for fmt in ("saved_model", "tflite", "onnx"):
        assert report["formats"][fmt]["box_agreement"] == 1.0
        assert report["formats"][fmt]["map_50_drop"] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.slow
def test_each_exported_raw_head_decodes_to_the_keras_models_detections(detection_run):
    """Each file run on its own (the formats' runners), its raw head decoded by
    box_decoding, against keras-cv's own decoding and NMS of the Keras model."""
    from visionpipe import box_decoding
    from visionpipe.formats import PartsTFLiteRunner
    from visionpipe.models.saving import load_model
    from visionpipe.serving import FILES, open_runner
    from visionpipe.tasks.detection import match_share
    from visionpipe.tasks.registry import task_for

    params, layout = detection_run
    out = layout.export_dir("yolo")
    meta = json.loads((out / "export.json").read_text())
    pixels = np.stack([ex.image for ex in records.read_split(layout.prepared("detection"),
                                                             "test")])
    task = task_for("yolo", "detection")
    model = task.export_model(load_model(layout.model_file("yolo")), params.export)
    expected = task.hooks.detect(model, pixels.astype(np.float32), 32)  # keras-cv decoding
    nms = meta["nms"]
    decode = dict(confidence=nms["confidence_threshold"], iou=nms["iou_threshold"],
                  max_detections=nms["max_detections"], decoder=meta["decoder"])
    own = box_decoding.decode_raw(task.forward(model, pixels.astype(np.float32)),
                                  tuple(meta["image_size"]), **decode)
    assert match_share(expected, own) == (1.0, pytest.approx(0.0, abs=1e-3))
    for fmt in ("tflite", "tflite_int8", "onnx"):
        runner = (PartsTFLiteRunner(out / FILES[fmt]) if fmt == "tflite_int8"
                  else open_runner(out, fmt, meta))
        raw = runner.predict(pixels)
        assert raw.shape == (len(pixels), 84, 64 + 4), fmt  # 64x64: 8x8 + 4x4 + 2x2 anchors
        got = box_decoding.decode_raw(raw, tuple(meta["image_size"]), **decode)
        share, _ = match_share(expected, got)
        assert share >= params.parity("yolo", fmt).min_agreement, (fmt, share)
