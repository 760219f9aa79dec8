"""prepare.detection from a TFDS catalog dataset: real `tfds.builder` code on local copies.

No network here, so `voc/2007` is written the way `tfds build voc/2007` leaves it: the
catalog's own feature spec (image, objects: bbox, label, pose, is_truncated, is_difficult,
...), TFRecord shards and dataset_info.json (through `tfds.folder_dataset.write_metadata`).
Its six photos of different sizes each hold one white rectangle per VOC class at known
pixels; one box is difficult and one has no height. A second, non-VOC dataset (a tiny
registered GeneratorBasedBuilder, no is_difficult) checks the path is not VOC-specific.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
import yaml

import visionpipe
from tests.helpers import tfds_local_copy
from visionpipe.config import parse_params
from visionpipe.data import records
from visionpipe.errors import DataError, ParamsError, SourceUnavailableError
from visionpipe.layout import Layout
from visionpipe.stages import prepare

SIZE = (128, 128)  # prepare.detection.image_size
# (height, width) of each photo, by the split of the local copy it is stored in
PHOTOS = {"train": [(160, 400), (300, 120), (180, 240)],
          "validation": [(240, 180), (120, 120)],
          "test": [(200, 320)]}
DIFFICULT = ("train-000000", 3)  # (image id, object index): flagged is_difficult
DEGENERATE = "train-000001"  # gets a 21st object with zero height


def _rects(h: int, w: int) -> list[tuple[int, int, int, int]]:
    """20 rectangles [x0, x1) x [y0, y1) in a 4 x 5 grid; rectangle k is VOC class k."""
    return [(c * w // 5 + w // 20, r * h // 4 + h // 16,
             (c + 1) * w // 5 - w // 20, (r + 1) * h // 4 - h // 16)
            for r in range(4) for c in range(5)]


def _photo(split: str, index: int, h: int, w: int) -> dict:
    """One example in voc/2007's features."""
    rng = np.random.default_rng(index)
    image = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)  # dark noise around the objects
    rects = _rects(h, w)
    for x0, y0, x1, y1 in rects:
        image[y0:y1, x0:x1] = 255
    bbox = [np.array([y0 / h, x0 / w, y1 / h, x1 / w], np.float32) for x0, y0, x1, y1 in rects]
    labels = list(range(20))
    difficult = [(f"{split}-{index:06d}", k) == DIFFICULT for k in range(20)]
    if f"{split}-{index:06d}" == DEGENERATE:
        bbox.append(np.array([0.5, 0.1, 0.5, 0.3], np.float32))  # ymin == ymax
        labels.append(0)
        difficult.append(False)
    n = len(labels)
    return {"image": image, "image/filename": f"{split}_{index}.jpg",
            "objects": {"bbox": np.stack(bbox), "label": np.array(labels, np.int64),
                        "pose": np.zeros(n, np.int64), "is_truncated": np.zeros(n, bool),
                        "is_difficult": np.array(difficult)},
            "labels": np.array(sorted(set(labels)), np.int64),
            "labels_no_difficult": np.array(sorted(set(labels)), np.int64)}


@pytest.fixture(scope="module")
def voc_dir(tmp_path_factory):
    """A local TFDS data_dir holding a prepared `voc/2007` (6 photos, 121 objects)."""
    splits = {split: [_photo(split, i, h, w) for i, (h, w) in enumerate(sizes)]
              for split, sizes in PHOTOS.items()}
    data_dir = tfds_local_copy(tmp_path_factory.mktemp("tfds"), "voc/2007", splits)
    assert tfds.builder("voc/2007", data_dir=str(data_dir)).is_prepared()
    return data_dir


def _params(data_dir, name="voc/2007", resize="pad", seed=3):
    return parse_params({"seed": seed, "prepare": {"detection": {
        "source": "tfds", "tfds_name": name, "tfds_data_dir": str(data_dir),
        "image_size": list(SIZE), "resize": resize,
        "splits": {"train": 0.5, "val": 0.25, "test": 0.25}}}})


def _letterbox(rect, hw, size=SIZE):
    """By hand: scale by the smaller ratio, round the resized size, centre it (pad)."""
    (h, w), (th, tw) = hw, size
    scale = min(th / h, tw / w)
    nh, nw = round(h * scale), round(w * scale)
    top, left = (th - nh) // 2, (tw - nw) // 2
    x0, y0, x1, y1 = rect
    return [x0 * nw / w + left, y0 * nh / h + top, x1 * nw / w + left, y1 * nh / h + top]


