"""Where images and boxes go when resized to a model's size: stretch, pad or crop.

Prepare resizes with PIL (:func:`fit_to_size`, :func:`fit_boxes`); exported SavedModels resize
inside the graph with the TensorFlow twin (:func:`fit_images`) and map detections back to the
input image (:func:`boxes_to_input`). Both sides share :func:`resize_geometry`'s arithmetic, so
a served image lands on the same pixels as a prepared one.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from PIL import Image

RESIZE_POLICIES = ("stretch", "pad", "crop")


def resize_geometry(hw: tuple[int, int], size: tuple[int, int], policy: str
                    ) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where ``fit_to_size`` puts an image of (height, width) ``hw``: the size it is resized
    to, and the (top, left) of that resized image in the output (negative when cropped)."""
    th, tw = size
    h, w = hw
    if policy == "stretch":
        return (th, tw), (0, 0)
    if policy == "pad":
        scale = min(th / h, tw / w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        return (nh, nw), ((th - nh) // 2, (tw - nw) // 2)
    if policy == "crop":
        scale = max(th / h, tw / w)
        nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
        return (nh, nw), (-((nh - th) // 2), -((nw - tw) // 2))
    raise ValueError(f"unknown resize policy {policy!r}; known: {', '.join(RESIZE_POLICIES)}")


def fit_to_size(image: np.ndarray, size: tuple[int, int], policy: str) -> np.ndarray:
    """``image`` at (height, width) by ``policy``: stretch, pad (letterbox) or centre crop."""
    th, tw = size
    h, w = image.shape[:2]
    if (h, w) == (th, tw):
        return image
    (nh, nw), (top, left) = resize_geometry((h, w), size, policy)
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    if policy == "pad":
        out = np.zeros((th, tw, 3), np.uint8)
        out[top:top + nh, left:left + nw] = resized
        return out
    return resized[-top:-top + th, -left:-left + tw]


def fit_boxes(boxes: np.ndarray, hw: tuple[int, int], size: tuple[int, int], policy: str
              ) -> np.ndarray:
    """Boxes ``[x_min, y_min, x_max, y_max]`` in pixels of an (height, width) ``hw`` image,
    moved to where ``fit_to_size(image, size, policy)`` puts those pixels (not clipped)."""
    h, w = hw
    (nh, nw), (top, left) = resize_geometry(hw, size, policy)
    scale = np.array([nw / w, nh / h, nw / w, nh / h], np.float32)
    offset = np.array([left, top, left, top], np.float32)
    return np.asarray(boxes, np.float32).reshape(-1, 4) * scale + offset


def _round_half_even(x: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.round(x), tf.int32)


def fit_images(images: tf.Tensor, size: tuple[int, int], policy: str) -> tf.Tensor:
    """uint8 images (N, h, w, 3) of one size -> float32 (N, H, W, 3) holding whole 0..255 values.

    The TensorFlow twin of :func:`fit_to_size` (what prepare does with PIL): stretch,
    pad (letterbox, black bars) or crop (centre), antialiased bilinear, rounded to whole pixel
    values as a uint8 image would be. Images already at ``size`` pass through unchanged.
    """
    th, tw = int(size[0]), int(size[1])
    images = tf.convert_to_tensor(images)
    shape = tf.shape(images)
    h, w = shape[1], shape[2]
    hf, wf = tf.cast(h, tf.float64), tf.cast(w, tf.float64)

    def resize(x, nh, nw):
        out = tf.image.resize(tf.cast(x, tf.float32), tf.stack([nh, nw]), method="bilinear",
                              antialias=True)
        return tf.clip_by_value(tf.round(out), 0.0, 255.0)

    def fit():
        if policy == "stretch":
            return resize(images, th, tw)
        if policy == "pad":
            scale = tf.minimum(th / hf, tw / wf)
            nh = tf.maximum(1, _round_half_even(hf * scale))
            nw = tf.maximum(1, _round_half_even(wf * scale))
            return tf.image.pad_to_bounding_box(resize(images, nh, nw), (th - nh) // 2,
                                                (tw - nw) // 2, th, tw)
        if policy == "crop":
            scale = tf.maximum(th / hf, tw / wf)
            nh = tf.maximum(th, _round_half_even(hf * scale))
            nw = tf.maximum(tw, _round_half_even(wf * scale))
            return tf.image.crop_to_bounding_box(resize(images, nh, nw), (nh - th) // 2,
                                                 (nw - tw) // 2, th, tw)
        raise ValueError(f"unknown resize policy {policy!r}")

    same = tf.logical_and(tf.equal(h, th), tf.equal(w, tw))
    out = tf.cond(same, lambda: tf.cast(images, tf.float32), fit)
    return tf.ensure_shape(out, [None, th, tw, 3])


def boxes_to_input(boxes: tf.Tensor, input_hw: tf.Tensor, size: tuple[int, int],
                   policy: str) -> tf.Tensor:
    """xyxy boxes in the pixels of :func:`fit_images`' output -> the input image's pixels.

    The inverse of ``fit_images``' stretch or pad (letterbox) for images of height and width
    ``input_hw``, clipped to the image; padding rows (all -1) stay -1.
    """
    th, tw = int(size[0]), int(size[1])
    hf, wf = tf.cast(input_hw[0], tf.float64), tf.cast(input_hw[1], tf.float64)
    h, w = tf.cast(hf, tf.float32), tf.cast(wf, tf.float32)
    if policy == "pad":  # the same arithmetic as fit_images, so the offsets match exactly
        scale = tf.minimum(th / hf, tw / wf)
        nh = tf.maximum(1, _round_half_even(hf * scale))
        nw = tf.maximum(1, _round_half_even(wf * scale))
        top = tf.cast((th - nh) // 2, tf.float32)
        left = tf.cast((tw - nw) // 2, tf.float32)
        nh, nw = tf.cast(nh, tf.float32), tf.cast(nw, tf.float32)
    elif policy == "stretch":
        nh, nw, top, left = tf.constant(float(th)), tf.constant(float(tw)), 0.0, 0.0
    else:
        raise ValueError(f"boxes cannot be mapped back through resize policy {policy!r}")
    x = tf.clip_by_value((boxes[..., 0::2] - left) * w / nw, 0.0, w)
    y = tf.clip_by_value((boxes[..., 1::2] - top) * h / nh, 0.0, h)
    out = tf.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], axis=-1)
    padding = tf.reduce_all(boxes == -1.0, axis=-1, keepdims=True)
    return tf.where(padding, -1.0, out)
