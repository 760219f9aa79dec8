"""Grad-CAM (Selvaraju et al., 2017): where in an image a convolutional classifier saw its class.

The gradients of a class's score (its logit, before the softmax) with respect to the last
convolutional feature map, averaged over the map's positions, weigh its channels; the ReLU of
the weighted sum, resized to the image (bilinear) and divided by its maximum, is the heat map
(0..1). The feature map is the output of the last layer after the first convolution that
gives one (rank 4, more than one position; not a padding, cropping or pooling), looked for
inside a nested model too (a ``keras.applications`` backbone wrapped as one layer, whose last
map is its output, or a layer before it where that output has a single position or comes
from a pooling). A model with no convolution (an MLP) has none, and gets no heat map.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import layers

CONVOLUTIONS = (layers.Conv2D, layers.Conv2DTranspose, layers.DepthwiseConv2D,
                layers.SeparableConv2D)
# Outputs skipped: padding and cropping move a map's positions off the image's grid, and
# pooling only coarsens the last convolution's map (the paper takes that convolution's).
SKIPPED = (layers.ZeroPadding2D, layers.Cropping2D, layers.MaxPooling2D, layers.AveragePooling2D)


def _node(layer):
    """The one call of ``layer`` in its model's graph (Keras keeps no public handle on the
    outer call of a nested model: its ``output`` is its own graph's)."""
    nodes = layer._inbound_nodes
    return nodes[0] if len(nodes) == 1 else None


def _is_map(tensors: list) -> bool:
    """One output, a feature map: rank 4 with more than one position."""
    shape = tensors[0].shape if len(tensors) == 1 else ()
    return len(shape) == 4 and (shape[1] or 0) * (shape[2] or 0) > 1


def feature_layer(model: keras.Model) -> tuple[str, ...] | None:
    """The layer whose output Grad-CAM weighs, as names from ``model`` down into nested
    models (``("backbone", "block_13_expand_relu")``); None when there is none."""
    found, convolved = None, False
    for layer in model.layers:
        if _node(layer) is None:  # called more than once (or never): no one map to take
            continue
        if isinstance(layer, keras.Model):
            inner = feature_layer(layer)
            if inner is None:
                continue
            convolved = True
            found = (layer.name, *inner)
        elif isinstance(layer, CONVOLUTIONS) or convolved:
            convolved = True
            if not isinstance(layer, SKIPPED) and _is_map(_node(layer).output_tensors):
                found = (layer.name,)
    return found


def _scores_tensor(model: keras.Model):
    """The tensor whose values the class scores are computed from, and how: the input of a
    final softmax (Dense or activation layer) gives the logits, as the paper takes them;
    otherwise the model's output is the score."""
    last = model.layers[-1]
    node = _node(last)
    if node is not None and len(model.outputs) == 1 and node.output_tensors[0] is model.outputs[0]:
        hidden = node.input_tensors[0]
        if isinstance(last, layers.Dense) and last.activation is keras.activations.softmax:
            def dense(h):
                h = keras.ops.cast(h, "float32")
                logits = keras.ops.matmul(h, keras.ops.cast(last.kernel, "float32"))
                return logits + keras.ops.cast(last.bias, "float32") if last.use_bias else logits

            return hidden, dense
        if isinstance(last, layers.Softmax) or (isinstance(last, layers.Activation)
                                                and last.activation is keras.activations.softmax):
            return hidden, lambda h: keras.ops.cast(h, "float32")
    return model.outputs[0], lambda y: keras.ops.cast(y, "float32")


def _tap(model: keras.Model, path: tuple[str, ...], target) -> Callable:
    """images -> (the feature map at ``path``, ``target``: a tensor of ``model``'s graph),
    in one forward pass that gradients flow through."""
    layer = model.get_layer(path[0])
    node = _node(layer)
    if len(path) == 1:
        both = keras.Model(model.inputs[0], [node.output_tensors[0], target])
        return lambda x: both(x, training=False)
    # Split the model around the nested one, whose own graph holds the map.
    before = keras.Model(model.inputs[0], node.input_tensors[0])
    inner = _tap(layer, path[1:], layer.outputs[0])
    after = keras.Model(node.output_tensors[0], target)

    def run(x):
        features, nested = inner(before(x, training=False))
        return features, after(nested, training=False)

    return run


