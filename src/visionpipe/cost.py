"""What a model costs to run: FLOPs per image, latency per image, and the machine measured on."""

from __future__ import annotations

import platform
import time

import keras
import numpy as np
import tensorflow as tf

from visionpipe.timing import cores


def flops_per_image(model: keras.Model, input_shape: tuple[int, ...]) -> int:
    """Floating-point operations of one forward pass on one image (TF profiler count)."""
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    fn = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec((1, *input_shape), tf.float32))
    frozen = convert_variables_to_constants_v2(fn)
    opts = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    opts["output"] = "none"
    info = tf.compat.v1.profiler.profile(graph=frozen.graph,
                                         run_meta=tf.compat.v1.RunMetadata(), cmd="op",
                                         options=opts)
    return int(info.total_float_ops)


def latency_ms(model: keras.Model, images: np.ndarray, samples: int, warmup: int) -> dict:
    """Mean and median wall time of a compiled forward pass on one image (batch of 1)."""
    fn = tf.function(lambda x: model(x, training=False))
    n = len(images)
    for i in range(warmup):
        to_numpy(fn(images[i % n][None]))
    times = []
    for i in range(samples):
        x = images[i % n][None]
        start = time.perf_counter()
        to_numpy(fn(x))
        times.append((time.perf_counter() - start) * 1000.0)
    return {"mean": float(np.mean(times)), "median": float(np.median(times)),
            "samples": samples, "batch_size": 1}


def to_numpy(outputs):
    """Wait for every output of a forward pass (one tensor, or a detector's dict of them)."""
    return tf.nest.map_structure(lambda t: t.numpy(), outputs)


def machine() -> dict:
    """The CPU, its cores available here, and whether TensorFlow sees a GPU."""
    return {"cpu": platform.processor() or platform.machine(), "cores": cores(),
            "gpu": bool(tf.config.list_physical_devices("GPU"))}
