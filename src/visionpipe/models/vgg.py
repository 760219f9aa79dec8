"""VGG (Simonyan & Zisserman, 2015): stacks of 3x3 convolutions, each stack then 2x2 max pooling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import keras
from keras import layers

from visionpipe.config import spec
from visionpipe.models.layers import classifier_head, conv_bn_act, image_input, scaled_width
from visionpipe.models.registry import register

# Convolutions per block (configurations A, B and D of the paper) and the paper's widths.
LAYOUTS = {"vgg11": (1, 1, 2, 2, 2), "vgg13": (2, 2, 2, 2, 2), "vgg16": (2, 2, 3, 3, 3)}
WIDTHS = (64, 128, 256, 512, 512)


@dataclass(frozen=True)
class VGGParams:
    """models.<name>.architecture for family 'vgg'."""

    layout: Literal["vgg11", "vgg13", "vgg16"] = "vgg11"
    width_multiplier: float = spec(0.25, gt=0, le=4)  # channels = max(8, round(64..512 * m))
    batch_norm: bool = True
    dropout: float = spec(0.5, ge=0, lt=1)
    head_units: tuple[int, ...] = spec((256,), ge=1, le=65536)  # may be empty: [] in yaml
    pooling: Literal["flatten", "global_average"] = "global_average"


@register("vgg", task="classification", params=VGGParams,
          tiny={"layout": "vgg11", "width_multiplier": 0.125, "head_units": [16]})
def vgg(input_shape: tuple[int, int, int], num_classes: int, p: VGGParams) -> keras.Model:
    """VGG-11/13/16 (Simonyan & Zisserman, 2015), optionally with BatchNorm, on any image size.

    A block's 2x2 max pooling is skipped while the feature map is already smaller than 2 px
    on a side, so small images (e.g. 16x16, MNIST's 28x28) keep all 5 conv blocks instead
    of failing; every pooling the image can take is still done.
    """
    inputs, x = image_input(input_shape)
    for b, (convs, base) in enumerate(zip(LAYOUTS[p.layout], WIDTHS, strict=True), start=1):
        filters = scaled_width(base, p.width_multiplier)
        for c in range(1, convs + 1):
            x = conv_bn_act(x, filters, 3, 1, f"block{b}_conv{c}", batch_norm=p.batch_norm)
        if min(x.shape[1], x.shape[2]) >= 2:
            x = layers.MaxPooling2D(2, name=f"block{b}_pool")(x)
    if p.pooling == "flatten":
        x = layers.Flatten(name="flatten")(x)
    else:
        x = layers.GlobalAveragePooling2D(name="global_pool")(x)
    for i, units in enumerate(p.head_units, start=1):
        x = layers.Dense(units, activation="relu", name=f"fc{i}")(x)
        if p.dropout > 0 and i < len(p.head_units):
            x = layers.Dropout(p.dropout, name=f"fc{i}_dropout")(x)
    # The last hidden layer's dropout (or, with no hidden layer, dropout on the pooled
    # features) is the classifier head's.
    outputs = classifier_head(x, num_classes, dropout=p.dropout)
    return keras.Model(inputs, outputs, name=p.layout)
