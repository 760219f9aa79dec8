"""Detection metrics against answers worked out by hand, and against pycocotools itself.

COCO AP is the mean of the interpolated precision at the 101 recall points 0, 0.01, ..., 1;
pycocotools divides by (tp + fp + 2.2e-16), so a "1.0" comes back as 1 - 2e-16: values are
compared with a 1e-12 tolerance, which still tells 51/101 from 50/101 or 52/101.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

import matplotlib.figure
import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from visionpipe.errors import DataError
from visionpipe.tasks.detection_metrics import (
    FP,
    IGNORED,
    TP,
    box_iou,
    coco_metrics,
    detection_metrics,
    match_detections,
    pr_curves,
    xyxy_to_xywh,
)
from visionpipe.tasks.pr_curves import f1_confidence_png, pr_curve_png

EXACT = 1e-12
NAMES = ["a", "b", "c"]


def approx(x):
    return pytest.approx(x, abs=EXACT)


def truth(boxes, class_ids, difficult=None):
    out = {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
           "class_ids": np.asarray(class_ids, np.int64)}
    if difficult is not None:
        out["difficult"] = np.asarray(difficult, bool)
    return out


def pred(boxes, class_ids, scores):
    return {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
            "class_ids": np.asarray(class_ids, np.int64),
            "scores": np.asarray(scores, np.float64)}


NOTHING = pred([], [], [])


def iou(a, b):
    """Plain IoU of two xyxy boxes, written out independently of the module."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


# --- building blocks ------------------------------------------------------------------------


def test_module_does_not_import_tensorflow():
    assert "visionpipe.tasks.detection_metrics" in sys.modules
    import subprocess

    code = ("import sys, visionpipe.tasks.detection_metrics; "
            "print('tensorflow' in sys.modules, 'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.stdout.split() == ["False", "False"]


def test_xyxy_to_xywh():
    assert xyxy_to_xywh(np.array([[10, 20, 14, 50]])).tolist() == [[10, 20, 4, 30]]
    assert xyxy_to_xywh(np.zeros((0, 4))).shape == (0, 4)


def test_box_iou_plain_and_crowd():
    a, b = [10, 20, 20, 30], [15, 20, 25, 30]  # overlap 5 x 10 = 50, union 150
    assert box_iou(np.array([a]), np.array([b]))[0, 0] == pytest.approx(1 / 3)
    # the crowd rule (used for difficult boxes): intersection / first box's area = 50 / 100
    assert box_iou(np.array([a]), np.array([b]), crowd=np.array([True]))[0, 0] == 0.5
    # touching along an edge, and disjoint: 0, never NaN
    edge = box_iou(np.array([a]), np.array([[20, 20, 30, 30], [100, 100, 100, 100]]))
    assert edge.tolist() == [[0.0, 0.0]]


def test_match_detections_statuses():
    gts = np.array([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]], float)
    difficult = np.array([False, False, True])
    dets = np.array([[0, 0, 10, 10],      # TP on box 0
                     [0, 0, 10, 10],      # duplicate of box 0: FP
                     [41, 1, 45, 5],      # inside the difficult box: ignored
                     [20, 0, 28, 10],     # IoU 0.8 with box 1: TP
                     [60, 0, 70, 10]], float)  # nothing there: FP
    assert match_detections(dets, gts, difficult).tolist() == [TP, FP, IGNORED, TP, FP]


# --- COCO mAP, worked by hand ---------------------------------------------------------------


def test_perfect_predictions_give_one_everywhere():
    truths = [truth([[10, 20, 40, 35], [50, 5, 60, 45]], [0, 1]),
              truth([[0, 0, 12, 7]], [0]),
              truth([], [])]  # an image with nothing in it
    preds = [pred(t["boxes"], t["class_ids"], [0.9] * len(t["boxes"])) for t in truths]
    m = detection_metrics(truths, preds, ["a", "b"])
    assert m["map_50"] == approx(1.0)
    assert m["map_50_95"] == approx(1.0)
    assert m["map_75"] == approx(1.0)
    assert (m["precision"], m["recall"], m["f1"], m["confidence"]) == approx((1, 1, 1, 0.9))
    assert m["images"] == 3 and m["instances"] == 3 and m["detections"] == 3
    assert m["per_class"]["a"]["instances"] == 2 and m["per_class"]["b"]["instances"] == 1


