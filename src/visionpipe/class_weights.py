"""Class weights of the training loss: params' list as given, or ``balanced`` from the train split.

``balanced`` gives class c the weight n / (K * n_c), with n_c its count in the train split as
trained on (data/augmented/<task>, augmented copies included), n the count of all classes and
K their number: scikit-learn's ``class_weight="balanced"`` (``compute_class_weight``; King and
Zeng, 2001). A class then weighs as much in the loss as every other, and the counts' mean weight
is 1, so the loss keeps its scale. What a class is counted in is what its loss is summed over:
images of each label (classification), boxes of each class (detection), pixels of each class
(segmentation). Only the targets are read from the shards, never the images.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from visionpipe.data import records
from visionpipe.errors import ParamsError

BALANCED = "balanced"
MAX_WEIGHT = 1000.0  # the most the params schema allows a listed weight
UNITS = {"classification": "images", "detection": "boxes", "segmentation": "pixels"}
BATCH = 512


def resolve(value: str | Sequence[float] | None, train_dir: Path, task_name: str,
            class_names: list[str], key: str) -> tuple[float, ...] | None:
    """One weight per class, in class order, from params' ``value`` (None: unweighted, a list,
    or ``"balanced"``: from the counts of ``train_dir``'s train split). A list of another
    length, or a class ``balanced`` finds no example of, is a ParamsError naming ``key``."""
    if value is None:
        return None
    order = f"{len(class_names)} in class order ({', '.join(class_names)})"
    if isinstance(value, str):
        if value != BALANCED:
            raise ParamsError(f"params.yaml: {key} = {value!r}: expected {BALANCED!r}, null or "
                              f"one weight per class, {order}")
        return balanced(train_counts(train_dir, task_name, len(class_names)), class_names,
                        key, UNITS[task_name])
    weights = tuple(float(w) for w in value)
    if len(weights) != len(class_names):
        raise ParamsError(f"params.yaml: {key} = {list(weights)}: expected one weight per "
                          f"class, {order}; or {BALANCED!r}")
    return weights


def balanced(counts: Sequence[int], class_names: list[str], key: str,
             unit: str = "examples") -> tuple[float, ...]:
    """n / (K * n_c) per class from its count n_c (n: their sum, K: how many). A class with no
    example (an infinite weight), or whose weight would exceed MAX_WEIGHT, is a ParamsError
    naming ``key`` and the class, saying to give a list instead."""
    counts = [int(c) for c in counts]
    total, k = sum(counts), len(counts)
    listed = f"a list of {k} weights in class order ({', '.join(class_names)})"
    absent = [name for name, c in zip(class_names, counts, strict=True) if c == 0]
    if absent:
        which = ", ".join(repr(n) for n in absent)
        raise ParamsError(f"params.yaml: {key} = {BALANCED!r}: the train split has no {unit} "
                          f"of class {which}, so its weight would be infinite; give {listed} "
                          "instead")
    weights = tuple(total / (k * c) for c in counts)
    heavy = [(name, w, c) for name, w, c in zip(class_names, weights, counts, strict=True)
             if w > MAX_WEIGHT]
    if heavy:
        name, w, c = max(heavy, key=lambda h: h[1])
        raise ParamsError(f"params.yaml: {key} = {BALANCED!r}: class {name!r} would weigh "
                          f"{w:.6g} ({c} of {total} {unit} in the train split), more than "
                          f"{MAX_WEIGHT:g}; give {listed} instead")
    return weights


def as_mapping(weights: Sequence[float] | None, class_names: list[str]) -> dict[str, float] | None:
    """The weights as model.json records them: class name -> weight in class order (None:
    unweighted)."""
    if weights is None:
        return None
    return {name: float(w) for name, w in zip(class_names, weights, strict=True)}


def train_counts(train_dir: Path, task_name: str, num_classes: int) -> np.ndarray:
    """Per class, its images (classification), boxes (detection) or pixels (segmentation) in
    the train split of ``train_dir``. Labels are parsed from the records without decoding the
    images; masks are decoded (in parallel), the images never."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    if task_name not in UNITS:
        raise ValueError(f"no class counts for task {task_name!r}")
    paths = [str(p) for p in records.shard_paths(train_dir, "train")]
    dataset = tf.data.TFRecordDataset(paths)
    counts = np.zeros(num_classes, np.int64)
    if task_name == "segmentation":
        spec = {"mask": tf.io.FixedLenFeature([], tf.string)}

        def pixels(record):
            mask = tf.io.decode_png(tf.io.parse_single_example(record, spec)["mask"], 1)
            # Ids outside 0..K-1 count for no class, as the loss's one-hot gives them none.
            return tf.math.bincount(tf.cast(mask, tf.int32), minlength=num_classes,
                                    maxlength=num_classes, dtype=tf.int64)

        total = dataset.map(pixels, num_parallel_calls=tf.data.AUTOTUNE,
                            deterministic=False).reduce(
            tf.zeros(num_classes, tf.int64), lambda a, b: a + b)
        return counts + total.numpy()
    name = "label" if task_name == "classification" else "box_labels"
    spec = ({"label": tf.io.FixedLenFeature([], tf.int64)} if name == "label"
            else {"box_labels": tf.io.RaggedFeature(tf.int64)})
    for batch in dataset.batch(BATCH):
        labels = tf.io.parse_example(batch, spec)[name]
        if isinstance(labels, tf.RaggedTensor):
            labels = labels.values
        labels = labels.numpy()
        labels = labels[(labels >= 0) & (labels < num_classes)]
        counts += np.bincount(labels, minlength=num_classes)
    return counts
