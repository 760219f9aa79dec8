"""The on-disk format written by prepare and augment: TFRecord shards plus manifest.json.

Each record is a ``tf.train.Example`` holding one ``Example``: the image as PNG, and whichever
targets the task needs (label, mask as PNG, boxes). The manifest says what the shards hold and
carries a checksum of their bytes, so a later stage can tell it is reading what it expects.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from visionpipe import atomic
from visionpipe.data.example import Example
from visionpipe.errors import DataError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")


def encode_png(array: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8 (H, W, 3) image or (H, W) mask."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """The uint8 array stored by ``encode_png``."""
    return np.asarray(Image.open(io.BytesIO(data)))


def _tf():
    import tensorflow as tf  # imported late: the CLI's --help must not pay for TensorFlow

    return tf


def serialize(example: Example) -> bytes:
    """One Example as a serialised ``tf.train.Example``."""
    tf = _tf()
    f = tf.train.Feature
    h, w = example.image.shape[:2]
    feats = {
        "id": f(bytes_list=tf.train.BytesList(value=[example.id.encode()])),
        "image": f(bytes_list=tf.train.BytesList(value=[encode_png(example.image)])),
        "height": f(int64_list=tf.train.Int64List(value=[h])),
        "width": f(int64_list=tf.train.Int64List(value=[w])),
    }
    if example.label is not None:
        feats["label"] = f(int64_list=tf.train.Int64List(value=[int(example.label)]))
    if example.mask is not None:
        feats["mask"] = f(bytes_list=tf.train.BytesList(value=[encode_png(example.mask)]))
    if example.boxes is not None:
        boxes = np.asarray(example.boxes, np.float32).reshape(-1, 4)
        feats["boxes"] = f(float_list=tf.train.FloatList(value=boxes.ravel().tolist()))
        feats["box_labels"] = f(int64_list=tf.train.Int64List(
            value=np.asarray(example.box_labels, np.int64).tolist()))
        if example.difficult is not None and np.any(example.difficult):
            # Only when some box is difficult: other records stay byte for byte as they were.
            feats["difficult"] = f(int64_list=tf.train.Int64List(
                value=np.asarray(example.difficult, np.int64).tolist()))
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString(
        deterministic=True)  # protobuf map order is otherwise unspecified


def deserialize(data: bytes) -> Example:
    """The Example held by one serialised record (numpy side, for stages and tests)."""
    tf = _tf()
    msg = tf.train.Example.FromString(data).features.feature
    ex = Example(id=msg["id"].bytes_list.value[0].decode(),
                 image=decode_png(msg["image"].bytes_list.value[0]))
    if "label" in msg:
        ex.label = int(msg["label"].int64_list.value[0])
    if "mask" in msg:
        ex.mask = decode_png(msg["mask"].bytes_list.value[0])
    if "boxes" in msg:
        ex.boxes = np.asarray(msg["boxes"].float_list.value, np.float32).reshape(-1, 4)
        ex.box_labels = np.asarray(msg["box_labels"].int64_list.value, np.int32)
        if "difficult" in msg:
            ex.difficult = np.asarray(msg["difficult"].int64_list.value, bool)
    return ex


def write_split(examples: Iterable[Example | bytes], out_dir: Path, split: str,
                shard_size: int) -> tuple[int, list[str]]:
    """Write ``examples`` as shards ``<split>-NNNNN.tfrecord``; returns (count, shard names).

    An item that is ``bytes`` is a record already serialised (one read by ``read_records``
    and kept as it is) and is written unchanged."""
    tf = _tf()
    out_dir.mkdir(parents=True, exist_ok=True)
    count, shards, writer = 0, [], None
    try:
        for ex in examples:
            if count % shard_size == 0:
                if writer is not None:
                    writer.close()
                shards.append(f"{split}-{len(shards):05d}.tfrecord")
                writer = tf.io.TFRecordWriter(str(out_dir / shards[-1]))
            writer.write(ex if isinstance(ex, bytes) else serialize(ex))
            count += 1
    finally:
        if writer is not None:
            writer.close()
    return count, shards


def shard_paths(data_dir: Path, split: str) -> list[Path]:
    """The shard files of ``split`` listed in the manifest of ``data_dir``."""
    manifest = read_manifest(data_dir)
    if split not in manifest["splits"]:
        raise DataError(f"{data_dir / MANIFEST}: has no split '{split}' (it has "
                        f"{', '.join(manifest['splits'])}); rerun the stage that writes it")
    return [data_dir / name for name in manifest["splits"][split]["shards"]]


# Records read per step of tf.data: one eager step per record cost about as much as decoding
# it. A step holds at most about this many bytes of decoded pixels, so large images are read
# a few at a time.
READ_BATCH = 256
READ_BATCH_BYTES = 1 << 22


def _read_batch(manifest: dict) -> int:
    """Records per read step for the images a manifest describes."""
    sizes = [manifest.get(k) for k in ("image_size", "test_image_size")]
    pixels = max((int(s[0]) * int(s[1]) for s in sizes
                  if isinstance(s, list) and len(s) == 2), default=0)
    return max(1, min(READ_BATCH, READ_BATCH_BYTES // max(3 * pixels, 1)))


def read_records(data_dir: Path, split: str) -> Iterator[bytes]:
    """The serialised records of one split, in stored order."""
    tf = _tf()
    batch = _read_batch(read_manifest(data_dir))
    for path in shard_paths(data_dir, split):
        for records in tf.data.TFRecordDataset(str(path)).batch(batch).as_numpy_iterator():
            yield from records


def read_split(data_dir: Path, split: str) -> Iterator[Example]:
    """Iterate the Examples of one split, in stored order."""
    for rec in read_records(data_dir, split):
        yield deserialize(rec)


def checksum(data_dir: Path, names: Iterable[str]) -> str:
    """SHA-256 over the named files' names and bytes, in sorted order."""
    digest = hashlib.sha256()
    for name in sorted(names):
        digest.update(name.encode() + b"\0")
        with open(data_dir / name, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def shard_names(manifest: dict) -> list[str]:
    """Every shard a manifest lists, split by split in its order."""
    return [name for split in manifest["splits"].values() for name in split["shards"]]


def restore_hint(data_dir: Path, root: Path) -> str:
    """The command that brings back ``data_dir`` (a DVC output) as dvc.lock records it."""
    try:
        rel = Path(data_dir).relative_to(root)
    except ValueError:
        return f"rerun the stage that writes {data_dir}"
    stage = {"prepared": "prepare", "augmented": "augment"}.get(rel.parent.name)
    if stage is None:
        return f"rerun the stage that writes {rel}"
    return f"restore it with `dvc checkout {rel.as_posix()}` (or `dvc repro {stage}@{rel.name}`)"


def _record_counts(manifest: dict) -> dict[str, int]:
    """How many records each shard holds as written (write_split fills shards in order), when
    the manifest says its shard size."""
    size = manifest.get("shard_size")
    if not isinstance(size, int) or size < 1:
        return {}
    counts = {}
    for split in manifest["splits"].values():
        left = int(split["count"])
        for name in split["shards"]:
            counts[name] = min(size, left)
            left -= counts[name]
    return counts


def record_error(exc: Exception) -> str:
    """TensorFlow's reason a record file cannot be read, in words and on one line."""
    text = str(getattr(exc, "message", exc)).strip().splitlines()[0]
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*|\s*\[Op:\w+\].*$", "", text)
    # A failing map function: "Error in user-defined function passed to ... with iterator:
    # Iterator::Root::...: Could not parse example input, value: '...'"
    text = re.sub(r"^Error in user-defined function .*?with iterator: \S+: ", "", text)
    text = text.split("' failed")[0]  # "truncated record at N' failed with Read less bytes..."
    if text.startswith("truncated record"):
        return f"cut short: {text}"
    if text.startswith("corrupted record"):
        return f"a record fails its CRC check: {text}"
    return text[:200]


def damaged_shard(data_dir: Path, manifest: dict) -> tuple[str, str] | None:
    """The first shard of ``data_dir`` that is missing, cannot be read as TFRecords (a cut or
    changed byte fails the records' CRC) or holds another number of records than written,
    with why; None when every shard reads whole."""
    tf = _tf()
    expected = _record_counts(manifest)
    for name in shard_names(manifest):
        path = Path(data_dir) / name
        if not path.is_file():
            return name, "missing"
        try:
            count = int(tf.data.TFRecordDataset(str(path)).reduce(
                np.int64(0), lambda n, _: n + 1))
        except tf.errors.OpError as exc:
            return name, record_error(exc)
        if name in expected and count != expected[name]:
            return name, f"holds {count} records, {expected[name]} were written"
    return None


def verify_shards(data_dir: Path, restore: str) -> dict:
    """The manifest of ``data_dir``, after checking that its shards are the bytes it was written
    with (every shard present, their SHA-256 the manifest's ``checksum``); a stage calls it
    before reading them. Otherwise a DataError names the missing or damaged shard and
    ``restore`` (what brings it back, e.g. ``restore_hint``'s)."""
    manifest = read_manifest(data_dir)
    data_dir = Path(data_dir)
    names = shard_names(manifest)
    for name in names:
        if not (data_dir / name).is_file():
            raise DataError(f"{data_dir / name}: missing (listed in {data_dir / MANIFEST}); "
                            f"{restore}")
    try:
        same = checksum(data_dir, names) == manifest["checksum"]
    except OSError as exc:
        raise DataError(f"{exc.filename or data_dir}: cannot be read "
                        f"({exc.strerror or exc}); {restore}") from None
    if same:
        return manifest
    bad = damaged_shard(data_dir, manifest)
    if bad is not None:
        raise DataError(f"{data_dir / bad[0]}: damaged ({bad[1]}); {restore}")
    raise DataError(f"{data_dir}: the shards do not match the checksum in {MANIFEST} (a shard "
                    f"was replaced or the manifest edited); {restore}")


def write_json(path: Path, data: Any) -> None:
    """Write JSON through a temporary name and rename, so a kill never leaves half a file."""
    atomic.write_json(path, data)


def write_manifest(data_dir: Path, manifest: dict) -> dict:
    """Add format version and checksum over every shard, then write manifest.json."""
    names = shard_names(manifest)
    manifest = {"format_version": FORMAT_VERSION, **manifest,
                "checksum": checksum(data_dir, names)}
    write_json(data_dir / MANIFEST, manifest)
    return manifest


def read_json(path: Path) -> dict | None:
    """A JSON object from ``path``; None when it is missing or unreadable (reports that a
    stage may not have written yet)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _splits_ok(splits: Any) -> bool:
    """Whether a manifest's ``splits`` is what write_split made: per split a count and plain
    shard file names (no folders: a stage reads nothing outside the dataset's folder)."""
    if not isinstance(splits, dict):
        return False
    for split in splits.values():
        if not (isinstance(split, dict) and isinstance(split.get("count"), int)
                and not isinstance(split["count"], bool) and split["count"] >= 0
                and isinstance(split.get("shards"), list)):
            return False
        for name in split["shards"]:
            if not (isinstance(name, str) and name and Path(name).name == name
                    and "\\" not in name and name not in (".", "..")):
                return False
    return True


def read_manifest(data_dir: Path) -> dict:
    """manifest.json of a prepared or augmented dataset, checked for the keys stages rely on."""
    path = Path(data_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: not found; run `dvc repro` (or the stage that writes "
                        f"{data_dir}) first") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); delete it and rerun the stage "
                        "that writes it") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc}); make it readable or "
                        "rerun the stage that writes it") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: holds a JSON {type(manifest).__name__}, not an object; "
                        "rerun the stage that writes it")
    missing = [k for k in ("task", "class_names", "image_size", "splits", "checksum")
               if k not in manifest]
    if missing:
        raise DataError(f"{path}: missing keys {', '.join(missing)}; rerun the stage that "
                        "writes it")
    if not _splits_ok(manifest["splits"]) or not isinstance(manifest["checksum"], str):
        raise DataError(f"{path}: 'splits' must map each split to its count and the names of "
                        "its shard files in this folder, and 'checksum' be a string; rerun the "
                        "stage that writes it")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: format_version {manifest.get('format_version')!r}, this "
                        f"visionpipe reads {FORMAT_VERSION}; rerun `dvc repro`")
    return manifest
