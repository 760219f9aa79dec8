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


def _solid(colour: int, size: int = 32):
    """A one-colour image with one box over all of it, labelled with its colour index."""
    from visionpipe.data.example import Example

    image = np.full((size, size, 3), colour * 60, np.uint8)
    return Example(id=f"solid{colour}", image=image,
                   mask=np.full((size, size), colour + 1, np.uint8),
                   boxes=np.array([[0, 0, size, size]], np.float32),
                   box_labels=np.array([colour], np.int32))


def test_a_mosaic_shows_four_images_each_box_on_its_own_pixels():
    cfg = AugmentConfig(flip_horizontal=False, mosaic=1.0, box_min_visible=0.0)
    partners = [_solid(c) for c in (1, 2, 3)]
    sizes = []
    for index in range(20):
        aug, dropped = augment_example(_solid(0), cfg, seed=2, copy=0, index=index,
                                       partners=partners)
        assert aug.image.shape == (32, 32, 3) and aug.mask.shape == (32, 32)
        assert dropped == 0
        # The window always holds the join of the four tiles: all four are in view.
        assert sorted(aug.box_labels.tolist()) == [0, 1, 2, 3]
        for box, label in zip(aug.boxes, aug.box_labels, strict=True):
            ys, xs = np.nonzero(aug.mask == label + 1)
            if len(xs) == 0:  # a sliver of a tile, thinner than a pixel, holds no centre
                assert min(box[2] - box[0], box[3] - box[1]) < 1
                continue
            region = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            # The window sits at sub-pixel offsets: the mask is sampled at pixel centres.
            np.testing.assert_allclose(box, region, atol=1.0)
            inner = aug.image[int(np.ceil(box[1])):int(box[3]), int(np.ceil(box[0])):int(box[2])]
            if inner.size:
                # Inside a tile, its own colour: bilinear blends only along the joins.
                assert np.all(inner[1:-1, 1:-1] == label * 60)
        sizes.append(tuple(np.round(aug.boxes[aug.box_labels == 0][0])))
    assert len(set(sizes)) > 10  # the window and the tile order are drawn per copy


def test_mosaic_keeps_tight_boxes_under_flips_and_shifts():
    from dataclasses import replace

    # At scale 1 nearest-neighbour sampling cannot skip a shape's one-pixel tips, so a box
    # must fit its mask to the pixel (scaling is the test above's).
    cfg = replace(GEOMETRIC, scale=(1.0, 1.0), mosaic=1.0)
    examples = _examples()
    checked = 0
    for i, ex in enumerate(examples):
        aug, _ = augment_example(ex, cfg, seed=3, copy=0, index=i,
                                       partners=examples[:i])
        for box, label in zip(aug.boxes, aug.box_labels, strict=True):
            x0, y0, x1, y1 = box
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            # Within the box only: a neighbouring tile may hold a same-class shape touching
            # the join (the exact test above checks that no pixels leak out of a box).
            m0x, m0y = int(x0), int(y0)
            window = aug.mask[m0y:int(np.ceil(y1)), m0x:int(np.ceil(x1))]
            ys, xs = np.nonzero(window == label + 1)
            if len(ys) == 0 or x0 == 0 or y0 == 0 or x1 == 64 or y1 == 64:
                continue
            tight = np.array([xs.min() + m0x, ys.min() + m0y, xs.max() + 1 + m0x,
                              ys.max() + 1 + m0y])
            assert np.all(np.abs(tight - box) <= 1.5), (ex.id, box, tight)
            checked += 1
    assert checked > 30


def test_mosaic_off_or_not_drawn_leaves_the_copy_as_it_was():
    from dataclasses import replace

    examples = _examples(12)
    for i, ex in enumerate(examples):
        plain, _ = augment_example(ex, GEOMETRIC, seed=4, copy=1, index=i)
        rare, _ = augment_example(ex, replace(GEOMETRIC, mosaic=1e-12), seed=4, copy=1,
                                  index=i, partners=examples)
        assert plain.image.tobytes() == rare.image.tobytes()
        np.testing.assert_array_equal(plain.boxes, rare.boxes)
    half = replace(GEOMETRIC, mosaic=0.5)
    drawn = sum(
        augment_example(ex, half, seed=4, copy=1, index=i, partners=examples)[0].image.tobytes()
        != augment_example(ex, GEOMETRIC, seed=4, copy=1, index=i)[0].image.tobytes()
        for i, ex in enumerate(_examples(40)))
    assert 10 <= drawn <= 30  # about half the copies are mosaics


def test_mosaic_is_refused_for_classification_and_bounded():
    from visionpipe.config import parse_params
    from visionpipe.errors import ParamsError

    with pytest.raises(ParamsError, match=r"augment\.classification\.mosaic = 0\.5: expected 0"):
        parse_params({"augment": {"classification": {"mosaic": 0.5}}})
    with pytest.raises(ParamsError, match=r"augment\.detection\.mosaic = 2"):
        parse_params({"augment": {"detection": {"mosaic": 2}}})
    assert parse_params({"augment": {"segmentation": {"mosaic": 0.5}}}).augment[
        "segmentation"].mosaic == 0.5
