"""The record format: lossless round trip, sharding, manifest checksum and clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from visionpipe.data import records
from visionpipe.data.example import Example
from visionpipe.data.pipeline import record_dataset
from visionpipe.errors import DataError


def _example(i: int) -> Example:
    rng = np.random.default_rng(i)
    return Example(id=f"ex-{i}", image=rng.integers(0, 256, (12, 10, 3), dtype=np.uint8),
                   label=i % 3, mask=rng.integers(0, 4, (12, 10), dtype=np.uint8),
                   boxes=np.array([[1, 2, 5, 9], [0, 0, 10, 12]], np.float32) + i,
                   box_labels=np.array([i % 3, 2], np.int32))


def _write(tmp_path, n=5, shard_size=2):
    count, shards = records.write_split((_example(i) for i in range(n)), tmp_path, "train",
                                        shard_size)
    manifest = records.write_manifest(tmp_path, {
        "task": "classification", "class_names": ["a", "b", "c"], "image_size": [12, 10],
        "splits": {"train": {"count": count, "shards": shards}}})
    return count, shards, manifest


def test_round_trip_is_lossless(tmp_path):
    count, shards, _ = _write(tmp_path)
    assert count == 5 and shards == ["train-00000.tfrecord", "train-00001.tfrecord",
                                     "train-00002.tfrecord"]
    back = list(records.read_split(tmp_path, "train"))
    for i, ex in enumerate(back):
        ref = _example(i)
        assert ex.id == ref.id and ex.label == ref.label
        np.testing.assert_array_equal(ex.image, ref.image)
        np.testing.assert_array_equal(ex.mask, ref.mask)
        np.testing.assert_array_equal(ex.boxes, ref.boxes)
        np.testing.assert_array_equal(ex.box_labels, ref.box_labels)


def test_tf_data_parse_matches_numpy_side(tmp_path):
    _write(tmp_path)
    recs = list(record_dataset(tmp_path, "train").as_numpy_iterator())
    assert len(recs) == 5
    ref = _example(3)
    np.testing.assert_array_equal(recs[3]["image"], ref.image)
    np.testing.assert_array_equal(recs[3]["mask"], ref.mask)
    np.testing.assert_array_equal(recs[3]["boxes"], ref.boxes)
    assert recs[3]["label"] == ref.label


def test_checksum_tracks_content(tmp_path):
    _, shards, manifest = _write(tmp_path)
    same = records.checksum(tmp_path, shards)
    assert same == manifest["checksum"] and same.startswith("sha256:")
    data = bytearray((tmp_path / shards[1]).read_bytes())
    data[-5] ^= 0xFF
    (tmp_path / shards[1]).write_bytes(bytes(data))
    assert records.checksum(tmp_path, shards) != same


def test_missing_manifest_names_path(tmp_path):
    with pytest.raises(DataError, match=r"manifest.json: not found; run `dvc repro`"):
        records.read_manifest(tmp_path)


def test_broken_manifest_names_path(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=r"manifest\.json: not valid JSON"):
        records.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"task": "x"}))
    with pytest.raises(DataError, match="missing keys class_names, image_size"):
        records.read_manifest(tmp_path)


def test_unknown_split_is_an_error(tmp_path):
    _write(tmp_path)
    with pytest.raises(DataError, match="has no split 'test'"):
        records.shard_paths(tmp_path, "test")


def test_serialized_bytes_do_not_depend_on_the_process():
    """Same Example, same bytes, in processes with different hash seeds: protobuf map order
    is unspecified unless serialisation is deterministic, and DVC hashes these bytes."""
    import subprocess
    import sys

    code = ("import hashlib; from tests.unit.test_records import _example; "
            "from visionpipe.data.records import serialize; "
            "print(hashlib.sha256(b''.join(serialize(_example(i)) for i in range(20)))"
            ".hexdigest())")
    root = Path(__file__).resolve().parents[2]
    # Both at once: each spends most of its time importing TensorFlow on one core.
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}) for seed in ("1", "2")]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    digests = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert len(digests) == 1, digests


def test_difficult_flags_round_trip_and_are_stored_only_when_set(tmp_path):
    from visionpipe.data.pipeline import record_dataset

    image = np.zeros((8, 8, 3), np.uint8)
    boxes = np.array([[0, 0, 4, 4], [2, 2, 8, 8]], np.float32)
    plain = Example(id="a", image=image, boxes=boxes, box_labels=np.array([0, 1], np.int32))
    none_set = Example(id="a", image=image, boxes=boxes, box_labels=np.array([0, 1], np.int32),
                       difficult=np.array([False, False]))
    one_set = Example(id="b", image=image, boxes=boxes, box_labels=np.array([0, 1], np.int32),
                      difficult=np.array([False, True]))
    assert records.serialize(none_set) == records.serialize(plain)  # old records unchanged
    assert records.deserialize(records.serialize(plain)).difficult is None
    np.testing.assert_array_equal(records.deserialize(records.serialize(one_set)).difficult,
                                  [False, True])
    count, shards = records.write_split([plain, one_set], tmp_path, "test", 10)
    records.write_manifest(tmp_path, {"task": "detection", "class_names": ["x", "y"],
                                      "image_size": [8, 8],
                                      "splits": {"test": {"count": count, "shards": shards}}})
    parsed = list(record_dataset(tmp_path, "test").as_numpy_iterator())
    assert parsed[0]["difficult"].tolist() == [False, False]  # absent: none is difficult
    assert parsed[1]["difficult"].tolist() == [False, True]


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_verify_shards_passes_intact_data_and_names_a_missing_or_damaged_shard(tmp_path):
    _, shards, manifest = _write(tmp_path)
    assert records.verify_shards(tmp_path, "RESTORE") == manifest
    second = tmp_path / shards[1]
    good = second.read_bytes()

    def error() -> str:
        with pytest.raises(DataError) as info:
            records.verify_shards(tmp_path, "RESTORE")
        assert "\n" not in str(info.value) and str(info.value).endswith("; RESTORE")
        return str(info.value)

    second.write_bytes(good[:len(good) // 2 - 7])  # cut mid-record (the 2nd of 2)
    assert error().startswith(f"{second}: damaged (cut short: truncated record at ")
    second.write_bytes(good)
    _flip(second, len(good) // 2)  # same size, one byte changed
    assert error().startswith(f"{second}: damaged (a record fails its CRC check: corrupted "
                              "record at ")
    second.unlink()
    assert error() == f"{second}: missing (listed in {tmp_path / 'manifest.json'}); RESTORE"
    # A whole, valid shard in its place (another split's): only the checksum tells.
    second.write_bytes((tmp_path / shards[0]).read_bytes())
    assert error() == (f"{tmp_path}: the shards do not match the checksum in manifest.json (a "
                       "shard was replaced or the manifest edited); RESTORE")


def test_a_shard_cut_between_records_is_found_by_its_record_count(tmp_path):
    count, shards = records.write_split((_example(i) for i in range(5)), tmp_path, "train", 2)
    records.write_manifest(tmp_path, {
        "task": "classification", "class_names": ["a", "b", "c"], "image_size": [12, 10],
        "shard_size": 2, "splits": {"train": {"count": count, "shards": shards}}})
    second = tmp_path / shards[1]
    one_record = 16 + len(records.serialize(_example(2)))  # length, 2 CRCs, payload
    second.write_bytes(second.read_bytes()[:one_record])
    with pytest.raises(DataError, match=f"^{second}: damaged \\(holds 1 records, 2 were "
                                        "written\\); RESTORE$"):
        records.verify_shards(tmp_path, "RESTORE")


def test_restore_hint_names_the_dvc_output_and_stage(tmp_path):
    assert records.restore_hint(tmp_path / "data/prepared/detection", tmp_path) == (
        "restore it with `dvc checkout data/prepared/detection` (or `dvc repro "
        "prepare@detection`)")
    assert records.restore_hint(tmp_path / "data/augmented/detection", tmp_path).endswith(
        "(or `dvc repro augment@detection`)")
    assert records.restore_hint(tmp_path / "elsewhere", tmp_path / "project") == (
        f"rerun the stage that writes {tmp_path / 'elsewhere'}")


@pytest.mark.parametrize("edit,fragment", [
    (lambda m: [m], "holds a JSON list, not an object"),
    (lambda m: {**m, "splits": {"train": {"count": 5, "shards": ["../../etc/passwd"]}}},
     "'splits' must map each split to its count and the names of its shard files"),
    (lambda m: {**m, "splits": {"train": {"count": "5", "shards": []}}}, "'splits' must map"),
    (lambda m: {**m, "splits": ["train"]}, "'splits' must map"),
    (lambda m: {**m, "checksum": 7}, "and 'checksum' be a string"),
])
def test_a_malformed_manifest_is_one_line_naming_it(tmp_path, edit, fragment):
    _, _, manifest = _write(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps(edit(manifest)))
    with pytest.raises(DataError) as info:
        records.read_manifest(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'manifest.json'}: ") and fragment in message
    assert "\n" not in message and message.endswith("rerun the stage that writes it")
    (tmp_path / "manifest.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(DataError, match=r"manifest\.json: not valid JSON"):
        records.read_manifest(tmp_path)


def test_a_shard_failing_while_read_names_it_though_the_checksum_matched(tmp_path):
    """The manifest edited to match a damaged shard: the error comes while the records are
    read, and the shards are read again to say which."""
    import tensorflow as tf

    from visionpipe.data.pipeline import damaged_records

    def read_all():
        with damaged_records({tmp_path: "RESTORE"}):
            return list(record_dataset(tmp_path, "train").as_numpy_iterator())

    def rehash():
        manifest = json.loads((tmp_path / "manifest.json").read_text())
        manifest["checksum"] = records.checksum(tmp_path, records.shard_names(manifest))
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
        records.verify_shards(tmp_path, "RESTORE")  # passes: only reading finds it

    _, shards, _ = _write(tmp_path)
    last = tmp_path / shards[2]
    good = last.read_bytes()
    _flip(last, len(good) - 30)
    rehash()
    with pytest.raises(DataError, match=f"^{last}: damaged \\(a record fails its CRC check: "
                                        "corrupted record at 12\\); RESTORE$"):
        read_all()
    # Whole TFRecords that are no Examples: TensorFlow's parse error, then the shard named.
    with tf.io.TFRecordWriter(str(last)) as writer:
        writer.write(b"not an example")
    rehash()
    with pytest.raises(DataError, match=f"^{last}: damaged \\(record 1 cannot be decoded: "
                                        "Could not parse example input"):
        read_all()
    last.write_bytes(good)
    rehash()
    assert len(read_all()) == 5
