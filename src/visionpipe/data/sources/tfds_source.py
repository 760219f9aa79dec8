"""TFDS datasets, the embedded `shapes` builder and the public catalog, through one code path."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from visionpipe.data.example import Example
from visionpipe.errors import DataError, SourceUnavailableError, disk_full_line


def _tfds():
    import tensorflow_datasets as tfds

    return tfds


def catalog_builder(name: str, data_dir: str | None):
    """``tfds.builder(name)`` with an unknown name turned into a clear error."""
    tfds = _tfds()
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as exc:
        first = str(exc).strip().splitlines()[0]
        raise DataError(f"TFDS dataset '{name}' is not in the catalog ({first}); see "
                        "https://www.tensorflow.org/datasets/catalog") from None


# Where TFDS's own prepared copies live; a download that cannot reach it will not get far.
PROBE_URL = "https://storage.googleapis.com/"


def _fetch_hint(name: str, task_key: str, alternative: str = "") -> str:
    hint = (f"On a machine with network run `tfds build {name} --data_dir DIR`, copy DIR here "
            f"and set {task_key}.tfds_data_dir to it")
    return f"{hint}; {alternative}." if alternative else f"{hint}."


def _setting(task_key: str, name: str, catalog: bool) -> str:
    """``prepare.<task>.tfds_name = 'name': `` for a catalog dataset (params name it)."""
    return f"{task_key}.tfds_name = {name!r}: " if catalog else ""


def require_network(builder, *, name: str, task_key: str, timeout: float = 5.0,
                    alternative: str = "") -> None:
    """Fail in seconds, not minutes, when a dataset must be downloaded and there is no network.

    TFDS retries each file ten times with backoff (about 3.5 minutes offline); one quick
    request first (honouring HTTPS_PROXY) turns "no network" into an immediate clear error.
    The message names ``<task_key>.tfds_name`` and how to get a local copy; ``alternative``
    (e.g. another source for the task) is offered after that.
    """
    if builder.is_prepared():
        return
    import requests

    try:
        requests.head(PROBE_URL, timeout=timeout)
    except requests.RequestException as exc:
        reason = type(exc).__name__
        raise SourceUnavailableError(
            f"{_setting(task_key, name, True)}TFDS dataset '{name}' is not in "
            f"{builder.data_dir} and there is no network to download it ({reason} reaching "
            f"{PROBE_URL}). {_fetch_hint(name, task_key, alternative)}"
        ) from None


def prepare_builder(builder, *, name: str, task_key: str, catalog: bool = False,
                    alternative: str = "") -> None:
    """``download_and_prepare``; without network or a local copy, say how to get one.

    ``catalog``: ``name`` comes from ``<task_key>.tfds_name``, which the message then names.
    """
    _tfds().disable_progress_bar()  # prepare draws its own bar per split
    try:
        builder.download_and_prepare()
    except Exception as exc:  # TFDS raises many kinds of error for "no network"
        if disk_full_line(exc):  # a full disk is not a missing dataset: the CLI says so
            raise
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise SourceUnavailableError(
            f"{_setting(task_key, name, catalog)}TFDS dataset '{name}' is not available in "
            f"{builder.data_dir} and could not be downloaded ({type(exc).__name__}: {reason}). "
            f"{_fetch_hint(name, task_key, alternative)}"
        ) from None


def _rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


@dataclass
class BoxTally:
    """What converting a detection dataset's ``objects`` kept and left out, for the manifest."""

    images: int = 0
    boxes: int = 0  # kept
    difficult: int = 0  # kept boxes flagged ``is_difficult`` (kept, as the VOC source does)
    images_without_objects: int = 0
    dropped: list[str] = field(default_factory=list)  # "<id>: object i 'name' (...): why"

    def counts(self) -> dict[str, int]:
        return {"images": self.images, "boxes": self.boxes, "boxes_dropped": len(self.dropped),
                "difficult_boxes": self.difficult,
                "images_without_objects": self.images_without_objects}


def _no_area(lo: float, hi: float, axis: str, side: str) -> str:
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return f"{axis} not a number ({axis}min {lo:g}, {axis}max {hi:g})"
    if hi < lo:
        return f"inverted corners ({axis}max {hi:g} < {axis}min {lo:g} px)"
    return f"zero {side} ({axis}min = {axis}max = {lo:g} px)"


