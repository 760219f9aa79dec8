"""The NumPy decoder of a YOLOv8 raw head gives keras-cv's detections, so TFLite and ONNX
outputs decode without TensorFlow the way the Keras model decodes its own."""

from __future__ import annotations

import numpy as np
import pytest

from visionpipe.box_decoding import DECODER, anchors, check_decoder, decode_raw, nms

BIG = 30.0  # a logit that makes one bin of 16 take all the weight


def raw_head(size, num_classes, boxes):
    """A raw head (1, A, 64 + K) whose anchors ``boxes`` maps to (sides in stride units,
    class, score) hold exactly those; every other anchor scores 0.01."""
    points, _ = anchors(size)
    raw = np.zeros((1, len(points), 64 + num_classes), np.float32)
    raw[..., 64:] = 0.01
    for anchor, (sides, cls, score) in boxes.items():
        for s, bins in enumerate(sides):
            raw[0, anchor, 16 * s + bins] = BIG
        raw[0, anchor, 64 + cls] = score
    return raw


def test_anchor_points_follow_keras_cv_order():
    points, strides = anchors((64, 96))
    # stride 8: 8 rows x 12 columns, then 4 x 6, then 2 x 3; row by row, x first.
    assert len(points) == 96 + 24 + 6 and strides.tolist() == [8] * 96 + [16] * 24 + [32] * 6
    assert points[0].tolist() == [0.5, 0.5] and points[1].tolist() == [1.5, 0.5]
    assert points[12].tolist() == [0.5, 1.5]  # second row of the stride-8 grid
    assert points[96].tolist() == [0.5, 0.5] and points[-1].tolist() == [2.5, 1.5]


def test_one_anchor_decodes_to_its_box_in_pixels():
    # Stride-8 anchor at row 2, column 3 (centre 3.5, 2.5 in stride units); sides l,t,r,b =
    # 1, 2, 3, 4 strides: x 20..52, y 4..52 pixels.
    raw = raw_head((64, 64), 3, {2 * 8 + 3: ((1, 2, 3, 4), 1, 0.9)})
    [det] = decode_raw(raw, (64, 64), confidence=0.25, iou=0.7, max_detections=10)
    np.testing.assert_allclose(det["boxes"], [[20, 4, 52, 52]], atol=1e-3)
    assert det["class_ids"].tolist() == [1]
    np.testing.assert_allclose(det["scores"], [0.9])


def test_nms_drops_overlaps_at_the_threshold_and_keeps_the_best_first():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 5], [20, 20, 30, 30], [0, 0, 10, 10]],
                     np.float32)
    scores = np.array([0.8, 0.9, 0.7, 0.2], np.float32)
    # IoU(box0, box1) = 0.5: suppressed at iou 0.5 (>=), kept at 0.6; box3 under confidence.
    assert nms(boxes, scores, confidence=0.25, iou=0.5, max_detections=10).tolist() == [1, 2]
    assert nms(boxes, scores, confidence=0.25, iou=0.6, max_detections=10).tolist() == [1, 0, 2]
    assert nms(boxes, scores, confidence=0.25, iou=0.6, max_detections=2).tolist() == [1, 0]
    assert nms(boxes, scores, confidence=0.95, iou=0.6, max_detections=2).tolist() == []


def test_decoding_matches_the_keras_cv_detector():
    from visionpipe.config.schema import NMSConfig
    from visionpipe.models.registry import create_model, get_family
    from visionpipe.models.yolo import YOLOHooks, detect, set_nms

    model = create_model("yolo", (64, 96, 3), 3, get_family("yolo").tiny)
    images = np.random.default_rng(0).uniform(0, 255, (4, 64, 96, 3)).astype(np.float32)
    raw = YOLOHooks().flatten(model(images, training=False)).numpy()
    # Untrained scores sit near 0.5: a threshold at their median keeps dozens of
    # boxes per image for NMS to work on.
    confidence = float(np.quantile(raw[..., 64:].max(-1), 0.5))
    set_nms(model, NMSConfig(iou_threshold=0.8, confidence_threshold=confidence,
                             max_detections=50))
    expected = detect(model, images, 4)
    got = decode_raw(raw, (64, 96), confidence=confidence, iou=0.8, max_detections=50)
    kept = sum(len(d["scores"]) for d in got)
    above = int((raw[..., 64:].max(-1) > confidence).sum())
    assert 8 < kept < above, (kept, above)  # NMS has boxes to keep and boxes to drop
    for want, have in zip(expected, got, strict=True):
        assert have["class_ids"].tolist() == want["class_ids"].tolist()
        np.testing.assert_allclose(have["boxes"], want["boxes"], atol=1e-3)
        np.testing.assert_allclose(have["scores"], want["scores"], atol=1e-6)


def test_an_unknown_decoder_or_a_head_of_another_size_is_refused():
    assert check_decoder(None) == DECODER
    with pytest.raises(ValueError, match=r"'ssd'.*re-export"):
        check_decoder({"kind": "ssd"})
    raw = np.zeros((1, 10, 67), np.float32)
    with pytest.raises(ValueError, match=r"does not fit a 64x64 input \(84 anchors"):
        decode_raw(raw, (64, 64), confidence=0.25, iou=0.7, max_detections=10)
