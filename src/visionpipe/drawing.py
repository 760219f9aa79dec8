"""Masks and boxes drawn onto images with PIL and NumPy: previews, galleries and the copies
`visionpipe predict` renders (no matplotlib, so predict stays light)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

PALETTE = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                    [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230]], np.uint8)


def overlay(image: np.ndarray, mask: np.ndarray | None = None,
            boxes: np.ndarray | None = None, box_labels: np.ndarray | None = None) -> np.ndarray:
    """The image with a half-transparent class mask and class-coloured box outlines."""
    out = image.copy()
    if mask is not None:
        colours = PALETTE[mask % len(PALETTE)]
        fg = mask > 0
        out[fg] = (0.5 * out[fg] + 0.5 * colours[fg]).astype(np.uint8)
    if boxes is not None and len(boxes):
        pil = Image.fromarray(out)
        draw = ImageDraw.Draw(pil)
        labels = box_labels if box_labels is not None else np.zeros(len(boxes), int)
        for (x0, y0, x1, y1), lab in zip(boxes, labels, strict=True):
            colour = tuple(int(c) for c in PALETTE[(int(lab) + 1) % len(PALETTE)])
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=colour)
        out = np.asarray(pil)
    return out


def colour(class_id: int) -> tuple[int, int, int]:
    """The palette colour of a box of class ``class_id`` (0 is drawn in the second colour:
    the first, black, is a mask's background)."""
    return tuple(int(c) for c in PALETTE[(int(class_id) + 1) % len(PALETTE)])


def draw_detections(image: np.ndarray, boxes: np.ndarray, class_ids: np.ndarray,
                    labels: list[str]) -> Image.Image:
    """The image with each box outlined in its class colour and ``labels[i]`` written on a
    filled tab above it (inside the image where the box touches the top edge)."""
    pil = Image.fromarray(image)
    draw = ImageDraw.Draw(pil)
    scale = max(1, round(max(pil.size) / 320))
    for (x0, y0, x1, y1), k, text in zip(boxes, class_ids, labels, strict=True):
        c = colour(k)
        draw.rectangle([x0, y0, x1, y1], outline=c, width=scale)
        left, top, right, bottom = draw.textbbox((0, 0), text, font_size=10 * scale)
        th, tw = bottom - top + 2, right - left + 4
        ty = y0 - th if y0 - th >= 0 else y0
        tx = max(0, min(x0, pil.width - tw))  # the tab stays inside the image
        draw.rectangle([tx, ty, tx + tw, ty + th], fill=c)
        draw.text((tx + 2, ty - top + 1), text, fill=(255, 255, 255), font_size=10 * scale)
    return pil
