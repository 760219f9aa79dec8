"""Large images through a model of a smaller input: overlapping tiles, blended.

Segmentation models trained on crops see test images (evaluate) and new images (predict, and
the SavedModel's ``serving_default``) at the scale they were trained on, in tiles of their
input size. NumPy only: `visionpipe predict` uses it without the training code.
"""

from __future__ import annotations

import numpy as np


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles covering ``length`` with at least ``overlap`` shared; the last
    tile ends at the edge."""
    if length <= tile:
        return [0]
    stride = max(1, int(tile * (1.0 - overlap)))
    starts = list(range(0, length - tile, stride))
    return [*starts, length - tile]


def taper(size: int) -> np.ndarray:
    """Weights that fall towards a tile's edges, where a model sees the least context."""
    ramp = np.minimum(np.arange(size) + 0.5, size - np.arange(size) - 0.5) / (size / 2)
    return np.clip(ramp, 0.05, 1.0)


def tile_weights(tile: tuple[int, int]) -> np.ndarray:
    """Per-pixel weights (H, W, 1) of one tile's scores when tiles are blended."""
    return np.outer(taper(tile[0]), taper(tile[1]))[..., None]


def sliding_window(predict, image: np.ndarray, tile: tuple[int, int], overlap: float = 0.25,
                   batch_size: int = 16) -> np.ndarray:
    """Scores (H, W, K) for one image of any size from a model taking ``tile``-sized inputs.

    Overlapping tiles are predicted in batches and blended with weights that taper towards
    each tile's edges, so seams do not show. An image smaller than a tile is padded by
    reflection and the result cropped back.
    """
    th, tw = tile
    h, w = image.shape[:2]
    ph, pw = max(0, th - h), max(0, tw - w)
    if ph or pw:
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="reflect")
    H, W = image.shape[:2]
    weight = tile_weights((th, tw))
    acc, norm = None, np.zeros((H, W, 1), np.float64)
    spots = [(y, x) for y in tile_starts(H, th, overlap) for x in tile_starts(W, tw, overlap)]
    for i in range(0, len(spots), batch_size):
        chunk = spots[i:i + batch_size]
        batch = np.stack([image[y:y + th, x:x + tw] for y, x in chunk]).astype(np.float32)
        out = np.asarray(predict(batch), np.float64)
        if acc is None:
            acc = np.zeros((H, W, out.shape[-1]), np.float64)
        for (y, x), scores in zip(chunk, out, strict=True):
            acc[y:y + th, x:x + tw] += scores * weight
            norm[y:y + th, x:x + tw] += weight
    return (acc / norm)[:h, :w].astype(np.float32)
