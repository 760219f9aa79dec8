"""Augmentation moves masks and boxes with the pixels; colour touches the image only."""

from __future__ import annotations

import numpy as np
import pytest

from visionpipe.config import AugmentConfig
from visionpipe.data.augment import augment_example, warp_boxes
from visionpipe.data.sources.shapes import generate

GEOMETRIC = AugmentConfig(copies=1, flip_horizontal=True, flip_vertical=True,
                          scale=(0.8, 1.2), translate=0.15)


def _examples(n=40):
    return list(generate(7, "train", n, (64, 64)))


def test_flips_are_exact_on_image_mask_and_boxes():
    cfg = AugmentConfig(flip_horizontal=True, flip_vertical=True)
    seen = set()
    for i, ex in enumerate(_examples(24)):
        aug, dropped = augment_example(ex, cfg, seed=0, copy=0, index=i)
        assert dropped == 0
        h, w = ex.image.shape[:2]
        for fh in (False, True):
            for fv in (False, True):
                img, mask, boxes = ex.image, ex.mask, ex.boxes.copy()
                if fh:
                    img, mask = img[:, ::-1], mask[:, ::-1]
                    boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
                if fv:
                    img, mask = img[::-1], mask[::-1]
                    boxes[:, [1, 3]] = h - boxes[:, [3, 1]]
                if np.array_equal(aug.image, img):
                    np.testing.assert_array_equal(aug.mask, mask)
                    np.testing.assert_array_equal(aug.boxes, boxes)
                    np.testing.assert_array_equal(aug.box_labels, ex.box_labels)
                    seen.add((fh, fv))
                    break
            else:
                continue
            break
        else:
            pytest.fail(f"augmented {ex.id} is no flip of the original")
    assert len(seen) >= 3  # the flips really are random


def test_boxes_stay_tight_around_their_objects_after_affine():
    checked = 0
    for i, ex in enumerate(_examples()):
        aug, dropped = augment_example(ex, GEOMETRIC, seed=3, copy=0, index=i)
        assert len(aug.boxes) + dropped == len(ex.boxes)
        assert set(np.unique(aug.mask)) <= {0, 1, 2, 3, 4}
        for box, label in zip(aug.boxes, aug.box_labels, strict=True):
            x0, y0, x1, y1 = box
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            # The object's pixels: its class inside the box, plus a 2 px margin to catch
            # anything that leaked out (shapes never touch, they keep a 2 px gap).
            m0x, m0y = max(int(x0) - 1, 0), max(int(y0) - 1, 0)
            window = aug.mask[m0y:int(np.ceil(y1)) + 1, m0x:int(np.ceil(x1)) + 1]
            ys, xs = np.nonzero(window == label + 1)
            if len(ys) == 0:
                continue
            tight = np.array([xs.min() + m0x, ys.min() + m0y, xs.max() + 1 + m0x,
                              ys.max() + 1 + m0y])
            if x0 == 0 or y0 == 0 or x1 == 64 or y1 == 64:
                # Cut by the border: a box alone cannot know the outline of the part that
                # is left, so it must contain the object's pixels, not fit them.
                assert np.all(tight[:2] >= box[:2] - 1) and np.all(tight[2:] <= box[2:] + 1)
            else:
                # Nearest-neighbour sampling moves a mask edge by under a pixel.
                assert np.all(np.abs(tight - box) <= 1.5), (ex.id, box, tight)
                checked += 1
    assert checked > 40


def test_same_seed_same_bytes_other_copy_differs():
    ex = _examples(1)[0]
    a, _ = augment_example(ex, GEOMETRIC, seed=5, copy=0, index=0)
    b, _ = augment_example(ex, GEOMETRIC, seed=5, copy=0, index=0)
    c, _ = augment_example(ex, GEOMETRIC, seed=5, copy=1, index=0)
    assert a.image.tobytes() == b.image.tobytes() and a.mask.tobytes() == b.mask.tobytes()
    assert a.image.tobytes() != c.image.tobytes()


def test_colour_jitter_leaves_mask_and_boxes_alone():
    cfg = AugmentConfig(flip_horizontal=False, brightness=0.3, contrast=0.3, noise=5.0)
    for i, ex in enumerate(_examples(5)):
        aug, _ = augment_example(ex, cfg, seed=1, copy=0, index=i)
        np.testing.assert_array_equal(aug.mask, ex.mask)
        np.testing.assert_array_equal(aug.boxes, ex.boxes)
        assert not np.array_equal(aug.image, ex.image)


def test_boxes_pushed_out_are_clipped_or_dropped():
    boxes = np.array([[0, 0, 10, 10], [40, 40, 60, 60]], np.float64)
    labels = np.array([1, 2])
    shift = np.array([[1, 0, -8], [0, 1, 0], [0, 0, 1]], np.float64)  # 8 px to the left
    out, kept, dropped = warp_boxes(boxes, labels, shift, 64, 64, min_visible=0.1)
    np.testing.assert_array_equal(out, [[0, 0, 2, 10], [32, 40, 52, 60]])
    assert dropped == 0 and kept.tolist() == [1, 2]
    # 2 of its 10 columns stay visible: below the default 25 %, so it is dropped.
    out, kept, dropped = warp_boxes(boxes, labels, shift, 64, 64)
    np.testing.assert_array_equal(out, [[32, 40, 52, 60]])
    assert dropped == 1 and kept.tolist() == [2]


def test_the_drop_rule_comes_from_params():
    """augment.<task>.box_min_visible: the share of a box that must stay in the image."""
    from dataclasses import replace

    from visionpipe.config import parse_params
    from visionpipe.errors import ParamsError

    pushed = replace(GEOMETRIC, scale=(1.3, 1.6), translate=0.3)
    dropped = {}
    for share in (0.0, 0.25, 0.75, 1.0):
        cfg = replace(pushed, box_min_visible=share)
        total = 0
        for i, ex in enumerate(_examples()):
            total += augment_example(ex, cfg, seed=5, copy=0, index=i)[1]
        dropped[share] = total
    assert dropped[0.0] < dropped[0.25] < dropped[0.75] < dropped[1.0]
    with pytest.raises(ParamsError, match=r"augment\.detection\.box_min_visible = 1\.5"):
        parse_params({"augment": {"detection": {"box_min_visible": 1.5}}})


def test_difficult_flags_follow_their_boxes_when_others_are_dropped():
    from dataclasses import replace

    pushed = replace(GEOMETRIC, scale=(1.3, 1.6), translate=0.3)
    followed = 0
    for i, ex in enumerate(_examples()):
        # flag every box whose label is odd, so each flag can be checked against its label
        ex.difficult = ex.box_labels % 2 == 1
        aug, dropped = augment_example(ex, pushed, seed=5, copy=0, index=i)
        assert len(aug.difficult) == len(aug.boxes) == len(aug.box_labels)
        np.testing.assert_array_equal(aug.difficult, aug.box_labels % 2 == 1)
        followed += dropped > 0 and aug.difficult.any()
    assert followed > 0  # some image lost boxes and still carried flags