def _boxes(objects: dict, h: int, w: int, where: str, tally: BoxTally | None,
           names: list[str] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """TFDS ``objects`` (bbox normalised ``[ymin, xmin, ymax, xmax]``, label, optionally
    is_difficult) as absolute pixel ``[x_min, y_min, x_max, y_max]`` boxes and their labels.
    With a ``tally``, boxes without area (at float32, as stored) are dropped and listed in it;
    without one (the generated ``shapes``, whose boxes all have area) nothing is dropped."""
    bbox = np.asarray(objects["bbox"], np.float64).reshape(-1, 4)
    ymin, xmin, ymax, xmax = bbox.T
    # Normalised float32 storage loses a little; round off that noise only.
    boxes = np.round(np.stack([xmin * w, ymin * h, xmax * w, ymax * h], axis=1),
                     3).astype(np.float32)
    labels = np.asarray(objects["label"], np.int32).reshape(-1)
    difficult = np.asarray(objects.get("is_difficult", np.zeros(len(labels), bool)),
                           bool).reshape(-1)
    keep = np.ones(len(boxes), bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes if tally is not None else ()):
        why = [_no_area(lo, hi, axis, side)
               for lo, hi, axis, side in ((x0, x1, "x", "width"), (y0, y1, "y", "height"))
               if not hi > lo]
        if why:
            keep[i] = False
            name = names[labels[i]] if names and 0 <= labels[i] < len(names) else labels[i]
            tally.dropped.append(
                f"{where}: object {i + 1} {str(name)!r} (bbox [ymin, xmin, ymax, xmax] "
                f"{', '.join(f'{v:.6g}' for v in bbox[i])} of a {w}x{h} image): "
                f"{', '.join(why)}")
    if tally is not None:
        tally.images += 1
        tally.boxes += int(keep.sum())
        tally.difficult += int((difficult & keep).sum())
        tally.images_without_objects += not keep.any()
    flags = difficult[keep] if "is_difficult" in objects else None
    return boxes[keep], labels[keep], flags


def to_example(features: dict, index: int, split: str, tally: BoxTally | None = None,
               box_names: list[str] | None = None) -> Example:
    """Map TFDS feature names (image, label, segmentation_mask, objects) to an Example.

    ``objects`` become boxes in absolute pixels of the image; ``tally`` (if given) counts them
    and lists the boxes dropped for having no area, named by ``box_names``.
    """
    image = _rgb(features["image"])
    h, w = image.shape[:2]
    ex = Example(id=f"{split}-{index:06d}", image=image)
    if "label" in features:
        ex.label = int(features["label"])
    if "segmentation_mask" in features:
        mask = features["segmentation_mask"]
        ex.mask = (mask[..., 0] if mask.ndim == 3 else mask).astype(np.uint8)
    objects = features.get("objects")
    if isinstance(objects, dict) and "bbox" in objects:
        ex.boxes, ex.box_labels, ex.difficult = _boxes(objects, h, w, ex.id, tally,
                                                       box_names)
    return ex


def iter_split(builder, split: str, tally: BoxTally | None = None) -> Iterator[Example]:
    """The Examples of one split of a prepared builder, in stored order; ``tally`` counts
    their boxes (detection datasets)."""
    names = class_names(builder, boxes=True) if tally is not None else None
    ds = builder.as_dataset(split=split, shuffle_files=False)
    for i, features in enumerate(_tfds().as_numpy(ds)):
        yield to_example(features, i, split, tally, names)


def _has_boxes(feats) -> bool:
    objects = feats["objects"] if "objects" in feats else None  # noqa: SIM401 - no .get on FeaturesDict
    return (objects is not None and "bbox" in objects and "label" in objects
            and hasattr(objects["label"], "names"))


def class_names(builder, *, boxes: bool = False) -> list[str]:
    """Class names from the builder's ``label`` or ``objects/label`` ClassLabel feature;
    ``boxes``: from ``objects/label`` only (detection), which must come with ``objects/bbox``."""
    feats = builder.info.features
    if boxes:
        if not _has_boxes(feats):
            raise DataError(f"TFDS dataset '{builder.name}' has no boxes: detection needs the "
                            "features objects/bbox (BBoxFeature) and objects/label (ClassLabel), "
                            "as voc/2007 and coco/2017 have")
        return list(feats["objects"]["label"].names)
    if "label" in feats and hasattr(feats["label"], "names"):
        return list(feats["label"].names)
    if _has_boxes(feats):
        return list(feats["objects"]["label"].names)
    raise DataError(f"TFDS dataset '{builder.name}' has no ClassLabel feature to take class "
                    "names from")


def split_sizes(builder) -> dict[str, int]:
    """Number of examples per split, from the builder's metadata."""
    return {name: info.num_examples for name, info in builder.info.splits.items()}


def default_data_dir() -> Path:
    """Where TFDS keeps the catalog datasets unless params say otherwise."""
    return Path(_tfds().core.constants.DATA_DIR).expanduser()
