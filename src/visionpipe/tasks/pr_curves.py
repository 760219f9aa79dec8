"""Precision-recall and F1-confidence curves, shared by every task.

Detection counts a prediction by matching boxes at an IoU threshold
(:func:`visionpipe.tasks.detection_metrics.pr_curves`); classification and segmentation read
each image or pixel as one prediction per class (:func:`visionpipe.tasks.curves.
one_vs_rest_curves`). Both give a :class:`PRCurves`, drawn by :func:`pr_curve_png` and
:func:`f1_confidence_png`, with COCO's 101-point interpolated precision for AP.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from visionpipe.plots import save_figure

RECALL_POINTS = np.linspace(0.0, 1.0, 101)  # COCO's recall thresholds


@dataclass(frozen=True)
class PRCurves:
    """Precision, recall and F1 per confidence threshold at one IoU threshold.

    ``iou_threshold`` is None for one-vs-rest curves of classification and segmentation
    (:func:`visionpipe.tasks.curves.one_vs_rest_curves`), where nothing is matched by overlap.
    ``confidence`` holds the distinct scores of the counted (not ignored) predictions, highest
    first; entry t describes keeping the predictions with score >= ``confidence[t]``. Pooled
    arrays (T,) sum TP/FP/truth over classes; ``class_*`` arrays are (K, T). Precision is NaN
    where nothing is kept, recall and F1 NaN for a class without truth boxes.
    ``class_interpolated_precision`` (K, 101) is COCO's interpolated precision at
    ``RECALL_POINTS``; its row mean is ``class_ap`` (NaN without truth boxes).
    """

    class_names: tuple[str, ...]
    iou_threshold: float | None
    confidence: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    class_precision: np.ndarray
    class_recall: np.ndarray
    class_f1: np.ndarray
    instances: np.ndarray
    class_interpolated_precision: np.ndarray
    class_ap: np.ndarray

    @property
    def best_index(self) -> int | None:
        """Index of the threshold with the highest pooled F1 (the highest such confidence on
        a tie); None when no prediction counts."""
        return int(np.argmax(self.f1)) if len(self.f1) else None

    def best(self) -> dict:
        """``confidence``, ``precision``, ``recall``, ``f1`` at the pooled-F1 maximum. With no
        counted prediction: confidence None and 0 for the rest (as ultralytics reports)."""
        i = self.best_index
        if i is None:
            return {"confidence": None, "precision": 0.0, "recall": 0.0, "f1": 0.0}
        return {"confidence": float(self.confidence[i]), "precision": float(self.precision[i]),
                "recall": float(self.recall[i]), "f1": float(self.f1[i])}


def counts_at(scores: np.ndarray, is_tp: np.ndarray, confidence: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """TP and FP counts among the predictions with score >= each confidence."""
    order = np.argsort(-scores, kind="stable")
    cum_tp = np.concatenate([[0], np.cumsum(is_tp[order])])
    kept = np.searchsorted(-scores[order], -confidence, side="right")
    return cum_tp[kept], kept - cum_tp[kept]


def precision_recall_f1(tp: np.ndarray, fp: np.ndarray, n_truth: int
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 from TP and FP counts and the number of truth instances
    (precision NaN where nothing is kept; recall and F1 NaN without truth)."""
    tp, fp = tp.astype(np.float64), fp.astype(np.float64)
    nan = np.full_like(tp, np.nan)
    precision = np.divide(tp, tp + fp, out=nan.copy(), where=(tp + fp) > 0)
    if n_truth == 0:
        return precision, nan.copy(), nan.copy()
    return precision, tp / n_truth, 2 * tp / (tp + fp + n_truth)  # F1 = 2TP/(2TP+FP+FN)


def coco_interpolated_precision(is_tp: np.ndarray, is_fp: np.ndarray, n_truth: int
                                ) -> np.ndarray:
    """COCO's precision at recall 0, 0.01, ..., 1 for predictions in ranked order.

    Precision at each rank is made non-increasing from the right (the best precision at this
    recall or beyond); a recall point the ranking never reaches gets 0. The mean is the AP.
    """
    tp = np.cumsum(is_tp, dtype=np.float64)
    fp = np.cumsum(is_fp, dtype=np.float64)
    if len(tp) == 0:
        return np.zeros(len(RECALL_POINTS))
    recall = tp / n_truth
    precision = np.maximum.accumulate((tp / (tp + fp + np.spacing(1)))[::-1])[::-1]
    idx = np.searchsorted(recall, RECALL_POINTS, side="left")
    return np.where(idx < len(tp), precision[np.minimum(idx, len(tp) - 1)], 0.0)


