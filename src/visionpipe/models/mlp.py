"""Multi-layer perceptron on flattened pixels: the baseline every CNN has to beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import keras
from keras import layers

from visionpipe.config import spec
from visionpipe.models.layers import classifier_head, image_input
from visionpipe.models.registry import register


@dataclass(frozen=True)
class MLPParams:
    """models.<name>.architecture for family 'mlp'."""

    hidden_units: tuple[int, ...] = spec((512, 256), ge=1, le=65536, min_len=1)
    activation: Literal["relu", "gelu", "swish", "tanh", "elu"] = "relu"
    dropout: float = spec(0.2, ge=0, lt=1)
    batch_norm: bool = True
    # 0.9 rather than Keras' 0.99: with few steps per epoch the moving statistics must keep
    # up with the fast-changing first layer, or inference-mode accuracy lags far behind.
    batch_norm_momentum: float = spec(0.9, gt=0, lt=1)
    input_pool: int = spec(1, ge=1, le=16)  # average-pool the image by this factor first


@register("mlp", task="classification", params=MLPParams,
          tiny={"hidden_units": [16, 8], "dropout": 0.1},
          cpu_float32=("mixed_bfloat16 trained at 1.16x float32's images/s but reached test "
                       "accuracy 0.582 against 0.612 (`visionpipe benchmark`, 2-core AMD EPYC "
                       "with AVX-512 BF16, 2026-12-03)"))
def mlp(input_shape: tuple[int, int, int], num_classes: int, p: MLPParams) -> keras.Model:
    """(AvgPool) -> Flatten -> [Dense -> (BatchNorm) -> activation -> (Dropout)] x N -> softmax."""
    inputs, x = image_input(input_shape)
    if p.input_pool > 1:
        x = layers.AveragePooling2D(p.input_pool, name="input_pool")(x)
    x = layers.Flatten(name="flatten")(x)
    for i, units in enumerate(p.hidden_units, start=1):
        x = layers.Dense(units, use_bias=not p.batch_norm, name=f"dense{i}")(x)
        if p.batch_norm:
            x = layers.BatchNormalization(momentum=p.batch_norm_momentum,
                                          name=f"dense{i}_bn")(x)
        x = layers.Activation(p.activation, name=f"dense{i}_{p.activation}")(x)
        if p.dropout > 0 and i < len(p.hidden_units):
            x = layers.Dropout(p.dropout, name=f"dense{i}_dropout")(x)
    outputs = classifier_head(x, num_classes, dropout=p.dropout)
    return keras.Model(inputs, outputs, name="mlp")
