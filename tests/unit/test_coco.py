"""The COCO JSON source: categories, boxes, crowd regions, every bad input skipped with a
one-line reason and counted (or a one-line error for an unusable file), fuzzing."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from visionpipe.data.sources.coco import load_coco
from visionpipe.errors import DataError

FUZZ = settings(max_examples=120, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
CATEGORIES = [{"id": 18, "name": "dog", "supercategory": "animal"},
              {"id": 3, "name": "cat", "supercategory": "animal"}]


def _doc(images=("a", "b"), annotations=(), categories=CATEGORIES, size=(100, 50)) -> dict:
    return {"info": {}, "licenses": [],
            "images": [{"id": i + 1, "file_name": f"{name}.jpg", "width": size[0],
                        "height": size[1]} for i, name in enumerate(images)],
            "annotations": [{"id": i + 1, "iscrowd": 0, "area": 1.0, **ann}
                            for i, ann in enumerate(annotations)],
            "categories": list(categories)}


def _dataset(root: Path, doc: dict | str, files=("a", "b"), size=(100, 50)) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    for name in files:
        Image.new("RGB", size, (90, 60, 30)).save(root / "images" / f"{name}.jpg")
    text = doc if isinstance(doc, str) else json.dumps(doc)
    (root / "annotations" / "instances.json").write_text(text)
    return root


def _load(root: Path):
    return load_coco(root / "annotations" / "instances.json", root / "images", root=root,
                     shown_root="ds")


def _error(root: Path) -> str:
    with pytest.raises(DataError) as info:
        _load(root)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def _reasons(ds) -> dict[str, str]:
    return {s.path: s.reason for s in ds.skipped}


def test_categories_sorted_by_id_renumbered_and_boxes_in_pixels(tmp_path):
    root = _dataset(tmp_path, _doc(annotations=[
        {"image_id": 1, "category_id": 18, "bbox": [10, 5, 20, 30]},
        {"image_id": 1, "category_id": 3, "bbox": [0.5, 1.25, 9.5, 8.75]},
        {"image_id": 2, "category_id": 3, "bbox": [60, 10, 20, 20]}]))
    ds = _load(root)
    assert ds.class_names == ["cat", "dog"]  # ids 3, 18 -> 0, 1
    a, b = ds.samples
    assert (a.id, a.width, a.height) == ("a", 100, 50)
    assert a.boxes.tolist() == [[10, 5, 30, 35], [0.5, 1.25, 10, 10]]
    assert a.class_ids.tolist() == [1, 0] and b.class_ids.tolist() == [0]
    assert ds.counts["boxes"] == 3 and ds.skipped == [] and ds.dropped == []


def test_crowd_boxes_are_kept_flagged_difficult(tmp_path):
    root = _dataset(tmp_path, _doc(annotations=[
        {"image_id": 1, "category_id": 3, "bbox": [10, 5, 20, 30], "iscrowd": 1},
        {"image_id": 1, "category_id": 3, "bbox": [40, 5, 20, 30]}]))
    ds = _load(root)
    assert ds.samples[0].difficult.tolist() == [True, False]
    assert ds.counts["difficult_boxes"] == 1


def test_images_without_annotations_are_kept_background_images(tmp_path):
    root = _dataset(tmp_path, _doc(annotations=[
        {"image_id": 1, "category_id": 3, "bbox": [10, 5, 20, 30]}]))
    ds = _load(root)
    assert [len(s.boxes) for s in ds.samples] == [1, 0]
    assert ds.counts["background_images"] == 1 and ds.counts["images_without_objects"] == 1


def test_unlisted_images_and_listed_images_without_file_are_skipped(tmp_path):
    root = _dataset(tmp_path, _doc(images=("a", "b", "gone")), files=("a", "b", "extra"))
    (root / "images" / "notes.txt").write_text("not an image, not counted")
    ds = _load(root)
    assert [s.id for s in ds.samples] == ["a", "b"]
    assert _reasons(ds) == {
        "ds/images/extra.jpg": "image not listed in ds/annotations/instances.json; COCO lists "
                               "every image of the dataset under images",
        "ds/images/gone.jpg": "no image file for ds/annotations/instances.json's image id 3; "
                              "looked for ds/images/gone.jpg"}
    assert ds.counts["images_without_annotation"] == 1
    assert ds.counts["annotations_without_image"] == 1 and ds.counts["images"] == 3


@pytest.mark.parametrize("ann, kind, fragment", [
    ({"category_id": 3, "bbox": [1, 2, 3]}, "malformed annotation",
     "annotations[1] (id 2): bbox [1, 2, 3] is not 4 finite numbers"),
    ({"category_id": 3, "bbox": [1, "2", 3, 4]}, "malformed annotation", "bbox [1, '2', 3, 4]"),
    ({"category_id": 3}, "malformed annotation", "bbox None"),
    ({"category_id": "cat", "bbox": [1, 2, 3, 4]}, "malformed annotation",
     "category_id 'cat' is not a whole number"),
    ({"category_id": 3, "bbox": [1, 2, 3, 4], "iscrowd": 2}, "malformed annotation",
     "iscrowd 2 is not 0 or 1"),
    ({"category_id": 7, "bbox": [1, 2, 3, 4]}, "unknown class id",
     "category_id 7 is not one of the categories"),
])
def test_bad_annotations_leave_their_image_out_with_one_line(tmp_path, ann, kind, fragment):
    root = _dataset(tmp_path, _doc(annotations=[
        {"image_id": 1, "category_id": 3, "bbox": [10, 5, 20, 30]}, {"image_id": 2, **ann}]))
    ds = _load(root)
    assert [s.id for s in ds.samples] == ["a"]
    (skip,) = ds.skipped
    assert skip.path == "ds/images/b.jpg" and skip.kind == kind
    assert skip.reason.startswith(f"{kind}: ds/annotations/instances.json ")
    assert fragment in skip.reason and "\n" not in skip.reason, skip.reason
    key = ("images_with_malformed_annotation" if kind == "malformed annotation"
           else "images_with_unknown_class")
    assert ds.counts[key] == 1 and ds.counts["samples"] == 1


def test_annotations_of_unlisted_images_and_bad_image_entries(tmp_path):
    doc = _doc(annotations=[{"image_id": 1, "category_id": 3, "bbox": [10, 5, 20, 30]},
                            {"image_id": 9, "category_id": 3, "bbox": [1, 1, 5, 5]},
                            {"image_id": 2, "category_id": 3, "bbox": [1, 1, 5, 5]}])
    doc["images"][1]["width"] = "wide"
    ds = _load(_dataset(tmp_path, doc))
    assert [s.id for s in ds.samples] == ["a"]
    reasons = _reasons(ds)
    assert reasons["ds/annotations/instances.json: images[1]"] == (
        "malformed image entry: width/height 'wide'/50 are not positive whole numbers; its "
        "annotations are not used")
    assert reasons["ds/annotations/instances.json: annotations[1]"] == (
        "annotation of no listed image: image_id 9 is not an image of this file")
    assert "ds/images/b.jpg" in reasons  # on disk, but its entry was unusable
    assert ds.counts["image_entries_malformed"] == 1
    assert ds.counts["annotations_unknown_image"] == 1  # annotations[2] goes with images[1]


def test_boxes_outside_are_clipped_and_degenerate_ones_dropped(tmp_path):
    root = _dataset(tmp_path, _doc(annotations=[
        {"image_id": 1, "category_id": 3, "bbox": [90, -5, 20, 20]},
        {"image_id": 1, "category_id": 3, "bbox": [10, 10, 0, 5]},
        {"image_id": 1, "category_id": 18, "bbox": [200, 10, 5, 5]}]))
    ds = _load(root)
    assert ds.samples[0].boxes.tolist() == [[90, 0, 100, 15]]
    assert ds.counts["boxes_clipped"] == 1 and ds.counts["boxes_dropped"] == 2
    assert ds.dropped == [
        "ds/annotations/instances.json: annotations[1] 'cat' (10, 10, 10, 15): zero width",
        "ds/annotations/instances.json: annotations[2] 'dog' (200, 10, 205, 15): outside the "
        "100x50 image"]


def test_size_mismatch_and_unreadable_images_are_skipped(tmp_path):
    doc = _doc(images=("a", "b", "c"))
    doc["images"][1]["width"] = 200
    root = _dataset(tmp_path, doc, files=("a", "b", "c"))
    (root / "images" / "c.jpg").write_bytes(b"")
    ds = _load(root)
    reasons = _reasons(ds)
    assert "the image is 100x50 but" in reasons["ds/images/b.jpg"]
    assert "200x50" in reasons["ds/images/b.jpg"]
    assert reasons["ds/images/c.jpg"].startswith("empty file (0 bytes)")
    assert ds.counts["images_size_mismatch"] == 1 and ds.counts["images_unreadable"] == 1


@pytest.mark.parametrize("text, fragment", [
    ('{"images": [', "not JSON (line 1, column"),
    ("[1, 2]", "top level is a JSON list"),
    ('{"images": [], "annotations": []}', "no list categories"),
    ('{"images": [], "annotations": [], "categories": []}', "categories is empty"),
    ('{"images": [], "annotations": [], "categories": [{"id": 1}]}',
     "categories[0]: name None"),
    ('{"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}, '
     '{"id": 1, "name": "b"}]}', "categories[1]: id 1 is given twice"),
    ('{"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}, '
     '{"id": 2, "name": "a"}]}', "'a' more than once"),
])
def test_unusable_files_are_one_line_errors_naming_the_file(tmp_path, text, fragment):
    message = _error(_dataset(tmp_path, text))
    assert message.startswith("ds/annotations/instances.json") and fragment in message, message


def test_duplicate_image_entries_and_nothing_usable_are_errors(tmp_path):
    doc = _doc()
    doc["images"][1]["id"] = 1
    assert "id 1 is also the id of 'a.jpg'" in _error(_dataset(tmp_path / "ids", doc))
    doc = _doc()
    doc["images"][1]["file_name"] = "a.jpg"
    assert "'a.jpg' is listed twice" in _error(_dataset(tmp_path / "names", doc))
    assert "no usable image among the 2 listed" in _error(
        _dataset(tmp_path / "none", _doc(), files=()))
    assert "annotations file not found" in _error(tmp_path / "missing")


_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 300), st.floats(allow_nan=True),
              st.text(max_size=5), st.sampled_from(["a.jpg", "b.jpg", "../x.jpg"])),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.sampled_from(
                                ["id", "image_id", "category_id", "bbox", "iscrowd",
                                 "file_name", "width", "height", "name"]), inner, max_size=5)),
    max_leaves=20)


@FUZZ
@given(images=st.lists(_value, max_size=3), annotations=st.lists(_value, max_size=4),
       categories=st.one_of(st.just(CATEGORIES), st.lists(_value, max_size=3)))
def test_fuzz_random_entries_only_ever_give_data_error(images, annotations, categories):
    doc = {"images": [*_doc()["images"], *images], "annotations": annotations,
           "categories": categories}
    with tempfile.TemporaryDirectory() as tmp:
        root = _dataset(Path(tmp), json.dumps(doc))
        try:
            ds = _load(root)
        except DataError as exc:
            assert "\n" not in str(exc)
            return
    assert ds.counts["samples"] == len(ds.samples) >= 1
    for sample in ds.samples:
        x0, y0, x1, y1 = sample.boxes.T
        assert (x0 >= 0).all() and (x1 <= sample.width).all() and (x1 > x0).all()
        assert (y0 >= 0).all() and (y1 <= sample.height).all() and (y1 > y0).all()
    assert all("\n" not in s.reason for s in ds.skipped)
