"""Object detection: boxes and their classes per image; training targets, evaluation, plots.

Records hold boxes as ``[x_min, y_min, x_max, y_max]`` in pixels with class ids (prepare).
The model sees them as keras-cv's dense format: per image ``boxes`` (n, 4) and ``classes``
(n,), padded with -1 to the most boxes of any image in the batch. Evaluation decodes the
detector's outputs with ``evaluate.nms`` and scores them with COCO mAP and precision/recall at
the F1-best confidence (:mod:`visionpipe.tasks.detection_metrics`).

The task knows no detector: a detection family registers a :class:`DetectorHooks` (its own
losses, box decoding and raw outputs; :class:`visionpipe.models.yolo.YOLOHooks`), and the
task reaches the model only through it.
"""

from __future__ import annotations

import abc
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from visionpipe import box_decoding
from visionpipe.config import EvaluateConfig
from visionpipe.geometry import boxes_to_input, fit_images
from visionpipe.tasks import detection_metrics as dm
from visionpipe.tasks.base import Task, judged
from visionpipe.tasks.pr_curves import f1_confidence_png, pr_curve_png

CONFUSION_IOU = 0.5  # a detection and a truth box of any class pair up at this IoU or more
PAD = -1.0  # keras-cv's marker of "no box"


def greedy_pairs(ious: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """(row, column) pairs of ``ious``, highest overlap first, each row and column used at
    most once, down to ``threshold`` (ties in index order)."""
    pairs, rows, cols = [], set(), set()
    for flat in np.argsort(-ious, axis=None, kind="stable"):
        r, c = (int(i) for i in np.unravel_index(flat, ious.shape))
        if ious[r, c] < threshold:
            break
        if r not in rows and c not in cols:
            rows.add(r)
            cols.add(c)
            pairs.append((r, c))
    return pairs


def confusion(truths: list[dict], predictions: list[dict], num_classes: int,
              confidence: float | None, iou: float = CONFUSION_IOU) -> np.ndarray:
    """Counts[true, predicted] over classes plus a last row/column for background.

    Per image, detections scoring at least ``confidence`` (none if it is None) pair up
    greedily with truth boxes of any class, highest IoU first, if their IoU is at least
    ``iou``: a pair counts at [true class, predicted class]. A truth box left over was missed
    (true class, background); a detection left over is a false alarm (background, predicted
    class). This is the matrix ultralytics draws; difficult boxes count like any other.
    """
    bg = num_classes
    cm = np.zeros((num_classes + 1, num_classes + 1), np.int64)
    for truth, pred in zip(truths, predictions, strict=True):
        t_cls = np.asarray(truth["class_ids"], np.int64)
        keep = (np.zeros(0, bool) if confidence is None
                else np.asarray(pred["scores"]) >= confidence)
        p_cls = np.asarray(pred["class_ids"], np.int64)[keep]
        p_box = np.asarray(pred["boxes"], np.float64).reshape(-1, 4)[keep]
        t_box = np.asarray(truth["boxes"], np.float64).reshape(-1, 4)
        t_used, p_used = np.zeros(len(t_cls), bool), np.zeros(len(p_cls), bool)
        if len(t_cls) and len(p_cls):
            for p, t in greedy_pairs(dm.box_iou(p_box, t_box), iou):
                p_used[p] = t_used[t] = True
                cm[t_cls[t], p_cls[p]] += 1
        np.add.at(cm, (t_cls[~t_used], bg), 1)
        np.add.at(cm, (bg, p_cls[~p_used]), 1)
    return cm


def errors_per_image(cm_rows: list[np.ndarray]) -> np.ndarray:
    """Misses + false alarms + wrong classes of each image's confusion matrix."""
    return np.array([int(m.sum() - np.trace(m[:-1, :-1])) for m in cm_rows], np.int64)


def detections_png(images: list[np.ndarray], truths: list[dict], predictions: list[dict],
                   captions: list[str], class_names: list[str], confidence: float | None,
                   path: Path, columns: int = 4) -> Path:
    """A gallery: ground-truth boxes dashed white, detections (score >= ``confidence``)
    solid in their class colour with class name and score."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from visionpipe.drawing import PALETTE
    from visionpipe.plots import labelled_gallery_png, save_figure

    if not images:
        return labelled_gallery_png([], [], path, empty="no test image has a detection error")
    columns = min(columns, len(images))
    rows = (len(images) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.5 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, truth, pred, caption in zip(axes.ravel(), images, truths, predictions,
                                               captions, strict=False):
        ax.imshow(np.clip(image, 0, 255).astype(np.uint8))
        for x0, y0, x1, y1 in np.asarray(truth["boxes"]).reshape(-1, 4):
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                   edgecolor="white", linestyle="--", linewidth=1.2))
        keep = (np.zeros(len(pred["scores"]), bool) if confidence is None
                else np.asarray(pred["scores"]) >= confidence)
        for (x0, y0, x1, y1), k, s in zip(np.asarray(pred["boxes"])[keep],
                                          np.asarray(pred["class_ids"])[keep],
                                          np.asarray(pred["scores"])[keep], strict=True):
            colour = PALETTE[(int(k) + 1) % len(PALETTE)] / 255.0
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                   edgecolor=colour, linewidth=1.5))
            ax.text(x0, y0 - 1, f"{class_names[int(k)]} {s:.2f}", color="white", fontsize=6,
                    va="bottom", bbox={"facecolor": colour, "alpha": 0.8, "pad": 0.5,
                                       "linewidth": 0})
        ax.set_title(caption, fontsize=8)
    return save_figure(fig, path)


@keras.saving.register_keras_serializable(package="visionpipe")
class ClassWeightedBinaryCrossentropy(keras.losses.Loss):
    """Binary cross-entropy over per-class score columns (``y_true``, ``y_pred``: (..., K)
    sigmoid targets and scores), each class's column times its weight, then the mean over the
    columns as Keras' ``binary_crossentropy`` takes it: a detector's class loss (YOLOv8's,
    reduction "sum") where a rare class's boxes count more. A column's weight applies to all
    its terms, the anchors assigned a box of that class and those taught to score it low; a
    weight of 0 takes the class out of the loss. Weights of all ones give Keras' loss."""

    def __init__(self, class_weights, name: str = "class_weighted_binary_crossentropy",
                 **kwargs):
        super().__init__(name=name, **kwargs)
        self.class_weights = [float(w) for w in class_weights]

    def call(self, y_true, y_pred):
        y_pred = keras.ops.convert_to_tensor(y_pred)
        y_true = keras.ops.cast(y_true, y_pred.dtype)
        weights = keras.ops.convert_to_tensor(self.class_weights, y_pred.dtype)
        return keras.ops.mean(keras.ops.binary_crossentropy(y_true, y_pred) * weights, axis=-1)

    def get_config(self):
        return {**super().get_config(), "class_weights": self.class_weights}


class DetectorHooks(abc.ABC):
    """What a detection family supplies: its losses, its box decoding and its raw outputs.

    Decoded detections are per image ``boxes`` (n, 4) xyxy in the model's input pixels,
    ``class_ids`` (n,) and ``scores`` (n,), best first."""

    @abc.abstractmethod
    def compile(self, model, optimizer, architecture,
                class_weights: tuple[float, ...] | None = None) -> None:
        """Compile with the family's own losses (weighted as ``architecture`` says), the class
        loss weighted per class by ``class_weights`` (one per class; None: unweighted)."""

    @abc.abstractmethod
    def set_nms(self, model, nms) -> None:
        """Decode with the thresholds of ``nms`` (an NMSConfig) from now on."""

    @abc.abstractmethod
    def detect(self, model, images: np.ndarray, batch_size: int) -> list[dict]:
        """Decoded detections per image, with the model's current NMS."""

    @abc.abstractmethod
    def decode(self, model, raw, images) -> dict:
        """Inside a tf.function: raw outputs -> ``boxes`` (batch, max, 4), ``classes``,
        ``confidence`` (padded with -1) and ``num_detections`` (batch,)."""

    @abc.abstractmethod
    def flatten(self, raw) -> tf.Tensor:
        """The model's call outputs as one tensor (batch, anchors, channels): the raw head
        that exported formats are compared on."""

    @abc.abstractmethod
    def class_scores(self, flat: np.ndarray) -> np.ndarray:
        """The class-score channels (..., num_classes) of :meth:`flatten`'s output."""

    @abc.abstractmethod
    def raw_decoder(self) -> dict:
        """How :meth:`flatten`'s output decodes outside TensorFlow: the ``decoder`` of
        :func:`visionpipe.box_decoding.decode_raw`, written into export.json."""

    @abc.abstractmethod
    def head_parts(self, model):
        """A callable: float32 images -> ``{"boxes", "classes"}``, :meth:`flatten`'s two
        parts taken before the model joins them, so that a full-int8 file quantises each on
        its own scale (box logits span tens, class scores 0..1)."""


class DetectionTask(Task):
    """Boxes with classes; the family's :class:`DetectorHooks` trains and decodes."""

    name = "detection"
    headline_metrics = ("map_50", "map_50_95")
    agreement_key = "box_agreement"
    served_outputs = {
        "boxes": "float32 [batch, max_detections, 4]: x_min, y_min, x_max, y_max in the input "
                 "image's own pixels, best first; -1 after num_detections",
        "scores": "float32 [batch, max_detections], confidence of each box",
        "class_id": "int32 [batch, max_detections] (-1: no box)",
        "class_name": "string [batch, max_detections] ('' : no box)",
        "num_detections": "int32 [batch], boxes kept by export.nms",
        "serving_fixed_size": "scores: float32 [batch, anchors, channels + classes], the raw "
                              "head outputs (the family's box channels, then class scores); "
                              "the TFLite and ONNX files return the same (decoder: export.json)"}
    parity_on_fixed_signature = True
    predicts_folders = True
    Hooks = DetectorHooks

    def to_model_io(self, num_classes: int):
        """Map a parsed record to (float image in 0..255, {boxes, classes}); batches pad the
        box lists with -1 (padding_values)."""

        def fn(rec):
            return (tf.cast(rec["image"], tf.float32),
                    {"boxes": tf.cast(rec["boxes"], tf.float32),
                     "classes": tf.cast(rec["box_labels"], tf.float32)})

        return fn

    def padding_values(self):
        """Images need none; box lists pad with -1, keras-cv's marker of "no box"."""
        return (0.0, {"boxes": PAD, "classes": PAD})

    def compile(self, model, optimizer, cfg, architecture, num_classes: int) -> None:
        """The detector's own losses (box and class), weighted as the architecture says, the
        class loss per class by ``cfg.class_weights`` (resolved: one per class, or None)."""
        # jit_compile "auto" is Keras' compile default.
        self.hooks.compile(model, optimizer, architecture, cfg.class_weights)
        if cfg.jit_compile != "auto":  # the detector's compile takes no jit_compile
            model.jit_compile = cfg.jit_compile

    def evaluation_model(self, model, cfg: EvaluateConfig):
        """The model decoding with ``evaluate.nms`` (mAP wants nearly every box)."""
        self.hooks.set_nms(model, cfg.nms)
        return model

    def predict(self, model, images: np.ndarray, batch_size: int,
                overlap: float) -> list[dict]:
        """Detections per test image: boxes (xyxy pixels), class ids and scores."""
        return self.hooks.detect(model, images, batch_size)

    def targets(self, rec: dict) -> dict:
        """The ground truth of one parsed numpy record: boxes, class ids, difficult flags."""
        return {"boxes": np.asarray(rec["boxes"], np.float32).reshape(-1, 4),
                "class_ids": np.asarray(rec["box_labels"], np.int64),
                "difficult": np.asarray(rec["difficult"], bool)}

    def evaluate(self, truths, outputs: list[dict], class_names: list[str],
                 cfg: EvaluateConfig) -> dict:
        """COCO mAP@[.5:.95], mAP@.5, mAP@.75, per-class AP, and precision, recall and F1 at
        the confidence that maximises F1 (IoU 0.5)."""
        result = dm.detection_metrics(list(truths), outputs, class_names,
                                      max_detections=cfg.nms.max_detections)
        for row in result["per_class"].values():  # F1 beside precision and recall
            p, r = row.get("precision"), row.get("recall")
            row["f1"] = (None if p is None or r is None
                         else (0.0 if p + r == 0 else 2 * p * r / (p + r)))
        result["nms"] = {"iou_threshold": cfg.nms.iou_threshold,
                         "confidence_threshold": cfg.nms.confidence_threshold,
                         "max_detections": cfg.nms.max_detections}
        result["num_test_images"] = len(outputs)
        return result

    def plots(self, images: np.ndarray, ids: list[str], truths, outputs: list[dict],
              class_names: list[str], out_dir: Path, cfg: EvaluateConfig) -> list[Path]:
        """PR and F1-confidence curves, the confusion matrix (with background) at the
        F1-best confidence as `dvc plots` rows and a PNG, and a gallery of the test images
        with the most errors there (ground truth dashed, detections solid)."""
        from visionpipe.data.records import write_json
        from visionpipe.plots import confusion_png

        truths = list(truths)
        curves = dm.pr_curves(truths, outputs, class_names,
                              max_detections=cfg.nms.max_detections)
        pr = pr_curve_png(curves, out_dir / "pr_curve.png")
        f1 = f1_confidence_png(curves, out_dir / "f1_curve.png")
        confidence = curves.best().get("confidence")
        names = [*class_names, "background"]
        per_image = [confusion([t], [p], len(class_names), confidence)
                     for t, p in zip(truths, outputs, strict=True)]
        cm = (np.sum(per_image, axis=0) if per_image
              else np.zeros((len(names), len(names)), np.int64))
        rows = [{"actual": names[t], "predicted": names[p]}
                for t in range(len(names)) for p in range(len(names))
                for _ in range(int(cm[t, p]))]
        write_json(out_dir / "confusion.json", rows)
        png = confusion_png(cm, names, out_dir / "confusion.png")
        errors = errors_per_image(per_image)
        worst = [i for i in np.argsort(-errors, kind="stable")[:cfg.gallery] if errors[i] > 0]
        conf_text = "none" if confidence is None else f"{confidence:.2f}"
        captions = [f"{ids[i]}: {errors[i]} error(s) at conf {conf_text}" for i in worst]
        gallery = detections_png([images[i] for i in worst], [truths[i] for i in worst],
                                 [outputs[i] for i in worst], captions, class_names,
                                 confidence, out_dir / "misclassified.png")
        return [pr, f1, out_dir / "confusion.json", png, gallery]

    # ------------------------------------------------------------------ export

    nms = None  # export.nms, set by export_model
    size: tuple[int, int] | None = None  # the model's input size, set by export_model

    def export_model(self, model, cfg):
        """Decode with ``export.nms`` (what the exported files keep) from now on."""
        self.hooks.set_nms(model, cfg.nms)
        self.nms = cfg.nms
        self.size = tuple(int(d) for d in model.inputs[0].shape[1:3])
        return model

    def export_meta(self, cfg) -> dict:
        """How the raw head of the TFLite and ONNX files (and ``serving_fixed_size``) decodes
        (:mod:`visionpipe.box_decoding`), and the NMS thresholds the SavedModel applies."""
        return {"decoder": self.hooks.raw_decoder(),
                "nms": {"iou_threshold": cfg.nms.iou_threshold,
                        "confidence_threshold": cfg.nms.confidence_threshold,
                        "max_detections": cfg.nms.max_detections}}

    def quantization_parts(self, model):
        """The head's boxes and classes apart (see DetectorHooks.head_parts)."""
        return self.hooks.head_parts(model)

    def _decode_raw(self, raw: np.ndarray) -> list[dict]:
        """Detections per image of raw head outputs, decoded in NumPy with ``export.nms``
        as any runtime's output would be (:func:`visionpipe.box_decoding.decode_raw`)."""
        nms = self.nms
        return box_decoding.decode_raw(
            raw, self.size, confidence=nms.confidence_threshold, iou=nms.iou_threshold,
            max_detections=nms.max_detections, decoder=self.hooks.raw_decoder())

    def parity_images(self, truths: list, samples: int, cfg) -> int | None:
        """``parity_samples`` images, or more: the fewest first images holding
        ``parity_min_boxes`` truth boxes; None when all of them hold fewer."""
        counts = np.cumsum([len(t["class_ids"]) for t in truths])
        if not len(counts) or counts[-1] < cfg.parity_min_boxes:
            return None
        enough = int(np.searchsorted(counts, cfg.parity_min_boxes)) + 1
        return min(len(truths), max(samples, enough))

    def parity_measures(self, reference: np.ndarray, other: np.ndarray, truths: list) -> dict:
        """agreement() plus mAP@.5 of both runtimes' decoded detections against the truth
        boxes of these images, and ``map_50_drop`` (Keras' minus the format's)."""
        names = [str(k) for k in range(self.hooks.class_scores(reference[:1, :1]).shape[-1])]
        ours = dm.coco_metrics(truths, self._decode_raw(reference), names,
                               max_detections=self.nms.max_detections)["map_50"]
        theirs = dm.coco_metrics(truths, self._decode_raw(other), names,
                                 max_detections=self.nms.max_detections)["map_50"]
        return {**self.agreement(reference, other), "map_50_keras": ours, "map_50": theirs,
                "map_50_drop": ours - theirs,
                "truth_boxes": int(sum(len(t["class_ids"]) for t in truths)),
                "images": len(truths)}

    def parity_checks(self) -> list[tuple[str, str, str]]:
        """The raw head's drift, the decoded boxes' agreement and the mAP@.5 drop."""
        return [*super().parity_checks(), ("map_50_drop", "max_map_drop", "max")]

    def forward(self, model, images: np.ndarray) -> np.ndarray:
        """The raw head outputs per anchor (N, anchors, channels) that formats share."""
        # Any batch size: one trace for the 64-image batches and a smaller last one.
        fn = tf.function(lambda x: self.fixed_outputs(model(x, training=False)),
                         input_signature=[tf.TensorSpec([None, *images.shape[1:]], tf.float32)])
        return np.concatenate([fn(tf.constant(images[i:i + 64], tf.float32)).numpy()
                               for i in range(0, len(images), 64)])

    def fixed_outputs(self, outputs):
        """The detector's raw head as one tensor (the family's flatten)."""
        return self.hooks.flatten(outputs)

    def agreement(self, reference: np.ndarray, other: np.ndarray) -> dict:
        """Both raw heads decoded with ``export.nms``: ``box_agreement`` (match_share: the
        detections that pair up, same class and IoU >= MATCH_IOU, over the larger count),
        the largest corner difference of a pair and each side's detection count; and
        ``anchor_agreement``: of the anchors either scores at least the export confidence for
        some class, the share where both do and pick the same class (1.0 when none)."""
        ref, oth = self.hooks.class_scores(reference), self.hooks.class_scores(other)
        confidence = self.nms.confidence_threshold
        ref_on, oth_on = ref.max(-1) >= confidence, oth.max(-1) >= confidence
        either = ref_on | oth_on
        same = ref_on & oth_on & (ref.argmax(-1) == oth.argmax(-1))
        share = float(same.sum() / either.sum()) if either.any() else 1.0
        ours, theirs = self._decode_raw(reference), self._decode_raw(other)
        boxes, worst = match_share(ours, theirs)
        return {"box_agreement": boxes, "box_max_corner_diff": worst,
                "detections": {"keras": _count(ours), "format": _count(theirs)},
                "anchor_agreement": share, "anchors_compared": int(either.sum())}

    def serving_function(self, model, size, policy: str, class_names, scale=None,
                         overlap: float = 0.25):
        """``serving_default`` of the SavedModel: uint8 images of any size -> detections in
        that image's own pixels (letterboxed or stretched inside, as prepare did; a detector
        is never trained on crops, so ``scale`` is its size)."""
        names = tf.constant([*class_names, ""])  # -1 (padding) reads the empty name

        def serve(images):
            x = fit_images(images, size, policy)
            out = self.hooks.decode(model, model(x, training=False), x)
            class_id = tf.cast(out["classes"], tf.int32)
            return {"boxes": boxes_to_input(tf.cast(out["boxes"], tf.float32),
                                            tf.shape(images)[1:3], size, policy),
                    "scores": tf.cast(out["confidence"], tf.float32), "class_id": class_id,
                    "class_name": tf.gather(names, tf.where(class_id < 0, len(class_names),
                                                            class_id)),
                    "num_detections": tf.cast(out["num_detections"], tf.int32)}

        return serve

    def resized_input_check(self, model, saved: Path, enlarged: np.ndarray,
                            as_prepared: np.ndarray, size, policy: str, ex,
                            overlap: float = 0.25) -> dict:
        """SavedModel's ``serving_default`` on ``enlarged`` images (letterboxed inside, boxes
        mapped back) against the Keras model on ``as_prepared`` (the same images resized as
        prepare resizes them), its boxes mapped back the same way: the share of detections
        that pair up (same class, IoU >= MATCH_IOU)."""
        big = enlarged.shape[1:3]
        fn = tf.saved_model.load(str(saved)).signatures["serving_default"]
        served = []
        for start in range(0, len(enlarged), 32):  # parity may judge hundreds of images
            out = fn(images=tf.constant(enlarged[start:start + 32], tf.uint8))
            served += [{"boxes": out["boxes"][i, :n].numpy(),
                        "class_ids": out["class_id"][i, :n].numpy().astype(np.int64),
                        "scores": out["scores"][i, :n].numpy()}
                       for i, n in enumerate(out["num_detections"].numpy())]
        keras_dets = self.hooks.detect(model, as_prepared, 64)
        for det in keras_dets:
            det["boxes"] = boxes_to_input(tf.constant(det["boxes"].reshape(-1, 4)),
                                          tf.constant(big), size, policy).numpy()
        agreement, worst = match_share(keras_dets, served)
        values = {"detection_agreement": agreement}
        return {"input_size": list(big), "resize": policy, "images": len(enlarged),
                "max_abs_diff": worst, **values,
                "detections": {"keras": _count(keras_dets), "saved_model": _count(served)},
                **judged(values, {"detection_agreement": (
                    "export.resize_min_agreement", "min", ex.resize_min_agreement)})}


MATCH_IOU = 0.8  # two runtimes' detections of one object, after different resizing


def _count(detections: list[dict]) -> int:
    return int(sum(len(d["scores"]) for d in detections))


def match_share(a: list[dict], b: list[dict], iou: float = MATCH_IOU) -> tuple[float, float]:
    """Pairs of same-class detections with IoU >= ``iou`` (greedy, highest first) over the
    larger of the two detection counts, pooled over images (1.0 when neither has any); and
    the largest corner difference in pixels among the pairs (0.0 without pairs)."""
    pairs, total, worst = 0, 0, 0.0
    for x, y in zip(a, b, strict=True):
        total += max(len(x["scores"]), len(y["scores"]))
        if not (len(x["scores"]) and len(y["scores"])):
            continue
        ious = dm.box_iou(np.asarray(x["boxes"], np.float64), np.asarray(y["boxes"], np.float64))
        ious[np.asarray(x["class_ids"])[:, None] != np.asarray(y["class_ids"])[None, :]] = 0.0
        for i, j in greedy_pairs(ious, iou):
            pairs += 1
            worst = max(worst, float(np.abs(np.asarray(x["boxes"][i], np.float64)
                                            - np.asarray(y["boxes"][j])).max()))
    return (pairs / total if total else 1.0), worst