def test_box_below_half_iou_is_a_miss():
    gt, det = [10, 20, 20, 30], [15, 20, 25, 30]
    assert iou(gt, det) == pytest.approx(1 / 3)  # 5x10 overlap / (100 + 100 - 50)
    m = detection_metrics([truth([gt], [0])], [pred([det], [0], [0.9])], NAMES)
    assert m["per_class"]["a"]["ap_50"] == 0.0
    assert m["per_class"]["a"]["ap_50_95"] == 0.0
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)


def test_box_at_iou_0625_counts_up_to_060_only():
    # Off the origin and not square, so an xyxy/xywh mix-up shows: read as xywh these boxes
    # would overlap by 600 / 720 = 0.83 and count up to IoU 0.80 (AP@[.5:.95] = 0.7).
    gt, det = [10, 20, 20, 30], [10, 20, 20, 36]
    assert iou(gt, det) == 0.625  # 100 / 160: between the thresholds 0.60 and 0.65
    m = coco_metrics([truth([gt], [1])], [pred([det], [1], [0.8])], NAMES)
    b = m["per_class"]["b"]
    # One TP at thresholds 0.50, 0.55, 0.60 (AP 1 each), none at 0.65 ... 0.95 (AP 0):
    assert b["ap_50"] == approx(1.0)
    assert b["ap_75"] == 0.0
    assert b["ap_50_95"] == approx(3 / 10)
    assert (m["map_50"], m["map_75"], m["map_50_95"]) == approx((1.0, 0.0, 0.3))
    assert m["per_class"]["a"]["ap_50"] is None and m["per_class"]["c"]["ap_50"] is None


def test_two_truths_one_found_is_51_of_101():
    truths = [truth([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0])]
    preds = [pred([[0, 0, 10, 10]], [0], [0.7])]
    m = detection_metrics(truths, preds, NAMES)
    # recall 0.5, precision 1: recall points 0, 0.01, ..., 0.50 (51 of 101) get precision 1
    assert m["map_50"] == approx(51 / 101)
    assert m["map_50"] != approx(50 / 101) and m["map_50"] != approx(52 / 101)
    assert (m["precision"], m["recall"], m["f1"]) == approx((1.0, 0.5, 2 / 3))
    # and pycocotools run the plain way (files-free, default parameters) agrees
    assert _reference_stats(truths, preds, len(NAMES))[1] == approx(51 / 101)


def test_false_positive_above_the_true_positive():
    truths = [truth([[0, 0, 10, 10]], [0])]
    hit, miss = [0, 0, 10, 10], [50, 50, 60, 60]
    # ranked FP (0.9) then TP (0.8): precision 0 then 1/2 at recall 0 then 1; interpolated
    # precision is 1/2 at every recall point -> AP 1/2
    m = coco_metrics(truths, [pred([miss, hit], [0, 0], [0.9, 0.8])], NAMES)
    assert m["map_50"] == approx(0.5)
    # scores swapped: the TP comes first, precision 1 up to recall 1 -> AP 1
    m = coco_metrics(truths, [pred([miss, hit], [0, 0], [0.8, 0.9])], NAMES)
    assert m["map_50"] == approx(1.0)


def test_false_positive_on_an_image_without_truth_counts():
    truths = [truth([[0, 0, 10, 10]], [0]), truth([], [])]
    preds = [pred([[0, 0, 10, 10]], [0], [0.8]), pred([[0, 0, 10, 10]], [0], [0.9])]
    m = detection_metrics(truths, preds, NAMES)
    assert m["map_50"] == approx(0.5)  # FP then TP, as above
    assert (m["precision"], m["recall"], m["confidence"]) == approx((0.5, 1.0, 0.8))


