"""YOLO (keras-cv's YOLOv8): an anchor-free one-stage object detector, from scratch or from a
COCO-pretrained backbone.

keras-cv stays behind this module: the stages build, decode and configure detectors only
through the functions here. The model takes float32 RGB pixels in 0..255 (it rescales inside)
and returns raw head outputs; :func:`detect` decodes them into boxes with non-maximum
suppression (NMS) set by :func:`set_nms` from params (``evaluate.nms``, ``export.nms``).

``architecture.weights`` picks the backbone's starting weights: null (random, the build of
``variant`` and the multipliers), a keras-cv preset name (its COCO weights, downloaded from
Kaggle), a local keras-cv preset folder in ``weights/`` (``config.json`` and
``model.weights.h5``), or a local file (a visionpipe ``.keras`` YOLO or the backbone's
``.weights.h5``). The neck and head always start from random weights (a new set of classes).
With a preset the backbone's shape comes from the preset, and ``variant``, ``width_multiplier``
and ``depth_multiplier`` must describe it (an error says the values to set), so params and
model.json say what was trained.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np

from visionpipe.config import NMSConfig, spec
from visionpipe.errors import ModelError, ParamsError
from visionpipe.models import pretrained
from visionpipe.models.registry import register
from visionpipe.tasks.detection import ClassWeightedBinaryCrossentropy, DetectorHooks

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
# keras-cv's COCO-pretrained backbone presets (weights on Kaggle) -> the variant each one is at
# width and depth 1.0 (same channels, blocks and parameter count: 1,277,680, 5,089,760 and
# 11,872,464). Its l and xl presets have no variant here.
PRESETS = {"yolo_v8_xs_backbone_coco": "n", "yolo_v8_s_backbone_coco": "s",
           "yolo_v8_m_backbone_coco": "m"}


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
    # The backbone's starting weights: null (random); a keras-cv COCO preset
    # (yolo_v8_xs_backbone_coco = variant n, yolo_v8_s_backbone_coco = s,
    # yolo_v8_m_backbone_coco = m; multipliers 1.0), downloaded from Kaggle; or in weights/: a
    # keras-cv preset folder (config.json + model.weights.h5), a visionpipe YOLO model.keras,
    # or the backbone's .weights.h5. The neck and head start from random weights.
    weights: str | None = None

    def validate(self, path: str) -> None:
        """Checks across fields; registry.parse_architecture calls this with the params key."""
        w = self.weights
        if w is None or pretrained.is_local(w):
            return  # a local preset's shape is checked when the model is built
        if w not in PRESETS:
            raise ParamsError(
                f"params.yaml: {path}.weights = {w!r}: expected null (random), a keras-cv COCO "
                "preset (" + ", ".join(f"{name} = variant {v}" for name, v in PRESETS.items())
                + f") or a local preset folder or file in {pretrained.WEIGHTS_DIR}/ (e.g. "
                f"{pretrained.WEIGHTS_DIR}/yolo_v8_xs_backbone_coco)")
        channels, depths = VARIANTS[PRESETS[w]]
        mismatch = _mismatch(self, {"variant": PRESETS[w], "width_multiplier": 1.0,
                                    "depth_multiplier": 1.0})
        if mismatch:
            field, value, want = mismatch
            raise ParamsError(
                f"params.yaml: {path}.{field} = {value!r}: the preset {w} is variant "
                f"{PRESETS[w]} at full width and depth (channels {_dashed(channels)}, blocks "
                f"{_dashed(depths)}; the preset decides the backbone); set {field}: {want}")

    def stages(self) -> tuple[list[int], list[int]]:
        """The backbone's channels and blocks per stage after the multipliers."""
        channels, depths = VARIANTS[self.variant]
        # Channels stay even: the C2f blocks split them in two halves.
        return ([max(8, 2 * round(c * self.width_multiplier / 2)) for c in channels],
                [max(1, round(d * self.depth_multiplier)) for d in depths])


def _dashed(values) -> str:
    return "-".join(str(v) for v in values)


def _mismatch(p: YOLOParams, want: dict) -> tuple[str, object, object] | None:
    """The first of variant, width_multiplier, depth_multiplier that differs from ``want``:
    (field, value in p, wanted value); None when all agree."""
    for field, value in want.items():
        if getattr(p, field) != value:
            return field, getattr(p, field), value
    return None


