"""One-vs-rest PR and F1-confidence curves (classification, segmentation) against answers
worked out by hand and by brute force, and the two PNGs each task's plots now write.

AP is COCO's mean interpolated precision at the 101 recall points 0, 0.01, ..., 1; like
pycocotools, the code divides by (tp + fp + 2.2e-16), so a "1.0" comes back as 1 - 2e-16:
values are compared with a 1e-12 tolerance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionpipe.config import EvaluateConfig
from visionpipe.errors import DataError
from visionpipe.tasks import pr_curves
from visionpipe.tasks.curves import one_vs_rest_curves
from visionpipe.tasks.pr_curves import (
    RECALL_POINTS,
    _step,
    f1_confidence_png,
    pr_curve_png,
)

EXACT = 1e-12


def approx(x):
    return pytest.approx(x, abs=EXACT, nan_ok=True)


def softmax_case(n: int, k: int, seed: int, signal: float = 1.5
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Random labels and float32 softmax scores leaning towards the true class (no ties)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += signal
    p = np.exp(logits)
    return y, (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def brute_force_ap(y_true: np.ndarray, scores: np.ndarray, k: int) -> float:
    """COCO 101-point AP of class k by plain loops: rank by score (ties: item order), and at
    each recall point take the best precision at any rank whose recall reaches it (0 if none)."""
    order = sorted(range(len(y_true)), key=lambda i: -float(scores[i, k]))
    n_truth = sum(1 for t in y_true if t == k)
    tp = fp = 0
    ranks = []  # (recall, precision) after each prediction
    for i in order:
        if y_true[i] == k:
            tp += 1
        else:
            fp += 1
        ranks.append((tp / n_truth, tp / (tp + fp)))
    total = 0.0
    for r in RECALL_POINTS:
        total += max([p for rec, p in ranks if rec >= r], default=0.0)
    return total / len(RECALL_POINTS)


# --- the curves ---------------------------------------------------------------------------


def test_perfect_scores_give_ap_1_and_precision_recall_1_at_the_best_threshold():
    y = np.array([0, 1, 2, 0, 1, 2, 2])
    scores = np.full((len(y), 3), 0.1)
    scores[np.arange(len(y)), y] = 0.8
    curves = one_vs_rest_curves(y, scores, ["a", "b", "c"])
    assert curves.iou_threshold is None
    assert curves.class_ap.tolist() == approx([1.0, 1.0, 1.0])
    assert curves.class_interpolated_precision == approx(np.ones((3, 101)))
    assert curves.instances.tolist() == [2, 2, 3]
    assert curves.confidence.tolist() == approx([0.8, 0.1])
    assert curves.best() == approx({"confidence": 0.8, "precision": 1.0, "recall": 1.0,
                                    "f1": 1.0})
    # keeping everything: every item is TP once and FP twice -> precision 1/3, recall 1
    assert curves.precision[-1] == approx(1 / 3) and curves.recall[-1] == approx(1.0)
    assert curves.class_precision[:, 0] == approx(np.ones(3))
    assert curves.class_recall[:, 0] == approx(np.ones(3))


# Worked by hand. Five items, classes 0 and 1:
#   item:     0    1    2    3    4
#   truth:    0    0    1    0    1
#   score 0: .9   .6   .7   .2   .4     class 0 has 3 instances, class 1 has 2
#   score 1: .1   .4   .3   .8   .6
# Distinct scores, highest first: .9 .8 .7 .6 .4 .3 .2 .1. Kept with score >= c:
#   c    class 0 (TP,FP) P    R    F1   | class 1 (TP,FP) P    R   F1  | pooled TP,FP P   R   F1
#   .9   1,0  1    1/3  1/2             | 0,0  NaN  0   0              | 1,0  1    1/5 1/3
#   .8   1,0  1    1/3  1/2             | 0,1  0    0   0              | 1,1  1/2  1/5 2/7
#   .7   1,1  1/2  1/3  2/5             | 0,1  0    0   0              | 1,2  1/3  1/5 1/4
#   .6   2,1  2/3  2/3  2/3             | 1,1  1/2  1/2 1/2            | 3,2  3/5  3/5 3/5
#   .4   2,2  1/2  2/3  4/7             | 1,2  1/3  1/2 2/5            | 3,4  3/7  3/5 1/2
#   .3   2,2  1/2  2/3  4/7             | 2,2  1/2  1   2/3            | 4,4  1/2  4/5 8/13
#   .2   3,2  3/5  1    3/4             | 2,2  1/2  1   2/3            | 5,4  5/9  1   5/7
#   .1   3,2  3/5  1    3/4             | 2,3  2/5  1   4/7            | 5,5  1/2  1   2/3
# (F1 = 2TP / (2TP + FP + FN).) The best pooled F1 is 5/7 at .2.
# AP, class 0: ranked T F T F T -> recall 1/3 1/3 2/3 2/3 1, precision 1 1/2 2/3 1/2 3/5,
# interpolated 1 2/3 2/3 3/5 3/5: recall points 0..0.33 (34) get 1, 0.34..0.66 (33) get
# 2/3, 0.67..1 (34) get 3/5 -> AP = (34 + 22 + 20.4) / 101.
# AP, class 1: ranked F T F T F -> recall 0 1/2 1/2 1 1, precision 0 1/2 1/3 1/2 2/5,
# interpolated 1/2 1/2 1/2 1/2 2/5: every recall point is first reached at precision 1/2.
HAND_Y = np.array([0, 0, 1, 0, 1])
HAND_SCORES = np.array([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8], [0.4, 0.6]])
nan = float("nan")


def test_a_case_worked_by_hand():
    curves = one_vs_rest_curves(HAND_Y, HAND_SCORES, ["zero", "one"])
    assert curves.confidence.tolist() == approx([0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.1])
    assert curves.instances.tolist() == [3, 2]
    assert curves.class_precision[0].tolist() == approx(
        [1, 1, 1 / 2, 2 / 3, 1 / 2, 1 / 2, 3 / 5, 3 / 5])
    assert curves.class_recall[0].tolist() == approx(
        [1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 1, 1])
    assert curves.class_f1[0].tolist() == approx(
        [1 / 2, 1 / 2, 2 / 5, 2 / 3, 4 / 7, 4 / 7, 3 / 4, 3 / 4])
    assert curves.class_precision[1].tolist() == approx(
        [nan, 0, 0, 1 / 2, 1 / 3, 1 / 2, 1 / 2, 2 / 5])
    assert curves.class_recall[1].tolist() == approx([0, 0, 0, 1 / 2, 1 / 2, 1, 1, 1])
    assert curves.class_f1[1].tolist() == approx([0, 0, 0, 1 / 2, 2 / 5, 2 / 3, 2 / 3, 4 / 7])
    assert curves.precision.tolist() == approx(
        [1, 1 / 2, 1 / 3, 3 / 5, 3 / 7, 1 / 2, 5 / 9, 1 / 2])
    assert curves.recall.tolist() == approx([1 / 5, 1 / 5, 1 / 5, 3 / 5, 3 / 5, 4 / 5, 1, 1])
    assert curves.f1.tolist() == approx([1 / 3, 2 / 7, 1 / 4, 3 / 5, 1 / 2, 8 / 13, 5 / 7,
                                         2 / 3])
    assert curves.best() == approx({"confidence": 0.2, "precision": 5 / 9, "recall": 1.0,
                                    "f1": 5 / 7})
    assert curves.class_ap.tolist() == approx([(34 + 22 + 20.4) / 101, 0.5])


def test_ap_of_every_class_matches_a_brute_force_coco_computation():
    y, scores = softmax_case(300, 4, seed=3, signal=1.0)
    curves = one_vs_rest_curves(y, scores, list("abcd"))
    expected = [brute_force_ap(y, scores, k) for k in range(4)]
    assert curves.class_ap.tolist() == approx(expected)
    best = int(np.argmax(curves.class_ap))
    assert 0.3 < curves.class_ap[best] < 1.0  # a real curve, neither trivial nor perfect
    assert curves.class_ap[best] == approx(brute_force_ap(y, scores, best))


def test_counts_at_every_threshold_match_a_loop_even_with_tied_scores():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, 60)
    scores = rng.integers(0, 6, (60, 3)) / 5.0  # many ties within and across classes
    curves = one_vs_rest_curves(y, scores, ["a", "b", "c"])
    assert curves.confidence.tolist() == sorted(set(scores.ravel().tolist()), reverse=True)
    for t, c in enumerate(curves.confidence):
        kept = scores >= c
        hit = kept & (y[:, None] == np.arange(3))
        tp, fp = hit.sum(), (kept & ~hit).sum()
        assert curves.precision[t] == approx(tp / (tp + fp))
        assert curves.recall[t] == approx(tp / len(y))
        for k in range(3):
            tp_k, fp_k = hit[:, k].sum(), (kept[:, k] & ~hit[:, k]).sum()
            n_k = (y == k).sum()
            assert curves.class_recall[k, t] == approx(tp_k / n_k)
            assert curves.class_f1[k, t] == approx(2 * tp_k / (tp_k + fp_k + n_k))
            want = tp_k / (tp_k + fp_k) if tp_k + fp_k else nan
            assert curves.class_precision[k, t] == approx(want)


def test_a_class_without_true_items_has_nan_ap_and_recall(tmp_path: Path):
    y = np.array([0, 1, 0, 1])
    scores = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.5, 0.1, 0.4], [0.3, 0.6, 0.1]])
    curves = one_vs_rest_curves(y, scores, ["a", "b", "never"])
    assert curves.instances.tolist() == [2, 2, 0]
    assert np.isnan(curves.class_ap[2]) and np.isnan(curves.class_interpolated_precision[2]).all()
    assert np.isnan(curves.class_recall[2]).all() and np.isnan(curves.class_f1[2]).all()
    # its predictions are all false positives: precision 0 where any is kept
    assert curves.class_precision[2][np.isfinite(curves.class_precision[2])].tolist() == \
        [0.0] * int(np.isfinite(curves.class_precision[2]).sum())
    assert curves.class_ap[:2].tolist() == approx([1.0, 1.0])
    # the figures leave the class out instead of failing
    assert pr_curve_png(curves, tmp_path / "pr.png").stat().st_size > 0
    assert f1_confidence_png(curves, tmp_path / "f1.png").stat().st_size > 0


def test_a_capped_grid_keeps_exact_values_and_the_same_f1_figure():
    y, scores = softmax_case(2000, 3, seed=7)
    full = one_vs_rest_curves(y, scores, list("abc"))
    capped = one_vs_rest_curves(y, scores, list("abc"), max_thresholds=2500)
    assert len(full.confidence) == 6000 and len(capped.confidence) <= 2500
    assert np.all(np.diff(capped.confidence) < 0)
    where = np.searchsorted(-full.confidence, -capped.confidence)
    assert np.array_equal(full.confidence[where], capped.confidence)  # a subset of the scores
    assert capped.f1.tolist() == approx(full.f1[where].tolist())
    assert capped.class_precision == approx(full.class_precision[:, where])
    assert capped.class_ap.tolist() == approx(full.class_ap.tolist())
    grid = np.linspace(0.0, 1.0, 1001)  # f1_confidence_png's axis for scores in [0, 1]
    assert np.array_equal(_step(capped.confidence, capped.f1, grid, 0.0),
                          _step(full.confidence, full.f1, grid, 0.0))
    for k in range(3):
        assert np.array_equal(_step(capped.confidence, capped.class_f1[k], grid, 0.0),
                              _step(full.confidence, full.class_f1[k], grid, 0.0))


def test_20000_items_by_10_classes_pool_every_item():
    y, scores = softmax_case(20000, 10, seed=11)
    curves = one_vs_rest_curves(y, scores, [str(k) for k in range(10)])
    assert curves.class_precision.shape == (10, len(curves.confidence))
    assert int(curves.instances.sum()) == 20000
    assert curves.recall[-1] == approx(1.0) and curves.precision[-1] == approx(0.1)


@pytest.mark.parametrize("y, scores, message", [
    (np.array([0, 1]), np.zeros((2, 3)), "expected \\(items, 2\\)"),
    (np.array([0, 1, 1]), np.zeros((2, 2)), "labels have shape"),
    (np.array([0, 2]), np.zeros((2, 2)), "integers in 0..1"),
    (np.array([0, 0.5]), np.zeros((2, 2)), "integers in 0..1"),
    (np.array([0, 1]), np.array([[0.5, np.nan], [0.5, 0.5]]), "NaN"),
    (np.zeros(0, int), np.zeros((0, 2)), "no test items"),
])
def test_malformed_input_is_a_data_error(y, scores, message):
    with pytest.raises(DataError, match=message):
        one_vs_rest_curves(y, scores, ["a", "b"])


def test_figure_wording_names_iou_only_when_there_is_one(tmp_path: Path, monkeypatch):
    drawn = []
    monkeypatch.setattr(pr_curves, "save_figure", lambda fig, path: drawn.append(fig) or path)
    curves = one_vs_rest_curves(HAND_Y, HAND_SCORES, ["zero", "one"])
    pr_curve_png(curves, tmp_path / "pr.png", title="PR (one-vs-rest)")
    f1_confidence_png(curves, tmp_path / "f1.png")
    pr_ax, f1_ax = drawn[0].axes[0], drawn[1].axes[0]
    assert pr_ax.get_title() == "PR (one-vs-rest)"
    assert pr_ax.get_legend_handles_labels()[1][-1].endswith(" mAP")
    assert f1_ax.get_title() == "F1-confidence curve"
    # detection curves keep their wording
    detected = pr_curves.PRCurves(**{**curves.__dict__, "iou_threshold": 0.5})
    pr_curve_png(detected, tmp_path / "pr.png")
    f1_confidence_png(detected, tmp_path / "f1.png")
    pr_ax, f1_ax = drawn[2].axes[0], drawn[3].axes[0]
    assert pr_ax.get_title() == "Precision-Recall curve"
    assert pr_ax.get_legend_handles_labels()[1][-1].endswith(" mAP@0.5")
    assert f1_ax.get_title() == "F1-confidence curve (IoU 0.5)"


# --- the tasks' plots -----------------------------------------------------------------------


def _assert_figure(path: Path) -> None:
    with Image.open(path) as img:
        assert img.format == "PNG"
        width, height = img.size
        pixels = np.asarray(img.convert("RGB"))
    assert 500 < width < 2000 and 300 < height < 1200
    assert (pixels.min(axis=2) < 200).mean() > 0.01  # lines and text, not a blank page
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # several colours


def test_classification_plots_write_the_pr_and_f1_curves(tmp_path: Path):
    from visionpipe.tasks.classification import ClassificationTask

    y, scores = softmax_case(40, 3, seed=13)
    images = np.random.default_rng(0).integers(0, 255, (40, 12, 12, 3)).astype(np.uint8)
    ids = [f"img{i}" for i in range(40)]
    out = ClassificationTask().plots(images, ids, y, scores, ["cat", "dog", "fox"], tmp_path,
                                     EvaluateConfig())
    assert tmp_path / "pr_curve.png" in out and tmp_path / "f1_curve.png" in out
    assert all(p.exists() for p in out)
    _assert_figure(tmp_path / "pr_curve.png")
    _assert_figure(tmp_path / "f1_curve.png")


def test_segmentation_plots_write_the_pr_and_f1_curves(tmp_path: Path):
    from visionpipe.tasks.segmentation import SegmentationTask

    rng = np.random.default_rng(17)
    masks = rng.integers(0, 3, (2, 10, 10))
    logits = rng.normal(size=(2, 10, 10, 3))
    logits += 2 * np.eye(3)[masks]
    scores = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    images = rng.integers(0, 255, (2, 10, 10, 3)).astype(np.uint8)
    out = SegmentationTask().plots(images, ["a", "b"], masks, scores, ["bg", "x", "y"],
                                   tmp_path, EvaluateConfig())
    assert tmp_path / "pr_curve.png" in out and tmp_path / "f1_curve.png" in out
    assert all(p.exists() for p in out)
    _assert_figure(tmp_path / "pr_curve.png")
    _assert_figure(tmp_path / "f1_curve.png")


def test_the_pixel_sample_is_reproducible_and_capped():
    from visionpipe.tasks.segmentation import CURVE_PIXELS, pixel_sample

    rng = np.random.default_rng(19)
    masks = rng.integers(0, 4, (3, 20, 30))
    scores = rng.random((3, 20, 30, 4)).astype(np.float32)
    labels, picked = pixel_sample(masks, scores)  # 1800 pixels: all of them, in order
    assert CURVE_PIXELS >= 1800
    assert np.array_equal(labels, masks.ravel()) and np.array_equal(picked,
                                                                    scores.reshape(-1, 4))
    labels, picked = pixel_sample(masks, scores, limit=100)
    again = pixel_sample(masks, scores, limit=100)
    assert labels.shape == (100,) and picked.shape == (100, 4)
    assert np.array_equal(labels, again[0]) and np.array_equal(picked, again[1])
    flat_scores = scores.reshape(-1, 4)
    rows = [int(np.flatnonzero((flat_scores == row).all(axis=1))[0]) for row in picked]
    assert len(set(rows)) == 100 and rows == sorted(rows)  # distinct pixels, raster order
    assert np.array_equal(labels, masks.ravel()[rows])  # each label stays with its scores
    other = pixel_sample(masks, scores, limit=100, seed=1)[1]
    assert not np.array_equal(picked, other)
