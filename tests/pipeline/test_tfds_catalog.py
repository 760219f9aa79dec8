"""The TFDS catalog source: real `tfds.builder` code on a local copy, and the offline error.

No network here, so the local copy is written the way a `tfds build mnist` leaves it: the
catalog's own feature spec, TFRecord shards and dataset_info.json (through
`tfds.folder_dataset.write_metadata`), holding 50 small synthetic digits.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.helpers import tfds_local_copy
from visionpipe.config import parse_params
from visionpipe.data import records
from visionpipe.layout import Layout
from visionpipe.stages import prepare

COUNTS = {"train": 40, "test": 10}


def _digits(split: str, n: int) -> list[dict]:
    rng = np.random.default_rng(len(split))
    return [{"image": rng.integers(0, 256, (28, 28, 1), dtype=np.uint8), "label": i % 10}
            for i in range(n)]


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    """A local TFDS data_dir holding a prepared `mnist` (50 examples, 5 per class)."""
    return tfds_local_copy(tmp_path_factory.mktemp("tfds"), "mnist",
                       {split: _digits(split, n) for split, n in COUNTS.items()})


def _pets(n: int, values=(1, 2, 3)) -> list[dict]:
    """Oxford-IIIT Pet examples: photos of varied sizes with trimaps (1 pet, 2 background,
    3 border), as the catalog stores them."""
    rng = np.random.default_rng(n)
    out = []
    for i in range(n):
        h, w = 40 + 4 * i, 48 - 2 * i
        trimap = np.full((h, w, 1), 2, np.uint8)
        trimap[h // 4:3 * h // 4, w // 4:3 * w // 4] = 3
        trimap[h // 4 + 2:3 * h // 4 - 2, w // 4 + 2:3 * w // 4 - 2] = 1
        trimap[0, 0] = values[-1]
        out.append({"image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "label": i % 37,
                    "species": i % 2, "file_name": f"pet_{i}.jpg",
                    "head_bbox": np.array([0.1, 0.1, 0.5, 0.5], np.float32),
                    "segmentation_mask": trimap})
    return out


def test_oxford_pet_trimaps_become_three_classes(tmp_path):
    data_dir = tfds_local_copy(tmp_path / "tfds", "oxford_iiit_pet",
                           {"train": _pets(8), "test": _pets(4)})
    params = parse_params({"prepare": {"segmentation": {
        "source": "tfds", "tfds_name": "oxford_iiit_pet", "tfds_data_dir": str(data_dir),
        "image_size": [32, 32], "splits": {"train": 0.5, "val": 0.25, "test": 0.25}}}})
    manifest = prepare.run(params, "segmentation", Layout(tmp_path))
    assert manifest["class_names"] == ["pet", "background", "border"]
    assert manifest["counts"] == {"train": 6, "val": 3, "test": 3}
    originals = {f"{s}-{i:06d}": ex for s, n in (("train", 8), ("test", 4))
                 for i, ex in enumerate(_pets(n))}
    for split in ("train", "val", "test"):
        for ex in records.read_split(tmp_path / "data/prepared/segmentation", split):
            trimap = originals[ex.id]["segmentation_mask"][..., 0]
            expected = np.asarray(Image.fromarray(trimap).resize((32, 32), Image.NEAREST)) - 1
            np.testing.assert_array_equal(ex.mask, expected)
            assert ex.image.shape == (32, 32, 3)


def test_a_trimap_value_outside_the_mapping_is_named(tmp_path):
    from visionpipe.errors import DataError

    data_dir = tfds_local_copy(tmp_path / "tfds", "oxford_iiit_pet",
                           {"train": _pets(3, values=(1, 2, 3, 7))})
    params = parse_params({"prepare": {"segmentation": {
        "source": "tfds", "tfds_name": "oxford_iiit_pet", "tfds_data_dir": str(data_dir),
        "image_size": [32, 32], "splits": {"train": 0.5, "val": 0.25, "test": 0.25}}}})
    with pytest.raises(DataError, match=r"oxford_iiit_pet train-000000: mask values \{7: 1\}"):
        prepare.run(params, "segmentation", Layout(tmp_path))


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


@pytest.mark.parametrize("task, name", [("classification", "mnist"),
                                        ("segmentation", "oxford_iiit_pet")])
def test_catalog_offline_gives_one_line_with_the_fix(tmp_path, task, name):
    params = {"seed": 1, "prepare": {task: {
        "source": "tfds", "tfds_name": name, "tfds_data_dir": str(tmp_path / "empty"),
        "image_size": [16, 16], "splits": {"train": 0.8, "val": 0.1, "test": 0.1}}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run([sys.executable, "-m", "visionpipe.cli", "prepare", "--task",
                             task], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 2
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("visionpipe: error")]
    assert len(errors) == 1, result.stderr
    assert f"TFDS dataset '{name}' is not in" in errors[0]
    assert f"`tfds build {name} --data_dir DIR`" in errors[0]
    assert f"set prepare.{task}.tfds_data_dir" in errors[0]
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
