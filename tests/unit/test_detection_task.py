"""The detection task: padded box batches, the confusion matrix with background, runtime
agreement. The stages on shapes: tests/pipeline/test_detection_stages.py."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from visionpipe.data import records
from visionpipe.data.example import Example
from visionpipe.data.pipeline import model_dataset
from visionpipe.tasks.detection import confusion, errors_per_image, match_share
from visionpipe.tasks.registry import task_for


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
    task, cfg = task_for("yolo", "detection"), EvaluateConfig()
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
    task = task_for("yolo", "detection")
    batches = list(model_dataset(tmp_path, "train", task.to_model_io(2), 3,
                                 padding=task.padding_values()))
    (x1, y1), (_, y2) = batches
    assert x1.shape == (3, 32, 32, 3) and x1.dtype == tf.float32
    assert y1["boxes"].shape == (3, 3, 4) and y1["classes"].shape == (3, 3)
    np.testing.assert_array_equal(y1["classes"].numpy(), [[-1, -1, -1], [0, -1, -1],
                                                          [0, 1, 0]])
    np.testing.assert_array_equal(y1["boxes"].numpy()[1], [[1, 2, 3, 4], [-1] * 4, [-1] * 4])
    assert y2["boxes"].shape == (1, 2, 4)  # padded to the most boxes in its own batch
