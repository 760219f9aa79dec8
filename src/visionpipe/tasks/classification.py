"""Classification: one label per image; loss, metrics, evaluation and plots."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from visionpipe import batches
from visionpipe.config import EvaluateConfig, TrainConfig
from visionpipe.tasks.base import Task, scores_serving


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts[true, predicted]."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)), 1)
    return cm


def top_k_accuracy(y_true: np.ndarray, probs: np.ndarray, k: int) -> float:
    """Share of images whose true class is among the ``k`` highest scores. A class tied with
    the k-th score counts as inside, as in ``tf.math.in_top_k`` and Keras' top-k metric."""
    y_true = np.asarray(y_true, np.int64)
    true_score = probs[np.arange(len(y_true)), y_true]
    higher = (probs > true_score[:, None]).sum(axis=1)
    return float((higher < k).mean())


def most_confident_mistakes(y_true: np.ndarray, probs: np.ndarray, limit: int) -> np.ndarray:
    """Indices of misclassified images, highest predicted-class score first (at most limit)."""
    y_pred = probs.argmax(axis=1)
    wrong = np.flatnonzero(y_pred != np.asarray(y_true))
    return wrong[np.argsort(-probs[wrong, y_pred[wrong]], kind="stable")][:limit]


def classification_metrics(y_true: np.ndarray, probs: np.ndarray,
                           class_names: list[str], top_k: int = 2) -> dict:
    """Accuracy, top-k accuracy, loss, per-class and macro precision/recall/F1, and a
    majority-class baseline. ``top_k`` is capped at the number of classes."""
    y_true = np.asarray(y_true, np.int64)
    n = len(class_names)
    k = min(top_k, n)
    y_pred = probs.argmax(axis=1)
    cm = confusion_matrix(y_true, y_pred, n)
    tp = np.diag(cm).astype(float)
    predicted, actual = cm.sum(axis=0), cm.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros(n), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros(n), where=actual > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(n),
                   where=(precision + recall) > 0)
    eps = 1e-7
    loss = float(-np.mean(np.log(np.clip(probs[np.arange(len(y_true)), y_true], eps, 1.0))))
    majority = int(np.bincount(y_true, minlength=n).argmax())
    return {
        "accuracy": float((y_pred == y_true).mean()),
        f"top_{k}_accuracy": top_k_accuracy(y_true, probs, k),
        "loss": loss,
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]),
                             "f1": float(f1[i]), "support": int(actual[i])}
                      for i, name in enumerate(class_names)},
        "baseline": {"name": "majority_class", "class": class_names[majority],
                     "accuracy": float((y_true == majority).mean())},
        "num_test_images": len(y_true),
    }


