"""TFDS datasets, the embedded `shapes` builder and the public catalog, through one code path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from visionpipe.data.example import Example
from visionpipe.errors import DataError, SourceUnavailableError


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


def _fetch_hint(name: str, task_key: str) -> str:
    return (f"On a machine with network run `tfds build {name} --data_dir DIR`, copy DIR here "
            f"and set {task_key}.tfds_data_dir to it.")


def require_network(builder, *, name: str, task_key: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not minutes, when a dataset must be downloaded and there is no network.

    TFDS retries each file ten times with backoff (about 3.5 minutes offline); one quick
    request first (honouring HTTPS_PROXY) turns "no network" into an immediate clear error.
    """
    if builder.is_prepared():
        return
    import requests

    try:
        requests.head(PROBE_URL, timeout=timeout)
    except requests.RequestException as exc:
        reason = type(exc).__name__
        raise SourceUnavailableError(
            f"TFDS dataset '{name}' is not in {builder.data_dir} and there is no network to "
            f"download it ({reason} reaching {PROBE_URL}). {_fetch_hint(name, task_key)}"
        ) from None


def prepare_builder(builder, *, name: str, task_key: str) -> None:
    """``download_and_prepare``; without network or a local copy, say how to get one."""
    _tfds().disable_progress_bar()  # prepare draws its own bar per split
    try:
        builder.download_and_prepare()
    except Exception as exc:  # TFDS raises many kinds of error for "no network"
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise SourceUnavailableError(
            f"TFDS dataset '{name}' is not available in {builder.data_dir} and could not be "
            f"downloaded ({type(exc).__name__}: {reason}). {_fetch_hint(name, task_key)}"
        ) from None


def _rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


def to_example(features: dict, index: int, split: str) -> Example:
    """Map TFDS feature names (image, label, segmentation_mask, objects) to an Example."""
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
        ymin, xmin, ymax, xmax = np.asarray(objects["bbox"], np.float64).reshape(-1, 4).T
        boxes = np.stack([xmin * w, ymin * h, xmax * w, ymax * h], axis=1)
        # Normalised float32 storage loses a little; round off that noise only.
        ex.boxes = np.round(boxes, 3).astype(np.float32)
        ex.box_labels = np.asarray(objects["label"], np.int32)
    return ex


def iter_split(builder, split: str) -> Iterator[Example]:
    """The Examples of one split of a prepared builder, in stored order."""
    ds = builder.as_dataset(split=split, shuffle_files=False)
    for i, features in enumerate(_tfds().as_numpy(ds)):
        yield to_example(features, i, split)


def class_names(builder) -> list[str]:
    """Class names from the builder's ``label`` or ``objects/label`` ClassLabel feature."""
    feats = builder.info.features
    if "label" in feats and hasattr(feats["label"], "names"):
        return list(feats["label"].names)
    if "objects" in feats and "label" in feats["objects"]:
        return list(feats["objects"]["label"].names)
    raise DataError(f"TFDS dataset '{builder.name}' has no ClassLabel feature to take class "
                    "names from")


def split_sizes(builder) -> dict[str, int]:
    """Number of examples per split, from the builder's metadata."""
    return {name: info.num_examples for name, info in builder.info.splits.items()}


def default_data_dir() -> Path:
    """Where TFDS keeps the catalog datasets unless params say otherwise."""
    return Path(_tfds().core.constants.DATA_DIR).expanduser()
