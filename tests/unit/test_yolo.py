"""YOLO (keras-cv YOLOv8) behind the registry: sizes from params, the stride check, NMS
from params, safe save/load, boxes mapped back through the serving resize, and the backbone's
starting weights (random, a keras-cv preset folder or file in weights/, a COCO preset that
cannot be downloaded here: this machine has no network)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from visionpipe import finetune
from visionpipe.config import NMSConfig
from visionpipe.errors import ModelError, ParamsError
from visionpipe.geometry import boxes_to_input, fit_boxes, fit_images
from visionpipe.models import pretrained
from visionpipe.models.registry import create_model, get_family, known_families, parse_architecture
from visionpipe.models.yolo import (
    BOX_CHANNELS,
    PRESETS,
    VARIANTS,
    YOLOParams,
    detect,
    nms_layer,
    set_nms,
)
from visionpipe.tasks.registry import task_for

TINY = {"variant": "n", "width_multiplier": 0.25}  # 8-16-32-64 channels


@pytest.fixture(scope="module")
def tiny():
    return create_model("yolo", (64, 96, 3), 3, TINY)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (4, 64, 96, 3)).astype(np.float32)


def test_yolo_is_a_registered_detection_family():
    assert "yolo" in known_families()
    arch = parse_architecture("yolo", {"variant": "s"}, "models.det.architecture")
    assert arch == YOLOParams(variant="s")


@pytest.mark.parametrize("arch, channels, depths", [
    ({"variant": "n"}, [32, 64, 128, 256], [1, 2, 2, 1]),
    ({"variant": "n", "width_multiplier": 0.5}, [16, 32, 64, 128], [1, 2, 2, 1]),
    ({"variant": "s"}, [64, 128, 256, 512], [1, 2, 2, 1]),
    ({"variant": "m"}, [96, 192, 384, 576], [2, 4, 4, 2]),
    ({"variant": "m", "depth_multiplier": 0.5, "width_multiplier": 0.25},
     [24, 48, 96, 144], [1, 2, 2, 1]),
    ({"variant": "n", "depth_multiplier": 0.1}, [32, 64, 128, 256], [1, 1, 1, 1]),
])
def test_variants_and_multipliers_set_channels_and_blocks(arch, channels, depths):
    assert parse_architecture("yolo", arch, "models.det.architecture").stages() == (
        channels, depths)


def test_bad_architecture_values_name_the_key():
    with pytest.raises(ParamsError, match=r"models\.det\.architecture\.variant = 'xl'"):
        parse_architecture("yolo", {"variant": "xl"}, "models.det.architecture")
    with pytest.raises(ParamsError, match=r"models\.det\.architecture\.width_multiplier"):
        parse_architecture("yolo", {"width_multiplier": 0}, "models.det.architecture")


@pytest.mark.parametrize("size, suggestion", [
    ((60, 64), "[32, 64] or [64, 64]"),
    ((100, 130), "[96, 128] or [128, 160]"),
    ((20, 64), "[32, 64]"),
])
def test_image_size_must_be_a_multiple_of_32(size, suggestion):
    with pytest.raises(ModelError) as info:
        create_model("yolo", (*size, 3), 2, TINY)
    msg = str(info.value)
    assert f"input size {size[0]}x{size[1]} is not a multiple of 32" in msg
    assert "prepare.detection.image_size" in msg and suggestion in msg


def raw_outputs(model, images):
    """The raw head per anchor as export compares formats on it (the detection task's
    forward, through YOLOHooks.flatten)."""
    return task_for("yolo", "detection").forward(model, images)


def test_raw_outputs_hold_one_row_per_anchor(tiny, images):
    raw = raw_outputs(tiny, images)
    # Anchors at strides 8, 16 and 32 of a 64x96 image: 8*12 + 4*6 + 2*3.
    assert raw.shape == (4, 96 + 24 + 6, 64 + 3)
    scores = raw[..., BOX_CHANNELS:]
    assert np.all((scores >= 0) & (scores <= 1))  # sigmoid class scores


def test_nms_from_params_bounds_what_is_kept(tiny, images):
    set_nms(tiny, NMSConfig(iou_threshold=0.5, confidence_threshold=0.0, max_detections=3))
    loose = detect(tiny, images, 4)
    assert [len(d["scores"]) for d in loose] == [3, 3, 3, 3]
    for det in loose:
        assert np.all(np.diff(det["scores"]) <= 0)  # best first
        assert np.all((det["class_ids"] >= 0) & (det["class_ids"] < 3))
    set_nms(tiny, NMSConfig(iou_threshold=0.5, confidence_threshold=0.999,
                            max_detections=100))
    strict = detect(tiny, images, 4)
    best = raw_outputs(tiny, images)[..., BOX_CHANNELS:].max(axis=(1, 2))
    for det, top in zip(strict, best, strict=True):
        assert np.all(det["scores"] >= 0.999)
        assert (len(det["scores"]) == 0) == (top < 0.999)


# Saving and loading (safe mode) is checked for every family in test_models.py, and by
# export's keras format in tests/pipeline/test_detection_stages.py.


@pytest.mark.parametrize("hw, policy", [((50, 80), "pad"), ((90, 40), "pad"),
                                        ((64, 64), "pad"), ((50, 80), "stretch")])
def test_boxes_map_back_through_the_serving_resize(hw, policy):
    """prepare's box transform (fit_boxes) followed by serving's inverse is the identity."""
    boxes = np.array([[0, 0, hw[1], hw[0]], [3.5, 7, 20, 31], [hw[1] - 9, hw[0] - 5, hw[1],
                                                                hw[0]]], np.float32)
    fitted = fit_boxes(boxes, hw, (64, 64), policy)
    back = boxes_to_input(tf.constant(fitted), tf.constant(hw), (64, 64), policy).numpy()
    np.testing.assert_allclose(back, boxes, atol=1e-3)
    padding = boxes_to_input(tf.fill([2, 4], -1.0), tf.constant(hw), (64, 64), policy)
    np.testing.assert_array_equal(padding.numpy(), -np.ones((2, 4)))
    # And the letterbox the boxes describe is where fit_images puts the image.
    image = np.full((1, *hw, 3), 255, np.uint8)
    fitted_image = fit_images(image, (64, 64), policy).numpy()[0, ..., 0]
    rows, cols = np.flatnonzero(fitted_image.max(1) > 0), np.flatnonzero(fitted_image.max(0) > 0)
    np.testing.assert_allclose(fitted[0], [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1],
                               atol=1e-3)


# ------------------------------------------------------------------- starting weights

KEY = "models.det.architecture"


def _build(root, arch, size=32):
    with pretrained.context(KEY, root):
        return create_model("yolo", (size, size, 3), 3, arch)


def _error(match: str, call, *args) -> str:
    with pytest.raises(ParamsError) as caught:
        call(*args)
    text = str(caught.value)
    assert "\n" not in text and match in text, text
    return text


def _keras_cv():
    import keras_cv

    return keras_cv


def test_weights_null_builds_the_detector_as_before(tmp_path):
    """null: keras-cv's backbone and detector built straight from the variant's stages, as
    before presets existed: same layers, same names, same initial weights (seeded)."""
    keras_cv = _keras_cv()
    p = parse_architecture("yolo", get_family("yolo").tiny, KEY)
    assert p.weights is None
    keras.utils.set_random_seed(5)
    model = _build(tmp_path, p)
    keras.utils.set_random_seed(5)
    channels, depths = p.stages()
    reference = keras_cv.models.YOLOV8Detector(
        num_classes=3, bounding_box_format="xyxy", fpn_depth=p.fpn_depth,
        backbone=keras_cv.models.YOLOV8Backbone(
            stackwise_channels=channels, stackwise_depth=depths, include_rescaling=True,
            activation="swish", input_shape=(32, 32, 3)),
        prediction_decoder=nms_layer(NMSConfig()), name="yolov8n")

    def layers(m):  # auto-numbered names (input_layer_3, rescaling_2) differ per build
        return [(type(layer).__name__, layer.name.rstrip("_0123456789"))
                for layer in m.backbone.layers + m.layers]

    assert model.name == reference.name == "yolov8n"
    assert layers(model) == layers(reference)
    assert model.count_params() == reference.count_params()
    mine, theirs = model.get_weights(), reference.get_weights()
    assert len(mine) == len(theirs) > 100
    assert all(np.array_equal(a, b) for a, b in zip(mine, theirs, strict=True))


@pytest.fixture(scope="module")
def preset_project(tmp_path_factory):
    """A project root whose weights/ holds a keras-cv preset folder of the registry's tiny
    YOLOv8 backbone (saved by keras-cv's own save_to_preset, without its rescaling layer, as
    a preset may be) and the same backbone's .weights.h5; its weights nudged off any fresh
    initialisation."""
    from keras_cv.src.utils.preset_utils import save_to_preset

    keras_cv = _keras_cv()
    root = tmp_path_factory.mktemp("yolo_weights")
    channels, depths = parse_architecture("yolo", get_family("yolo").tiny, KEY).stages()
    source = keras_cv.models.YOLOV8Backbone(
        stackwise_channels=channels, stackwise_depth=depths, include_rescaling=False,
        input_shape=(32, 32, 3))
    rng = np.random.default_rng(0)
    source.set_weights([w + rng.normal(0, 0.05, w.shape).astype(w.dtype)
                        for w in source.get_weights()])
    save_to_preset(source, str(root / "weights" / "tiny_yolo"))
    with_rescaling = keras_cv.models.YOLOV8Backbone(
        stackwise_channels=channels, stackwise_depth=depths, include_rescaling=True,
        input_shape=(32, 32, 3))
    with_rescaling.set_weights(source.get_weights())
    with_rescaling.save_weights(str(root / "weights" / "tiny_yolo.weights.h5"))
    return root, source


@pytest.mark.parametrize("weights", ["weights/tiny_yolo", "weights/tiny_yolo.weights.h5"])
def test_a_local_preset_loads_the_backbone_exactly(preset_project, weights):
    root, source = preset_project
    model = _build(root, {**get_family("yolo").tiny, "weights": weights})
    backbone = pretrained.nested_backbone(model)
    assert backbone is model.backbone
    assert len(backbone.weights) == len(source.weights) > 50
    for a, b in zip(backbone.weights, source.weights, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b)), a.path
    # The model still takes 0..255 pixels: one rescaling by 1/255 inside, whatever the
    # preset held (this one was saved without).
    scales = [layer.scale for layer in backbone.layers
              if isinstance(layer, keras.layers.Rescaling)]
    assert scales == [pytest.approx(1 / 255)]
    pixels = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(backbone(pixels).numpy(), source(pixels / 255).numpy(),
                               rtol=1e-4, atol=1e-4)
    # train's fine-tuning schedule finds the backbone's stages as blocks after the stem.
    groups = finetune.blocks(backbone)
    assert [g[0].name.split("_")[0] for g in groups[1:]] == ["stack1", "stack2", "stack3",
                                                            "stack4"]
    assert finetune.block_count(model) == 4


def test_a_local_preset_of_another_shape_names_the_key_to_change(preset_project):
    root, _ = preset_project
    arch = {**get_family("yolo").tiny, "variant": "s", "weights": "weights/tiny_yolo"}
    text = _error(f"{KEY}.variant = 's': the preset in weights/tiny_yolo has channels "
                  "8-16-32-64 and blocks 1-1-1-1", _build, root, arch)
    assert "set variant: n, width_multiplier: 0.25, depth_multiplier: 0.5" in text
    text = _error(f"{KEY}.width_multiplier = 1.0", _build, root,
                  {"weights": "weights/tiny_yolo", "depth_multiplier": 0.5})
    assert "set variant: n, width_multiplier: 0.25" in text


def test_a_missing_or_foreign_preset_folder_is_one_line_naming_the_key(preset_project,
                                                                      tmp_path):
    root, _ = preset_project
    tiny = get_family("yolo").tiny
    _error(f"{KEY}.weights = 'weights/nothing': no such folder", _build, root,
           {**tiny, "weights": "weights/nothing"})
    (root / "weights" / "empty").mkdir(exist_ok=True)
    _error("not a keras-cv preset folder (no config.json)", _build, root,
           {**tiny, "weights": "weights/empty"})
    (root / "weights" / "other").mkdir(exist_ok=True)
    (root / "weights" / "other" / "config.json").write_text(
        '{"class_name": "ResNetBackbone", "config": {}}')
    _error("is a ResNetBackbone, not a YOLOV8Backbone", _build, root,
           {**tiny, "weights": "weights/other"})
    _error("must lie in weights/", _build, root, {**tiny, "weights": str(tmp_path)})


def test_preset_names_are_checked_when_params_are_parsed():
    text = _error(f"{KEY}.weights = 'yolo_v8_l_backbone_coco': expected null", parse_architecture,
                  "yolo", {"weights": "yolo_v8_l_backbone_coco"}, KEY)
    assert all(name in text for name in PRESETS) and "weights/" in text
    _error(f"{KEY}.variant = 'n': the preset yolo_v8_s_backbone_coco is variant s",
           parse_architecture, "yolo", {"weights": "yolo_v8_s_backbone_coco"}, KEY)
    text = _error(f"{KEY}.width_multiplier = 0.5", parse_architecture, "yolo",
                  {"weights": "yolo_v8_m_backbone_coco", "variant": "m",
                   "width_multiplier": 0.5}, KEY)
    assert text.endswith("set width_multiplier: 1.0")
    arch = parse_architecture("yolo", {"weights": "yolo_v8_s_backbone_coco", "variant": "s"},
                              KEY)
    assert arch.stages() == ([64, 128, 256, 512], [1, 2, 2, 1])


def test_presets_are_keras_cvs_with_the_variants_shapes():
    """Each preset named here is one of keras-cv's COCO backbones, and the variant it maps to
    has its parameter count (keras-cv's metadata)."""
    keras_cv = _keras_cv()
    known = keras_cv.models.YOLOV8Backbone.presets_with_weights
    for name, variant in PRESETS.items():
        channels, depths = VARIANTS[variant]
        backbone = keras_cv.models.YOLOV8Backbone(
            stackwise_channels=list(channels), stackwise_depth=list(depths),
            include_rescaling=True, input_shape=(32, 32, 3))
        assert backbone.count_params() == known[name]["metadata"]["params"], name


def test_a_preset_download_without_network_is_one_line_naming_the_key(
        tmp_path, monkeypatch, capsys):
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    capsys.readouterr()
    text = _error(f"{KEY}.weights = 'yolo_v8_xs_backbone_coco': the keras-cv preset "
                  "yolo_v8_xs_backbone_coco could not be downloaded from "
                  "https://www.kaggle.com/models/keras/yolov8/keras/yolo_v8_xs_backbone_coco/2",
                  _build, tmp_path, {"weights": "yolo_v8_xs_backbone_coco"})
    assert ("kagglehub.model_download('keras/yolov8/keras/yolo_v8_xs_backbone_coco/2', "
            "output_dir='weights/yolo_v8_xs_backbone_coco')") in text
    assert "set weights: weights/yolo_v8_xs_backbone_coco" in text
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    assert not list((tmp_path / "kagglehub").rglob("*.h5"))
