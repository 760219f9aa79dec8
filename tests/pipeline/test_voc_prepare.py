"""prepare.detection from PASCAL VOC folders: letterboxed images whose boxes still enclose
their objects, and the real raccoon set prepared whole; the same boxes as VOC XML, YOLO txt and
COCO JSON give identical records; the report's counts are the records written (a truncated
JPEG in any of the three)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from visionpipe.config import parse_params
from visionpipe.data import records
from visionpipe.data.sources.voc import parse_annotation
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


# --- one set of boxes, three formats ------------------------------------------------------

STEMS = ("raccoon-1", "raccoon-10", "raccoon-102", "raccoon-104", "raccoon-2", "raccoon-3",
         "raccoon-4")
NAMES = ("raccoon", "tail")
COCO_IDS = {"raccoon": 5, "tail": 9}  # not contiguous, not from 0


def _objects(raccoon) -> dict[str, tuple[int, int, list]]:
    """stem -> (width, height, [(class, x0, y0, x1, y1)]): raccoon's own boxes plus a small
    'tail' box on each, one box reaching 15 px past the right edge, and one image (the last)
    without objects."""
    out = {}
    for i, stem in enumerate(STEMS):
        ann = parse_annotation(raccoon / "annotations" / f"{stem}.xml")
        objs = [(o.name, o.xmin, o.ymin, o.xmax, o.ymax) for o in ann.objects]
        x0, y0 = objs[0][1], objs[0][2]
        objs.append(("tail", x0 + 3, y0 + 4, x0 + 23, y0 + 14))
        if i == 0:
            objs.append(("tail", ann.width - 30, 10, ann.width + 15, 40))
        out[stem] = (ann.width, ann.height, [] if stem == STEMS[-1] else objs)
    return out


def _write(fmt: str, raccoon, root):
    """The same images and boxes as a VOC, YOLO txt or COCO JSON dataset under ``root``."""
    (root / "images").mkdir(parents=True)
    objects = _objects(raccoon)
    for stem in objects:
        shutil.copy(raccoon / "images" / f"{stem}.jpg", root / "images")
    if fmt == "voc":
        (root / "annotations").mkdir()
        for stem, (w, h, objs) in objects.items():
            (root / "annotations" / f"{stem}.xml").write_text(XML.format(
                name=stem, w=w, h=h, objects="".join(
                    OBJECT.format(cls=c, x0=x0, y0=y0, x1=x1, y1=y1)
                    for c, x0, y0, x1, y1 in objs)))
    elif fmt == "yolo":
        (root / "labels").mkdir()
        (root / "data.yaml").write_text("nc: 2\nnames: {0: raccoon, 1: tail}\n")
        for stem, (w, h, objs) in objects.items():
            if objs:  # the image without objects has no label file: a background image
                (root / "labels" / f"{stem}.txt").write_text("".join(
                    f"{NAMES.index(c)} {(x0 + x1) / 2 / w!r} {(y0 + y1) / 2 / h!r} "
                    f"{(x1 - x0) / w!r} {(y1 - y0) / h!r}\n" for c, x0, y0, x1, y1 in objs))
    else:
        images, annotations = [], []
        for i, (stem, (w, h, objs)) in enumerate(objects.items(), 1):
            images.append({"id": 100 + i, "file_name": f"{stem}.jpg", "width": w, "height": h})
            annotations += [{"id": len(annotations) + j, "image_id": 100 + i, "iscrowd": 0,
                             "category_id": COCO_IDS[c], "bbox": [x0, y0, x1 - x0, y1 - y0]}
                            for j, (c, x0, y0, x1, y1) in enumerate(objs, 1)]
        (root / "annotations").mkdir()
        (root / "annotations" / "instances.json").write_text(json.dumps({
            "images": images, "annotations": annotations,
            "categories": [{"id": i, "name": n} for n, i in reversed(COCO_IDS.items())]}))
    return root


def _format_params(fmt: str, path):
    extra = {"annotations_file": "annotations/instances.json"} if fmt == "coco" else {}
    return _params(path, source=fmt, splits={"train": 0.72, "val": 0.14, "test": 0.14},
                   **extra)


def _records(out) -> dict[str, list]:
    return {split: list(records.read_split(out, split)) for split in ("train", "val", "test")}


def test_voc_yolo_and_coco_of_the_same_boxes_give_identical_records(tmp_path, datasets_dir):
    raccoon = datasets_dir / "raccoon"
    results = {}
    for fmt in ("voc", "yolo", "coco"):
        data = _write(fmt, raccoon, tmp_path / fmt / "data")
        manifest = prepare.run(_format_params(fmt, data), "detection", Layout(tmp_path / fmt))
        results[fmt] = (manifest, _records(tmp_path / fmt / "data/prepared/detection"))
    voc_manifest, voc_records = results["voc"]
    assert voc_manifest["class_names"] == ["raccoon", "tail"]
    assert voc_manifest["counts"] == {"train": 5, "val": 1, "test": 1}
    annotations = voc_manifest["source"]["annotations"]
    assert (annotations["samples"], annotations["boxes_clipped"]) == (7, 1)
    assert annotations["images_without_objects"] == 1
    for fmt in ("yolo", "coco"):
        manifest, recs = results[fmt]
        for key in ("class_names", "counts", "class_counts", "checksum", "skipped"):
            assert manifest[key] == voc_manifest[key], (fmt, key)
        theirs = manifest["source"]["annotations"]
        for key in ("samples", "boxes", "boxes_clipped", "boxes_dropped",
                    "images_without_objects", "difficult_boxes"):
            assert theirs[key] == annotations[key], (fmt, key)
        assert theirs["background_images"] == 1
        for split, examples in voc_records.items():
            assert [ex.id for ex in recs[split]] == [ex.id for ex in examples]
            for mine, ref in zip(recs[split], examples, strict=True):
                assert np.array_equal(mine.image, ref.image), (fmt, ref.id)
                assert np.array_equal(mine.boxes, ref.boxes), (fmt, ref.id)
                assert np.array_equal(mine.box_labels, ref.box_labels), (fmt, ref.id)


@pytest.mark.parametrize("fmt", ["voc", "yolo", "coco"])
def test_report_counts_are_the_records_written_with_a_truncated_jpeg(tmp_path, datasets_dir,
                                                                      fmt):
    """The bug of issue 20: the header of a truncated JPEG reads, its pixels do not; the report
    once counted its sample and boxes anyway (164 samples, 266 boxes, 0 unreadable for 163
    photos and 263 boxes written)."""
    data = _write(fmt, datasets_dir / "raccoon", tmp_path / "data")
    broken = data / "images" / "raccoon-10.jpg"
    broken.write_bytes(broken.read_bytes()[:len(broken.read_bytes()) // 2])
    with Image.open(broken) as img:
        assert img.size == (450, 495)  # the header still reads
    manifest = prepare.run(_format_params(fmt, data), "detection", Layout(tmp_path))
    report = json.loads((tmp_path / "reports/prepare/detection.json").read_text())
    annotations = report["source"]["annotations"]
    written = [ex for exs in _records(tmp_path / "data/prepared/detection").values()
               for ex in exs]
    assert annotations["samples"] == sum(report["counts"].values()) == len(written) == 6
    assert annotations["boxes"] == sum(len(ex.boxes) for ex in written)
    assert annotations["boxes"] == sum(sum(c.values()) for c in report["class_counts"].values())
    assert annotations["images_unreadable"] == 1
    assert "raccoon-10" not in {ex.id for ex in written}
    (item,) = report["skipped"]["items"]
    assert item["path"] == f"{data}/images/raccoon-10.jpg"
    assert item["reason"].startswith("corrupt or truncated image: ")
    assert report["skipped"]["by_reason"] == {"corrupt or truncated image": 1}
    assert report["skipped"] == manifest["skipped"]
    # the truncated image's boxes are not listed as dropped: they were never used
    assert not [line for line in report["source"]["dropped_boxes"] if "raccoon-10" in line]


@pytest.mark.parametrize("fmt, prep, message", [
    ("yolo", {"source": "yolo"}, "prepare.segmentation.source = 'yolo': YOLO txt boxes are "
                                 "detection data, not segmentation"),
    ("coco", {"source": "coco"}, "prepare.detection.annotations_file = None: expected the "
                                 "COCO instances JSON"),
    ("coco", {"source": "coco", "annotations_file": "a.json", "class_names": ["x"]},
     "prepare.detection.class_names = ['x']: expected null"),
])
def test_yolo_and_coco_params_errors_name_the_key(fmt, prep, message):
    task = "segmentation" if "segmentation" in message else "detection"
    with pytest.raises(ParamsError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        parse_params({"prepare": {task: prep}})
