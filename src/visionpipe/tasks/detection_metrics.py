"""Object detection evaluation: COCO mAP, precision/recall/F1 per confidence, and two plots.

Entry point: :func:`detection_metrics` returns everything a metrics JSON needs (it calls
:func:`coco_metrics` and :func:`pr_curves`); the figures are drawn from :func:`pr_curves`'
result by :func:`pr_curve_png` and :func:`f1_confidence_png`. Nothing here imports TensorFlow.

Inputs are plain numpy, one mapping per image, in the same order for truth and prediction:

* truth: ``boxes`` float (n, 4) ``xmin, ymin, xmax, ymax`` in pixels, ``class_ids`` int (n,)
  (``class_names[k]`` is id k), optional ``difficult`` bool (n,);
* prediction: ``boxes`` (m, 4) in the same format, ``class_ids`` (m,), ``scores`` (m,).

Matching (both the COCO numbers and the curves follow the rules of ``pycocotools.COCOeval``):

* per image and class, predictions are taken by descending score (ties keep their input
  order) and at most ``max_detections`` of them are kept; the rest are dropped everywhere;
* each prediction is matched, greedily in that order, to the not yet matched, non-difficult
  truth box of its class with the highest IoU, if that IoU is at least the threshold: a true
  positive (TP). A truth box is matched at most once, so a second detection of the same object
  is a false positive (FP), as is a prediction of the wrong class or one overlapping nothing;
* difficult boxes are ignored the PASCAL VOC way: they do not count as instances, and a
  prediction that matches no regular box but overlaps a difficult one is neither TP nor FP
  (any number of predictions may fall on one difficult box). COCOeval can only ignore a truth
  box through ``iscrowd=1``, so difficult boxes are handed to it as crowd boxes; their overlap
  is then intersection / prediction area (not IoU): a small prediction lying inside a difficult
  box is ignored even where its IoU is low. :func:`pr_curves` uses the same rule, so its
  AP at IoU 0.5 equals COCO's AP50 exactly.

COCO numbers: AP is the 101-point interpolated precision (recall 0, 0.01, ..., 1) averaged
per class, at IoU 0.50 (AP50), 0.75 (AP75) and averaged over 0.50, 0.55, ..., 0.95
(AP@[.5:.95]), area range "all". mAP is the mean over the classes that have at least one
non-difficult truth box; a class without one has AP ``None`` and is left out of the means.

The figures:

* ``PR_curve.png`` (:func:`pr_curve_png`): for each class, the interpolated precision (the
  best precision reachable at this recall or beyond, as AP integrates it) against recall at
  IoU 0.5, with the class's AP50 in the legend; the thick line is the mean over classes, whose
  area is mAP@.5. A curve that stays high to the right is a class found completely with few
  false alarms; where a curve drops to 0, the detector never reaches that recall.
* ``F1_curve.png`` (:func:`f1_confidence_png`): F1 against the confidence threshold (a
  prediction is kept when its score >= the threshold), per class and for all classes pooled
  (TP, FP and truth boxes summed over classes, unlike ultralytics, which averages the
  per-class curves). The marked point is the threshold that maximises the pooled F1: a good
  default for deployment; the metrics report precision and recall at that threshold.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from visionpipe.errors import DataError
from visionpipe.tasks.pr_curves import (
    RECALL_POINTS,
    PRCurves,
    coco_interpolated_precision,
    counts_at,
    precision_recall_f1,
)

TP, FP, IGNORED = 1, 0, -1  # what a kept prediction turned out to be
AREA_ALL = [0.0, 1e5 ** 2]  # COCO's "all" area range


@dataclass(frozen=True)
class _Truth:
    boxes: np.ndarray  # (n, 4) float64 xyxy
    class_ids: np.ndarray  # (n,) int64
    difficult: np.ndarray  # (n,) bool


@dataclass(frozen=True)
class _Prediction:
    boxes: np.ndarray  # (m, 4) float64 xyxy
    class_ids: np.ndarray  # (m,) int64
    scores: np.ndarray  # (m,) float64


def _array(item: Mapping, key: str, where: str, dtype, shape_tail: tuple[int, ...]
           ) -> np.ndarray:
    try:
        value = np.asarray(item[key], dtype)
    except KeyError:
        raise DataError(f"{where} has no '{key}'") from None
    except (TypeError, ValueError) as err:
        raise DataError(f"{where}: '{key}' is not numeric: {err}") from None
    if value.size == 0:
        value = value.reshape((0, *shape_tail))
    if value.shape[1:] != shape_tail or value.ndim != 1 + len(shape_tail):
        want = "(n, 4) xmin, ymin, xmax, ymax" if shape_tail else "(n,)"
        raise DataError(f"{where}: '{key}' has shape {value.shape}; expected {want}")
    return value


def _boxes_and_classes(item: Mapping, where: str, num_classes: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    boxes = _array(item, "boxes", where, np.float64, (4,))
    class_ids = _array(item, "class_ids", where, np.float64, ())
    if len(class_ids) != len(boxes):
        raise DataError(f"{where}: {len(boxes)} boxes but {len(class_ids)} class ids")
    if not np.isfinite(boxes).all():
        raise DataError(f"{where}: 'boxes' holds NaN or infinite values")
    if ((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).any():
        raise DataError(f"{where}: a box has xmax < xmin or ymax < ymin; boxes are "
                        "xmin, ymin, xmax, ymax")
    if len(class_ids) and (np.any(class_ids != np.round(class_ids)) or class_ids.min() < 0
                           or class_ids.max() >= num_classes):
        raise DataError(f"{where}: class ids must be integers in 0..{num_classes - 1}, got "
                        f"{sorted(set(class_ids.tolist()))}")
    return boxes, class_ids.astype(np.int64)


def _parse(truths: Sequence[Mapping], predictions: Sequence[Mapping], num_classes: int
           ) -> tuple[list[_Truth], list[_Prediction]]:
    """Checked float64/int64 arrays for every image; DataError on anything malformed."""
    if len(truths) != len(predictions):
        raise DataError(f"{len(truths)} images of ground truth but predictions for "
                        f"{len(predictions)}; give one (possibly empty) entry per image")
    gts, dets = [], []
    for i, (truth, pred) in enumerate(zip(truths, predictions, strict=True)):
        boxes, class_ids = _boxes_and_classes(truth, f"ground truth of image {i}", num_classes)
        if truth.get("difficult") is None:
            difficult = np.zeros(len(boxes), bool)
        else:
            difficult = _array(truth, "difficult", f"ground truth of image {i}", bool, ())
            if len(difficult) != len(boxes):
                raise DataError(f"ground truth of image {i}: {len(boxes)} boxes but "
                                f"{len(difficult)} difficult flags")
        gts.append(_Truth(boxes, class_ids, difficult))
        where = f"predictions of image {i}"
        boxes, class_ids = _boxes_and_classes(pred, where, num_classes)
        scores = _array(pred, "scores", where, np.float64, ())
        if len(scores) != len(boxes):
            raise DataError(f"{where}: {len(boxes)} boxes but {len(scores)} scores")
        if not np.isfinite(scores).all():
            raise DataError(f"{where}: 'scores' holds NaN or infinite values")
        dets.append(_Prediction(boxes, class_ids, scores))
    return gts, dets


def _require_boxes(gts: list[_Truth]) -> None:
    total = sum(len(g.boxes) for g in gts)
    difficult = sum(int(g.difficult.sum()) for g in gts)
    if total == 0:
        raise DataError(f"the test split has no boxes (0 ground-truth boxes in {len(gts)} "
                        "images): detection metrics are undefined; check that the split was "
                        "prepared with its boxes")
    if difficult == total:
        raise DataError(f"the test split has no boxes that count: all {total} ground-truth "
                        "boxes are marked difficult, which evaluation ignores")


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """``xmin, ymin, xmax, ymax`` -> COCO's ``x, y, width, height`` (same pixel units)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def box_iou(boxes: np.ndarray, truth_boxes: np.ndarray, crowd: np.ndarray | None = None
            ) -> np.ndarray:
    """Overlap (len(boxes), len(truth_boxes)) of xyxy boxes, computed as pycocotools does.

    IoU (intersection / union); against a truth box flagged in ``crowd`` it is intersection /
    area of the first box instead (COCO's crowd rule, used here for difficult boxes). Boxes
    that do not overlap, or touch only along an edge, score 0.
    """
    d, g = xyxy_to_xywh(boxes), xyxy_to_xywh(truth_boxes)
    iw = (np.minimum(d[:, None, 0] + d[:, None, 2], g[None, :, 0] + g[None, :, 2])
          - np.maximum(d[:, None, 0], g[None, :, 0]))
    ih = (np.minimum(d[:, None, 1] + d[:, None, 3], g[None, :, 1] + g[None, :, 3])
          - np.maximum(d[:, None, 1], g[None, :, 1]))
    inter = np.where((iw > 0) & (ih > 0), np.clip(iw, 0, None) * np.clip(ih, 0, None), 0.0)
    d_area, g_area = d[:, 2] * d[:, 3], g[:, 2] * g[:, 3]
    union = d_area[:, None] + g_area[None, :] - inter
    if crowd is not None:
        union = np.where(np.asarray(crowd, bool)[None, :], d_area[:, None], union)
    return np.divide(inter, union, out=np.zeros_like(inter), where=inter > 0)


