"""U-Net (Ronneberger et al., 2015): an encoder-decoder with skip connections, for segmentation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import keras
from keras import layers

from visionpipe.config import spec
from visionpipe.errors import ModelError
from visionpipe.models.layers import conv_bn_act, image_input
from visionpipe.models.registry import register


@dataclass(frozen=True)
class UNetParams:
    """models.<name>.architecture for family 'unet'."""

    depth: int = spec(4, ge=1, le=6)  # 2x2 poolings; input sides must be multiples of 2**depth
    base_filters: int = spec(16, ge=1, le=1024)  # level 1; doubles at each level down
    batch_norm: bool = True
    dropout: float = spec(0.0, ge=0, lt=1)  # at the deepest encoder level and the bottleneck
    # transpose: Conv2DTranspose 2x2, stride 2; bilinear: UpSampling2D then a 3x3 conv.
    upsampling: Literal["transpose", "bilinear"] = "transpose"


def check_input_size(input_shape: tuple, depth: int) -> None:
    """Raise ModelError unless each known side of ``input_shape`` is a multiple of 2**depth."""
    height, width = input_shape[0], input_shape[1]
    factor = 2 ** depth
    if all(side is None or side % factor == 0 for side in (height, width)):
        return

    def fit(side, up: bool):
        if side is None:
            return "any"
        return (-(-side // factor) if up else side // factor) * factor

    below, above = (fit(height, False), fit(width, False)), (fit(height, True), fit(width, True))
    sizes = [f"{h}x{w}" for h, w in (below, above) if 0 not in (h, w)]
    raise ModelError(f"unet: input size {height or 'any'}x{width or 'any'} is not a multiple "
                     f"of 2**depth = {factor} (depth {depth}); use e.g. {' or '.join(sizes)} "
                     "(prepare.segmentation.image_size / crop_size), or lower "
                     "architecture.depth")


def _double_conv(x: keras.KerasTensor, filters: int, name: str, p: UNetParams,
                 dropout: bool = False) -> keras.KerasTensor:
    x = conv_bn_act(x, filters, 3, 1, f"{name}_conv1", batch_norm=p.batch_norm)
    x = conv_bn_act(x, filters, 3, 1, f"{name}_conv2", batch_norm=p.batch_norm)
    if dropout and p.dropout > 0:
        x = layers.Dropout(p.dropout, name=f"{name}_dropout")(x)
    return x


def _upsample(x: keras.KerasTensor, filters: int, name: str, p: UNetParams) -> keras.KerasTensor:
    # Linear (no BN, no activation), as the paper's 2x2 "up-convolution".
    if p.upsampling == "transpose":
        return layers.Conv2DTranspose(filters, 2, strides=2, padding="same",
                                      kernel_initializer="he_normal", name=name)(x)
    x = layers.UpSampling2D(2, interpolation="bilinear", name=name)(x)
    return layers.Conv2D(filters, 3, padding="same", kernel_initializer="he_normal",
                         name=f"{name}_conv")(x)


# Tiny input: sides must be multiples of 2**depth = 4.
@register("unet", task="segmentation", params=UNetParams,
          tiny={"depth": 2, "base_filters": 4}, tiny_input=(32, 32))
def unet(input_shape: tuple[int, int, int], num_classes: int, p: UNetParams) -> keras.Model:
    """U-Net with "same" padding, so the output mask has the input's height and width.

    Level i (1..depth) has two 3x3 convolutions of base_filters * 2**(i-1) channels, then 2x2
    max pooling ``down{i}``; the bottleneck has base_filters * 2**depth. On the way up,
    ``up{i}`` doubles the size and halves the channels, ``dec{i}_concat`` joins the skip
    connection from ``enc{i}``, and two 3x3 convolutions follow. A 1x1 softmax convolution
    gives per-pixel class probabilities, shape (batch, H, W, num_classes).
    """
    check_input_size(input_shape, p.depth)
    inputs, x = image_input(input_shape)
    skips = []
    for level in range(1, p.depth + 1):
        filters = p.base_filters * 2 ** (level - 1)
        x = _double_conv(x, filters, f"enc{level}", p, dropout=level == p.depth)
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"down{level}")(x)
    x = _double_conv(x, p.base_filters * 2 ** p.depth, "bottleneck", p, dropout=True)
    for level in range(p.depth, 0, -1):
        filters = p.base_filters * 2 ** (level - 1)
        x = _upsample(x, filters, f"up{level}", p)
        x = layers.Concatenate(name=f"dec{level}_concat")([skips[level - 1], x])
        x = _double_conv(x, filters, f"dec{level}", p)
    # float32 so the softmax is stable under mixed precision.
    outputs = layers.Conv2D(num_classes, 1, activation="softmax", dtype="float32",
                            name="head_softmax")(x)
    return keras.Model(inputs, outputs, name="unet")
