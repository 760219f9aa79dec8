"""YOLO (keras-cv YOLOv8) behind the registry: sizes from params, the stride check, NMS
from params, safe save/load, and boxes mapped back through the serving resize."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from visionpipe.config import NMSConfig
from visionpipe.errors import ModelError, ParamsError
from visionpipe.geometry import boxes_to_input, fit_boxes, fit_images
from visionpipe.models.registry import create_model, known_families, parse_architecture
from visionpipe.models.yolo import BOX_CHANNELS, YOLOParams, detect, set_nms
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
