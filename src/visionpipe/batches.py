"""``model.predict`` in batches of one size, so Keras traces its predict step once."""

from __future__ import annotations

import keras
import numpy as np


def predict(model: keras.Model, images: np.ndarray, batch_size: int):
    """``model.predict(images, batch_size)`` with the last batch as large as the others.

    Keras traces its predict step for the first batch's shape and again, relaxed, for a smaller
    last batch (500 test images at 256: 256 + 244); the last batch is padded with copies of the
    last image and their outputs dropped. Every image's outputs are the ones ``predict`` gives
    (each image goes through the model on its own: no layer mixes images in inference).
    Outputs: an array, or a dict of them (a detector's), for ``len(images)`` images."""
    count = len(images)
    if count == 0:
        return model.predict(images, batch_size=batch_size, verbose=0)
    batch = min(batch_size, count)
    short = -count % batch
    if short:
        images = np.concatenate([images, np.repeat(images[-1:], short, axis=0)])
    outputs = model.predict(images, batch_size=batch, verbose=0)
    return keras.tree.map_structure(lambda a: a[:count], outputs)