def match_detections(boxes: np.ndarray, truth_boxes: np.ndarray, difficult: np.ndarray,
                     iou_threshold: float = 0.5) -> np.ndarray:
    """TP (1), FP (0) or IGNORED (-1) for each prediction of one image and one class.

    ``boxes`` must already be in descending score order. Each prediction takes the unmatched
    non-difficult truth box with the highest IoU >= ``iou_threshold`` (on equal IoU the later
    box, as COCOeval does); if there is none but it overlaps a difficult box by at least the
    threshold (intersection / prediction area), it is ignored; otherwise it is a FP.
    """
    threshold = min(float(iou_threshold), 1 - 1e-10)  # as COCOeval: IoU 1 still matches at 1
    difficult = np.asarray(difficult, bool)
    iou = box_iou(boxes, truth_boxes, crowd=difficult)
    used = np.zeros(len(difficult), bool)
    status = np.full(len(iou), FP, np.int8)
    for d, row in enumerate(iou):
        free = np.flatnonzero(~difficult & ~used & (row >= threshold))
        if len(free):
            best = free[np.flatnonzero(row[free] == row[free].max())[-1]]
            used[best] = True
            status[d] = TP
        elif (difficult & (row >= threshold)).any():
            status[d] = IGNORED
    return status


def _kept(pred: _Prediction, class_id: int, max_detections: int) -> np.ndarray:
    """Indices of one class's predictions in an image, best score first, capped."""
    idx = np.flatnonzero(pred.class_ids == class_id)
    return idx[np.argsort(-pred.scores[idx], kind="stable")][:max_detections]


