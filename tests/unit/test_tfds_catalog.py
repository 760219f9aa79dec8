"""The TFDS catalog source: real `tfds.builder` code on a local copy, and the offline error.

No network here, so the local copy is written the way a `tfds build mnist` leaves it: the
catalog's own feature spec, TFRecord shards and dataset_info.json (through
`tfds.folder_dataset.write_metadata`), holding 50 small synthetic digits.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
import yaml
from PIL import Image

from visionpipe.config import parse_params
from visionpipe.data import records
from visionpipe.layout import Layout
from visionpipe.stages import prepare

TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
COUNTS = {"train": 40, "test": 10}


def _digits(split: str, n: int) -> list[dict]:
    rng = np.random.default_rng(len(split))
    return [{"image": rng.integers(0, 256, (28, 28, 1), dtype=np.uint8), "label": i % 10}
            for i in range(n)]


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    """A local TFDS data_dir holding a prepared `mnist` (50 examples, 5 per class)."""
    data_dir = tmp_path_factory.mktemp("tfds")
    builder = tfds.builder("mnist", data_dir=str(data_dir))
    out = builder.data_path
    out.mkdir(parents=True)
    features = builder.info.features
    infos = []
    for split, n in COUNTS.items():
        path = out / f"mnist-{split}.tfrecord-00000-of-00001"
        with tf.io.TFRecordWriter(str(path)) as writer:
            for ex in _digits(split, n):
                writer.write(features.serialize_example(ex))
        template = tfds.core.ShardedFileTemplate(data_dir=out, template=TEMPLATE,
                                                 dataset_name="mnist", split=split,
                                                 filetype_suffix="tfrecord")
        infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[n],
                                         num_bytes=os.path.getsize(path),
                                         filename_template=template))
    tfds.folder_dataset.write_metadata(data_dir=out, features=features, split_infos=infos,
                                       filename_template=TEMPLATE, check_data=True)
    return data_dir


def _params(data_dir, seed=7, resize="stretch"):
    return parse_params({"seed": seed, "prepare": {"classification": {
        "source": "tfds", "tfds_name": "mnist", "tfds_data_dir": str(data_dir),
        "image_size": [16, 16], "resize": resize,
        "splits": {"train": 0.6, "val": 0.2, "test": 0.2}}}})


def test_local_catalog_copy_is_pooled_and_split_stratified(mnist_dir, tmp_path):
    manifest = prepare.run(_params(mnist_dir), "classification", Layout(tmp_path))
    assert manifest["source"]["kind"] == "tfds" and manifest["source"]["name"] == "mnist"
    assert manifest["class_names"] == [str(d) for d in range(10)]
    # 5 per class pooled from train+test, split 3/1/1 within each class
    assert manifest["counts"] == {"train": 30, "val": 10, "test": 10}
    for split, per_class in (("train", 3), ("val", 1), ("test", 1)):
        assert manifest["class_counts"][split] == {str(d): per_class for d in range(10)}
    originals = {f"{s}-{i:06d}": ex for s, n in COUNTS.items()
                 for i, ex in enumerate(_digits(s, n))}
    out = tmp_path / "data/prepared/classification"
    ids = set()
    for split in ("train", "val", "test"):
        for ex in records.read_split(out, split):
            src = originals[ex.id]
            ids.add(ex.id)
            assert ex.label == src["label"]
            grey = np.asarray(Image.fromarray(src["image"][..., 0]).resize((16, 16),
                                                                            Image.BILINEAR))
            assert ex.image.shape == (16, 16, 3)
            assert np.abs(ex.image[..., 0].astype(int) - grey).max() <= 1
    assert ids == set(originals)  # every example used once


def test_same_seed_same_bytes_other_seed_other_split(mnist_dir, tmp_path):
    first = prepare.run(_params(mnist_dir), "classification", Layout(tmp_path / "a"))
    again = prepare.run(_params(mnist_dir), "classification", Layout(tmp_path / "b"))
    other = prepare.run(_params(mnist_dir, seed=8), "classification", Layout(tmp_path / "c"))
    assert first["checksum"] == again["checksum"]
    assert other["checksum"] != first["checksum"]
    assert other["class_counts"] == first["class_counts"]


def test_catalog_offline_gives_one_line_with_the_fix(tmp_path):
    params = {"seed": 1, "prepare": {"classification": {
        "source": "tfds", "tfds_name": "mnist", "tfds_data_dir": str(tmp_path / "empty"),
        "image_size": [16, 16], "splits": {"train": 0.8, "val": 0.1, "test": 0.1}}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run([sys.executable, "-m", "visionpipe.cli", "prepare", "--task",
                             "classification"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 2
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("visionpipe: error")]
    assert len(errors) == 1, result.stderr
    assert "TFDS dataset 'mnist' is not in" in errors[0]
    assert "`tfds build mnist --data_dir DIR`" in errors[0]
    assert "set prepare.classification.tfds_data_dir" in errors[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data/prepared/classification").exists()


def test_unknown_catalog_name_is_a_clear_error(tmp_path):
    from visionpipe.errors import DataError

    params = parse_params({"prepare": {"classification": {
        "source": "tfds", "tfds_name": "no_such_dataset_xyz",
        "splits": {"train": 0.8, "val": 0.1, "test": 0.1}}}})
    with pytest.raises(DataError, match="TFDS dataset 'no_such_dataset_xyz' is not in the "
                                        "catalog"):
        prepare.run(params, "classification", Layout(tmp_path))