def test_duplicate_detection_is_a_false_positive():
    truths = [truth([[0, 0, 10, 10], [20, 0, 30, 10]], [0, 0])]
    # box 1 found twice (0.9, 0.8), box 2 found at 0.7: TP, FP, TP.
    # recall .5, .5, 1; precision 1, 1/2, 2/3 -> interpolated 1, 2/3, 2/3.
    # recall points 0..0.50 (51) get 1, 0.51..1 (50) get 2/3: AP = (51 + 100/3) / 101
    preds = [pred([[0, 0, 10, 10], [0, 0, 10, 10], [20, 0, 30, 10]], [0, 0, 0],
                  [0.9, 0.8, 0.7])]
    m = detection_metrics(truths, preds, NAMES)
    assert m["map_50"] == approx(253 / 303)
    assert m["map_50_95"] == approx(253 / 303)  # exact boxes: the same at every threshold
    # thresholds 0.9 / 0.8 / 0.7: F1 = 2TP/(2TP+FP+FN) = 2/3, 2/4, 4/5 -> best at 0.7
    assert (m["confidence"], m["precision"], m["recall"], m["f1"]) == approx(
        (0.7, 2 / 3, 1.0, 0.8))


def test_wrong_class_is_a_miss():
    box = [[0, 0, 10, 10]]
    m = detection_metrics([truth(box, [0])], [pred(box, [1], [0.9])], NAMES)
    assert m["per_class"]["a"]["ap_50"] == 0.0
    assert m["per_class"]["b"]["ap_50"] is None  # no truth of class b
    assert m["per_class"]["b"]["detections"] == 1
    assert m["map_50"] == 0.0
    assert (m["precision"], m["recall"]) == (0.0, 0.0)


def test_detection_on_a_difficult_box_is_neither_tp_nor_fp():
    truths = [truth([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0], difficult=[False, True])]
    # the prediction on the difficult box has the higher score: were it a FP, AP would be
    # 1/2 and precision 1/2; were the difficult box an instance, recall would be 1/2.
    preds = [pred([[20, 20, 30, 30], [0, 0, 10, 10]], [0, 0], [0.95, 0.9])]
    m = detection_metrics(truths, preds, NAMES)
    assert m["map_50"] == approx(1.0)
    assert m["map_50_95"] == approx(1.0)
    assert (m["precision"], m["recall"], m["confidence"]) == approx((1.0, 1.0, 0.9))
    assert m["instances"] == 1 and m["difficult"] == 1
    assert m["per_class"]["a"]["instances"] == 1
    assert pr_curves(truths, preds, NAMES).confidence.tolist() == pytest.approx([0.9])


def test_small_detection_inside_a_difficult_box_is_ignored_crowd_rule():
    # Documented choice: difficult boxes go to COCOeval as crowd boxes, overlap =
    # intersection / prediction area. This one has IoU 25/100 = 0.25 with the difficult box
    # but lies wholly inside it (overlap 1), so it is ignored rather than a FP.
    truths = [truth([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0], difficult=[False, True])]
    inside = [20, 20, 25, 25]
    assert iou(inside, [20, 20, 30, 30]) == 0.25
    preds = [pred([inside, [0, 0, 10, 10]], [0, 0], [0.95, 0.9])]
    m = detection_metrics(truths, preds, NAMES)
    assert m["map_50"] == approx(1.0)
    assert m["precision"] == 1.0


