"""Offline augmentation that moves masks and boxes together with the pixels.

Geometric transforms (flips, scale, translation, rotation) are one affine map per example,
applied to the image (bilinear), the mask (nearest neighbour) and the box corners; colour
transforms (brightness, contrast, noise) touch the image only. A mosaic copy first tiles the
image with three others on a canvas twice its size and takes an image-size window of it.
Everything is drawn from a generator seeded by (seed, copy, example index), so the same params
give the same bytes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np

from visionpipe.config import AugmentConfig
from visionpipe.data.example import Example


def random_affine(rng: np.random.Generator, cfg: AugmentConfig, height: int,
                  width: int) -> np.ndarray:
    """A 3x3 matrix mapping input pixel-edge coordinates (x, y) to output coordinates."""
    cx, cy = width / 2.0, height / 2.0
    sx = -1.0 if cfg.flip_horizontal and rng.random() < 0.5 else 1.0
    sy = -1.0 if cfg.flip_vertical and rng.random() < 0.5 else 1.0
    scale = rng.uniform(*cfg.scale) if cfg.scale[0] != cfg.scale[1] else cfg.scale[0]
    angle = math.radians(rng.uniform(-cfg.rotate, cfg.rotate)) if cfg.rotate else 0.0
    tx = rng.uniform(-cfg.translate, cfg.translate) * width if cfg.translate else 0.0
    ty = rng.uniform(-cfg.translate, cfg.translate) * height if cfg.translate else 0.0
    cos, sin = math.cos(angle) * scale, math.sin(angle) * scale
    to_centre = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]])
    flip = np.diag([sx, sy, 1.0])
    rot_scale = np.array([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]])
    back = np.array([[1, 0, cx + tx], [0, 1, cy + ty], [0, 0, 1]])
    return back @ rot_scale @ flip @ to_centre


@functools.lru_cache(maxsize=8)
def _pixel_centres(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) of each pixel centre of a (height, width) image, computed once per size."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    ys.flags.writeable = xs.flags.writeable = False
    return ys, xs


def _source_coords(matrix: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Input coordinates of each output pixel centre."""
    inv = np.linalg.inv(matrix)
    ys, xs = _pixel_centres(height, width)
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    return sx, sy


