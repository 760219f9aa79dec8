"""YOLO (keras-cv's YOLOv8): an anchor-free one-stage object detector, trained from scratch.

keras-cv stays behind this module: the stages build, decode and configure detectors only
through the functions here. The model takes float32 RGB pixels in 0..255 (it rescales inside)
and returns raw head outputs; :func:`detect` decodes them into boxes with non-maximum
suppression (NMS) set by :func:`set_nms` from params (``evaluate.nms``, ``export.nms``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from visionpipe.config import NMSConfig, spec
from visionpipe.errors import ModelError
from visionpipe.models.registry import register
from visionpipe.tasks.detection import DetectorHooks

STRIDE = 32  # the coarsest feature map (P5) is the input over 32
BOX_FORMAT = "xyxy"  # absolute pixels, as prepare stores them
BOX_CHANNELS = 64  # raw head: 4 sides x 16 distance bins (DFL), then the class scores
# Channels and C2f blocks of the backbone's four stages: keras-cv's YOLOv8 presets xs, s and
# m (ultralytics' n, s and m scaled the same way).
VARIANTS = {
    "n": ((32, 64, 128, 256), (1, 2, 2, 1)),
    "s": ((64, 128, 256, 512), (1, 2, 2, 1)),
    "m": ((96, 192, 384, 576), (2, 4, 4, 2)),
}


@dataclass(frozen=True)
class YOLOParams:
    """models.<name>.architecture for family 'yolo'."""

    variant: Literal["n", "s", "m"] = "n"
    # Scales the variant: channels times width_multiplier, blocks per stage times
    # depth_multiplier (rounded, at least 1). 0.5 and 1.0 on n: a CPU-sized detector.
    width_multiplier: float = spec(1.0, gt=0, le=4)
    depth_multiplier: float = spec(1.0, gt=0, le=4)
    fpn_depth: int = spec(1, ge=1, le=6)  # C2f blocks in each path-aggregation FPN step
    # The loss: box_loss_weight * CIoU box loss + class_loss_weight * binary cross-entropy
    # (keras-cv's, and ultralytics', 7.5 and 0.5).
    box_loss_weight: float = spec(7.5, gt=0, le=100)
    class_loss_weight: float = spec(0.5, gt=0, le=100)

    def stages(self) -> tuple[list[int], list[int]]:
        """The backbone's channels and blocks per stage after the multipliers."""
        channels, depths = VARIANTS[self.variant]
        # Channels stay even: the C2f blocks split them in two halves.
        return ([max(8, 2 * round(c * self.width_multiplier / 2)) for c in channels],
                [max(1, round(d * self.depth_multiplier)) for d in depths])


