"""U-Net (Ronneberger et al., 2015): an encoder-decoder with skip connections, for segmentation.

The encoder is the paper's (trained from scratch) or, with ``architecture.encoder``, a
``keras.applications`` backbone (random, ImageNet or local weights, as in the applications
family): a nested model named ``backbone`` whose outputs are its feature maps at strides 2, 4,
8, 16 (the skips) and 32 (the bottom), as in TensorFlow's segmentation tutorial and the
segmentation_models library. The decoder is the same in both. The backbone's preprocessing
lives in the model, which takes 0..255 pixels either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import keras
from keras import layers

from visionpipe.config import spec
from visionpipe.errors import ModelError, ParamsError
from visionpipe.models import pretrained
from visionpipe.models.applications import BACKBONES, ApplicationsParams, build_backbone
from visionpipe.models.layers import conv_bn_act, image_input
from visionpipe.models.registry import register

# encoder -> its layers at strides 2, 4, 8, 16 (the last layer at each stride before the next
# downsampling; the backbone's own output, at stride 32, is the bottom).
SKIPS = {
    "mobilenet_v2": ("block_1_expand_relu", "block_3_expand_relu", "block_6_expand_relu",
                     "block_13_expand_relu"),
    "resnet50": ("conv1_relu", "conv2_block3_out", "conv3_block4_out", "conv4_block6_out"),
    "efficientnet_b0": ("block2a_expand_activation", "block3a_expand_activation",
                        "block4a_expand_activation", "block6a_expand_activation"),
    "vgg16": ("block2_conv2", "block3_conv3", "block4_conv3", "block5_conv3"),
}
ENCODER_DEPTH = 5  # an encoder's bottom is at stride 2**5 = 32


@dataclass(frozen=True)
class UNetParams:
    """models.<name>.architecture for family 'unet'."""

    depth: int = spec(4, ge=1, le=6)  # 2x2 poolings; input sides must be multiples of 2**depth
    base_filters: int = spec(16, ge=1, le=1024)  # level 1; doubles at each level down
    batch_norm: bool = True
    # At the deepest encoder level and the bottleneck (with an encoder: on its stride-32 output).
    dropout: float = spec(0.0, ge=0, lt=1)
    # transpose: Conv2DTranspose 2x2, stride 2; bilinear: UpSampling2D then a 3x3 conv.
    upsampling: Literal["transpose", "bilinear"] = "transpose"
    # none: the paper's encoder, from scratch; else a keras.applications backbone (depth 5).
    encoder: Literal["none", "mobilenet_v2", "resnet50", "efficientnet_b0", "vgg16"] = "none"
    # The encoder's starting weights: null (random), imagenet (keras.applications' download),
    # or a local file in weights/: a visionpipe model.keras whose backbone is copied (an
    # applications classifier or a U-Net of the same encoder), or a Keras weights file of it.
    weights: str | None = None
    alpha: float = spec(1.0, gt=0, le=1.5)  # MobileNetV2 encoder width (0.35 .. 1.4)

    def validate(self, path: str) -> None:
        """Checks across fields; registry.parse_architecture calls this with the params key."""
        w = self.weights
        if self.encoder == "none":
            if w is not None:
                raise ParamsError(f"params.yaml: {path}.weights = {w!r}: the U-Net without an "
                                  "encoder starts from random weights; expected null, or set "
                                  "encoder (" + ", ".join(SKIPS) + ") to start from "
                                  "pretrained ones")
        elif self.depth != ENCODER_DEPTH:
            raise ParamsError(f"params.yaml: {path}.depth = {self.depth}: an encoder has "
                              f"{ENCODER_DEPTH} levels (strides 2 to 32); expected "
                              f"{ENCODER_DEPTH} with encoder {self.encoder}")
        if w is not None and w != "imagenet" and not pretrained.is_local(w):
            raise ParamsError(f"params.yaml: {path}.weights = {w!r}: expected null (random), "
                              f"imagenet, or a local file in {pretrained.WEIGHTS_DIR}/ (e.g. "
                              f"{pretrained.WEIGHTS_DIR}/{self.encoder}.weights.h5)")
        if self.alpha != 1.0 and self.encoder != "mobilenet_v2":
            raise ParamsError(f"params.yaml: {path}.alpha = {self.alpha!r}: only the "
                              "mobilenet_v2 encoder has a width; expected 1.0 for encoder "
                              f"{self.encoder}")


def check_input_size(input_shape: tuple, depth: int, encoder: str = "none") -> None:
    """Raise ModelError unless each known side of ``input_shape`` is a multiple of 2**depth
    (with an encoder: of its stride, 32)."""
    height, width = input_shape[0], input_shape[1]
    factor = 2 ** (depth if encoder == "none" else ENCODER_DEPTH)
    if all(side is None or side % factor == 0 for side in (height, width)):
        return

    def fit(side, up: bool):
        if side is None:
            return "any"
        return (-(-side // factor) if up else side // factor) * factor

    below, above = (fit(height, False), fit(width, False)), (fit(height, True), fit(width, True))
    sizes = [f"{h}x{w}" for h, w in (below, above) if 0 not in (h, w)]
    if encoder != "none":
        raise ModelError(f"unet: input size {height or 'any'}x{width or 'any'} is not a "
                         f"multiple of 32 (the stride of encoder {encoder}); use e.g. "
                         f"{' or '.join(sizes)} (prepare.segmentation.image_size / crop_size)")
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
          tiny={"depth": 2, "base_filters": 4}, tiny_input=(32, 32),
          cpu_float32=("mixed_bfloat16 trained at 0.97x float32's images/s and reached test "
                       "mean IoU 0.236 against 0.427 (`visionpipe benchmark`, 2-core AMD EPYC "
                       "with AVX-512 BF16, 2026-12-03)"))
def unet(input_shape: tuple[int, int, int], num_classes: int, p: UNetParams) -> keras.Model:
    """U-Net with "same" padding, so the output mask has the input's height and width.

    Level i (1..depth) has two 3x3 convolutions of base_filters * 2**(i-1) channels, then 2x2
    max pooling ``down{i}``; the bottleneck has base_filters * 2**depth. On the way up,
    ``up{i}`` doubles the size and halves the channels, ``dec{i}_concat`` joins the skip
    connection from ``enc{i}``, and two 3x3 convolutions follow. A 1x1 softmax convolution
    gives per-pixel class probabilities, shape (batch, H, W, num_classes).

    With ``encoder`` set, :func:`encoder_unet` builds it on a keras.applications backbone.
    """
    if p.encoder != "none":
        return encoder_unet(input_shape, num_classes, p)
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


def build_encoder(p: UNetParams, input_shape: tuple[int, int, int]) -> keras.Model:
    """The keras.applications backbone ``p.encoder`` with the weights ``p.weights`` names, as a
    model named backbone with five outputs: the feature maps at strides 2, 4, 8, 16 and 32.

    It holds every layer of the headless keras.applications model (its own output is the
    last), so its weights are those of an applications classifier's backbone of the same
    width, and either loads into the other."""
    base = build_backbone(ApplicationsParams(backbone=p.encoder, weights=p.weights,
                                             alpha=p.alpha), input_shape)
    outputs = [base.get_layer(name).output for name in SKIPS[p.encoder]] + [base.output]
    return keras.Model(base.input, outputs, name="backbone")


def encoder_unet(input_shape: tuple[int, int, int], num_classes: int,
                 p: UNetParams) -> keras.Model:
    """U-Net on a keras.applications encoder (the "backbone" of segmentation_models / the
    TensorFlow segmentation tutorial): the image goes through the backbone's own preprocessing,
    its stride-32 output (``bottleneck_dropout`` when dropout > 0) climbs back through five
    decoder levels ``up{i}`` -> ``dec{i}_concat`` (the backbone's stride-2**(i-1) features,
    for i = 5..2) -> two 3x3 convolutions ``dec{i}`` of base_filters * 2**(i-1) channels, and
    a 1x1 softmax convolution gives per-pixel class probabilities at the input size. Input:
    float32 RGB pixels 0..255, sides multiples of 32."""
    p.validate(pretrained.key().rsplit(".", 1)[0])  # already done when parsed from params
    check_input_size(input_shape, ENCODER_DEPTH, p.encoder)
    backbone = build_encoder(p, input_shape)
    inputs = keras.Input(shape=input_shape, name="image")
    preprocess = BACKBONES[p.encoder][1]
    x = preprocess(p)(inputs) if preprocess is not None else inputs
    # With pretrained weights, train keeps the backbone's batch norm in inference mode
    # (finetune.apply): training=False here would be overridden by fit's training=True.
    *skips, x = backbone(x)
    if p.dropout > 0:
        x = layers.Dropout(p.dropout, name="bottleneck_dropout")(x)
    for level in range(ENCODER_DEPTH, 0, -1):
        filters = p.base_filters * 2 ** (level - 1)
        x = _upsample(x, filters, f"up{level}", p)
        if level > 1:  # the backbone has no stride-1 features (its stem is strided)
            x = layers.Concatenate(name=f"dec{level}_concat")([skips[level - 2], x])
        x = _double_conv(x, filters, f"dec{level}", p)
    outputs = layers.Conv2D(num_classes, 1, activation="softmax", dtype="float32",
                            name="head_softmax")(x)
    return keras.Model(inputs, outputs, name="unet")
