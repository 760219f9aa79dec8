"""Semantic segmentation: one class per pixel; losses, metrics, tiled inference and plots.

Masks hold class ids 0..K-1 (``class_names[k]`` is id k). Models output per-pixel softmax
scores of shape (batch, H, W, K). Test images larger than the model's input are predicted by
a sliding window of overlapping tiles (:func:`sliding_window`).
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from visionpipe import batches
from visionpipe.config import EvaluateConfig, TrainConfig
from visionpipe.geometry import fit_images
from visionpipe.tasks.base import Task, scores_serving
from visionpipe.tiling import sliding_window, tile_starts, tile_weights

EPS = 1e-7
CONFUSION_ROWS = 5000  # pixels sampled for the `dvc plots` confusion rows
CURVE_PIXELS = 20000  # pixels sampled (seed CURVE_SEED) for the PR and F1 curves
CURVE_SEED = 0


class SegmentationLoss(keras.losses.Loss):
    """Per-pixel cross-entropy, soft Dice, or their sum, with optional class weights.

    ``y_true``: class ids (batch, H, W); ``y_pred``: softmax scores (batch, H, W, K). Dice is
    computed per image and class (smoothed by 1 so a class absent from both counts as a
    match), then averaged over classes with the class weights.
    """

    def __init__(self, kind: str, num_classes: int, class_weights=None,
                 name: str = "segmentation_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.kind, self.num_classes = kind, int(num_classes)
        self.class_weights = None if class_weights is None else [float(w) for w in
                                                                 class_weights]

    def call(self, y_true, y_pred):
        y_pred = ops.cast(y_pred, "float32")
        onehot = ops.one_hot(ops.cast(y_true, "int32"), self.num_classes)
        weights = ops.convert_to_tensor(self.class_weights or [1.0] * self.num_classes,
                                        "float32")
        total = 0.0
        if self.kind in ("cross_entropy", "ce_dice"):
            log_p = ops.log(ops.clip(y_pred, EPS, 1.0))
            pixel = -ops.sum(onehot * log_p * weights, axis=-1)
            total = total + ops.mean(pixel, axis=(1, 2))
        if self.kind in ("dice", "ce_dice"):
            inter = ops.sum(onehot * y_pred, axis=(1, 2))
            denom = ops.sum(onehot, axis=(1, 2)) + ops.sum(y_pred, axis=(1, 2))
            dice = (2.0 * inter + 1.0) / (denom + 1.0)
            total = total + 1.0 - ops.sum(dice * weights, axis=-1) / ops.sum(weights)
        return total

    def get_config(self):
        return {**super().get_config(), "kind": self.kind, "num_classes": self.num_classes,
                "class_weights": self.class_weights}


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixel counts[true, predicted] over any number of masks."""
    idx = np.asarray(y_true, np.int64).ravel() * num_classes + np.asarray(y_pred,
                                                                          np.int64).ravel()
    return np.bincount(idx, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def scores_from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class IoU, Dice (= pixel F1), precision and recall; NaN where undefined."""
    cm = cm.astype(np.float64)
    tp = np.diag(cm)
    fp, fn = cm.sum(axis=0) - tp, cm.sum(axis=1) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"iou": tp / (tp + fp + fn), "dice": 2 * tp / (2 * tp + fp + fn),
                "precision": tp / (tp + fp), "recall": tp / (tp + fn)}


def mean_iou(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """IoU averaged over the classes present in the truth or the prediction."""
    iou = scores_from_confusion(confusion(y_true, y_pred, num_classes))["iou"]
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else 1.0


def _num(x: float) -> float | None:
    return None if not np.isfinite(x) else float(x)


def segmentation_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: list[str]) -> dict:
    """Pixel accuracy, per-class IoU/Dice/precision/recall, mean IoU and Dice over the classes
    that occur (in truth or prediction), pixel cross-entropy, and a majority-class baseline."""
    y_true = np.asarray(y_true, np.int64)
    n = len(class_names)
    y_pred = probs.argmax(axis=-1)
    cm = confusion(y_true, y_pred, n)
    s = scores_from_confusion(cm)
    support = cm.sum(axis=1)
    true_p = np.take_along_axis(probs, y_true[..., None], axis=-1)
    loss = float(-np.mean(np.log(np.clip(true_p, EPS, 1.0))))
    majority = int(support.argmax())
    base = confusion(y_true, np.full_like(y_true, majority), n)
    base_iou = scores_from_confusion(base)["iou"]
    return {
        "pixel_accuracy": float(np.trace(cm) / cm.sum()),
        "mean_iou": float(np.nanmean(s["iou"])),
        "mean_dice": float(np.nanmean(s["dice"])),
        "loss": loss,
        "per_class": {name: {"iou": _num(s["iou"][i]), "dice": _num(s["dice"][i]),
                             "f1": _num(s["dice"][i]), "precision": _num(s["precision"][i]),
                             "recall": _num(s["recall"][i]), "support": int(support[i])}
                      for i, name in enumerate(class_names)},
        "baseline": {"name": "majority_class", "class": class_names[majority],
                     "accuracy": float(np.trace(base) / base.sum()),
                     "mean_iou": float(np.nanmean(base_iou))},
        "num_test_images": len(y_true),
        "num_test_pixels": int(cm.sum()),
    }


def tiled_scores(model, tile: tuple[int, int], scale: tuple[int, int], overlap: float):
    """A graph function: float images (N, *scale, 3) -> scores (N, *scale, K) from the model's
    ``tile``-sized outputs on overlapping tiles, blended with :func:`tile_weights` (the graph
    twin of :func:`visionpipe.tiling.sliding_window`; the tile grid is fixed by ``scale``)."""
    th, tw = (int(d) for d in tile)
    H, W = (int(d) for d in scale)
    if th > H or tw > W:
        raise ValueError(f"tiles of {th}x{tw} do not fit images of {H}x{W}")
    spots = [(y, x) for y in tile_starts(H, th, overlap) for x in tile_starts(W, tw, overlap)]
    weight = tile_weights((th, tw)).astype(np.float32)
    norm = np.zeros((H, W, 1), np.float32)
    for y, x in spots:
        norm[y:y + th, x:x + tw] += weight

    def fn(images):
        n = tf.shape(images)[0]
        batch = tf.concat([images[:, y:y + th, x:x + tw] for y, x in spots], axis=0)
        scores = tf.cast(model(batch, training=False), tf.float32)
        total = 0.0
        for i, (y, x) in enumerate(spots):
            part = scores[i * n:(i + 1) * n] * weight
            total += tf.pad(part, [[0, 0], [y, H - y - th], [x, W - x - tw], [0, 0]])
        return total / norm

    return fn


def pixel_sample(y_true: np.ndarray, scores: np.ndarray, limit: int = CURVE_PIXELS,
                 seed: int = CURVE_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Class ids (n,) and scores (n, K) of at most ``limit`` pixels of masks (N, H, W) and
    scores (N, H, W, K): every pixel when there are no more than ``limit``, otherwise a
    uniform sample without replacement drawn with ``seed`` (the same pixels on every run
    over the same test split), in raster order."""
    labels = np.asarray(y_true).reshape(-1)
    scores = np.asarray(scores).reshape(-1, np.shape(scores)[-1])
    if labels.size > limit:
        idx = np.sort(np.random.default_rng(seed).choice(labels.size, limit, replace=False))
        labels, scores = labels[idx], scores[idx]
    return labels, scores


def gallery_tile(image: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """image | ground truth | prediction, side by side, masks drawn over the image."""
    from visionpipe.drawing import overlay

    image = np.clip(image, 0, 255).astype(np.uint8)
    gap = np.full((image.shape[0], 2, 3), 255, np.uint8)
    return np.concatenate([image, gap, overlay(image, truth.astype(np.uint8)), gap,
                           overlay(image, pred.astype(np.uint8))], axis=1)


class SegmentationTask(Task):
    """Per-pixel softmax over classes; masks stay class ids (sparse) through the pipeline."""

    name = "segmentation"
    headline_metrics = ("mean_iou", "mean_dice")
    agreement_key = "mask_iou"
    predicts_folders = True
    served_outputs = {"scores": "float32 [batch, H, W, classes], softmax per pixel, at the "
                                "model's size (trained on crops: at prepare's image_size, "
                                "tiled)",
                      "mask": "int32 [batch, height, width], class id per pixel at the input "
                              "image's own size"}

    def to_model_io(self, num_classes: int):
        """Map a parsed record to (float image in 0..255, int32 class-id mask)."""

        def fn(rec):
            return tf.cast(rec["image"], tf.float32), tf.cast(rec["mask"], tf.int32)

        return fn

    def loss(self, cfg: TrainConfig, num_classes: int) -> keras.losses.Loss:
        """cross_entropy, dice or ce_dice from params, with class weights if given."""
        return SegmentationLoss(cfg.loss, num_classes, cfg.class_weights)

    def metrics(self, num_classes: int) -> list:
        """Pixel accuracy and mean IoU, reported every epoch by fit."""
        return [keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
                keras.metrics.MeanIoU(num_classes, sparse_y_true=True, sparse_y_pred=False,
                                      name="mean_iou")]

    def predict(self, model: keras.Model, images: np.ndarray, batch_size: int,
                overlap: float) -> np.ndarray:
        """Scores per pixel; images larger than the model's input go through tiles."""
        size = tuple(int(d) for d in model.inputs[0].shape[1:3])
        if tuple(images.shape[1:3]) == size:
            return batches.predict(model, images, batch_size)
        fn = tf.function(lambda x: model(x, training=False))
        return np.stack([sliding_window(lambda b: fn(b).numpy(), image, size, overlap,
                                        batch_size) for image in images])

    def evaluate(self, y_true: np.ndarray, outputs: np.ndarray, class_names: list[str],
                 cfg: EvaluateConfig) -> dict:
        """Test metrics from per-pixel scores."""
        return segmentation_metrics(y_true, outputs, class_names)

    def targets(self, rec: dict) -> np.ndarray:
        """The ground-truth mask of one parsed numpy record."""
        return np.asarray(rec["mask"], np.uint8)

    def agreement(self, reference: np.ndarray, other: np.ndarray) -> dict:
        """Another runtime's masks against the Keras model's: share of equal pixels, and mean
        IoU between the two masks (classes present in either)."""
        a, b = reference.argmax(-1), other.argmax(-1)
        return {"pixel_agreement": float((a == b).mean()),
                "mask_iou": mean_iou(a, b, reference.shape[-1])}

    def serving_function(self, model, size, policy: str, class_names, scale=None,
                         overlap: float = 0.25):
        """Scores at the scale the model was trained on, and the mask at the input image's own
        size (scores resized bilinearly, then the best class per pixel). A model trained on
        crops (``scale``: prepare's image_size, larger than the model's ``size``) sees the
        image resized to ``scale`` and cut into overlapping tiles blended as evaluate blends
        them (:mod:`visionpipe.tiling`); otherwise the image is resized to ``size``."""

        def outputs(scores, images):
            full = tf.image.resize(scores, tf.shape(images)[1:3], method="bilinear")
            return {"scores": scores, "mask": tf.argmax(full, axis=-1, output_type=tf.int32)}

        scale = tuple(int(d) for d in (scale or size))
        if scale == tuple(size):
            return scores_serving(model, size, policy, outputs)
        tiled = tiled_scores(model, size, scale, overlap)

        def serve(images):
            return outputs(tiled(fit_images(images, scale, policy)), images)

        return serve

    def plots(self, images: np.ndarray, ids: list[str], y_true: np.ndarray,
              outputs: np.ndarray, class_names: list[str], out_dir: Path,
              cfg: EvaluateConfig) -> list[Path]:
        """Pixel confusion matrix (PNG, and sampled rows for `dvc plots`), a gallery of the
        test images with the lowest mean IoU: image | ground truth | prediction, and the
        one-vs-rest precision-recall (``pr_curve.png``) and F1-confidence (``f1_curve.png``)
        curves per class over at most CURVE_PIXELS pixels (:func:`pixel_sample`)."""
        from visionpipe.data.records import write_json
        from visionpipe.plots import confusion_png, labelled_gallery_png
        from visionpipe.tasks.curves import one_vs_rest_pngs

        n = len(class_names)
        y_pred = outputs.argmax(-1)
        cm = confusion(y_true, y_pred, n)
        png = confusion_png(cm, class_names, out_dir / "confusion.png")
        # `dvc plots` counts rows: a regular sample of pixels, not all of them.
        flat_t, flat_p = np.asarray(y_true).ravel(), y_pred.ravel()
        step = max(1, int(np.ceil(flat_t.size / CONFUSION_ROWS)))
        write_json(out_dir / "confusion.json",
                   [{"actual": class_names[t], "predicted": class_names[p]}
                    for t, p in zip(flat_t[::step].tolist(), flat_p[::step].tolist(),
                                    strict=True)])
        per_image = np.array([mean_iou(t, p, n) for t, p in zip(y_true, y_pred, strict=True)])
        worst = np.argsort(per_image, kind="stable")[:cfg.gallery]
        tiles = [gallery_tile(images[i], y_true[i], y_pred[i]) for i in worst]
        wrong = (np.asarray(y_true) != y_pred).sum(axis=(1, 2))
        captions = [f"{ids[i]}: IoU {per_image[i]:.3f}, {wrong[i]} px wrong\n"
                    "image | truth | prediction" for i in worst]
        gallery = labelled_gallery_png(tiles, captions, out_dir / "misclassified.png",
                                       columns=2, empty="no test images")
        labels, scores = pixel_sample(y_true, outputs)
        curves = one_vs_rest_pngs(labels, scores, class_names, out_dir,
                                  f"one-vs-rest, {len(labels):,} of {np.size(y_true):,} "
                                  "test pixels")
        return [png, out_dir / "confusion.json", gallery, *curves]