def test_class_without_truth_has_ap_none_and_is_left_out_of_the_mean():
    truths = [truth([[0, 0, 10, 10], [20, 0, 30, 10]], [0, 1])]
    preds = [pred([[0, 0, 10, 10], [50, 50, 60, 60]], [0, 2], [0.9, 0.8])]
    m = detection_metrics(truths, preds, NAMES)
    a, b, c = (m["per_class"][n] for n in NAMES)
    assert a["ap_50"] == approx(1.0) and b["ap_50"] == 0.0
    assert c["ap_50"] is None and c["ap_50_95"] is None and c["ap_75"] is None
    assert c["instances"] == 0 and c["detections"] == 1
    assert m["map_50"] == approx(0.5)  # (1 + 0) / 2, not (1 + 0 + 0) / 3
    assert m["map_50_95"] == approx(0.5)
    # per-class precision/recall at the best threshold (0.9): None where undefined
    assert (a["precision"], a["recall"]) == approx((1.0, 1.0))
    assert (b["precision"], b["recall"]) == (None, 0.0)
    assert (c["precision"], c["recall"]) == (None, None)


def test_no_predictions_at_all():
    truths = [truth([[0, 0, 10, 10]], [0]), truth([], [])]
    m = detection_metrics(truths, [NOTHING, NOTHING], NAMES)
    assert (m["map_50_95"], m["map_50"], m["map_75"]) == (0.0, 0.0, 0.0)
    assert (m["confidence"], m["precision"], m["recall"], m["f1"]) == (None, 0.0, 0.0, 0.0)
    assert m["per_class"]["a"]["ap_50"] == 0.0 and m["per_class"]["b"]["ap_50"] is None


def test_max_detections_keeps_the_best_scores_per_image_and_class():
    truths = [truth([[0, 0, 10, 10]], [0])]
    preds = [pred([[50, 50, 60, 60], [0, 0, 10, 10]], [0, 0], [0.9, 0.8])]  # FP, TP
    assert coco_metrics(truths, preds, NAMES)["map_50"] == approx(0.5)
    assert coco_metrics(truths, preds, NAMES, max_detections=1)["map_50"] == 0.0
    curves = pr_curves(truths, preds, NAMES, max_detections=1)
    assert curves.confidence.tolist() == pytest.approx([0.9])


def test_no_truth_box_raises_data_error():
    with pytest.raises(DataError, match=r"the test split has no boxes \(0 ground-truth boxes "
                                        r"in 2 images\)"):
        detection_metrics([truth([], []), truth([], [])],
                          [pred([[0, 0, 1, 1]], [0], [0.5]), NOTHING], NAMES)
    with pytest.raises(DataError, match="the test split has no boxes that count: all 1"):
        coco_metrics([truth([[0, 0, 5, 5]], [0], difficult=[True])], [NOTHING], NAMES)


@pytest.mark.parametrize("truths, preds, message", [
    ([truth([[0, 0, 1, 1]], [0])], [], "1 images of ground truth but predictions for 0"),
    ([truth([[0, 0, 1, 1]], [3])], [NOTHING], r"class ids must be integers in 0\.\.2"),
    ([truth([[5, 0, 1, 1]], [0])], [NOTHING], "xmax < xmin"),
    ([truth([[0, 0, 1, 1]], [0])], [{"boxes": [[0, 0, 1, 1]], "class_ids": [0]}],
     "has no 'scores'"),
    ([{"boxes": [0, 0, 1, 1], "class_ids": [0]}], [NOTHING], r"shape \(4,\)"),
])
def test_malformed_input_raises_data_error(truths, preds, message):
    with pytest.raises(DataError, match=message):
        detection_metrics(truths, preds, NAMES)


# --- precision / recall / F1 per confidence -------------------------------------------------


def _small_case():
    truths = [truth([[0, 0, 10, 10], [20, 0, 30, 10], [0, 20, 10, 30]], [0, 0, 1])]
    preds = [pred([[0, 0, 10, 10],      # a, TP, 0.9
                   [40, 40, 50, 50],    # a, FP, 0.8
                   [0, 20, 10, 30],     # b, TP, 0.8 (same score as the FP)
                   [20, 0, 30, 10],     # a, TP, 0.3
                   [60, 60, 70, 70]],   # b, FP, 0.2
                  [0, 0, 1, 0, 1], [0.9, 0.8, 0.8, 0.3, 0.2])]
    return truths, preds


