"""One-vs-rest precision-recall and F1-confidence curves for classification and segmentation.

Each of N items (a test image, or a sampled pixel) with softmax scores (N, K) is read as K
predictions, one per class: "class k, with confidence ``scores[i, k]``". That prediction is a
true positive (TP) when the item's true class is k and a false positive (FP) otherwise; every
item is one truth instance of its own class. Nothing is ignored and nothing is matched by
overlap, so the result is a :class:`~visionpipe.tasks.pr_curves.PRCurves` like detection's,
with ``iou_threshold`` None, drawn by the same
:func:`~visionpipe.tasks.pr_curves.pr_curve_png` and
:func:`~visionpipe.tasks.pr_curves.f1_confidence_png`.

The conventions are those of :func:`~visionpipe.tasks.detection_metrics.pr_curves`:

* per class, the ranking for AP is by descending score, ties in item order, and the AP is
  COCO's 101-point interpolated precision (its row in ``class_interpolated_precision``
  averaged); a class with no true item has AP NaN (and NaN recall and F1);
* the "all classes" arrays pool TP, FP and truth over classes (a micro average; the truth
  count is N). Keeping every score (the lowest threshold) gives recall 1 and precision 1/K;
* entry t of the curves describes keeping the predictions with score >= ``confidence[t]``.

``confidence`` holds the distinct scores, highest first, up to ``max_thresholds`` of them (by
default enough that the (K, T) per-class arrays stay near 4 million entries each). Beyond that
it keeps a subset of the distinct scores: the highest and the lowest, evenly spaced ranks, and
for each point of the F1 figure's confidence axis the lowest score at or above it, so the F1
figure is the same as with every score; each kept entry's values are still exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from visionpipe.errors import DataError
from visionpipe.tasks.pr_curves import (
    RECALL_POINTS,
    PRCurves,
    coco_interpolated_precision,
    f1_confidence_png,
    pr_curve_png,
    precision_recall_f1,
)

CURVE_ENTRIES = 4_000_000  # default cap on K x T, the size of each per-class array
MIN_THRESHOLDS = 5000  # the automatic cap never goes below this many thresholds
PLOT_POINTS = 1001  # points on f1_confidence_png's confidence axis


def _checked(y_true: np.ndarray, scores: np.ndarray, num_classes: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """int64 (N,) labels and float64 (N, K) scores; DataError on anything malformed."""
    try:
        scores = np.asarray(scores, np.float64)
        labels = np.asarray(y_true, np.float64)
    except (TypeError, ValueError) as err:
        raise DataError(f"labels and scores must be numeric: {err}") from None
    if num_classes < 1:
        raise DataError("one-vs-rest curves need at least one class name")
    if scores.ndim != 2 or scores.shape[1] != num_classes:
        raise DataError(f"scores have shape {scores.shape}; expected (items, {num_classes}), "
                        "one column per class name")
    if labels.ndim != 1 or len(labels) != len(scores):
        raise DataError(f"labels have shape {labels.shape}; expected ({len(scores)},), one "
                        "per row of scores")
    if len(labels) == 0:
        raise DataError("no test items: precision-recall curves are undefined")
    if not np.isfinite(scores).all():
        raise DataError("scores hold NaN or infinite values")
    if (np.any(labels != np.round(labels)) or labels.min() < 0
            or labels.max() >= num_classes):
        raise DataError(f"labels must be integers in 0..{num_classes - 1}, got values from "
                        f"{labels.min():g} to {labels.max():g}")
    return labels.astype(np.int64), scores


def _threshold_grid(scores: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct scores, highest first, at most ``limit`` (>= 2 * PLOT_POINTS) of them, chosen
    as the module docstring says when there are more; and for each score the index of the
    first (highest) threshold that keeps it (score >= threshold), len(grid) when none does."""
    distinct, inverse = np.unique(scores, return_inverse=True)  # ascending
    if len(distinct) <= limit:
        return distinct[::-1], len(distinct) - 1 - inverse.reshape(scores.shape)
    ranks = np.linspace(0, len(distinct) - 1, max(2, limit - PLOT_POINTS)).round()
    low, top = min(0.0, float(distinct[0])), max(1.0, float(distinct[-1]))
    axis = np.linspace(low, top, PLOT_POINTS)
    at_or_above = np.searchsorted(distinct, axis, side="left")
    keep = np.concatenate([ranks.astype(np.int64), at_or_above[at_or_above < len(distinct)]])
    grid = distinct[np.unique(keep)][::-1]
    return grid, np.searchsorted(-grid, -scores, side="left")


