"""Blocks shared by the model families."""

from __future__ import annotations

import keras
from keras import layers


def image_input(input_shape: tuple[int, int, int]) -> tuple[keras.KerasTensor, keras.KerasTensor]:
    """Model input taking raw pixel values 0..255 (float), and the same scaled to 0..1.

    Scaling inside the model means exported models take plain pixels, with no training code.
    """
    inputs = keras.Input(shape=input_shape, name="image")
    return inputs, layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)


def classifier_head(x: keras.KerasTensor, num_classes: int, *, dropout: float = 0.0,
                    name: str = "head") -> keras.KerasTensor:
    """Dropout then a softmax layer kept in float32 (stable under mixed precision)."""
    if dropout > 0:
        x = layers.Dropout(dropout, name=f"{name}_dropout")(x)
    return layers.Dense(num_classes, activation="softmax", dtype="float32",
                        name=f"{name}_softmax")(x)