def _params_for(channels: list[int], depths: list[int]) -> dict | None:
    """A variant and multipliers whose backbone has these channels and blocks; None if none."""
    if len(channels) != 4 or len(depths) != 4:
        return None
    for variant, (base_channels, base_depths) in VARIANTS.items():
        width = round(channels[0] / base_channels[0], 4)
        ratios = {round(d / b, 4) for d, b in zip(depths, base_depths, strict=True)}
        for depth in [1.0, *sorted(ratios - {1.0})]:
            if not (0 < width <= 4 and 0 < depth <= 4):
                continue
            p = YOLOParams(variant=variant, width_multiplier=width, depth_multiplier=depth)
            if p.stages() == (list(channels), list(depths)):
                return {"variant": variant, "width_multiplier": width, "depth_multiplier": depth}
    return None


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

    def compile(self, model, optimizer, architecture: YOLOParams,
                class_weights: tuple[float, ...] | None = None) -> None:
        compile_detector(model, optimizer, architecture, class_weights)

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
          tiny_input=(32, 32), hooks=YOLOHooks(),
          # Measured: fit fails under mixed_bfloat16 and mixed_float16 (keras-cv 0.9).
          float32_only="keras-cv 0.9's YOLOv8 label encoder multiplies float32 values by the "
                       "model's scores, so fit fails under a mixed policy (TypeError in Mul)",
          # Measured on a 2-core AMD EPYC, 2026-12-03 (docs/performance.md, "Threads").
          one_thread_per_op="the default YOLO's second epoch took 15.7 s instead of 22.4 s "
                            "on 2 cores (its many small ops gain more from running side by "
                            "side than from splitting each one)")
def build(input_shape: tuple[int, int, int], num_classes: int, p: YOLOParams):
    """A YOLOv8 detector: the backbone from ``p.weights`` (random when null), the neck and head
    random. A preset is downloaded only when ``p.weights`` names one of keras-cv's."""
    check_input_size(input_shape)
    keras_cv = _keras_cv()
    backbone = build_backbone(p, input_shape)
    return keras_cv.models.YOLOV8Detector(
        num_classes=num_classes, bounding_box_format=BOX_FORMAT, backbone=backbone,
        fpn_depth=p.fpn_depth, prediction_decoder=nms_layer(NMSConfig()),
        name=f"yolov8{p.variant}")


def build_backbone(p: YOLOParams, input_shape: tuple[int, int, int]):
    """keras-cv's YOLOV8Backbone with the weights ``p.weights`` names; it rescales 0..255
    pixels to 0..1 inside, once, whatever a preset says (ultralytics' COCO weights, which
    keras-cv's presets hold, were trained on 0..1 images)."""
    keras_cv = _keras_cv()
    if p.weights is not None and (p.weights in PRESETS or (
            pretrained.is_local(p.weights)
            and not p.weights.endswith(pretrained.FILE_SUFFIXES))):
        return _from_preset(p, input_shape)
    channels, depths = p.stages()
    backbone = keras_cv.models.YOLOV8Backbone(
        stackwise_channels=channels, stackwise_depth=depths, include_rescaling=True,
        activation="swish", input_shape=tuple(input_shape))
    if p.weights is not None:  # a visionpipe .keras YOLO or a .weights.h5 of this backbone
        pretrained.load_into(backbone, p.weights)
    return backbone


def kaggle_handle(preset: str) -> str:
    """Where keras-cv downloads ``preset`` from: its Kaggle handle, e.g.
    ``keras/yolov8/keras/yolo_v8_xs_backbone_coco/2``."""
    handle = _keras_cv().models.YOLOV8Backbone.presets[preset]["kaggle_handle"]
    return handle.removeprefix("kaggle://")