def _legend(ax, count: int) -> None:
    if count <= 20:  # beyond that the legend hides the plot
        ax.legend(bbox_to_anchor=(1.04, 1), loc="upper left", fontsize=8)


def pr_curve_png(curves: PRCurves, path: Path, *, title: str = "Precision-Recall curve"
                 ) -> Path:
    """Interpolated precision vs recall per class (AP in the legend) and the class mean
    ("all classes", labelled with mAP at the curves' IoU threshold, if they have one), written
    atomically."""
    fig, ax = plt.subplots(figsize=(9, 6))
    has_truth = curves.instances > 0
    many = len(curves.class_names) > 20
    for k, name in enumerate(curves.class_names):
        if has_truth[k]:
            ax.plot(RECALL_POINTS, curves.class_interpolated_precision[k], linewidth=1,
                    color="grey" if many else None,
                    label=None if many else f"{name} {curves.class_ap[k]:.3f}")
    mean = curves.class_interpolated_precision[has_truth].mean(axis=0)
    at = "" if curves.iou_threshold is None else f"@{curves.iou_threshold:g}"
    ax.plot(RECALL_POINTS, mean, linewidth=3, color="blue",
            label=f"all classes {mean.mean():.3f} mAP{at}")
    ax.set_xlabel("Recall")
    ax.set_ylabel("Precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend(ax, 1 if many else int(has_truth.sum()) + 1)
    return save_figure(fig, path)


def _step(confidence: np.ndarray, values: np.ndarray, grid: np.ndarray, empty: float
          ) -> np.ndarray:
    """Values of a per-threshold curve at any confidence: those of the lowest threshold that
    is >= it (what keeping score >= grid point gives), ``empty`` above the top score."""
    kept = np.searchsorted(-confidence, -grid, side="right")
    out = np.full(len(grid), empty, np.float64)
    out[kept > 0] = values[kept[kept > 0] - 1]
    return out


def f1_confidence_png(curves: PRCurves, path: Path, *, title: str | None = None) -> Path:
    """F1 vs confidence threshold per class and for all classes pooled, with the threshold
    of the best pooled F1 marked, written atomically. The default title names the curves' IoU
    threshold, if they have one."""
    fig, ax = plt.subplots(figsize=(9, 6))
    top = max(1.0, float(curves.confidence.max())) if len(curves.confidence) else 1.0
    low = min(0.0, float(curves.confidence.min())) if len(curves.confidence) else 0.0
    grid = np.linspace(low, top, 1001)
    many = len(curves.class_names) > 20
    for k, name in enumerate(curves.class_names):
        if curves.instances[k]:
            ax.plot(grid, _step(curves.confidence, curves.class_f1[k], grid, 0.0), linewidth=1,
                    color="grey" if many else None, label=None if many else name)
    best = curves.best()
    if best["confidence"] is None:
        label = "all classes: no predictions"
    else:
        label = f"all classes {best['f1']:.2f} at {best['confidence']:.3f}"
    ax.plot(grid, _step(curves.confidence, curves.f1, grid, 0.0), linewidth=3, color="blue",
            label=label)
    if best["confidence"] is not None:
        ax.axvline(best["confidence"], color="blue", linestyle="--", linewidth=1)
        ax.plot([best["confidence"]], [best["f1"]], marker="o", markersize=8, color="red",
                label=f"best: precision {best['precision']:.2f}, recall {best['recall']:.2f}")
    ax.set_xlabel("Confidence threshold")
    ax.set_ylabel("F1")
    ax.set_xlim(low, top)
    ax.set_ylim(0, 1.02)
    if title is None:
        title = ("F1-confidence curve" if curves.iou_threshold is None
                 else f"F1-confidence curve (IoU {curves.iou_threshold:g})")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend(ax, 2 if many else int((curves.instances > 0).sum()) + 2)
    return save_figure(fig, path)
