"""What prepare's splits hold: class balance per split, box geometry, mask coverage.

prepare calls :func:`describe` once its splits are written. It reads the targets back from the
shards (labels, boxes or masks; never the images, which it does not need) and writes, under
``reports/prepare/<task>/``:

- ``stats.json``: the numbers. Per split: images per class (classification), boxes per class
  and images holding each class (detection), pixels per class and images holding each class
  (segmentation), each with its share of the split; for detection the box size (square root of
  the box's share of its image's area), aspect ratio (width / height) and boxes per image; for
  segmentation each class's coverage (its share of an image's pixels) over the images holding
  it. Distributions as a summary (mean, min, p5, median, p95, max) and a fixed-bin histogram.
- ``class_balance.json``: one row per split and class, for ``dvc plots`` (dvc.yaml).
- ``plots/``: ``class_balance.png``; ``boxes.png`` (detection); ``coverage.png`` (segmentation),
  drawn from the numbers in stats.json.

A split of more than ``max_images`` images is described by every k-th image (a uniform,
reproducible sample; stats.json says ``described`` and ``every``), so the time and memory stay
bounded: masks are decoded one at a time and only the per-image figures of the sample are kept.
The manifest's ``class_counts``/``class_pixels`` stay the exact counts.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from visionpipe.atomic import write_json
from visionpipe.data import records

STATS = "stats.json"
CLASS_BALANCE = "class_balance.json"
PLOTS = "plots"
MAX_IMAGES = 10_000
BATCH = 512
# What a class is counted in, per task.
UNITS = {"classification": "images", "detection": "boxes", "segmentation": "pixels"}
SIZE_EDGES = np.linspace(0.0, 1.0, 21)
COVERAGE_EDGES = np.linspace(0.0, 1.0, 21)
ASPECT_EDGES = 2.0 ** np.linspace(-3.0, 3.0, 25)  # 1/8 .. 8, even on a log axis


def describe(data_dir: Path, task: str, class_names: list[str], out_dir: Path, *,
             max_images: int = MAX_IMAGES) -> dict:
    """Describe the splits of a prepared dataset into ``out_dir`` (stats.json,
    class_balance.json, plots/*.png); print where they are and return stats.json's content."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    manifest = records.read_manifest(data_dir)
    splits = {}
    for split, info in manifest["splits"].items():
        count = int(info["count"])
        every = max(1, math.ceil(count / max_images))
        batches = _targets(data_dir, split, task, every)
        if task == "classification":
            splits[split] = _classification(batches, class_names)
        elif task == "detection":
            splits[split] = _detection(batches, class_names)
        else:
            splits[split] = _segmentation(batches, class_names)
        splits[split] = {"images": count, "described": splits[split].pop("described"),
                         "every": every, **splits[split]}
    stats = {"task": task, "class_names": list(class_names), "unit": UNITS[task],
             "max_images": max_images, "splits": splits}
    write_json(out_dir / STATS, stats)
    write_json(out_dir / CLASS_BALANCE, balance_rows(stats))
    pngs = draw(stats, out_dir / PLOTS)
    sampled = [f"1 in {s['every']} images of {name}" for name, s in splits.items()
               if s["every"] > 1]
    print(f"prepare@{task}: data stats in {_shown(out_dir / STATS)}, plots in "
          f"{_shown(out_dir / PLOTS)}/ ({', '.join(p.name for p in pngs)})"
          + (f"; described {', '.join(sampled)}" if sampled else ""), flush=True)
    return stats


def _shown(path: Path) -> str:
    """``path`` relative to the working directory (the project root under DVC) when inside it."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


# --- reading the targets ------------------------------------------------------------------------

def _targets(data_dir: Path, split: str, task: str, every: int) -> Iterator[dict]:
    """Batches of one split's targets as numpy arrays, every ``every``-th record. Parsed with
    ``tf.io.parse_example`` from the features ``records.serialize`` writes, leaving the image
    undecoded: about three times faster than ``records.read_split``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    spec = {"height": tf.io.FixedLenFeature([], tf.int64),
            "width": tf.io.FixedLenFeature([], tf.int64)}
    if task == "classification":
        spec["label"] = tf.io.FixedLenFeature([], tf.int64)
    elif task == "detection":
        spec["boxes"] = tf.io.RaggedFeature(tf.float32)
        spec["box_labels"] = tf.io.RaggedFeature(tf.int64)
    else:
        spec["mask"] = tf.io.FixedLenFeature([], tf.string)
    paths = [str(p) for p in records.shard_paths(data_dir, split)]
    dataset = tf.data.TFRecordDataset(paths)
    if every > 1:
        dataset = dataset.shard(every, 0)
    for batch in dataset.batch(BATCH):
        parsed = tf.io.parse_example(batch, spec)
        out = {k: v.numpy() for k, v in parsed.items() if not isinstance(v, tf.RaggedTensor)}
        for key in ("boxes", "box_labels"):
            if key in parsed:
                out[key] = parsed[key].values.numpy()
                out[f"{key}_splits"] = parsed[key].row_splits.numpy()
        yield out


# --- the numbers --------------------------------------------------------------------------------

def _round(value: float) -> float:
    return round(float(value), 6)


def summary(values: np.ndarray) -> dict | None:
    """mean, min, p5, median, p95, max of ``values``; None when there are none."""
    values = np.asarray(values, np.float64)
    if not values.size:
        return None
    p5, median, p95 = np.percentile(values, [5, 50, 95])
    return {k: _round(v) for k, v in (("mean", values.mean()), ("min", values.min()),
                                      ("p5", p5), ("median", median), ("p95", p95),
                                      ("max", values.max()))}


def histogram(values: np.ndarray, edges: np.ndarray) -> dict:
    """Counts of ``values`` in the bins between ``edges``; values outside them count in the
    first or last bin."""
    values = np.clip(np.asarray(values, np.float64), edges[0], edges[-1])
    counts, _ = np.histogram(values, bins=edges)
    return {"edges": [_round(e) for e in edges], "counts": counts.tolist()}


def _classes(names: list[str], counts: np.ndarray, unit: str,
             images: np.ndarray | None = None) -> dict:
    total = int(counts.sum())
    out = {}
    for i, name in enumerate(names):
        out[name] = {unit: int(counts[i]), "share": _round(counts[i] / total) if total else 0.0}
        if images is not None:
            out[name]["images"] = int(images[i])
    return out


def _imbalance(counts: np.ndarray) -> float | None:
    """Largest class count over smallest; None when a class is absent."""
    return _round(counts.max() / counts.min()) if counts.size and counts.min() > 0 else None


def _classification(batches: Iterator[dict], names: list[str]) -> dict:
    counts = np.zeros(len(names), np.int64)
    for batch in batches:
        counts += np.bincount(batch["label"], minlength=len(names))[:len(names)]
    return {"described": int(counts.sum()), "classes": _classes(names, counts, "images"),
            "imbalance": _imbalance(counts)}


def _detection(batches: Iterator[dict], names: list[str]) -> dict:
    n_classes = len(names)
    boxes_by_class = np.zeros(n_classes, np.int64)
    images_by_class = np.zeros(n_classes, np.int64)
    per_image, widths, heights, sizes, aspects = [], [], [], [], []
    for batch in batches:
        splits = batch["box_labels_splits"]
        counts = np.diff(splits)
        per_image.append(counts)
        labels = batch["box_labels"].astype(np.int64)
        boxes = batch["boxes"].reshape(-1, 4)
        owner = np.repeat(np.arange(len(counts)), counts)
        boxes_by_class += np.bincount(labels, minlength=n_classes)[:n_classes]
        present = np.zeros((len(counts), n_classes), bool)
        present[owner, labels] = True
        images_by_class += present.sum(axis=0)
        w = boxes[:, 2] - boxes[:, 0]
        h = boxes[:, 3] - boxes[:, 1]
        rel_w = w / batch["width"][owner]
        rel_h = h / batch["height"][owner]
        widths.append(rel_w)
        heights.append(rel_h)
        sizes.append(np.sqrt(np.clip(rel_w * rel_h, 0.0, None)))
        ok = (w > 0) & (h > 0)
        aspects.append(w[ok] / h[ok])
    per_image = np.concatenate(per_image) if per_image else np.zeros(0, np.int64)
    size, aspect = _join(sizes), _join(aspects)
    most = int(per_image.max()) if per_image.size else 0
    return {
        "described": int(per_image.size),
        "boxes": int(boxes_by_class.sum()),
        "classes": _classes(names, boxes_by_class, "boxes", images_by_class),
        "imbalance": _imbalance(boxes_by_class),
        "boxes_per_image": {"summary": summary(per_image),
                            "histogram": {str(k): int(v) for k, v in
                                          enumerate(np.bincount(per_image,
                                                                minlength=most + 1))}},
        "box_size": {"summary": summary(size), "histogram": histogram(size, SIZE_EDGES)},
        "aspect_ratio": {"summary": summary(aspect),
                         "histogram": histogram(aspect, ASPECT_EDGES)},
        "box_width": summary(_join(widths)),
        "box_height": summary(_join(heights)),
    }


def _join(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, np.float64)


def _segmentation(batches: Iterator[dict], names: list[str]) -> dict:
    n_classes = len(names)
    pixels = np.zeros(n_classes, np.int64)
    coverage = []  # one row per image described: each class's share of its pixels
    for batch in batches:
        for data in batch["mask"]:  # one mask at a time: never a split's masks at once
            mask = records.decode_png(data)
            counts = np.bincount(mask.ravel(), minlength=n_classes)[:n_classes]
            pixels += counts
            coverage.append((counts / max(mask.size, 1)).astype(np.float32))
    coverage = np.stack(coverage) if coverage else np.zeros((0, n_classes), np.float32)
    present = coverage > 0
    classes = _classes(names, pixels, "pixels", present.sum(axis=0))
    for i, name in enumerate(names):
        held = coverage[present[:, i], i]
        classes[name]["coverage"] = {"summary": summary(held),
                                     "histogram": histogram(held, COVERAGE_EDGES)}
    return {"described": int(coverage.shape[0]), "pixels": int(pixels.sum()),
            "classes": classes, "imbalance": _imbalance(pixels)}


def balance_rows(stats: dict) -> list[dict]:
    """class_balance.json: one row per split and class (``bar`` names both, for a bar chart),
    with the count in the task's unit and its share of the split."""
    unit = stats["unit"]
    return [{"bar": f"{split}: {name}", "split": split, "class": name, "unit": unit,
             "count": entry[unit], "share": entry["share"]}
            for split, info in stats["splits"].items()
            for name, entry in info["classes"].items()]


# --- the plots ----------------------------------------------------------------------------------

def draw(stats: dict, folder: Path) -> list[Path]:
    """The PNGs of ``stats`` in ``folder`` (PNGs left there by an earlier run are removed)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    out = [_balance_png(stats, folder / "class_balance.png")]
    if stats["task"] == "detection":
        out.append(_boxes_png(stats, folder / "boxes.png"))
    elif stats["task"] == "segmentation":
        out.append(_coverage_png(stats, folder / "coverage.png"))
    return out


def _grouped_bars(ax, labels: list[str], series: dict[str, list[float]]) -> None:
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(labels))
    for i, (name, values) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name)
    crowded = sum(len(label) + 2 for label in labels) > 40
    ax.set_xticks(x, labels, rotation=45 if crowded else 0, ha="right" if crowded else "center")
    ax.grid(alpha=0.3, axis="y")


def _balance_png(stats: dict, path: Path) -> Path:
    from visionpipe.plots import plt, save_figure  # plots sets the headless backend first

    names, unit, splits = stats["class_names"], stats["unit"], stats["splits"]
    panels = [(f"{unit} per class", f"share of the split's {unit}",
               {s: [info["classes"][n]["share"] for n in names] for s, info in splits.items()})]
    if unit != "images":
        panels.append(("images holding each class", "share of the split's images",
                       {s: [info["classes"][n]["images"] / max(info["described"], 1)
                            for n in names] for s, info in splits.items()}))
    width = max(4.5, 1.2 + 0.55 * len(names))
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 3.8), squeeze=False,
                             layout="constrained")
    for ax, (title, ylabel, series) in zip(axes[0], panels, strict=True):
        _grouped_bars(ax, names, series)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        _legend(ax, fontsize=8)
    fig.suptitle(f"{stats['task']}: class balance per split", fontsize=11)
    return save_figure(fig, path)


def _legend(ax, **kwargs) -> None:
    """A legend when something is labelled (matplotlib warns on an empty one)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def _step(ax, hist: dict, label: str) -> None:
    """A histogram from stats.json as a step line, as shares of its total."""
    counts = np.asarray(hist["counts"], np.float64)
    total = counts.sum()
    if not total:
        return
    ax.stairs(counts / total, hist["edges"], label=label)


def _boxes_png(stats: dict, path: Path) -> Path:
    from visionpipe.plots import plt, save_figure  # plots sets the headless backend first

    splits = stats["splits"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), layout="constrained")
    for split, info in splits.items():
        _step(axes[0], info["box_size"]["histogram"], split)
        _step(axes[1], info["aspect_ratio"]["histogram"], split)
    axes[0].set_title("box size: sqrt(box area / image area)", fontsize=10)
    axes[0].set_xlabel("relative size")
    axes[1].set_title("aspect ratio: width / height", fontsize=10)
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("width / height (ends hold what lies beyond)")
    most = max((len(i["boxes_per_image"]["histogram"]) for i in splits.values()), default=1)
    series = {}
    for split, info in splits.items():
        hist = info["boxes_per_image"]["histogram"]
        total = max(sum(hist.values()), 1)
        series[split] = [hist.get(str(k), 0) / total for k in range(most)]
    _grouped_bars(axes[2], [str(k) for k in range(most)], series)
    axes[2].set_title("boxes per image", fontsize=10)
    for ax, ylabel in zip(axes, ("share of boxes", "share of boxes", "share of images"),
                          strict=True):
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        _legend(ax, fontsize=8)
    fig.suptitle("detection: box geometry per split", fontsize=11)
    return save_figure(fig, path)


def _coverage_png(stats: dict, path: Path) -> Path:
    from visionpipe.plots import plt, save_figure  # plots sets the headless backend first

    names, splits = stats["class_names"], stats["splits"]
    columns = min(4, len(names))
    rows = math.ceil(len(names) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 2.9 * rows), squeeze=False,
                             layout="constrained")
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.ravel(), names, strict=False):
        for split, info in splits.items():
            entry = info["classes"][name]
            _step(ax, entry["coverage"]["histogram"], f"{split} ({entry['images']})")
        ax.set_title(name, fontsize=10)
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
        _legend(ax, fontsize=7, title="images holding it", title_fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("share of images")
    for ax in axes[-1]:
        ax.set_xlabel("share of the image's pixels")
    fig.suptitle("segmentation: coverage per class (images holding the class)", fontsize=11)
    return save_figure(fig, path)