def _coco_ground_truth(gts: list[_Truth], class_names: Sequence[str]) -> COCO:
    """An in-memory COCO object: image ids 1..N, category ids 1..K, annotation ids from 1
    (COCOeval takes id 0 for "unmatched"); difficult boxes become ``iscrowd=1``."""
    annotations = []
    for image_id, gt in enumerate(gts, start=1):
        for box, class_id, hard in zip(xyxy_to_xywh(gt.boxes), gt.class_ids, gt.difficult,
                                       strict=True):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(class_id) + 1,
                                "bbox": [float(v) for v in box],
                                "area": float(box[2] * box[3]), "iscrowd": int(hard)})
    coco = COCO()
    coco.dataset = {"images": [{"id": i} for i in range(1, len(gts) + 1)],
                    "categories": [{"id": k + 1, "name": str(name)}
                                   for k, name in enumerate(class_names)],
                    "annotations": annotations}
    coco.createIndex()
    return coco


def _coco_results(coco_gt: COCO, dets: list[_Prediction]) -> COCO:
    """The predictions as a COCO result object (``loadRes`` on a list; built by hand when
    empty, since ``loadRes`` cannot take an empty list)."""
    results = [{"image_id": image_id, "category_id": int(class_id) + 1,
                "bbox": [float(v) for v in box], "score": float(score)}
               for image_id, det in enumerate(dets, start=1)
               for box, class_id, score in zip(xyxy_to_xywh(det.boxes), det.class_ids,
                                               det.scores, strict=True)]
    if results:
        return coco_gt.loadRes(results)
    empty = COCO()
    empty.dataset = {"images": list(coco_gt.dataset["images"]),
                     "categories": copy.deepcopy(coco_gt.dataset["categories"]),
                     "annotations": []}
    empty.createIndex()
    return empty


