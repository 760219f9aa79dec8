"""Segmentation task: metrics worked by hand, losses, tiled inference, mask remapping and
augmentation that keeps masks aligned with pixels."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from visionpipe.config import AugmentConfig, TrainConfig
from visionpipe.data.augment import augment_example, random_affine, warp_mask
from visionpipe.data.example import Example
from visionpipe.data.sources.shapes import generate
from visionpipe.errors import DataError
from visionpipe.stages.prepare import crops, remap_mask
from visionpipe.tasks.segmentation import (
    SegmentationLoss,
    SegmentationTask,
    mean_iou,
    segmentation_metrics,
)
from visionpipe.tiling import sliding_window, tile_starts

NAMES = ["bg", "a", "b"]


def _probs(pred: np.ndarray, k: int = 3, p: float = 0.8) -> np.ndarray:
    out = np.full((*pred.shape, k), (1 - p) / (k - 1), np.float32)
    np.put_along_axis(out, pred[..., None], p, axis=-1)
    return out


def test_metrics_on_a_case_worked_by_hand():
    truth = np.array([[[0, 0, 1, 1],
                       [0, 0, 1, 1],
                       [0, 0, 0, 0],
                       [2, 2, 0, 0]]])
    pred = np.array([[[0, 0, 1, 1],
                      [0, 1, 1, 1],   # one bg pixel called a
                      [0, 0, 0, 0],
                      [2, 0, 0, 0]]])  # one b pixel called bg
    m = segmentation_metrics(truth, _probs(pred), NAMES)
    assert m["pixel_accuracy"] == pytest.approx(14 / 16)
    # bg: tp 9, fp 1 (the b pixel), fn 1 -> IoU 9/11, Dice 18/20.
    # a: tp 4, fp 1, fn 0 -> IoU 4/5, Dice 8/9.  b: tp 1, fn 1 -> IoU 1/2, Dice 2/3.
    pc = m["per_class"]
    assert pc["bg"]["iou"] == pytest.approx(9 / 11)
    assert pc["a"]["iou"] == pytest.approx(4 / 5)
    assert pc["b"]["iou"] == pytest.approx(1 / 2)
    assert pc["bg"]["dice"] == pytest.approx(18 / 20)
    assert pc["a"]["dice"] == pytest.approx(8 / 9)
    assert pc["b"]["dice"] == pytest.approx(2 / 3)
    assert pc["b"]["f1"] == pc["b"]["dice"]
    assert pc["a"]["precision"] == pytest.approx(4 / 5) and pc["a"]["recall"] == 1.0
    assert pc["bg"]["support"] == 10 and pc["b"]["support"] == 2
    assert m["mean_iou"] == pytest.approx((9 / 11 + 4 / 5 + 1 / 2) / 3)
    assert m["loss"] == pytest.approx(-(14 * np.log(0.8) + 2 * np.log(0.1)) / 16, rel=1e-6)
    assert m["baseline"]["class"] == "bg"
    assert m["baseline"]["accuracy"] == pytest.approx(10 / 16)
    # All-bg: IoU 10/16 for bg, 0 for a and b (they occur in the truth).
    assert m["baseline"]["mean_iou"] == pytest.approx(10 / 16 / 3)


def test_a_class_absent_from_truth_and_prediction_is_left_out_of_the_mean():
    truth = np.zeros((1, 4, 4), int)
    truth[0, :2] = 1
    m = segmentation_metrics(truth, _probs(truth), NAMES)
    assert m["per_class"]["b"]["iou"] is None and m["per_class"]["b"]["support"] == 0
    assert m["mean_iou"] == 1.0 and m["pixel_accuracy"] == 1.0
    assert mean_iou(truth, np.zeros_like(truth), 3) == pytest.approx(0.5 / 2)


def _loss(kind, truth, probs, weights=None):
    fn = SegmentationLoss(kind, probs.shape[-1], weights)
    return float(fn(tf.constant(truth), tf.constant(probs)))


def test_losses_match_their_formulas():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, (2, 5, 6))
    logits = rng.normal(size=(2, 5, 6, 3))
    probs = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    onehot = np.eye(3)[truth]
    ce = -np.mean(np.log(np.take_along_axis(probs, truth[..., None], -1)))
    assert _loss("cross_entropy", truth, probs) == pytest.approx(ce, rel=1e-5)
    inter = (onehot * probs).sum((1, 2))
    dice = (2 * inter + 1) / (onehot.sum((1, 2)) + probs.sum((1, 2)) + 1)
    assert _loss("dice", truth, probs) == pytest.approx(np.mean(1 - dice.mean(-1)), rel=1e-5)
    assert _loss("ce_dice", truth, probs) == pytest.approx(
        _loss("cross_entropy", truth, probs) + _loss("dice", truth, probs), rel=1e-5)
    w = np.array([0.0, 1.0, 3.0])
    weighted = -np.mean(w[truth] * np.log(np.take_along_axis(probs, truth[..., None], -1)[..., 0]))
    assert _loss("cross_entropy", truth, probs, w) == pytest.approx(weighted, rel=1e-5)
    perfect = np.eye(3, dtype=np.float32)[truth]
    assert _loss("dice", truth, perfect) == pytest.approx(0.0, abs=1e-6)


def test_task_loss_reads_params():
    loss = SegmentationTask().loss(TrainConfig(loss="ce_dice", class_weights=(1.0, 2.0)), 2)
    assert (loss.kind, loss.num_classes, loss.class_weights) == ("ce_dice", 2, [1.0, 2.0])


@pytest.mark.parametrize("length, tile, overlap", [(512, 128, 0.25), (300, 128, 0.25),
                                                   (128, 128, 0.5), (130, 64, 0.0)])
def test_tiles_cover_the_image_with_the_overlap_asked(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] == length - tile
    covered = np.zeros(length, int)
    for s in starts:
        covered[s:s + tile] += 1
    assert covered.min() >= 1
    gaps = np.diff(starts)
    assert (gaps <= tile * (1 - overlap) + 1e-9).all()


def _pointwise(batch: np.ndarray) -> np.ndarray:
    """A 'model' whose output at a pixel depends on that pixel only: tiles change nothing."""
    z = batch / 64.0
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("shape", [(512, 512), (200, 330), (40, 50)])
def test_sliding_window_equals_whole_image_for_a_pointwise_model(shape):
    image = np.random.default_rng(1).integers(0, 256, (*shape, 3)).astype(np.float32)
    tiled = sliding_window(_pointwise, image, (64, 64), overlap=0.25, batch_size=7)
    assert tiled.shape == (*shape, 3)
    np.testing.assert_allclose(tiled, _pointwise(image), atol=1e-5)


def test_serving_tiles_a_crop_trained_model_as_evaluate_does():
    """The SavedModel's in-graph tiling (training scale larger than the model) blends the same
    tiles with the same weights as sliding_window: a model whose outputs depend on where a
    pixel sits in its tile (a U-Net with padding) shows any misplaced tile or weight."""
    import tensorflow as tf

    from visionpipe.models.registry import create_model, get_family
    from visionpipe.tasks.segmentation import tiled_scores

    model = create_model("unet", (32, 32, 3), 3, get_family("unet").tiny)
    images = np.random.default_rng(0).uniform(0, 255, (2, 72, 56, 3)).astype(np.float32)
    graph = tiled_scores(model, (32, 32), (72, 56), 0.25)(tf.constant(images)).numpy()
    host = np.stack([sliding_window(lambda b: model(b, training=False).numpy(), image,
                                    (32, 32), 0.25) for image in images])
    assert graph.shape == (2, 72, 56, 3)
    np.testing.assert_allclose(graph, host, atol=1e-5)
    serve = SegmentationTask().serving_function(model, (32, 32), "stretch", NAMES,
                                                scale=(72, 56), overlap=0.25)
    out = serve(tf.constant(images[:1].astype(np.uint8)))
    assert out["scores"].shape == (1, 72, 56, 3) and out["mask"].shape == (1, 72, 56)
    with pytest.raises(ValueError, match="tiles of 32x32 do not fit images of 16x56"):
        tiled_scores(model, (32, 32), (16, 56), 0.25)


def test_remap_mask_maps_values_in_order_and_names_unknown_ones():
    mask = np.array([[0, 255], [255, 0]], np.uint8)
    np.testing.assert_array_equal(remap_mask(mask, {255: "m", 0: "c"}, "x.png"),
                                  [[1, 0], [0, 1]])
    bad = mask.copy()
    bad[0, 0] = 128
    with pytest.raises(DataError) as info:
        remap_mask(bad, {0: "c", 255: "m"}, "masks/7.png")
    assert "masks/7.png" in str(info.value) and "{128: 1}" in str(info.value)


def test_crops_cut_image_and_mask_alike():
    image = np.arange(8 * 12 * 3, dtype=np.uint8).reshape(8, 12, 3)
    mask = (np.arange(8 * 12).reshape(8, 12) % 5).astype(np.uint8)
    parts = list(crops(Example(id="p", image=image, mask=mask), (4, 4)))
    assert [p.id for p in parts] == [f"p-r{r}c{c}" for r in range(2) for c in range(3)]
    np.testing.assert_array_equal(parts[4].image, image[4:8, 4:8])
    np.testing.assert_array_equal(parts[4].mask, mask[4:8, 4:8])


PALETTE = np.array([[40, 40, 40], [220, 40, 40], [40, 220, 40], [40, 40, 220],
                    [220, 220, 40]], np.float64)


def test_augmented_masks_stay_aligned_with_the_pixels():
    """Shapes images repainted so each pixel's colour says its class: after geometric and
    colour augmentation, the class read back from the pixels agrees with the augmented mask."""
    cfg = AugmentConfig(copies=1, flip_horizontal=True, flip_vertical=True, scale=(0.8, 1.2),
                        translate=0.15, rotate=30.0, brightness=0.1, contrast=0.1)
    agreement, changed = [], 0
    for i, ex in enumerate(generate(3, "train", 30, (64, 64))):
        painted = Example(id=ex.id, image=PALETTE[ex.mask].astype(np.uint8), mask=ex.mask)
        aug, _ = augment_example(painted, cfg, seed=5, copy=0, index=i)
        assert aug.mask.dtype == np.uint8 and set(np.unique(aug.mask)) <= set(range(5))
        # Pixels that came from outside the image hold the fill colour (the image's mean)
        # and background in the mask: no source pixel to agree with, so they are left out.
        matrix = random_affine(np.random.default_rng([5, 0, i]), cfg, 64, 64)
        inside = warp_mask(np.ones((64, 64), np.uint8), matrix).astype(bool)
        dist = ((aug.image[:, :, None, :].astype(np.float64) - PALETTE) ** 2).sum(-1)
        agreement.append((dist.argmin(-1) == aug.mask)[inside].mean())
        changed += not np.array_equal(aug.mask, ex.mask)
    assert changed == 30
    assert min(agreement) >= 0.97 and np.mean(agreement) >= 0.99, agreement