def test_pr_curves_exact_values_per_threshold():
    truths, preds = _small_case()
    c = pr_curves(truths, preds, ["a", "b"])
    # 3 truth boxes.  keep score >= 0.9: TP 1 FP 0 | >= 0.8: TP 2 FP 1 | >= 0.3: TP 3 FP 1 |
    # >= 0.2: TP 3 FP 2.  F1 = 2TP / (2TP + FP + FN).
    assert c.confidence == pytest.approx([0.9, 0.8, 0.3, 0.2])
    assert c.precision == pytest.approx([1, 2 / 3, 3 / 4, 3 / 5])
    assert c.recall == pytest.approx([1 / 3, 2 / 3, 1, 1])
    assert c.f1 == pytest.approx([2 / 4, 4 / 6, 6 / 7, 6 / 8])
    assert c.best() == pytest.approx({"confidence": 0.3, "precision": 0.75, "recall": 1.0,
                                      "f1": 6 / 7})
    # class a (2 boxes): TP/FP 1/0, 1/1, 2/1, 2/1
    assert c.class_precision[0] == pytest.approx([1, 1 / 2, 2 / 3, 2 / 3])
    assert c.class_recall[0] == pytest.approx([1 / 2, 1 / 2, 1, 1])
    assert c.class_f1[0] == pytest.approx([2 / 3, 1 / 2, 4 / 5, 4 / 5])
    # class b (1 box): nothing kept at 0.9 (precision undefined), then 1/0, 1/0, 1/1
    assert np.isnan(c.class_precision[1, 0])
    assert c.class_precision[1, 1:] == pytest.approx([1, 1, 1 / 2])
    assert c.class_recall[1] == pytest.approx([0, 1, 1, 1])
    assert c.class_f1[1] == pytest.approx([0, 1, 1, 2 / 3])
    # AP at IoU .5: a ranks TP, FP, TP -> 253/303 (see the duplicate test); b ranks TP, FP -> 1
    assert c.class_ap == pytest.approx([253 / 303, 1.0], abs=EXACT)
    m = detection_metrics(truths, preds, ["a", "b"])
    assert (m["confidence"], m["precision"], m["recall"], m["f1"]) == approx(
        (0.3, 0.75, 1.0, 6 / 7))
    assert m["per_class"]["a"]["ap_50"] == approx(253 / 303)


def test_best_threshold_tie_goes_to_the_higher_confidence():
    truths = [truth([[0, 0, 10, 10], [20, 0, 30, 10]], [0, 0])]
    # TP 0.9, FP 0.8, FP 0.7, TP 0.6 -> F1 = 2/3, 2/4, 2/5, 4/6: 0.9 and 0.6 tie at 2/3
    preds = [pred([[0, 0, 10, 10], [50, 0, 60, 10], [70, 0, 80, 10], [20, 0, 30, 10]],
                  [0, 0, 0, 0], [0.9, 0.8, 0.7, 0.6])]
    c = pr_curves(truths, preds, NAMES)
    assert c.f1 == pytest.approx([2 / 3, 1 / 2, 2 / 5, 2 / 3])
    assert c.best() == pytest.approx({"confidence": 0.9, "precision": 1.0, "recall": 0.5,
                                      "f1": 2 / 3})


