"""ResNet (He et al., 2016): residual blocks in the CIFAR (6n+2) and ImageNet (18/34/50) layouts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import keras
from keras import layers

from visionpipe.config import spec
from visionpipe.errors import ParamsError
from visionpipe.models.layers import (
    basic_block,
    bottleneck_block,
    classifier_head,
    conv_bn_act,
    image_input,
    scaled_width,
)
from visionpipe.models.registry import register

# ImageNet layouts (Table 1 of the paper): blocks per stage and whether they are bottlenecks.
IMAGENET = {18: ((2, 2, 2, 2), False), 34: ((3, 4, 6, 3), False), 50: ((3, 4, 6, 3), True)}
IMAGENET_WIDTHS = (64, 128, 256, 512)
CIFAR_WIDTHS = (16, 32, 64)


@dataclass(frozen=True)
class ResNetParams:
    """models.<name>.architecture for family 'resnet'."""

    variant: Literal["cifar", "imagenet"] = "cifar"
    depth: int = spec(20, ge=8, le=1202)  # cifar: 6n+2 (20, 32, 44, 56, 110); imagenet: 18/34/50
    width_multiplier: float = spec(1.0, gt=0, le=4)  # channels = max(8, round(paper width * m))
    small_input_stem: bool = False  # imagenet: 3x3/1 conv stem, no max pool (32-64 px images)
    dropout: float = spec(0.0, ge=0, lt=1)

    def validate(self, path: str) -> None:
        """Checks across fields; registry.parse_architecture calls this with the params key."""
        if self.variant == "cifar" and (self.depth < 8 or (self.depth - 2) % 6):
            raise ParamsError(f"params.yaml: {path}.depth = {self.depth}: expected 6n+2 >= 8 "
                              "(e.g. 20, 32, 44, 56, 110) for variant 'cifar'")
        if self.variant == "imagenet" and self.depth not in IMAGENET:
            raise ParamsError(f"params.yaml: {path}.depth = {self.depth}: expected one of "
                              f"{', '.join(map(str, IMAGENET))} for variant 'imagenet'")

    def stages(self) -> list[tuple[int, int]]:
        """(blocks, paper width) of each stage."""
        if self.variant == "cifar":
            return [((self.depth - 2) // 6, w) for w in CIFAR_WIDTHS]
        return list(zip(IMAGENET[self.depth][0], IMAGENET_WIDTHS, strict=True))


@register("resnet", task="classification", params=ResNetParams,
          tiny={"variant": "cifar", "depth": 8, "width_multiplier": 0.5})
def resnet(input_shape: tuple[int, int, int], num_classes: int, p: ResNetParams) -> keras.Model:
    """ResNet v1, post-activation (He et al., 2016): conv-BN-ReLU, add, ReLU; projection shortcuts.

    cifar: 3x3 stem, 3 stages of n basic blocks (16/32/64 channels), depth 6n+2.
    imagenet: 7x7/2 stem + 3x3/2 max pool (or a 3x3/1 stem), 4 stages, basic (18, 34)
    or bottleneck (50) blocks. Stride 2 opens every stage after the first.
    """
    p.validate("architecture")  # already done with the full key when built from params.yaml
    inputs, x = image_input(input_shape)
    bottleneck = p.variant == "imagenet" and IMAGENET[p.depth][1]
    stages = p.stages()
    stem = scaled_width(stages[0][1], p.width_multiplier)
    if p.variant == "cifar" or p.small_input_stem:
        x = conv_bn_act(x, stem, 3, 1, "stem_conv")
    else:
        x = conv_bn_act(x, stem, 7, 2, "stem_conv")
        x = layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    for s, (blocks, base) in enumerate(stages, start=1):
        filters = scaled_width(base, p.width_multiplier)
        for b in range(1, blocks + 1):
            stride = 2 if s > 1 and b == 1 else 1
            name = f"stage{s}_block{b}"
            if bottleneck:
                x = bottleneck_block(x, filters, stride, name)
            else:
                x = basic_block(x, filters, stride, name)
    x = layers.GlobalAveragePooling2D(name="global_pool")(x)
    outputs = classifier_head(x, num_classes, dropout=p.dropout)
    return keras.Model(inputs, outputs, name=f"resnet{p.depth}")