def _from_preset(p: YOLOParams, input_shape: tuple[int, int, int]):
    keras_cv = _keras_cv()
    overrides = {"input_shape": tuple(input_shape), "include_rescaling": True}
    if p.weights in PRESETS:  # validate() checked that the params describe it
        handle = kaggle_handle(p.weights)
        local = f"{pretrained.WEIGHTS_DIR}/{p.weights}"
        return pretrained.download(
            "weights", p.weights, f"keras-cv preset {p.weights}",
            lambda: _download_preset(p.weights, handle, overrides),
            then=f"on a machine with a network run python -c \"import kagglehub; "
                 f"kagglehub.model_download('{handle}', output_dir='{local}')\" in the "
                 f"project, copy {local}/ here and set weights: {local}")
    path = pretrained.local_path(p.weights, folder=True)
    config = _preset_config(p.weights, path)
    channels = list(config.get("stackwise_channels") or [])
    depths = list(config.get("stackwise_depth") or [])
    if p.stages() != (channels, depths):
        _shape_error(p, channels, depths)
    import warnings

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            backbone = keras_cv.models.YOLOV8Backbone.from_preset(str(path), **overrides)
        skipped = [str(w.message) for w in caught if "Skipping" in str(w.message)]
        if skipped:  # Keras loads what matches and warns about the rest: a damaged file
            raise ValueError(skipped[0])
    except Exception as exc:  # noqa: BLE001 - keras-cv and Keras raise ValueError, OSError, ...
        text = " ".join(str(exc).split())[:200]
        raise pretrained.fail("weights", p.weights, f"the keras-cv preset in {path.name} cannot "
                              f"be loaded ({type(exc).__name__}: {text}); save it again with "
                              "the same keras-cv version") from None
    return backbone


def _preset_config(value: str, path) -> dict:
    """The YOLOV8Backbone config of the preset folder ``path``, checked."""
    file = path / "config.json"
    try:
        saved = json.loads(file.read_text())
        config = saved["config"]
        kind = saved.get("class_name")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        why = "no config.json" if not file.exists() else f"config.json unreadable: {exc}"
        raise pretrained.fail("weights", value, f"not a keras-cv preset folder ({why}); a "
                              "preset folder holds config.json and model.weights.h5, as "
                              "kagglehub downloads it (see docs/detection.md)") from None
    if kind != "YOLOV8Backbone" or not isinstance(config, dict):
        raise pretrained.fail("weights", value, f"the preset in {path.name} is a {kind}, not "
                              "a YOLOV8Backbone; use a keras-cv YOLOv8 backbone preset")
    return config


def _shape_error(p: YOLOParams, channels: list[int], depths: list[int]):
    """A local preset whose backbone the params do not describe: name the key to change."""
    mine = p.stages()
    have = (f"the preset in {p.weights} has channels {_dashed(channels)} and blocks "
            f"{_dashed(depths)} per stage, where variant {p.variant}, width_multiplier "
            f"{p.width_multiplier}, depth_multiplier {p.depth_multiplier} give "
            f"{_dashed(mine[0])} and {_dashed(mine[1])}")
    want = _params_for(channels, depths)
    mismatch = _mismatch(p, want) if want else None
    if mismatch is None:
        raise pretrained.fail("weights", p.weights, f"{have}; no variant ({', '.join(VARIANTS)})"
                              " and multipliers give that backbone: use a preset of keras-cv's "
                              "xs, s or m shape")
    field, value, _ = mismatch
    raise ParamsError(f"params.yaml: {pretrained.key(field)} = {value!r}: {have}; the preset "
                      "decides the backbone: set "
                      + ", ".join(f"{k}: {v}" for k, v in want.items()))


def _download_preset(name: str, handle: str, overrides: dict):
    """keras-cv's ``from_preset(name)`` quietly (kagglehub logs each download on stdout and
    draws progress bars on stderr); a failure names the Kaggle page and the reason."""
    import logging

    log = logging.getLogger("kagglehub")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return _keras_cv().models.YOLOV8Backbone.from_preset(name, **overrides)
    except Exception as exc:  # noqa: BLE001 - requests, kagglehub and OS errors alike
        text = " ".join(str(exc).split())
        errno = re.search(r"\[Errno [^\]]+\][^'\")]*", text)
        reason = errno.group(0).strip() if errno else text[:120]
        raise RuntimeError(f"https://www.kaggle.com/models/{handle} -- "
                           f"{type(exc).__name__}: {reason}") from None
    finally:
        log.setLevel(level)


def compile_detector(model, optimizer, p: YOLOParams,
                     class_weights: tuple[float, ...] | None = None) -> None:
    """YOLOv8's own loss: CIoU on boxes, binary cross-entropy on classes (keras-cv), each
    class's column of it times its weight when ``class_weights`` are given."""
    classification_loss = ("binary_crossentropy" if class_weights is None  # keras-cv's own
                           else ClassWeightedBinaryCrossentropy(class_weights, reduction="sum"))
    model.compile(optimizer=optimizer, box_loss="ciou",
                  classification_loss=classification_loss,
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
    from visionpipe import batches

    return unpad(batches.predict(model, images, batch_size))