@keras.saving.register_keras_serializable(package="visionpipe")
class ClassWeightedCrossentropy(keras.losses.Loss):
    """Categorical cross-entropy with each image's term times the weight of its true class,
    then averaged over the batch: what Keras' ``fit(class_weight=...)`` computes, kept in the
    loss so that validation loss is weighted alike. Label smoothing applies to the targets
    first, as in ``CategoricalCrossentropy``; the weight comes from the unsmoothed one-hot
    label (a soft label mixes its classes' weights). Weights of all ones give that loss."""

    def __init__(self, class_weights, label_smoothing: float = 0.0,
                 name: str = "class_weighted_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.class_weights = [float(w) for w in class_weights]
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        per_image = keras.losses.categorical_crossentropy(
            y_true, y_pred, label_smoothing=self.label_smoothing)
        weights = keras.ops.convert_to_tensor(self.class_weights, per_image.dtype)
        return per_image * keras.ops.sum(keras.ops.cast(y_true, per_image.dtype) * weights,
                                         axis=-1)

    def get_config(self):
        return {**super().get_config(), "class_weights": self.class_weights,
                "label_smoothing": self.label_smoothing}


class ClassificationTask(Task):
    """Softmax over classes; labels are one-hot so label smoothing works."""

    name = "classification"
    headline_metrics = ("accuracy", "macro_f1")
    agreement_key = "label_agreement"
    served_outputs = {"scores": "float32 [batch, classes], softmax probabilities",
                      "class_id": "int32 [batch]", "class_name": "string [batch]"}
    predicts_folders = True
    size_independent_targets = True

    def to_model_io(self, num_classes: int):
        """Map a parsed record to (float image in 0..255, one-hot label)."""

        def fn(rec):
            return tf.cast(rec["image"], tf.float32), tf.one_hot(rec["label"], num_classes)

        return fn

    def loss(self, cfg: TrainConfig, num_classes: int) -> keras.losses.Loss:
        """Categorical cross-entropy with the configured label smoothing; with class weights
        (resolved: one per class), each image's term times its class's weight."""
        if cfg.class_weights is None:
            return keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing)
        return ClassWeightedCrossentropy(cfg.class_weights, label_smoothing=cfg.label_smoothing)

    def metrics(self, num_classes: int) -> list:
        """Metrics reported every epoch by fit."""
        return [keras.metrics.CategoricalAccuracy(name="accuracy")]

    def predict(self, model: keras.Model, images: np.ndarray, batch_size: int,
                overlap: float) -> np.ndarray:
        """Class probabilities for test images at the model's size."""
        return batches.predict(model, images, batch_size)

    def evaluate(self, y_true: np.ndarray, outputs: np.ndarray, class_names: list[str],
                 cfg: EvaluateConfig) -> dict:
        """Test metrics from model outputs (class probabilities)."""
        return classification_metrics(y_true, outputs, class_names, cfg.top_k)

    def targets(self, rec: dict) -> int:
        """The ground truth of one parsed numpy record."""
        return int(rec["label"])

    def agreement(self, reference: np.ndarray, other: np.ndarray) -> dict:
        """How closely another runtime's outputs follow the Keras model's: label agreement."""
        return {"label_agreement": float((reference.argmax(1) == other.argmax(1)).mean())}

    def serving_function(self, model, size, policy: str, class_names, scale=None,
                         overlap: float = 0.25):
        """Scores, the best class id and its name (images resized to ``size``: a classifier
        is never trained on crops, so ``scale`` is its size)."""

        def outputs(scores, images):
            class_id = tf.argmax(scores, axis=-1, output_type=tf.int32)
            return {"scores": scores, "class_id": class_id,
                    "class_name": tf.gather(tf.constant(class_names), class_id)}

        return scores_serving(model, size, policy, outputs)

    def plots(self, images: np.ndarray, ids: list[str], y_true: np.ndarray,
              outputs: np.ndarray, class_names: list[str], out_dir: Path,
              cfg: EvaluateConfig) -> list[Path]:
        """Confusion matrix as rows for `dvc plots` (confusion template) and as a PNG, a
        gallery of the misclassified test images, most confidently wrong first, and the
        one-vs-rest precision-recall (``pr_curve.png``) and F1-confidence (``f1_curve.png``)
        curves per class (:func:`visionpipe.tasks.curves.one_vs_rest_curves`)."""
        from visionpipe.data.records import write_json
        from visionpipe.plots import confusion_png, labelled_gallery_png
        from visionpipe.tasks.curves import one_vs_rest_pngs

        y_pred = outputs.argmax(1)
        rows = [{"actual": class_names[t], "predicted": class_names[p]}
                for t, p in zip(np.asarray(y_true).tolist(), y_pred.tolist(), strict=True)]
        write_json(out_dir / "confusion.json", rows)
        cm = confusion_matrix(y_true, y_pred, len(class_names))
        png = confusion_png(cm, class_names, out_dir / "confusion.png")
        wrong = most_confident_mistakes(y_true, outputs, cfg.gallery)
        captions = [f"{ids[i]}\ntrue: {class_names[y_true[i]]}\n"
                    f"pred: {class_names[y_pred[i]]} ({outputs[i, y_pred[i]]:.2f})"
                    for i in wrong]
        gallery = labelled_gallery_png([images[i] for i in wrong], captions,
                                       out_dir / "misclassified.png",
                                       empty="no misclassified test images")
        curves = one_vs_rest_pngs(y_true, outputs, class_names, out_dir,
                                  f"one-vs-rest, {len(y_true)} test images")
        return [out_dir / "confusion.json", png, gallery, *curves]

    def explain(self, model: keras.Model, images: np.ndarray, ids: list[str],
                y_true: np.ndarray, outputs: np.ndarray, class_names: list[str],
                out_dir: Path, cfg: EvaluateConfig) -> dict:
        """``gradcam.png``: Grad-CAM heat maps (Selvaraju et al., 2017) of the predicted class
        on ``cfg.gradcam_images`` test images, the most confident correct and wrong ones
        (:func:`visionpipe.gradcam.gradcam_png`); none for a model without convolutions."""
        from visionpipe.gradcam import gradcam_png

        path = out_dir / "gradcam.png"
        path.unlink(missing_ok=True)  # an earlier run's figure must not pass for this one's
        if cfg.gradcam_images == 0:
            return {"summary": "Grad-CAM off (evaluate.gradcam_images: 0)", "path": None}
        shown = gradcam_png(model, images, np.asarray(y_true), outputs, class_names,
                            cfg.gradcam_images, path)
        if shown is None:
            return {"summary": "no Grad-CAM: the model has no convolutional feature map",
                    "path": None}
        right = sum(shown["correct"])
        return {"summary": f"Grad-CAM of {len(shown['shown'])} test images ({right} correct, "
                           f"{len(shown['shown']) - right} wrong) at layer {shown['layer']}",
                "path": path, **{k: shown[k] for k in ("layer", "shown", "correct")}}