def test_hand_computed_letterbox_of_one_box():
    # 160x400 into 128x128: scale 0.32, resized to 51x128 (round(51.2)), (128 - 51) // 2 = 38
    # black rows above; rectangle 0 is x 20..60, y 10..30.
    assert _rects(160, 400)[0] == (20, 10, 60, 30)
    np.testing.assert_allclose(_letterbox((20, 10, 60, 30), (160, 400)),
                               [6.4, 10 * 51 / 160 + 38, 19.2, 30 * 51 / 160 + 38])


def test_voc2007_boxes_are_letterboxed_with_their_images(voc_dir, tmp_path):
    manifest = prepare.run(_params(voc_dir), "detection", Layout(tmp_path))
    voc_names = tfds.builder("voc/2007", data_dir=str(voc_dir)).info.features[
        "objects"]["label"].names
    assert manifest["class_names"] == voc_names and len(voc_names) == 20
    assert manifest["class_names"][:3] == ["aeroplane", "bicycle", "bird"]
    # 6 photos pooled from train/validation/test and split 3/2/1 by the shares
    assert manifest["counts"] == {"train": 3, "val": 2, "test": 1}
    source = manifest["source"]
    assert source["kind"] == "tfds" and source["name"] == "voc/2007"
    assert source["annotations"] == {"images": 6, "boxes": 120, "boxes_dropped": 1,
                                     "difficult_boxes": 1, "images_without_objects": 0}
    assert source["difficult_boxes_kept"] == 1
    assert len(source["dropped_boxes"]) == 1
    assert source["dropped_boxes"][0].startswith(f"{DEGENERATE}: object 21 'aeroplane'")
    assert "zero height" in source["dropped_boxes"][0]
    assert manifest["warnings"] == []

    sizes = {f"{s}-{i:06d}": hw for s, hws in PHOTOS.items() for i, hw in enumerate(hws)}
    seen, difficult_seen = {}, False
    for split in ("train", "val", "test"):
        examples = list(records.read_split(tmp_path / "data/prepared/detection", split))
        assert len(examples) == manifest["counts"][split]
        for ex in examples:
            seen[ex.id] = split
            hw = sizes[ex.id]
            assert ex.image.shape == (*SIZE, 3)
            # the degenerate 21st object is gone; the other 20 are in order, class k at k
            np.testing.assert_array_equal(ex.box_labels, np.arange(20))
            expected = np.array([_letterbox(r, hw) for r in _rects(*hw)], np.float32)
            np.testing.assert_allclose(ex.boxes, expected, atol=0.5)
            for x0, y0, x1, y1 in np.round(ex.boxes).astype(int):
                # image and boxes moved together: inside each box is its white rectangle
                assert ex.image[y0 + 1:y1 - 1, x0 + 1:x1 - 1].min() > 200, (ex.id, x0, y0)
            difficult_seen |= ex.id == DIFFICULT[0]  # kept: all 20 boxes are there
            # the flag is stored with its box, for evaluate to ignore it
            flags = np.zeros(20, bool) if ex.difficult is None else ex.difficult
            np.testing.assert_array_equal(flags, np.arange(20) == DIFFICULT[1]
                                          if ex.id == DIFFICULT[0] else np.zeros(20, bool))
    assert set(seen) == set(sizes) and difficult_seen
    per_class = {n: sum(c[n] for c in manifest["class_counts"].values()) for n in voc_names}
    assert per_class == {n: 6 for n in voc_names}


class VisionpipeTestBoxes(tfds.core.GeneratorBasedBuilder):
    """A detection dataset that is not VOC: two classes, no is_difficult, no downloads."""

    VERSION = tfds.core.Version("1.0.0")
    IMAGES = [(40, 100, [(10, 5, 30, 25, 1), (60, 10, 90, 30, 0)]),
              (90, 30, [(3, 20, 27, 70, 0), (5, 75, 25, 85, 1)])]

    def _info(self):
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "objects": tfds.features.Sequence({
                "bbox": tfds.features.BBoxFeature(),
                "label": tfds.features.ClassLabel(names=["square", "circle"])})}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, (h, w, rects) in enumerate(self.IMAGES * 2):
            image = np.zeros((h, w, 3), np.uint8)
            for x0, y0, x1, y1, _ in rects:
                image[y0:y1, x0:x1] = 255
            yield i, {"image": image, "objects": {
                "bbox": np.array([[y0 / h, x0 / w, y1 / h, x1 / w]
                                  for x0, y0, x1, y1, _ in rects], np.float32),
                "label": [r[4] for r in rects]}}


