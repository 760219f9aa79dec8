"""Classifiers on ``keras.applications`` backbones (ResNet50, MobileNetV2/V3, EfficientNetB0,
VGG16), from random, ImageNet or local weights: transfer learning as in keras-io's guide.

The model is ``image -> preprocessing -> backbone -> global pooling -> dropout -> softmax``, the
backbone a nested model named ``backbone`` (what train's fine-tuning schedule freezes and
unfreezes, see visionpipe.finetune). The preprocessing the weights were trained with lives in
the model, so every export still takes plain 0..255 pixels. With pretrained weights train keeps
the backbone's batch normalisation in inference mode (finetune.apply), frozen or not; from
random weights it learns its statistics as usual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import keras
from keras import layers, ops

from visionpipe.config import spec
from visionpipe.models import pretrained
from visionpipe.models.layers import BN_MOMENTUM, classifier_head
from visionpipe.models.registry import register

# ImageNet's channel means in BGR order, as keras.applications' "caffe" preprocessing uses them.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="visionpipe")
class CaffePreprocess(layers.Layer):
    """RGB 0..255 -> BGR minus ImageNet's mean: ResNet50's and VGG16's preprocess_input."""

    def call(self, x):
        return ops.flip(x, axis=-1) - ops.convert_to_tensor(CAFFE_MEAN_BGR, dtype=x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape


def _caffe(_p):
    return CaffePreprocess(name="preprocess")


def _tf(_p):
    return layers.Rescaling(1.0 / 127.5, offset=-1.0, name="preprocess")  # to -1..1


# name -> (constructor, preprocessing outside the backbone (None: it has its own), its kwargs)
BACKBONES = {
    "resnet50": (keras.applications.ResNet50, _caffe, ()),
    "vgg16": (keras.applications.VGG16, _caffe, ()),
    "mobilenet_v2": (keras.applications.MobileNetV2, _tf, ("alpha",)),
    "mobilenet_v3_small": (keras.applications.MobileNetV3Small, None, ("alpha",)),
    "mobilenet_v3_large": (keras.applications.MobileNetV3Large, None, ("alpha",)),
    "efficientnet_b0": (keras.applications.EfficientNetB0, None, ()),
}
# keras.applications' own constructor names, for the command users with a network run.
CONSTRUCTORS = {"resnet50": "ResNet50", "vgg16": "VGG16", "mobilenet_v2": "MobileNetV2",
                "mobilenet_v3_small": "MobileNetV3Small",
                "mobilenet_v3_large": "MobileNetV3Large", "efficientnet_b0": "EfficientNetB0"}


@dataclass(frozen=True)
class ApplicationsParams:
    """models.<name>.architecture for family 'applications'."""

    backbone: Literal["resnet50", "vgg16", "mobilenet_v2", "mobilenet_v3_small",
                      "mobilenet_v3_large", "efficientnet_b0"] = "mobilenet_v2"
    # null: random weights; imagenet: keras.applications' download (cached in ~/.keras/models);
    # or a local file in weights/: a visionpipe model.keras whose backbone is copied, or a Keras
    # weights file of this backbone (.weights.h5, .h5).
    weights: str | None = None
    alpha: float = spec(1.0, gt=0, le=1.5)  # MobileNet width (0.35 .. 1.4 have ImageNet weights)
    pooling: Literal["avg", "max"] = "avg"
    dropout: float = spec(0.2, ge=0, lt=1)

    def validate(self, path: str) -> None:
        """Checks across fields; registry.parse_architecture calls this with the params key."""
        from visionpipe.errors import ParamsError

        w = self.weights
        if w is not None and w != "imagenet" and not pretrained.is_local(w):
            raise ParamsError(f"params.yaml: {path}.weights = {w!r}: expected null (random), "
                              f"imagenet, or a local file in {pretrained.WEIGHTS_DIR}/ (e.g. "
                              f"{pretrained.WEIGHTS_DIR}/{self.backbone}.weights.h5)")
        if self.alpha != 1.0 and "alpha" not in BACKBONES[self.backbone][2]:
            raise ParamsError(f"params.yaml: {path}.alpha = {self.alpha!r}: only the MobileNets "
                              f"have a width; expected 1.0 for backbone {self.backbone}")


def build_backbone(p: ApplicationsParams, input_shape: tuple[int, int, int]) -> keras.Model:
    """The headless backbone with the weights ``p.weights`` names, as a model named backbone."""
    make, _, options = BACKBONES[p.backbone]
    kwargs = {"input_shape": tuple(input_shape), "include_top": False}
    kwargs.update({o: getattr(p, o) for o in options})
    if p.weights == "imagenet":
        call = (f"python -c \"import keras; keras.applications.{CONSTRUCTORS[p.backbone]}("
                + "".join(f"{o}={getattr(p, o)!r}, " for o in options)
                + "include_top=False, weights='imagenet')\"")
        model = pretrained.download(
            "weights", "imagenet", f"ImageNet weights of {p.backbone}",
            lambda: make(weights="imagenet", **kwargs),
            then=f"on a machine with a network run {call}, copy the file it saves in "
                 f"~/.keras/models/ into {pretrained.WEIGHTS_DIR}/ and set weights: "
                 f"{pretrained.WEIGHTS_DIR}/<that file>")
    else:
        model = make(weights=None, **kwargs)
        if p.weights is not None:
            pretrained.load_into(model, p.weights)
        else:
            # keras.applications' batch norm momentum (0.99, MobileNets 0.999) suits ImageNet's
            # thousands of steps; from random weights on a few hundred steps the moving
            # statistics lag far behind and inference-mode accuracy stays at chance (measured:
            # val_accuracy 0.254 on shapes after 2 epochs at train accuracy 0.77). The project's
            # own families use 0.9 (models/layers.py); pretrained ones keep theirs frozen.
            for layer in model.layers:
                if isinstance(layer, layers.BatchNormalization):
                    layer.momentum = BN_MOMENTUM
    # A nested model keeps its own name in the saved file; "backbone" is what fine-tuning finds.
    return keras.Model(model.input, model.output, name="backbone")


@register("applications", task="classification", params=ApplicationsParams,
          tiny={"backbone": "mobilenet_v2", "alpha": 0.35},
          cpu_float32=("MobileNetV2 (alpha 0.35) trained at 0.62x float32's images/s in "
                       "mixed_bfloat16 (`visionpipe benchmark`, 2-core AMD EPYC with AVX-512 "
                       "BF16, 2026-12-03; the other backbones were not measured)"))
def applications(input_shape: tuple[int, int, int], num_classes: int,
                 p: ApplicationsParams) -> keras.Model:
    """keras.applications backbone + global pooling + dropout + softmax (keras-io's transfer
    learning model). Input: float32 RGB pixels 0..255 of at least 32x32."""
    backbone = build_backbone(p, input_shape)
    inputs = keras.Input(shape=input_shape, name="image")
    preprocess = BACKBONES[p.backbone][1]
    x = preprocess(p)(inputs) if preprocess is not None else inputs
    x = backbone(x)
    pool = layers.GlobalAveragePooling2D if p.pooling == "avg" else layers.GlobalMaxPooling2D
    x = pool(name="global_pool")(x)
    outputs = classifier_head(x, num_classes, dropout=p.dropout)
    return keras.Model(inputs, outputs, name=f"{p.backbone}_classifier")
