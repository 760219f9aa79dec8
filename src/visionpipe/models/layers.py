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


# 0.9 rather than Keras' 0.99, as in the MLP: with few steps per epoch the moving statistics
# must keep up with the weights, or inference-mode accuracy lags far behind training.
BN_MOMENTUM = 0.9


def scaled_width(base: int, multiplier: float, minimum: int = 8) -> int:
    """Channels of a layer whose paper width is ``base``, scaled by ``multiplier``."""
    return max(minimum, round(base * multiplier))


def conv_bn_act(x: keras.KerasTensor, filters: int, kernel: int, stride: int, name: str, *,
                batch_norm: bool = True, activation: str | None = "relu") -> keras.KerasTensor:
    """Conv2D (same padding, He init) -> (BatchNorm) -> (activation); layers ``name``[_bn|_act].

    The convolution has no bias when BatchNorm follows (BN's beta plays that role).
    """
    x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=not batch_norm,
                      kernel_initializer="he_normal", name=name)(x)
    if batch_norm:
        x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
    if activation:
        x = layers.Activation(activation, name=f"{name}_{activation}")(x)
    return x


def _shortcut(x: keras.KerasTensor, filters: int, stride: int, name: str,
              batch_norm: bool) -> keras.KerasTensor:
    # Projection (1x1 conv + BN, strided) only where the shape changes; identity otherwise.
    if stride == 1 and x.shape[-1] == filters:
        return x
    return conv_bn_act(x, filters, 1, stride, f"{name}_shortcut", batch_norm=batch_norm,
                       activation=None)


def basic_block(x: keras.KerasTensor, filters: int, stride: int, name: str, *,
                batch_norm: bool = True) -> keras.KerasTensor:
    """ResNet v1 basic block (He et al., 2016): 3x3 -> 3x3, add shortcut, then ReLU."""
    shortcut = _shortcut(x, filters, stride, name, batch_norm)
    y = conv_bn_act(x, filters, 3, stride, f"{name}_conv1", batch_norm=batch_norm)
    y = conv_bn_act(y, filters, 3, 1, f"{name}_conv2", batch_norm=batch_norm, activation=None)
    y = layers.Add(name=f"{name}_add")([shortcut, y])
    return layers.Activation("relu", name=f"{name}_out")(y)


def bottleneck_block(x: keras.KerasTensor, filters: int, stride: int, name: str, *,
                     expansion: int = 4, batch_norm: bool = True) -> keras.KerasTensor:
    """ResNet v1 bottleneck (He et al., 2016): 1x1 -> 3x3 -> 1x1 (x``expansion``), add, ReLU.

    The stride sits on the 3x3 convolution (torchvision's "v1.5"), not on the first 1x1.
    """
    out = filters * expansion
    shortcut = _shortcut(x, out, stride, name, batch_norm)
    y = conv_bn_act(x, filters, 1, 1, f"{name}_conv1", batch_norm=batch_norm)
    y = conv_bn_act(y, filters, 3, stride, f"{name}_conv2", batch_norm=batch_norm)
    y = conv_bn_act(y, out, 1, 1, f"{name}_conv3", batch_norm=batch_norm, activation=None)
    y = layers.Add(name=f"{name}_add")([shortcut, y])
    return layers.Activation("relu", name=f"{name}_out")(y)
