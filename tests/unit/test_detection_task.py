"""The detection task: padded box batches, the confusion matrix with background, runtime
agreement, and the stages prepare -> augment -> train -> evaluate -> export on shapes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from visionpipe.config import parse_params
from visionpipe.data import records
from visionpipe.data.example import Example
from visionpipe.data.pipeline import model_dataset
from visionpipe.layout import Layout
from visionpipe.tasks.detection import DetectionTask, confusion, errors_per_image, match_share


def _truth(boxes, classes):
    return {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
            "class_ids": np.asarray(classes, np.int64)}


def _pred(boxes, classes, scores):
    return {**_truth(boxes, classes), "scores": np.asarray(scores, np.float32)}


def test_confusion_counts_matches_wrong_classes_misses_and_false_alarms():
    truths = [_truth([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 1]), _truth([[5, 5, 15, 15]], [1])]
    preds = [_pred([[0, 0, 10, 10], [21, 20, 30, 30], [40, 40, 50, 50], [0, 20, 9, 29]],
                   [0, 0, 1, 1], [0.9, 0.8, 0.7, 0.1]),
             _pred(np.zeros((0, 4)), [], [])]
    cm = confusion(truths, preds, 2, confidence=0.5)
    # rows: true circle, square, background; columns: predicted, the same order
    np.testing.assert_array_equal(cm, [[1, 0, 0],   # circle found
                                       [1, 0, 1],   # square called circle; square missed
                                       [0, 1, 0]])  # a square where there is nothing
    # Nothing kept: every truth box is a miss.
    np.testing.assert_array_equal(confusion(truths, preds, 2, None), [[0, 0, 1], [0, 0, 2],
                                                                        [0, 0, 0]])
    # The low-score box overlaps nothing above IoU 0.5: at confidence 0 it is a false alarm.
    assert confusion(truths, preds, 2, confidence=0.0)[2, 1] == 2
    per_image = [confusion([t], [p], 2, 0.5) for t, p in zip(truths, preds, strict=True)]
    np.testing.assert_array_equal(errors_per_image(per_image), [2, 1])


def test_evaluate_ignores_difficult_boxes():
    from visionpipe.config import EvaluateConfig

    found_one = [_pred([[0, 0, 10, 10]], [0], [0.9])]
    truth = _truth([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0])
    task, cfg = DetectionTask(), EvaluateConfig()
    regular = task.evaluate([truth], found_one, ["a"], cfg)
    flagged = task.evaluate([{**truth, "difficult": np.array([False, True])}], found_one,
                            ["a"], cfg)
    assert regular["instances"] == 2 and regular["recall"] == pytest.approx(0.5)
    assert flagged["instances"] == 1 and flagged["recall"] == pytest.approx(1.0)
    assert flagged["map_50"] == pytest.approx(1.0) and regular["map_50"] < 0.6


def test_match_share_pairs_same_class_boxes_only():
    a = [_pred([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 1], [0.9, 0.8]), _pred([], [], [])]
    b = [_pred([[0, 0, 10, 11], [20, 20, 30, 30]], [0, 0], [0.9, 0.8]), _pred([], [], [])]
    share, worst = match_share(a, b)
    assert share == pytest.approx(1 / 2)  # the second pair differs in class
    assert worst == pytest.approx(1.0)
    assert match_share([_pred([], [], [])], [_pred([], [], [])]) == (1.0, 0.0)


def test_batches_pad_box_lists_with_minus_one(tmp_path):
    rng = np.random.default_rng(0)
    examples = [Example(id=f"e{n}", image=rng.integers(0, 255, (32, 32, 3), np.uint8),
                        boxes=np.arange(4 * n, dtype=np.float32).reshape(n, 4) + 1,
                        box_labels=np.arange(n, dtype=np.int32) % 2)
                for n in (0, 1, 3, 2)]
    count, shards = records.write_split(examples, tmp_path, "train", 10)
    records.write_manifest(tmp_path, {"task": "detection", "class_names": ["a", "b"],
                                      "image_size": [32, 32],
                                      "splits": {"train": {"count": count, "shards": shards}}})
    batches = list(model_dataset(tmp_path, "train", DetectionTask().to_model_io(2), 3))
    (x1, y1), (x2, y2) = batches
    assert x1.shape == (3, 32, 32, 3) and x1.dtype == tf.float32
    assert y1["boxes"].shape == (3, 3, 4) and y1["classes"].shape == (3, 3)
    np.testing.assert_array_equal(y1["classes"].numpy(), [[-1, -1, -1], [0, -1, -1],
                                                          [0, 1, 0]])
    np.testing.assert_array_equal(y1["boxes"].numpy()[1], [[1, 2, 3, 4], [-1] * 4, [-1] * 4])
    assert y2["boxes"].shape == (1, 2, 4)  # padded to the most boxes in its own batch


# --------------------------------------------------------------------------- the stages


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
    params, layout = detection_run
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