def check_input_size(input_shape: tuple) -> None:
    """Raise ModelError unless height and width are multiples of 32 (the P5 stride)."""
    height, width = input_shape[0], input_shape[1]
    if all(side is not None and side % STRIDE == 0 and side > 0 for side in (height, width)):
        return

    def near(side, up):
        return max(STRIDE, (-(-side // STRIDE) if up else side // STRIDE) * STRIDE)

    sizes = sorted({(near(height, False), near(width, False)), (near(height, True),
                                                                 near(width, True))})
    raise ModelError(f"yolo: input size {height}x{width} is not a multiple of 32 (the "
                     "detector's coarsest stride); set prepare.detection.image_size to e.g. "
                     + " or ".join(f"[{h}, {w}]" for h, w in sizes))


def _keras_cv():
    import keras_cv  # imported here: only detection needs it, and it is slow to import

    return keras_cv


def nms_layer(nms: NMSConfig):
    """keras-cv's NonMaxSuppression with the thresholds of ``nms`` (scores are sigmoids)."""
    return _keras_cv().layers.NonMaxSuppression(
        bounding_box_format=BOX_FORMAT, from_logits=False, iou_threshold=nms.iou_threshold,
        confidence_threshold=nms.confidence_threshold, max_detections=nms.max_detections)


class YOLOHooks(DetectorHooks):
    """What the detection task needs from a YOLOv8 model (the functions below)."""

    def compile(self, model, optimizer, architecture: YOLOParams) -> None:
        compile_detector(model, optimizer, architecture)

    def set_nms(self, model, nms: NMSConfig) -> None:
        set_nms(model, nms)

    def detect(self, model, images: np.ndarray, batch_size: int) -> list[dict]:
        return detect(model, images, batch_size)

    def decode(self, model, raw: dict, images) -> dict:
        return decode(model, raw, images)

    def flatten(self, raw: dict):
        import tensorflow as tf

        return tf.concat([raw["boxes"], raw["classes"]], axis=-1)

    def class_scores(self, flat: np.ndarray) -> np.ndarray:
        return flat[..., BOX_CHANNELS:]

    def raw_decoder(self) -> dict:
        from visionpipe.box_decoding import DECODER

        return DECODER

    def head_parts(self, model):
        return head_parts(model)


# Tiny: 8-16-32-64 channels, one C2f block per stage; sides must be multiples of 32.
@register("yolo", task="detection", params=YOLOParams,
          tiny={"variant": "n", "width_multiplier": 0.25, "depth_multiplier": 0.1},
          tiny_input=(32, 32), hooks=YOLOHooks())
def build(input_shape: tuple[int, int, int], num_classes: int, p: YOLOParams):
    """A YOLOv8 detector with random weights (nothing is downloaded)."""
    check_input_size(input_shape)
    keras_cv = _keras_cv()
    channels, depths = p.stages()
    backbone = keras_cv.models.YOLOV8Backbone(
        stackwise_channels=channels, stackwise_depth=depths, include_rescaling=True,
        activation="swish", input_shape=tuple(input_shape))
    return keras_cv.models.YOLOV8Detector(
        num_classes=num_classes, bounding_box_format=BOX_FORMAT, backbone=backbone,
        fpn_depth=p.fpn_depth, prediction_decoder=nms_layer(NMSConfig()),
        name=f"yolov8{p.variant}")


def compile_detector(model, optimizer, p: YOLOParams) -> None:
    """YOLOv8's own loss: CIoU on boxes, binary cross-entropy on classes (keras-cv)."""
    model.compile(optimizer=optimizer, box_loss="ciou",
                  classification_loss="binary_crossentropy",
                  box_loss_weight=p.box_loss_weight,
                  classification_loss_weight=p.class_loss_weight)


def set_nms(model, nms: NMSConfig) -> None:
    """Decode this detector's boxes with the thresholds of ``nms`` from now on."""
    model.prediction_decoder = nms_layer(nms)


def head_parts(model):
    """float32 images -> ``{"boxes": (N, A, 64), "classes": (N, A, K)}``, equal to the model's
    own outputs but taken from the head's last layers before keras-cv concatenates boxes and
    classes: joined, a full-int8 file quantises class scores (0..1) on the box logits' scale
    (tens), about 0.1 per step."""
    import keras
    import tensorflow as tf

    levels = sorted({layer.name.removesuffix("_classifier") for layer in model.layers
                     if layer.name.startswith("yolo_v8_head_")
                     and layer.name.endswith("_classifier")})
    outputs = [model.get_layer(f"{level}_{part}").output
               for part in ("box_3_conv", "classifier") for level in levels]
    parts = keras.Model(model.inputs, outputs, name=f"{model.name}_head_parts")

    def call(images):
        flat = [tf.reshape(o, [tf.shape(o)[0], -1, o.shape[-1]])
                for o in parts(images, training=False)]
        return {"boxes": tf.concat(flat[:len(levels)], axis=1),
                "classes": tf.concat(flat[len(levels):], axis=1)}

    return call


def decode(model, raw: dict, images) -> dict:
    """Boxes, classes, confidences and counts (padded per image) from raw head outputs."""
    return model.decode_predictions(raw, images)


def unpad(decoded: dict) -> list[dict]:
    """Per image: ``boxes`` (n, 4) xyxy pixels, ``class_ids`` (n,), ``scores`` (n,)."""
    out = []
    counts = np.asarray(decoded["num_detections"]).astype(int)
    for i, n in enumerate(counts):
        out.append({"boxes": np.asarray(decoded["boxes"][i][:n], np.float32),
                     "class_ids": np.asarray(decoded["classes"][i][:n]).astype(np.int64),
                     "scores": np.asarray(decoded["confidence"][i][:n], np.float32)})
    return out


def detect(model, images: np.ndarray, batch_size: int) -> list[dict]:
    """Detections per image (see :func:`unpad`) with the model's current NMS."""
    return unpad(model.predict(images, batch_size=batch_size, verbose=0))
