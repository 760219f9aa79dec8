"""PNG figures shared by stages: learning curves, confusion matrix, image grids."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: stages run under DVC with no display
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from visionpipe.atomic import atomic_path


def save_figure(fig, path: Path) -> Path:
    """Write a matplotlib figure to ``path`` atomically and close it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def read_history(path: Path) -> dict[str, list[float]]:
    """history.csv (Keras CSVLogger) as column -> values."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return {k: [float(r[k]) for r in rows] for k in (rows[0] if rows else {})}


def learning_curves_png(history: dict[str, list[float]], path: Path) -> Path:
    """One panel per metric (loss, accuracy, ...), train and validation per epoch."""
    names = [k for k in history if k not in ("epoch", "learning_rate")
             and not k.startswith("val_")]
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.5), squeeze=False)
    epochs = list(history.get("epoch", range(1, len(history[names[0]]) + 1)))  # 1-based
    for ax, name in zip(axes[0], names, strict=True):
        ax.plot(epochs, history[name], marker="o", label="train")
        if f"val_{name}" in history:
            ax.plot(epochs, history[f"val_{name}"], marker="o", label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path)


def confusion_png(cm: np.ndarray, class_names: list[str], path: Path) -> Path:
    """Confusion matrix with counts in each cell (rows: true, columns: predicted)."""
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * n, 0.8 + 0.8 * n))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = cm.max() if cm.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > top / 2 else "black")
    return save_figure(fig, path)


def labelled_gallery_png(images: list[np.ndarray], captions: list[str], path: Path, *,
                         columns: int = 4, empty: str = "nothing to show") -> Path:
    """Images with a caption under each (e.g. true/predicted label); a note when empty."""
    if not images:
        fig, ax = plt.subplots(figsize=(4, 1))
        ax.text(0.5, 0.5, empty, ha="center", va="center")
        ax.axis("off")
        return save_figure(fig, path)
    columns = min(columns, len(images))
    rows = (len(images) + columns - 1) // columns
    width = 2.6 if images[0].shape[1] <= images[0].shape[0] * 1.5 else 4.2
    aspect = images[0].shape[0] / images[0].shape[1]  # rows as tall as the images need
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns,
                                                     (width * aspect + 0.5) * rows),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, caption in zip(axes.ravel(), images, captions, strict=False):
        ax.imshow(np.clip(image, 0, 255).astype(np.uint8))
        ax.set_title(caption, fontsize=8)
    return save_figure(fig, path)


def image_grid(tiles: list[np.ndarray], columns: int, path: Path, *, scale: int = 2,
               pad: int = 2) -> Path:
    """Tile uint8 RGB images (all the same size) into one PNG, scaled up for visibility."""
    h, w = tiles[0].shape[:2]
    rows = (len(tiles) + columns - 1) // columns
    grid = Image.new("RGB", (columns * (w * scale + pad) + pad, rows * (h * scale + pad) + pad),
                     (255, 255, 255))
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        img = Image.fromarray(tile).resize((w * scale, h * scale), Image.NEAREST)
        grid.paste(img, (pad + c * (w * scale + pad), pad + r * (h * scale + pad)))
    with atomic_path(path) as tmp:
        grid.save(tmp)
    return path


