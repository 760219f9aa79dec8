"""``model.predict`` in batches of one size, so Keras traces its predict step once."""

from __future__ import annotations

import keras
import numpy as np


def predict(model: keras.Model, images: np.ndarray, batch_size: int):
    """``model.predict(images, batch_size)`` with the last batch as large as the others.

    Keras traces its predict step for the first batch's shape and again, relaxed, for a smaller
    last batch (500 test images at 256: 256 + 244). The whole batches go through ``predict``
    as they are; the rest is padded to a whole batch with copies of its last image, whose
    outputs are dropped, so the second call reuses the first one's trace and ``images`` is not
    copied. Every image's outputs are the ones ``predict`` gives (each image goes through the
    model on its own: no layer mixes images in inference).
    Outputs: an array, or a dict of them (a detector's), for ``len(images)`` images."""
    count = len(images)
    if count == 0:
        return model.predict(images, batch_size=batch_size, verbose=0)
    batch = min(batch_size, count)
    whole = count - count % batch
    parts = []
    if whole:
        parts.append(model.predict(images[:whole], batch_size=batch, verbose=0))
    if whole < count:
        rest = images[whole:]
        padded = np.concatenate([rest, np.repeat(rest[-1:], batch - len(rest), axis=0)])
        outputs = model.predict(padded, batch_size=batch, verbose=0)
        parts.append(keras.tree.map_structure(lambda a: a[:len(rest)], outputs))
    if len(parts) == 1:
        return parts[0]
    return keras.tree.map_structure(lambda *a: np.concatenate(a), *parts)
