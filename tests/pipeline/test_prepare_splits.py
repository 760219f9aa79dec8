"""Splits that filtering or small classes leave empty: a clear error, or a reported warning."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from visionpipe.config import parse_params
from visionpipe.errors import DataError
from visionpipe.layout import Layout
from visionpipe.stages import prepare


def _folder(root, counts: dict[str, int], broken: dict[str, int] | None = None):
    rng = np.random.default_rng(0)
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
                root / name / f"{i}.png")
        for i in range((broken or {}).get(name, 0)):
            (root / name / f"broken{i}.jpg").write_bytes(b"")
    return root


def _run(tmp_path, splits, counts, broken=None):
    _folder(tmp_path / "photos", counts, broken)
    params = parse_params({"prepare": {"classification": {
        "source": "folder", "path": "photos", "image_size": [16, 16], "splits": splits}}})
    return prepare.run(params, "classification", Layout(tmp_path))


def test_a_class_missing_from_val_is_a_warning_in_the_report_and_on_stderr(tmp_path, capsys):
    # c has 2 images: 1 for train (round(0.5 * 2)), round(0.25 * 2) = 0 for val, 1 for test.
    manifest = _run(tmp_path, {"train": 0.5, "val": 0.25, "test": 0.25},
                    {"a": 8, "b": 8, "c": 2})
    assert manifest["class_counts"]["val"] == {"a": 2, "b": 2, "c": 0}
    expected = ("split 'val' has no image of class(es) c; their val figures will not be "
                "measured (more images, or a larger val share in "
                "prepare.classification.splits)")
    assert manifest["warnings"] == [expected]
    report = json.loads((tmp_path / "reports/prepare/classification.json").read_text())
    assert report["warnings"] == [expected]
    assert f"prepare classification: warning: {expected}" in capsys.readouterr().err


def test_a_class_with_no_training_image_is_an_error_naming_it(tmp_path):
    # c's only image goes to test (round(0.4 * 1) = 0 for train and val).
    with pytest.raises(DataError) as err:
        _run(tmp_path, {"train": 0.4, "val": 0.2, "test": 0.4}, {"a": 8, "b": 8, "c": 1})
    assert str(err.value) == (
        "prepare.classification: no training image of class(es) c: the model could never "
        "predict them; add images of them, or give train a larger share in "
        "prepare.classification.splits")
    assert not (tmp_path / "data/prepared/classification").exists()  # nothing half-written


def test_a_split_left_empty_after_skipping_unusable_files_is_an_error(tmp_path, capsys):
    # 2 usable images per class and 5 empty files: after the skips, 0.1 of 2 rounds to 0.
    with pytest.raises(DataError) as err:
        _run(tmp_path, {"train": 0.8, "val": 0.1, "test": 0.1}, {"a": 2, "b": 2},
             broken={"a": 5, "b": 5})
    assert str(err.value) == ("prepare.classification: split 'val' is empty; give it a larger "
                              "share in params.yaml")


def test_all_classes_in_every_split_gives_no_warning(tmp_path):
    manifest = _run(tmp_path, {"train": 0.5, "val": 0.25, "test": 0.25}, {"a": 8, "b": 8})
    assert manifest["warnings"] == []
    assert manifest["counts"] == {"train": 8, "val": 4, "test": 4}