def _class_counts(first: np.ndarray, y_true: np.ndarray, thresholds: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """TP and FP counts (K, T) of each class's predictions kept at each threshold, from the
    index of the first threshold keeping each score (N, K): binned, then summed cumulatively,
    all classes in one pass."""
    n, num_classes = first.shape
    width = thresholds + 1  # the last bin: below every threshold, never kept
    first = first + np.arange(num_classes) * width
    kept = np.bincount(first.ravel(), minlength=num_classes * width)
    tp = np.bincount(first[np.arange(n), y_true], minlength=num_classes * width)
    kept = kept.reshape(num_classes, width)[:, :-1].cumsum(axis=1)
    tp = tp.reshape(num_classes, width)[:, :-1].cumsum(axis=1)
    return tp, kept - tp


def one_vs_rest_curves(y_true: np.ndarray, scores: np.ndarray, class_names: Sequence[str], *,
                       max_thresholds: int | None = None) -> PRCurves:
    """Precision/recall/F1 per confidence threshold, pooled and per class, and each class's
    COCO-interpolated PR curve and AP, with every item a prediction of every class (module
    docstring). ``y_true`` int (N,) class ids, ``scores`` float (N, K) (softmax
    probabilities), ``class_names[k]`` is class k. ``max_thresholds`` caps the length of
    ``confidence`` (default: max(5000, 4,000,000 // K); never below 2002). Raises DataError
    on malformed input or N = 0."""
    num_classes = len(class_names)
    y_true, scores = _checked(y_true, scores, num_classes)
    if max_thresholds is None:
        max_thresholds = max(MIN_THRESHOLDS, CURVE_ENTRIES // num_classes)
    max_thresholds = max(int(max_thresholds), 2 * PLOT_POINTS)
    is_tp = y_true[:, None] == np.arange(num_classes)[None, :]  # (N, K)
    instances = np.bincount(y_true, minlength=num_classes).astype(np.int64)

    confidence, first = _threshold_grid(scores, max_thresholds)
    tp, fp = _class_counts(first, y_true, len(confidence))  # (K, T) each
    precision, recall, f1 = precision_recall_f1(tp.sum(axis=0), fp.sum(axis=0),
                                                int(instances.sum()))
    class_prf = np.full((3, num_classes, len(confidence)), np.nan)
    interpolated = np.full((num_classes, len(RECALL_POINTS)), np.nan)
    order = np.argsort(-scores, axis=0, kind="stable")  # per class: score, then item order
    for k in range(num_classes):
        class_prf[:, k] = precision_recall_f1(tp[k], fp[k], int(instances[k]))
        if instances[k]:
            ranked = is_tp[order[:, k], k]
            interpolated[k] = coco_interpolated_precision(ranked, ~ranked, int(instances[k]))
    return PRCurves(class_names=tuple(str(n) for n in class_names), iou_threshold=None,
                    confidence=confidence, precision=precision, recall=recall, f1=f1,
                    class_precision=class_prf[0], class_recall=class_prf[1],
                    class_f1=class_prf[2], instances=instances,
                    class_interpolated_precision=interpolated,
                    class_ap=interpolated.mean(axis=1))


def one_vs_rest_pngs(y_true: np.ndarray, scores: np.ndarray, class_names: Sequence[str],
                     out_dir, what: str) -> list:
    """``pr_curve.png`` and ``f1_curve.png`` in ``out_dir`` from :func:`one_vs_rest_curves`;
    ``what`` says in the titles what was counted (e.g. "one-vs-rest, 500 test images")."""
    from pathlib import Path

    curves = one_vs_rest_curves(y_true, scores, class_names)
    out_dir = Path(out_dir)
    return [pr_curve_png(curves, out_dir / "pr_curve.png",
                         title=f"Precision-Recall curve ({what})"),
            f1_confidence_png(curves, out_dir / "f1_curve.png",
                              title=f"F1-confidence curve ({what})")]
