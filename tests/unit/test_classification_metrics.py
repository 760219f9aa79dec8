"""Classification metrics against values worked out by hand on a small fixed case."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from visionpipe.tasks.classification import (
    classification_metrics,
    confusion_matrix,
    most_confident_mistakes,
    top_k_accuracy,
)

NAMES = ["a", "b", "c"]
Y_TRUE = np.array([0, 0, 0, 1, 1, 2])
PROBS = np.array([
    [0.70, 0.20, 0.10],  # a -> a
    [0.60, 0.30, 0.10],  # a -> a
    [0.30, 0.50, 0.20],  # a -> b  (a is 2nd: a top-2 hit)
    [0.10, 0.80, 0.10],  # b -> b
    [0.35, 0.05, 0.60],  # b -> c  (b is 3rd: a top-2 miss)
    [0.20, 0.10, 0.70],  # c -> c
])


def test_confusion_matrix_counts():
    cm = confusion_matrix(Y_TRUE, PROBS.argmax(1), 3)
    assert cm.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_metrics_match_hand_computation():
    m = classification_metrics(Y_TRUE, PROBS, NAMES, top_k=2)
    # per class: a P=2/2 R=2/3 F1=0.8; b P=1/2 R=1/2 F1=0.5; c P=1/2 R=1/1 F1=2/3
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["top_2_accuracy"] == pytest.approx(5 / 6)
    assert m["per_class"]["a"] == pytest.approx(
        {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert m["per_class"]["b"] == pytest.approx(
        {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert m["per_class"]["c"] == pytest.approx(
        {"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert m["macro_precision"] == pytest.approx(2 / 3)
    assert m["macro_recall"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    expected_loss = -(math.log(0.7) + math.log(0.6) + math.log(0.3) + math.log(0.8)
                      + math.log(0.05) + math.log(0.7)) / 6
    assert m["loss"] == pytest.approx(expected_loss)
    assert m["baseline"] == {"name": "majority_class", "class": "a", "accuracy": 0.5}
    assert m["num_test_images"] == 6


def test_top_k_is_capped_at_the_number_of_classes_and_ties_count_as_in_tf():
    m = classification_metrics(Y_TRUE, PROBS, NAMES, top_k=5)
    assert m["top_3_accuracy"] == 1.0 and "top_5_accuracy" not in m
    tied = np.array([[0.4, 0.4, 0.2]])
    for true, k in ((0, 1), (1, 1), (1, 2), (2, 2), (2, 3)):
        ours = top_k_accuracy(np.array([true]), tied, k)
        theirs = float(tf.math.in_top_k(tf.constant([true]), tf.constant(tied, tf.float32),
                                        k).numpy()[0])
        assert ours == theirs, (true, k)
    assert [top_k_accuracy(np.array([t]), tied, 1) for t in (0, 1, 2)] == [1.0, 1.0, 0.0]


def test_class_never_predicted_has_zero_precision_not_nan():
    probs = np.array([[0.9, 0.1], [0.8, 0.2]])
    m = classification_metrics(np.array([0, 1]), probs, ["x", "y"], top_k=1)
    assert m["per_class"]["y"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["top_1_accuracy"] == m["accuracy"] == 0.5


def test_gallery_shows_the_most_confident_mistakes_first():
    assert most_confident_mistakes(Y_TRUE, PROBS, 10).tolist() == [4, 2]  # 0.60 then 0.50
    assert most_confident_mistakes(Y_TRUE, PROBS, 1).tolist() == [4]
    assert most_confident_mistakes(Y_TRUE, PROBS, 0).tolist() == []