def _mean_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def coco_metrics(truths: Sequence[Mapping], predictions: Sequence[Mapping],
                 class_names: Sequence[str], *, max_detections: int = 100) -> dict:
    """COCO box AP with pycocotools, in memory (no files, its printing silenced).

    Returns ``map_50_95`` (AP@[.5:.95], area "all"), ``map_50``, ``map_75``; ``per_class``
    {name: {"ap_50_95", "ap_50", "ap_75", "instances" (non-difficult truth boxes),
    "difficult", "detections" (predicted boxes of the class, before the cap)}}; ``images``,
    ``instances``, ``difficult``, ``detections`` and ``max_detections`` (kept per image and
    class, best score first). A class without a non-difficult truth box has AP ``None`` and
    is excluded from the means; a class with truth boxes and no prediction has AP 0.
    Raises DataError when the split has no (non-difficult) truth box at all.
    """
    gts, dets = _parse(truths, predictions, len(class_names))
    _require_boxes(gts)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = _coco_ground_truth(gts, class_names)
        coco_dt = _coco_results(coco_gt, dets)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        p = evaluator.params
        p.imgIds = list(range(1, len(gts) + 1))
        p.catIds = list(range(1, len(class_names) + 1))
        p.areaRng, p.areaRngLbl = [AREA_ALL], ["all"]
        p.maxDets = [int(max_detections)]
        evaluator.evaluate()
        evaluator.accumulate()
    precision = evaluator.eval["precision"][:, :, :, 0, 0]  # (IoU thresholds, recall, class)
    t50 = int(np.argmin(np.abs(p.iouThrs - 0.5)))
    t75 = int(np.argmin(np.abs(p.iouThrs - 0.75)))
    per_class = {}
    for k, name in enumerate(class_names):
        counts = {"instances": int(sum(((g.class_ids == k) & ~g.difficult).sum() for g in gts)),
                  "difficult": int(sum(((g.class_ids == k) & g.difficult).sum() for g in gts)),
                  "detections": int(sum((d.class_ids == k).sum() for d in dets))}
        q = precision[:, :, k]
        if (q < 0).any():  # -1: no truth box to recall for this class
            ap = {"ap_50_95": None, "ap_50": None, "ap_75": None}
        else:
            ap = {"ap_50_95": float(q.mean()), "ap_50": float(q[t50].mean()),
                  "ap_75": float(q[t75].mean())}
        per_class[str(name)] = {**ap, **counts}
    rows = list(per_class.values())
    return {
        "map_50_95": _mean_or_none([r["ap_50_95"] for r in rows]),
        "map_50": _mean_or_none([r["ap_50"] for r in rows]),
        "map_75": _mean_or_none([r["ap_75"] for r in rows]),
        "per_class": per_class,
        "images": len(gts),
        "instances": int(sum(r["instances"] for r in rows)),
        "difficult": int(sum(r["difficult"] for r in rows)),
        "detections": int(sum(r["detections"] for r in rows)),
        "max_detections": int(max_detections),
    }