def test_any_tfds_detection_dataset_stretched(tmp_path):
    data_dir = tmp_path / "tfds"
    tfds.builder("visionpipe_test_boxes", data_dir=str(data_dir)).download_and_prepare()
    manifest = prepare.run(_params(data_dir, name="visionpipe_test_boxes", resize="stretch"),
                           "detection", Layout(tmp_path))
    assert manifest["class_names"] == ["square", "circle"]
    assert sum(manifest["counts"].values()) == 4
    assert manifest["source"]["annotations"]["boxes"] == 8
    assert manifest["source"]["difficult_boxes_kept"] == 0
    assert manifest["source"]["dropped_boxes"] == []
    for split in ("train", "val", "test"):
        for ex in records.read_split(tmp_path / "data/prepared/detection", split):
            # TFDS stores generated examples shuffled; the label order tells the images apart
            h, w, rects = {tuple(r[4] for r in img[2]): img
                           for img in VisionpipeTestBoxes.IMAGES}[tuple(ex.box_labels)]
            sx, sy = SIZE[1] / w, SIZE[0] / h
            np.testing.assert_allclose(ex.boxes, [[x0 * sx, y0 * sy, x1 * sx, y1 * sy]
                                                  for x0, y0, x1, y1, _ in rects], atol=0.5)
            assert ex.box_labels.tolist() == [r[4] for r in rects]
            for x0, y0, x1, y1 in ex.boxes:  # upscaled edges blur: look at the middle
                assert ex.image[int((y0 + y1) / 2), int((x0 + x1) / 2)].min() > 240


def test_a_catalog_dataset_without_boxes_is_refused_before_any_download(tmp_path):
    params = _params(tmp_path / "empty", name="mnist")
    with pytest.raises(DataError, match="TFDS dataset 'mnist' has no boxes: detection needs "
                                        r"the features objects/bbox"):
        prepare.run(params, "detection", Layout(tmp_path))


@pytest.fixture
def no_network(monkeypatch):
    """Every HTTPS request goes to a closed local port: refused at once, never a hang (and the
    same on a machine that does have network)."""
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")


OFFLINE = ("prepare.detection.tfds_name = 'voc/2007': TFDS dataset 'voc/2007' is not in "
           "{data_dir}/voc/2007/5.0.0 and there is no network to download it (REASON reaching "
           "https://storage.googleapis.com/). On a machine with network run `tfds build "
           "voc/2007 --data_dir DIR`, copy DIR here and set prepare.detection.tfds_data_dir to "
           "it; or set prepare.detection.source: voc and put the images and their VOC XML "
           "annotations under prepare.detection.path.")


def _offline_pattern(data_dir) -> str:
    """The message as a regex; REASON is the requests exception's class name."""
    return re.escape(OFFLINE.format(data_dir=data_dir)).replace("REASON", r"\w+")


def test_voc2007_offline_is_one_clear_error(tmp_path, no_network):
    empty = tmp_path / "empty"
    with pytest.raises(SourceUnavailableError) as info:
        prepare.run(_params(empty), "detection", Layout(tmp_path))
    message = str(info.value)
    assert re.fullmatch(_offline_pattern(empty), message), message
    assert not (tmp_path / "data/prepared/detection").exists()
    assert not any(empty.rglob("*.tfrecord*"))  # nothing was downloaded


def test_voc2007_offline_cli_prints_one_line(tmp_path, no_network):
    params = {"seed": 1, "prepare": {"detection": {
        "source": "tfds", "tfds_name": "voc/2007", "tfds_data_dir": str(tmp_path / "empty"),
        "image_size": list(SIZE), "resize": "pad",
        "splits": {"train": 0.8, "val": 0.1, "test": 0.1}}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    src = str(Path(visionpipe.__file__).resolve().parents[1])  # PYTHONPATH=src is relative
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [src, *filter(None, [os.environ.get("PYTHONPATH")])])}
    result = subprocess.run([sys.executable, "-m", "visionpipe.cli", "prepare", "--task",
                             "detection"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, check=False, env=env)
    assert result.returncode == 2
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("visionpipe: error")]
    assert len(errors) == 1, result.stderr
    assert re.search(_offline_pattern(tmp_path / "empty"), errors[0]), errors[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("prep, message", [
    ({"resize": "crop"}, "prepare.detection.resize = 'crop'"),
    ({"tfds_name": None}, "prepare.detection.tfds_name = None"),
])
def test_detection_tfds_params(prep, message):
    base = {"source": "tfds", "tfds_name": "voc/2007", "resize": "pad"}
    cfg = parse_params({"prepare": {"detection": base}}).prepare_for("detection")
    assert (cfg.source, cfg.tfds_name, cfg.resize) == ("tfds", "voc/2007", "pad")
    with pytest.raises(ParamsError, match=re.escape(message)):
        parse_params({"prepare": {"detection": {**base, **prep}}})
