"""tf.data input pipelines over prepared/augmented record shards."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import tensorflow as tf

from visionpipe.config import TrainConfig
from visionpipe.data.records import (
    damaged_shard,
    read_manifest,
    record_error,
    shard_names,
    shard_paths,
)
from visionpipe.errors import DataError

AUTOTUNE = tf.data.AUTOTUNE


def parse_record(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """Decode one record to tensors: uint8 image (H, W, 3) plus whichever targets it holds."""
    spec = {
        "id": tf.io.FixedLenFeature([], tf.string),
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
        "mask": tf.io.FixedLenFeature([], tf.string, default_value=""),
        "boxes": tf.io.VarLenFeature(tf.float32),
        "box_labels": tf.io.VarLenFeature(tf.int64),
        "difficult": tf.io.VarLenFeature(tf.int64),
    }
    rec = tf.io.parse_single_example(serialized, spec)
    image = tf.io.decode_png(rec["image"], channels=3)
    out = {"id": rec["id"], "image": image, "label": tf.cast(rec["label"], tf.int32)}
    out["mask"] = tf.cond(
        tf.strings.length(rec["mask"]) > 0,
        lambda: tf.io.decode_png(rec["mask"], channels=1)[..., 0],
        lambda: tf.zeros(tf.shape(image)[:2], tf.uint8))
    out["boxes"] = tf.reshape(tf.sparse.to_dense(rec["boxes"]), [-1, 4])
    out["box_labels"] = tf.cast(tf.sparse.to_dense(rec["box_labels"]), tf.int32)
    # Stored only where some box is difficult; otherwise none is.
    difficult = tf.cast(tf.sparse.to_dense(rec["difficult"]), tf.bool)
    out["difficult"] = tf.cond(tf.size(difficult) > 0, lambda: difficult,
                               lambda: tf.zeros(tf.shape(out["box_labels"]), tf.bool))
    return out


def unparsable_shard(data_dir: Path, manifest: dict) -> tuple[str, str] | None:
    """The first shard of ``data_dir`` holding a record ``parse_record`` cannot decode (not
    an Example, no image, not a PNG), with which record and why; None when all decode."""
    for name in shard_names(manifest):
        index = 0
        try:
            for _ in tf.data.TFRecordDataset(str(Path(data_dir) / name)).map(parse_record):
                index += 1
        except tf.errors.OpError as exc:
            return name, f"record {index + 1} cannot be decoded: {record_error(exc)}"
    return None


@contextmanager
def damaged_records(restore: dict[Path, str]) -> Iterator[None]:
    """Reading the shards of the folders in ``restore`` (folder -> what restores it): a shard
    that fails to read or decode though its manifest's checksum matched (the manifest edited,
    say) becomes a one-line DataError naming it. TensorFlow says only that some record
    failed, so the shards are read again to find which; an error no shard explains (the
    model's, not the data's) is raised as it was."""
    try:
        yield
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as exc:
        for data_dir, hint in restore.items():
            manifest = read_manifest(data_dir)
            bad = damaged_shard(data_dir, manifest) or unparsable_shard(data_dir, manifest)
            if bad is not None:
                raise DataError(f"{data_dir / bad[0]}: damaged ({bad[1]}); {hint}") from None
        if not isinstance(exc, tf.errors.DataLossError):
            raise
        folders = " or ".join(str(d) for d in restore)
        raise DataError(f"a shard in {folders} cannot be read ({record_error(exc)}); "
                        f"{'; '.join(restore.values())}") from None


def record_dataset(data_dir: Path, split: str, deterministic: bool = True) -> tf.data.Dataset:
    """Parsed records of one split, in stored order (``deterministic=False``: as decoded)."""
    files = [str(p) for p in shard_paths(data_dir, split)]
    return tf.data.TFRecordDataset(files).map(parse_record, num_parallel_calls=AUTOTUNE,
                                              deterministic=deterministic)


def decoded_bytes(manifest: dict, split: str) -> int:
    """What the decoded images (uint8) of one split take in memory, from its manifest."""
    h, w = manifest["image_size"]
    return int(manifest["counts"][split]) * h * w * 3


def cache_mode(cache: str, nbytes: int, limit_mb: int) -> str:
    """``memory``, ``disk`` or ``none``: ``auto`` keeps the decoded split in memory when it
    fits in ``limit_mb`` and on disk otherwise."""
    if cache != "auto":
        return cache
    return "memory" if nbytes <= limit_mb * 2**20 else "disk"


def model_dataset(data_dir: Path, split: str, to_model_io: Callable, batch_size: int, *,
                  shuffle: bool = False, shuffle_buffer: int = 10000, seed: int = 0,
                  cache: str = "memory", cache_file: str | Path | None = None,
                  deterministic: bool = True, padding=None) -> tf.data.Dataset:
    """Batches of (inputs, targets) for ``fit``/``evaluate``: parallel decode, cache, shuffle,
    batch, prefetch.

    ``cache``: ``memory``, ``disk`` (``cache_file``, a path prefix TensorFlow writes its
    cache files under) or ``none`` (decode every epoch). ``deterministic=False`` lets the
    parallel decoding hand out records as they finish rather than in stored order.
    Targets of varying length (detection's boxes) are padded per batch with ``padding`` (the
    task's ``padding_values()``; None: plain batches)."""
    # The manifest's count as the dataset's cardinality: Keras then knows the epoch's length
    # (a progress bar with ETA from the first epoch, no "ran out of data" warning), and a
    # split with fewer or more records than its manifest says fails instead of training on.
    count = int(read_manifest(data_dir)["splits"][split]["count"])
    ds = record_dataset(data_dir, split, deterministic).apply(
        tf.data.experimental.assert_cardinality(count)).map(
        to_model_io, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    if cache == "memory":
        ds = ds.cache()
    elif cache == "disk":
        if cache_file is None:
            raise ValueError("cache='disk' needs cache_file")
        ds = ds.cache(str(cache_file))
    elif cache != "none":
        raise ValueError(f"cache must be memory, disk or none, not {cache!r}")
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    ds = (ds.batch(batch_size) if padding is None
          else ds.padded_batch(batch_size, padding_values=padding))
    return ds.prefetch(AUTOTUNE)


def with_image_shape(to_model_io, size: tuple[int, int]):
    """``to_model_io`` with the images' static shape set (train and val images are all
    ``size``): a detector lays out its anchors from it."""

    def fn(rec):
        return to_model_io({**rec, "image": tf.ensure_shape(rec["image"], (*size, 3))})

    return fn


def input_dataset(data_dir: Path, split: str, io, t: TrainConfig, seed: int, cache_dir: Path,
                  padding=None):
    """The train stage's input pipeline for one split (the train split shuffled with the
    seed), with the model's cache and determinism params; returns it and the cache mode
    ``auto`` resolved to. A disk cache goes under ``cache_dir``; ``padding``: the task's
    padding_values()."""
    cache = cache_mode(t.cache, decoded_bytes(read_manifest(data_dir), split),
                       t.cache_limit_mb)
    ds = model_dataset(data_dir, split, io, t.batch_size, shuffle=split == "train",
                       shuffle_buffer=t.shuffle_buffer, seed=seed, cache=cache,
                       cache_file=cache_dir / split, deterministic=t.deterministic_input,
                       padding=padding)
    return ds, cache


def test_arrays(data_dir: Path, targets: Callable[[dict], object], split: str = "test"
                ) -> tuple[np.ndarray, list, list[str]]:
    """Test images (or ``split``'s) as float32 (N, H, W, 3), ``targets(record)`` (the task's
    ground truth) and the id of each image."""
    images, truths, ids = [], [], []
    for rec in record_dataset(data_dir, split).as_numpy_iterator():
        images.append(rec["image"])
        truths.append(targets(rec))
        ids.append(rec["id"].decode())
    return np.stack(images).astype(np.float32), truths, ids
