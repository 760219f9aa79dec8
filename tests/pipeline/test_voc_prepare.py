"""prepare.detection from PASCAL VOC folders: letterboxed images whose boxes still enclose
their objects, and the real raccoon set prepared whole."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from visionpipe.config import parse_params
from visionpipe.data import records
from visionpipe.errors import ParamsError
from visionpipe.geometry import fit_boxes, fit_to_size
from visionpipe.layout import Layout
from visionpipe.stages import prepare

XML = """<annotation><filename>{name}.png</filename>
<size><width>{w}</width><height>{h}</height><depth>3</depth></size>{objects}</annotation>"""
OBJECT = """<object><name>{cls}</name><difficult>0</difficult>
<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"""

# (height, width) of each photo and its white rectangles as pixel ranges [x0, x1) x [y0, y1)
PHOTOS = {"wide": ((80, 200), [(20, 10, 60, 50, "box"), (120, 30, 190, 70, "bar")]),
          "tall": ((150, 60), [(5, 100, 40, 140, "box")]),
          "small": ((30, 40), [(10, 5, 30, 25, "bar")])}


def _voc_folder(root):
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    for name, ((h, w), rects) in PHOTOS.items():
        image = np.zeros((h, w, 3), np.uint8)
        objects = []
        for x0, y0, x1, y1, cls in rects:
            image[y0:y1, x0:x1] = 255
            objects.append(OBJECT.format(cls=cls, x0=x0, y0=y0, x1=x1, y1=y1))
        Image.fromarray(image).save(root / "images" / f"{name}.png")
        (root / "annotations" / f"{name}.xml").write_text(
            XML.format(name=name, w=w, h=h, objects="".join(objects)))
    return root


def _params(path, **prep):
    return parse_params({"prepare": {"detection": {
        "source": "voc", "path": str(path), "image_size": [64, 64], "resize": "pad",
        "splits": {"train": 1, "val": 1, "test": 1}, **prep}}})


@pytest.mark.parametrize("policy", ["pad", "stretch"])
def test_prepared_boxes_tightly_enclose_their_objects(tmp_path, policy):
    params = _params(_voc_folder(tmp_path / "photos"), resize=policy)
    manifest = prepare.run(params, "detection", Layout(tmp_path))
    assert manifest["class_names"] == ["bar", "box"]  # discovered, sorted
    assert sum(manifest["counts"].values()) == 3
    boxes_seen = 0
    for split in ("train", "val", "test"):
        for ex in records.read_split(tmp_path / "data/prepared/detection", split):
            assert ex.image.shape == (64, 64, 3)
            _, rects = PHOTOS[ex.id]
            assert [manifest["class_names"][i] for i in ex.box_labels] == [r[4] for r in rects]
            for box, _rect in zip(ex.boxes, rects, strict=True):
                x0, y0, x1, y1 = (round(v) for v in box)
                # Every pixel well inside the box is the object's (white)...
                assert ex.image[y0 + 1:y1 - 1, x0 + 1:x1 - 1].min() > 200, (ex.id, box)
                # ...and the white pixels around it end within one pixel of its edges.
                white = np.argwhere(ex.image[..., 0] > 128)
                near = white[(white[:, 1] >= x0 - 2) & (white[:, 1] <= x1 + 1)
                             & (white[:, 0] >= y0 - 2) & (white[:, 0] <= y1 + 1)]
                assert abs(near[:, 1].min() - box[0]) <= 1 and abs(near[:, 1].max() + 1
                                                                   - box[2]) <= 1
                assert abs(near[:, 0].min() - box[1]) <= 1 and abs(near[:, 0].max() + 1
                                                                   - box[3]) <= 1
                boxes_seen += 1
    assert boxes_seen == 4
    assert manifest["class_counts"] and sum(
        sum(c.values()) for c in manifest["class_counts"].values()) == 4


def test_pad_keeps_the_aspect_ratio_of_boxes():
    # 80x200 letterboxed into 64x64: scale 0.32, resized to 26x64 (x 0.325 / 0.32 after
    # rounding the height), (64 - 26) // 2 = 19 black rows above.
    boxes = fit_boxes(np.array([[20, 10, 60, 50]]), (80, 200), (64, 64), "pad")
    np.testing.assert_allclose(boxes, [[6.4, 10 * 0.325 + 19, 19.2, 50 * 0.325 + 19]],
                               rtol=1e-6)
    image = fit_to_size(np.full((80, 200, 3), 255, np.uint8), (64, 64), "pad")
    rows = np.flatnonzero(image[:, 32, 0] > 0)
    assert (rows.min(), rows.max() + 1) == (19, 45)


def test_raccoon_prepares_every_image_and_box(tmp_path, datasets_dir):
    params = _params(datasets_dir / "raccoon", image_size=[128, 128],
                     class_names=["raccoon"], splits={"train": 0.8, "val": 0.1, "test": 0.1})
    manifest = prepare.run(params, "detection", Layout(tmp_path))
    assert manifest["counts"] == {"train": 160, "val": 20, "test": 20}
    assert manifest["skipped"]["count"] == 0 and manifest["warnings"] == []
    annotations = manifest["source"]["annotations"]
    assert annotations["samples"] == 200 and annotations["boxes"] == 217
    total = 0
    for split in ("train", "val", "test"):
        for ex in records.read_split(tmp_path / "data/prepared/detection", split):
            assert ex.image.shape == (128, 128, 3) and len(ex.boxes) == len(ex.box_labels)
            assert (ex.boxes[:, 2:] > ex.boxes[:, :2]).all()
            assert (ex.boxes >= 0).all() and (ex.boxes <= 128).all()
            total += len(ex.boxes)
    assert total == 217
    assert sum(c["raccoon"] for c in manifest["class_counts"].values()) == 217


@pytest.mark.parametrize("task,prep,message", [
    ("classification", {"source": "voc"}, "prepare.classification.source = 'voc': PASCAL VOC "
                                          "boxes are detection data, not classification"),
    ("classification", {"source": "folder", "class_names": ["a"]},
     "prepare.classification.class_names"),
    ("detection", {"source": "voc", "resize": "crop"}, "prepare.detection.resize = 'crop'"),
])
def test_voc_params_errors_name_the_key(task, prep, message):
    with pytest.raises(ParamsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_params({"prepare": {task: prep}})
