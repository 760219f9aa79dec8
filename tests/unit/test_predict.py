"""predict's own arithmetic: boxes back to the image's pixels, what an export predicts, and
flags over params."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from visionpipe.config import PredictConfig
from visionpipe.geometry import fit_boxes
from visionpipe.predict import kind_of, options_from, to_image_pixels


@pytest.mark.parametrize("policy", ["pad", "stretch", "crop"])
@pytest.mark.parametrize("hw", [(100, 150), (300, 120), (64, 64)])
def test_boxes_go_back_to_the_pixels_they_came_from(policy, hw):
    h, w = hw
    boxes = np.array([[10, 20, 60, 90], [0, 0, w, h], [w * 0.4, h * 0.3, w * 0.6, h * 0.7]],
                     np.float32)
    fitted = fit_boxes(boxes, hw, (64, 64), policy)
    back = to_image_pixels(fitted, hw, (64, 64), policy)
    # Crop cuts part of the image away: only boxes inside what it keeps come back whole.
    inside = [2] if policy == "crop" else [0, 1, 2]
    np.testing.assert_allclose(back[inside], np.minimum(boxes[inside], [w, h, w, h]),
                               atol=1e-3)
    assert (back >= 0).all() and (back[:, [0, 2]] <= w).all() and (back[:, [1, 3]] <= h).all()


def test_what_an_export_predicts_follows_its_outputs():
    assert kind_of({"outputs": {"scores": "", "class_id": "", "class_name": ""}}) == "labels"
    assert kind_of({"outputs": {"scores": "", "mask": ""}}) == "masks"
    assert kind_of({"outputs": {"boxes": "", "scores": "", "class_id": ""}}) == "boxes"


def test_flags_win_over_params_and_params_over_defaults():
    settings = PredictConfig(confidence=0.5, iou=0.6, max_detections=30, batch_size=4)
    none = argparse.Namespace(conf=None, iou=None, max_det=None, batch_size=None)
    assert options_from(none, settings).confidence == 0.5
    flags = argparse.Namespace(conf=0.1, iou=0.3, max_det=5, batch_size=2)
    got = options_from(flags, settings)
    assert (got.confidence, got.iou, got.max_detections, got.batch_size) == (0.1, 0.3, 5, 2)
    assert options_from(none, PredictConfig()).confidence == 0.25


@pytest.mark.parametrize("flag, value, message", [
    ("--conf", "1.5", "argument --conf: 1.5 is outside 0..1"),
    ("--iou", "high", "argument --iou: 'high' is not a number"),
    ("--max-det", "0", "argument --max-det: 0 is less than 1"),
    ("--batch-size", "2.5", "argument --batch-size: '2.5' is not a whole number"),
])
def test_bad_flags_get_one_line_errors(flag, value, message, capsys):
    from visionpipe.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["predict", "--model", "yolo", "--input", "x", "--output",
                                   "y", flag, value])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(message)