def test_pr_curves_ap_equals_pycocotools_on_a_random_case():
    """Matching in pr_curves follows COCOeval's rules, so its AP at IoU 0.5 must equal
    pycocotools' AP50 per class; and coco_metrics' means must equal COCOeval.summarize's
    numbers when pycocotools is run the plain way with its default parameters."""
    rng = np.random.default_rng(7)
    truths, preds = [], []
    for _ in range(12):
        n = int(rng.integers(0, 5))
        xy = rng.uniform(0, 80, (n, 2))
        gt = np.concatenate([xy, xy + rng.uniform(5, 30, (n, 2))], axis=1)
        truths.append(truth(gt, rng.integers(0, 3, n), rng.random(n) < 0.15))
        jitter = np.repeat(gt, 2, axis=0) + rng.normal(0, 3, (2 * n, 4))
        jitter[:, 2:] = np.maximum(jitter[:, 2:], jitter[:, :2] + 1)
        extra = rng.uniform(0, 80, (2, 2))
        boxes = np.concatenate([jitter, np.concatenate([extra, extra + 10], axis=1)])
        labels = np.concatenate([np.repeat(truths[-1]["class_ids"], 2), rng.integers(0, 3, 2)])
        labels[rng.random(len(labels)) < 0.1] = 1  # some wrong classes
        scores = np.round(rng.uniform(0, 1, len(boxes)), 1)  # ties on purpose
        preds.append(pred(boxes, labels, scores))
    m = coco_metrics(truths, preds, NAMES)
    c = pr_curves(truths, preds, NAMES)
    for k, name in enumerate(NAMES):
        assert c.class_ap[k] == approx(m["per_class"][name]["ap_50"])
    stats = _reference_stats(truths, preds, len(NAMES))
    assert (m["map_50_95"], m["map_50"], m["map_75"]) == approx(tuple(stats[:3]))
    assert 0.2 < m["map_50"] < 0.95  # a case with both hits and misses


def _reference_stats(truths, preds, num_classes):
    """COCOeval.summarize's stats with default parameters (all areas, maxDets 1/10/100)."""
    anns, results = [], []
    for i, (t, p) in enumerate(zip(truths, preds, strict=True), start=1):
        for box, k, hard in zip(t["boxes"].tolist(), t["class_ids"].tolist(),
                                t.get("difficult", np.zeros(len(t["boxes"]), bool)).tolist(),
                                strict=True):
            w, h = box[2] - box[0], box[3] - box[1]
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": k + 1,
                         "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": int(hard)})
        for box, k, s in zip(p["boxes"].tolist(), p["class_ids"].tolist(),
                             p["scores"].tolist(), strict=True):
            results.append({"image_id": i, "category_id": k + 1, "score": s,
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": [{"id": i + 1} for i in range(len(truths))],
                      "categories": [{"id": k + 1} for k in range(num_classes)],
                      "annotations": anns}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


# --- figures --------------------------------------------------------------------------------


def test_the_two_pngs_are_written_atomically(tmp_path: Path, monkeypatch):
    truths, preds = _small_case()
    curves = pr_curves(truths, preds, ["a", "b"])
    pr_path, f1_path = tmp_path / "PR_curve.png", tmp_path / "F1_curve.png"
    assert pr_curve_png(curves, pr_path) == pr_path
    assert f1_confidence_png(curves, f1_path) == f1_path
    f1_confidence_png(curves, f1_path)  # replaces the existing file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["F1_curve.png", "PR_curve.png"]
    for path in (pr_path, f1_path):
        assert path.stat().st_size > 0
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 200
    # a failure while saving leaves the previous file whole and no temporary file behind
    before = pr_path.read_bytes()

    def broken_savefig(self, fname, **kwargs):
        Path(fname).write_bytes(b"half a png")
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        pr_curve_png(curves, pr_path)
    assert pr_path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["F1_curve.png", "PR_curve.png"]


def test_pngs_without_any_prediction(tmp_path: Path):
    curves = pr_curves([truth([[0, 0, 10, 10]], [0])], [NOTHING], NAMES)
    assert len(curves.confidence) == 0 and curves.best()["confidence"] is None
    for path in (pr_curve_png(curves, tmp_path / "pr.png"),
                 f1_confidence_png(curves, tmp_path / "f1.png")):
        with Image.open(path) as img:
            assert img.format == "PNG"