def warp_image(image: np.ndarray, matrix: np.ndarray, fill: np.ndarray,
               out_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Bilinear warp of a uint8 (H, W, C) image to ``out_shape`` (default: its own size);
    pixels from outside take ``fill``."""
    h, w = image.shape[:2]
    sx, sy = _source_coords(matrix, *(out_shape or (h, w)))
    x, y = sx - 0.5, sy - 0.5  # to pixel-centre index space
    x0f, y0f = np.floor(x), np.floor(y)
    x0, y0 = x0f.astype(int), y0f.astype(int)
    fx, fy = (x - x0f)[..., None], (y - y0f)[..., None]
    src = image.astype(np.float32)
    # Row h of ``flat`` (as (h + 1, w) pixels) is the fill: a neighbour outside the input.
    flat = np.concatenate([src, np.broadcast_to(fill, (1, w, src.shape[2]))],
                          axis=0).reshape(-1, src.shape[2])
    rows_in = [(y0 >= 0) & (y0 < h), (y0 >= -1) & (y0 < h - 1)]  # y0, y0 + 1 inside
    cols_in = [(x0 >= 0) & (x0 < w), (x0 >= -1) & (x0 < w - 1)]  # x0, x0 + 1 inside
    cols = [np.clip(x0, 0, w - 1), np.clip(x0 + 1, 0, w - 1)]

    def take(dy: int, dx: int) -> np.ndarray:
        """The (y0 + dy, x0 + dx) neighbour of every output pixel, or the fill."""
        row = np.where(rows_in[dy] & cols_in[dx], y0 + dy, h)
        return np.take(flat, row * w + cols[dx], axis=0)  # several times faster than flat[]

    if not (fx.any() or fy.any()):  # flips and whole-pixel shifts: each pixel is one input's
        out = take(0, 0)
    else:
        gx, gy = 1 - fx, 1 - fy
        top = take(0, 0) * gx
        top += take(0, 1) * fx
        bottom = take(1, 0) * gx
        bottom += take(1, 1) * fx
        out = top * gy
        out += bottom * fy
    # A pixel whose centre maps outside the input is fill, not a blend with the border.
    outside = (sx < 0) | (sx > w) | (sy < 0) | (sy > h)
    out[outside] = fill
    return np.clip(np.rint(out, out=out), 0, 255, out=out).astype(np.uint8)


def warp_mask(mask: np.ndarray, matrix: np.ndarray,
              out_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Nearest-neighbour warp of a class-id mask to ``out_shape`` (default: its own size);
    pixels from outside become background."""
    h, w = mask.shape
    sx, sy = _source_coords(matrix, *(out_shape or (h, w)))
    xi, yi = np.floor(sx).astype(int), np.floor(sy).astype(int)
    inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    out = np.zeros(sx.shape, mask.dtype)
    out[inside] = mask[yi[inside], xi[inside]]
    return out


def warp_boxes(boxes: np.ndarray, labels: np.ndarray, matrix: np.ndarray, height: int,
               width: int, min_visible: float = 0.25) -> tuple[np.ndarray, np.ndarray, int]:
    """Transform box corners, take their bounds, clip to the image.

    A box keeping less than ``min_visible`` of its transformed area is dropped; returns
    (boxes, labels, number dropped).
    """
    if len(boxes) == 0:
        return boxes.reshape(0, 4).astype(np.float32), labels, 0
    x0, y0, x1, y1 = boxes.T
    corners = np.stack([np.stack([x0, y0]), np.stack([x1, y0]), np.stack([x0, y1]),
                        np.stack([x1, y1])])  # (4, 2, N)
    xs = matrix[0, 0] * corners[:, 0] + matrix[0, 1] * corners[:, 1] + matrix[0, 2]
    ys = matrix[1, 0] * corners[:, 0] + matrix[1, 1] * corners[:, 1] + matrix[1, 2]
    out = np.stack([xs.min(0), ys.min(0), xs.max(0), ys.max(0)], axis=1)
    area = (out[:, 2] - out[:, 0]) * (out[:, 3] - out[:, 1])
    clipped = np.stack([np.clip(out[:, 0], 0, width), np.clip(out[:, 1], 0, height),
                        np.clip(out[:, 2], 0, width), np.clip(out[:, 3], 0, height)], axis=1)
    kept_area = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    keep = (kept_area > 0) & (kept_area >= min_visible * np.maximum(area, 1e-9))
    # Snap to the pixel grid where the map keeps it (flips, integer shifts): float noise
    # such as 31.999999 would otherwise loosen a tight box by a pixel.
    snapped = np.where(np.abs(clipped - np.rint(clipped)) < 1e-6, np.rint(clipped), clipped)
    return snapped[keep].astype(np.float32), labels[keep], int((~keep).sum())


def colour_jitter(rng: np.random.Generator, image: np.ndarray, cfg: AugmentConfig) -> np.ndarray:
    """Brightness, contrast and gaussian noise on the image only."""
    if not (cfg.brightness or cfg.contrast or cfg.noise):
        return image
    out = image.astype(np.float32)
    if cfg.contrast:
        factor = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)
        mean = out.mean(axis=(0, 1))
        out = (out - mean) * factor + mean
    if cfg.brightness:
        out = out + rng.uniform(-cfg.brightness, cfg.brightness) * 255.0
    if cfg.noise:
        out = out + rng.normal(0.0, cfg.noise, size=out.shape)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def mosaic(examples: list[Example], rng: np.random.Generator) -> tuple[Example, np.ndarray]:
    """Four same-size examples tiled 2x2 on a canvas twice their size, in a random order.

    Returns the canvas example and the matrix that takes canvas coordinates to an image-size
    window centred at a random point within half an image of the join (YOLO's mosaic centre
    range), so every window shows parts of all four. Boxes and masks go with their pixels.
    """
    h, w = examples[0].image.shape[:2]
    order = rng.permutation(4)
    image = np.empty((2 * h, 2 * w, 3), np.uint8)
    has_mask = examples[0].mask is not None
    mask = np.zeros((2 * h, 2 * w), np.uint8) if has_mask else None
    boxes, labels, difficult = [], [], []
    for slot, k in enumerate(order):
        ex = examples[k]
        y, x = (slot // 2) * h, (slot % 2) * w
        image[y:y + h, x:x + w] = ex.image
        if has_mask:
            mask[y:y + h, x:x + w] = ex.mask
        if ex.boxes is not None:
            offset = np.array([x, y, x, y], np.float64)
            boxes.append(np.asarray(ex.boxes, np.float64).reshape(-1, 4) + offset)
            labels.append(np.asarray(ex.box_labels))
            difficult.append(np.zeros(len(labels[-1]), bool) if ex.difficult is None
                             else np.asarray(ex.difficult, bool))
    canvas = Example(id=examples[0].id, image=image, label=examples[0].label, mask=mask)
    if boxes:
        canvas.boxes = np.concatenate(boxes)
        canvas.box_labels = np.concatenate(labels)
        if any(ex.difficult is not None for ex in examples):
            canvas.difficult = np.concatenate(difficult)
    left = w / 2 + rng.uniform(-w / 2, w / 2)
    top = h / 2 + rng.uniform(-h / 2, h / 2)
    return canvas, np.array([[1, 0, -left], [0, 1, -top], [0, 0, 1]])


def augment_example(example: Example, cfg: AugmentConfig, seed: int, copy: int,
                    index: int, partners: Sequence[Example] | None = None
                    ) -> tuple[Example, int]:
    """One augmented copy of ``example``; returns it and the number of boxes dropped.

    With ``cfg.mosaic`` > 0, that share of copies (drawn per copy) is a mosaic of ``example``
    and three other images drawn from ``partners`` (repeats only when it holds fewer than
    three; ``example`` itself when it is empty), moved by the same random transforms as a
    plain copy.
    """
    rng = np.random.default_rng([seed, copy, index])
    h, w = example.image.shape[:2]
    source, window = example, np.eye(3)
    if cfg.mosaic:
        # Its own generator: mosaic = 0 leaves every other draw, so every byte, as it was.
        pick = np.random.default_rng([seed, copy, index, 1])
        if pick.random() < cfg.mosaic:
            pool = partners or [example]
            others = [pool[i] for i in pick.choice(len(pool), 3, replace=len(pool) < 3)]
            source, window = mosaic([example, *others], pick)
    matrix = random_affine(rng, cfg, h, w) @ window
    fill = example.image.reshape(-1, 3).mean(axis=0).astype(np.float32)
    image = warp_image(source.image, matrix, fill, (h, w))
    image = colour_jitter(rng, image, cfg)
    out = Example(id=f"{example.id}-aug{copy}", image=image, label=example.label)
    dropped = 0
    if source.mask is not None:
        out.mask = warp_mask(source.mask, matrix, (h, w))
    if source.boxes is not None:
        # Indices as labels: the kept ones pick each box's class and difficult flag.
        out.boxes, kept, dropped = warp_boxes(
            np.asarray(source.boxes, np.float64).reshape(-1, 4), np.arange(len(source.boxes)),
            matrix, h, w, cfg.box_min_visible)
        out.box_labels = np.asarray(source.box_labels)[kept]
        if source.difficult is not None:
            out.difficult = np.asarray(source.difficult, bool)[kept]
    return out, dropped
