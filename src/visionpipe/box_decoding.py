"""A YOLOv8 detector's raw head decoded in NumPy: boxes, classes, scores, then NMS.

The TFLite and ONNX exports of a detector (and the SavedModel's ``serving_fixed_size``
signature) return the raw head: per image ``(anchors, 64 + classes)``, 64 box channels (four
sides, each a distribution over 16 bins in units of the anchor's stride) then one sigmoid
score per class. This module turns that into boxes the way keras-cv's ``YOLOV8Detector``
``decode_predictions`` and ``NonMaxSuppression`` do (class-agnostic NMS on the best class
score), so any runtime's output decodes to the same detections without TensorFlow or Keras.
It imports NumPy only: `visionpipe predict` uses it where only the export folder was pulled.
"""

from __future__ import annotations

import numpy as np

BINS = 16  # bins per box side (keras-cv's BOX_REGRESSION_CHANNELS // 4)
# What export.json records under "decoder" for a detector's raw head.
DECODER = {"kind": "yolov8_dfl", "box_channels": 4 * BINS, "strides": [8, 16, 32]}


def check_decoder(decoder: dict | None) -> dict:
    """The decoder description of an export (``DECODER`` when absent); other kinds are
    refused with a message saying what to do."""
    if decoder is None:
        return DECODER
    if not isinstance(decoder, dict) or decoder.get("kind") != DECODER["kind"]:
        kind = decoder.get("kind") if isinstance(decoder, dict) else decoder
        raise ValueError(f"export.json decoder {kind!r} is not one this visionpipe decodes "
                         f"({DECODER['kind']!r}); re-export with `dvc repro export@<model>`")
    return {**DECODER, **decoder}


def anchors(size: tuple[int, int], strides=(8, 16, 32)) -> tuple[np.ndarray, np.ndarray]:
    """Anchor centres (A, 2) as x, y in units of their stride, and each anchor's stride (A,),
    in the head's order: stride by stride, row by row (keras-cv's ``get_anchors``)."""
    points, steps = [], []
    for stride in strides:
        rows = len(range(0, int(size[0]), stride))
        cols = len(range(0, int(size[1]), stride))
        ys, xs = np.meshgrid(np.arange(rows, dtype=np.float32) + 0.5,
                             np.arange(cols, dtype=np.float32) + 0.5, indexing="ij")
        points.append(np.stack([xs.ravel(), ys.ravel()], axis=-1))
        steps.append(np.full(rows * cols, stride, np.float32))
    return np.concatenate(points), np.concatenate(steps)


def boxes_from_raw(raw: np.ndarray, size: tuple[int, int], decoder: dict | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (N, A, 4) xyxy in input pixels and class scores (N, A, K) of raw head outputs
    (N, A, box_channels + K)."""
    decoder = check_decoder(decoder)
    raw = np.asarray(raw, np.float32)
    channels = int(decoder["box_channels"])
    points, steps = anchors(size, decoder["strides"])
    if raw.ndim != 3 or raw.shape[1] != len(points) or raw.shape[2] <= channels:
        raise ValueError(f"raw head of shape {raw.shape} does not fit a {size[0]}x{size[1]} "
                         f"input ({len(points)} anchors, {channels} box channels + classes "
                         "expected)")
    logits = raw[..., :channels].reshape(*raw.shape[:2], 4, channels // 4)
    logits = logits - logits.max(axis=-1, keepdims=True)
    weights = np.exp(logits)
    weights /= weights.sum(axis=-1, keepdims=True)
    sides = weights @ np.arange(channels // 4, dtype=np.float32)  # left, top, right, bottom
    boxes = np.concatenate([points - sides[..., :2], points + sides[..., 2:]], axis=-1)
    return boxes * steps[:, None], raw[..., channels:]


def box_iou_one(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box with each of ``others`` (n, 4); 0 where the union is empty."""
    x0, y0 = np.maximum(box[0], others[:, 0]), np.maximum(box[1], others[:, 1])
    x1, y1 = np.minimum(box[2], others[:, 2]), np.minimum(box[3], others[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, *, confidence: float, iou: float,
        max_detections: int) -> np.ndarray:
    """Indices kept by greedy NMS, best first: scores above ``confidence``; a box is dropped
    when its IoU with a kept one is ``iou`` or more (TensorFlow's padded NMS)."""
    candidates = np.flatnonzero(scores > confidence)
    order = candidates[np.argsort(-scores[candidates], kind="stable")]
    kept: list[int] = []
    while order.size and len(kept) < max_detections:
        best, order = order[0], order[1:]
        kept.append(int(best))
        if order.size:
            order = order[box_iou_one(boxes[best], boxes[order]) < iou]
    return np.asarray(kept, np.int64)


def decode_raw(raw: np.ndarray, size: tuple[int, int], *, confidence: float, iou: float,
               max_detections: int, decoder: dict | None = None) -> list[dict]:
    """Detections per image of raw head outputs (N, A, box_channels + K) of ``size`` inputs:
    ``boxes`` (n, 4) xyxy float32 in input pixels, ``class_ids`` (n,) int64 and ``scores``
    (n,) float32, best first."""
    boxes, classes = boxes_from_raw(raw, size, decoder)
    out = []
    for b, c in zip(boxes, classes, strict=True):
        best = c.max(axis=-1)
        keep = nms(b, best, confidence=confidence, iou=iou, max_detections=max_detections)
        out.append({"boxes": b[keep].astype(np.float32).reshape(-1, 4),
                    "class_ids": c[keep].argmax(axis=-1).astype(np.int64),
                    "scores": best[keep].astype(np.float32)})
    return out