def heatmaps(model: keras.Model, images: np.ndarray, classes: np.ndarray | None = None, *,
             path: tuple[str, ...] | None = None, batch_size: int = 32) -> np.ndarray:
    """Grad-CAM heat maps (N, H, W), float32 in 0..1, of ``classes`` (default: each image's
    predicted class) on float32 images (N, H, W, C) in 0..255, at the feature map of
    ``path`` (default: :func:`feature_layer`). A map with no positive evidence is all 0."""
    path = path or feature_layer(model)
    if path is None:
        raise ValueError(f"model {model.name!r} has no convolutional feature map")
    hidden, to_scores = _scores_tensor(model)
    forward = _tap(model, path, hidden)
    out = []
    for start in range(0, len(images), batch_size):
        x = tf.convert_to_tensor(images[start:start + batch_size], tf.float32)
        with tf.GradientTape() as tape:
            features, h = forward(x)
            scores = to_scores(h)
            chosen = (tf.argmax(scores, axis=-1) if classes is None
                      else tf.constant(classes[start:start + batch_size], tf.int64))
            picked = tf.gather(scores, chosen, batch_dims=1)
        # Each image's score depends on its own map only (inference mode), so the gradient
        # of the batch's sum is each image's own.
        grads = tf.cast(tape.gradient(picked, features), tf.float32)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(weights * tf.cast(features, tf.float32), axis=-1))
        # Bilinear interpolation mixes neighbours (no negatives); the maximum is taken after
        # it, so each map reaches 1 at the image's size.
        cam = tf.image.resize(cam[..., None], x.shape[1:3], "bilinear")[..., 0]
        out.append(tf.math.divide_no_nan(cam, tf.reduce_max(cam, axis=(1, 2), keepdims=True))
                   .numpy())
    return np.concatenate(out) if out else np.zeros((0, *images.shape[1:3]), np.float32)


def select_images(y_true: np.ndarray, probs: np.ndarray, count: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Indices of up to ``count`` test images, about half correctly and half wrongly
    classified, each the most confident first (more of one kind where the other runs out),
    and whether each is correct."""
    y_true = np.asarray(y_true, np.int64)
    y_pred = probs.argmax(axis=1)
    confidence = probs[np.arange(len(y_pred)), y_pred]
    right = y_pred == y_true
    correct, wrong = (np.flatnonzero(kind) for kind in (right, ~right))
    correct = correct[np.argsort(-confidence[correct], kind="stable")]
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")]
    n_wrong = min(len(wrong), count // 2)
    n_correct = min(len(correct), count - n_wrong)
    n_wrong = min(len(wrong), count - n_correct)
    shown = np.concatenate([correct[:n_correct], wrong[:n_wrong]]).astype(np.int64)
    return shown, right[shown]


def gradcam_png(model: keras.Model, images: np.ndarray, y_true: np.ndarray, probs: np.ndarray,
                class_names: list[str], count: int, path: Path, *, columns: int = 4,
                alpha: float = 0.45) -> dict | None:
    """A grid of test images with their predicted class's Grad-CAM over them, captioned
    ``true / predicted (score)``: the most confident correct ones, then the most confident
    wrong ones (:func:`select_images`). Returns ``path``, ``layer`` (the feature map, as
    ``outer/inner`` names), ``shown`` (indices), ``correct`` (per index) and ``title``; None,
    with nothing written, when the model has no convolutional feature map."""
    from visionpipe.plots import plt, save_figure  # pyplot on the headless backend plots chose

    layer = feature_layer(model)
    if layer is None:
        return None
    shown, correct = select_images(y_true, probs, count)
    y_pred = probs.argmax(axis=1)
    heat = heatmaps(model, images[shown], y_pred[shown], path=layer)
    n_right, n_wrong = int(correct.sum()), int((~correct).sum())
    title = (f"Grad-CAM at {'/'.join(layer)}: {n_right} most confident correct, "
             f"{n_wrong} most confident wrong")
    if not (y_pred != np.asarray(y_true)).any():
        title = f"Grad-CAM at {'/'.join(layer)}: no misclassified test images; " \
                f"{n_right} most confident correct"
    columns = max(1, min(columns, len(shown)))
    rows = max(1, -(-len(shown) // columns))
    aspect = images.shape[1] / images.shape[2]
    height = (2.0 * aspect + 0.3) * rows + 0.6  # inches; the last 0.6 for the title
    fig, axes = plt.subplots(rows, columns, squeeze=False, figsize=(2.2 * columns, height),
                             gridspec_kw={"wspace": 0.05, "hspace": 0.15,
                                          "top": 1 - 0.6 / height})
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i, ok, h in zip(axes.ravel(), shown, correct, heat, strict=False):
        image = np.clip(images[i], 0, 255).astype(np.uint8)
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image,
                  cmap="gray" if image.shape[-1] == 1 else None, vmin=0, vmax=255)
        ax.imshow(h, cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0)
        none = "\nno positive evidence" if not h.any() else ""  # every channel weighs against
        ax.set_title(f"{class_names[y_true[i]]} / {class_names[y_pred[i]]} "
                     f"({probs[i, y_pred[i]]:.2f}){none}", fontsize=8,
                     color="tab:green" if ok else "tab:red")
    if not len(shown):
        axes[0, 0].text(0.5, 0.5, "no test images", ha="center", va="center")
    fig.suptitle(f"{title}\ntrue / predicted (score); red: evidence for the predicted class",
                 fontsize=9, y=1 - 0.05 / height, va="top")
    save_figure(fig, path)
    return {"path": path, "layer": "/".join(layer), "shown": shown.tolist(),
            "correct": correct.tolist(), "title": title}