def _concat(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


def pr_curves(truths: Sequence[Mapping], predictions: Sequence[Mapping],
              class_names: Sequence[str], *, iou_threshold: float = 0.5,
              max_detections: int = 100) -> PRCurves:
    """Match predictions to truth at ``iou_threshold`` (rules in the module docstring) and
    return precision/recall/F1 per confidence threshold, pooled and per class, plus each
    class's COCO-interpolated PR curve and AP. Raises DataError when there is no truth box."""
    num_classes = len(class_names)
    gts, dets = _parse(truths, predictions, num_classes)
    _require_boxes(gts)
    cls, score, status, image, position = [], [], [], [], []
    for i, (gt, det) in enumerate(zip(gts, dets, strict=True)):
        for k in np.unique(det.class_ids):
            keep = _kept(det, int(k), max_detections)
            mine = gt.class_ids == k
            status.append(match_detections(det.boxes[keep], gt.boxes[mine], gt.difficult[mine],
                                           iou_threshold))
            cls.append(np.full(len(keep), k))
            score.append(det.scores[keep])
            image.append(np.full(len(keep), i))
            position.append(keep)
    cls, score = _concat(cls, np.int64), _concat(score, np.float64)
    status, image = _concat(status, np.int8), _concat(image, np.int64)
    position = _concat(position, np.int64)
    instances = np.array([sum(int(((g.class_ids == k) & ~g.difficult).sum()) for g in gts)
                          for k in range(num_classes)], np.int64)

    counted = status != IGNORED
    confidence = np.unique(score[counted])[::-1]
    tp, fp = counts_at(score[counted], status[counted] == TP, confidence)
    precision, recall, f1 = precision_recall_f1(tp, fp, int(instances.sum()))
    class_prf = np.full((3, num_classes, len(confidence)), np.nan)
    interpolated = np.full((num_classes, len(RECALL_POINTS)), np.nan)
    for k in range(num_classes):
        mine = counted & (cls == k)
        tp, fp = counts_at(score[mine], status[mine] == TP, confidence)
        class_prf[:, k] = precision_recall_f1(tp, fp, int(instances[k]))
        if instances[k]:
            ranked = np.flatnonzero(cls == k)  # COCO's order: score, then image, then input
            ranked = ranked[np.lexsort((position[ranked], image[ranked], -score[ranked]))]
            interpolated[k] = coco_interpolated_precision(status[ranked] == TP,
                                                          status[ranked] == FP,
                                                          int(instances[k]))
    return PRCurves(class_names=tuple(str(n) for n in class_names),
                    iou_threshold=float(iou_threshold), confidence=confidence,
                    precision=precision, recall=recall, f1=f1,
                    class_precision=class_prf[0], class_recall=class_prf[1],
                    class_f1=class_prf[2], instances=instances,
                    class_interpolated_precision=interpolated,
                    class_ap=interpolated.mean(axis=1))


def _num(x: float) -> float | None:
    return None if not np.isfinite(x) else float(x)


def detection_metrics(truths: Sequence[Mapping], predictions: Sequence[Mapping],
                      class_names: Sequence[str], *, max_detections: int = 100) -> dict:
    """The detection evaluation (the one entry point for a metrics JSON).

    :func:`coco_metrics`' fields plus, at IoU 0.5, ``confidence`` (the score threshold that
    maximises the pooled F1; None when nothing was predicted), and ``precision``, ``recall``
    and ``f1`` there; each ``per_class`` entry gains ``precision`` and ``recall`` at that
    same threshold (None where undefined: nothing of the class kept, or no truth box). All
    values are plain floats, ints or None, ready for JSON. For the figures, call
    :func:`pr_curves` with the same arguments.
    """
    result = coco_metrics(truths, predictions, class_names, max_detections=max_detections)
    curves = pr_curves(truths, predictions, class_names, max_detections=max_detections)
    best, i = curves.best(), curves.best_index
    for k, name in enumerate(curves.class_names):
        row = result["per_class"][name]
        if i is None:
            row["precision"] = None
            row["recall"] = 0.0 if curves.instances[k] else None
        else:
            row["precision"] = _num(curves.class_precision[k, i])
            row["recall"] = _num(curves.class_recall[k, i])
    return {**result, **best}
