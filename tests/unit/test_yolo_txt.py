"""The YOLO txt source (ultralytics layout): layouts, data.yaml, label lines, every bad input
skipped with a one-line reason and counted, fuzzing."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from visionpipe.data.sources.yolo_txt import load_yolo
from visionpipe.errors import DataError

FUZZ = settings(max_examples=120, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


def _image(path: Path, size=(100, 50)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (40, 80, 120)).save(path)
    return path


def _label(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _dataset(root: Path, labels: dict[str, str | None], names="names: [cat, dog]\n",
             size=(100, 50)) -> Path:
    """root/images/<id>.jpg for each id, root/labels/<id>.txt unless its text is None."""
    if names is not None:
        _label(root / "data.yaml", names)
    for stem, text in labels.items():
        _image(root / "images" / f"{stem}.jpg", size)
        if text is not None:
            _label(root / "labels" / f"{stem}.txt", text)
    return root


def _load(root: Path, **kw):
    return load_yolo(root, shown_root="ds", **kw)


def _reasons(ds) -> dict[str, str]:
    return {s.path: s.reason for s in ds.skipped}


def _error(root: Path, **kw) -> str:
    with pytest.raises(DataError) as info:
        _load(root, **kw)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_boxes_are_converted_to_pixel_corners(tmp_path):
    root = _dataset(tmp_path, {"a": "0 0.5 0.5 0.2 0.4\n1 0.25 0.75 0.1 0.2\n"})
    ds = _load(root)
    assert ds.class_names == ["cat", "dog"]
    (sample,) = ds.samples
    assert (sample.id, sample.width, sample.height) == ("a", 100, 50)
    assert sample.boxes.dtype == np.float32
    assert sample.boxes.tolist() == [[40, 15, 60, 35], [20, 32.5, 30, 42.5]]
    assert sample.class_ids.tolist() == [0, 1] and sample.difficult.tolist() == [False] * 2
    assert ds.counts["boxes"] == 2 and ds.counts["samples"] == 1 and ds.skipped == []


def test_six_digit_label_files_land_on_whole_pixels(tmp_path):
    # what ultralytics' converters write: 6 decimals; corners drawn on whole pixels
    x0, y0, x1, y1, w, h = 113, 27, 401, 318, 640, 427
    line = (f"0 {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} {(x1 - x0) / w:.6f} "
            f"{(y1 - y0) / h:.6f}\n")
    root = _dataset(tmp_path, {"a": line}, size=(w, h))
    assert _load(root).samples[0].boxes.tolist() == [[x0, y0, x1, y1]]


@pytest.mark.parametrize("names, expected", [
    ("names: [cat, dog]\n", ["cat", "dog"]),
    ("names: {0: cat, 1: dog}\nnc: 2\n", ["cat", "dog"]),
    ("names:\n  1: dog\n  0: cat\n", ["cat", "dog"]),
    ("nc: 2\n", ["class_0", "class_1"]),
    ("path: ../datasets/x\ntrain: images/train\nval: images/val\nnames: [cat, dog]\n",
     ["cat", "dog"]),
])
def test_data_yaml_names_as_list_mapping_or_count(tmp_path, names, expected):
    root = _dataset(tmp_path, {"a": "1 0.5 0.5 0.2 0.2\n"}, names=names)
    assert _load(root).class_names == expected


@pytest.mark.parametrize("names, fragment", [
    ("names: {0: cat, 2: dog}\n", "ids 0..n-1"),
    ("names: [cat, dog]\nnc: 3\n", "nc = 3 but names lists 2"),
    ("names: [cat, cat]\n", "'cat' more than once"),
    ("names: [cat, '']\n", "names[1]"),
    ("names: []\n", "non-empty list"),
    ("train: images\n", "no 'names'"),
    ("names: [cat\n", "YAML syntax error at line"),
    ("- just\n- a list\n", "expected a mapping"),
    ("nc: two\nnames: [a, b]\n", "nc = 'two'"),
])
def test_bad_data_yaml_is_one_line_naming_the_file(tmp_path, names, fragment):
    root = _dataset(tmp_path, {"a": ""}, names=names)
    message = _error(root)
    assert message.startswith("ds/data.yaml: ") and fragment in message, message


def test_class_names_stand_in_for_a_missing_data_yaml(tmp_path):
    root = _dataset(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n"}, names=None)
    assert "ds/data.yaml: not found, and no class_names" in _error(root)
    assert _load(root, class_names=["cat"]).class_names == ["cat"]
    _label(root / "data.yaml", "names: [dog]\n")
    assert "disagree with data.yaml's names" in _error(root, class_names=["cat"])


def test_split_folders_of_ultralytics_and_roboflow(tmp_path):
    ultra = tmp_path / "ultra"
    _label(ultra / "data.yaml", "names: [cat]\n")
    for split in ("train", "val"):
        _image(ultra / "images" / split / "x.jpg")
        _label(ultra / "labels" / split / "x.txt", "0 0.5 0.5 0.2 0.2\n")
    ds = _load(ultra)
    assert [s.id for s in ds.samples] == ["train/x", "val/x"]
    assert ds.samples[1].annotation == ultra / "labels" / "val" / "x.txt"

    robo = tmp_path / "robo"
    _label(robo / "data.yaml", "names: [cat]\n")
    for split in ("test", "train", "valid"):
        _image(robo / split / "images" / "y.jpg")
        _label(robo / split / "labels" / "y.txt", "0 0.5 0.5 0.2 0.2\n")
    ds = _load(robo)
    assert [s.id for s in ds.samples] == ["test/y", "train/y", "valid/y"]
    assert ds.counts["boxes"] == 3 and ds.skipped == []


def test_images_without_labels_are_kept_background_images(tmp_path):
    root = _dataset(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n", "b": None, "c": ""})
    ds = _load(root)
    assert [s.id for s in ds.samples] == ["a", "b", "c"]
    assert [len(s.boxes) for s in ds.samples] == [1, 0, 0]
    assert ds.counts["background_images"] == 1  # b: no label file; c: an empty one
    assert ds.counts["images_without_objects"] == 2 and ds.skipped == []


def test_label_file_without_image_is_skipped_and_counted(tmp_path):
    root = _dataset(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n"})
    _label(root / "labels" / "ghost.txt", "0 0.5 0.5 0.2 0.2\n")
    _label(root / "labels" / "notes.md", "hello")
    ds = _load(root)
    assert _reasons(ds) == {
        "ds/labels/ghost.txt": "label file without image; looked for ds/images/ghost.* (any "
                               "image extension)",
        "ds/labels/notes.md": "not a YOLO label file (extension '.md', expected .txt)"}
    assert ds.counts["label_files_without_image"] == 1 and ds.counts["label_files"] == 2
    assert [s.kind for s in ds.skipped] == ["label file without image",
                                            "not a YOLO label file"]


@pytest.mark.parametrize("text, kind, fragment", [
    ("0 0.5 0.5 0.2\n", "malformed label file", "line 1: 4 values; expected 5"),
    ("0 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2 0.2 0.1\n", "malformed label file", "line 2: 6 values"),
    ("0 0.5 abc 0.2 0.2\n", "malformed label file", "line 1: 'abc' is not a number"),
    ("0 0.5 nan 0.2 0.2\n", "malformed label file", "line 1: 'nan' is not a finite number"),
    ("0.5 0.5 0.5 0.2 0.2\n", "malformed label file", "line 1: class '0.5' is not a whole"),
    ("0 320 240 50 60\n", "malformed label file", "line 1: coordinate '320' is not normalised"),
    ("\n\n2 0.5 0.5 0.2 0.2\n", "unknown class id", "line 3: class id 2 is not in the 2 class"),
    ("-1 0.5 0.5 0.2 0.2\n", "unknown class id", "line 1: class id -1"),
    ("0 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.2 0.2\n0 0.5 0.5 x 0.2\n", "malformed label file",
     "line 3: 'x' is not a number (and 1 more bad line(s))"),
])
def test_bad_label_lines_leave_the_image_out_with_one_line(tmp_path, text, kind, fragment):
    root = _dataset(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n", "b": text})
    ds = _load(root)
    assert [s.id for s in ds.samples] == ["a"]
    (skip,) = ds.skipped
    assert skip.path == "ds/labels/b.txt" and skip.kind == kind
    assert skip.reason.startswith(f"{kind}: ") and fragment in skip.reason, skip.reason
    assert skip.reason.endswith("its image ds/images/b.jpg is left out")
    assert "\n" not in skip.reason
    key = "label_files_malformed" if kind == "malformed label file" else \
        "label_files_unknown_class"
    assert ds.counts[key] == 1 and ds.counts["samples"] == 1 and ds.counts["boxes"] == 1


def test_undecodable_label_file_is_malformed(tmp_path):
    root = _dataset(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n", "b": None})
    (root / "labels" / "b.txt").write_bytes(b"0 0.5 \xff\xfe 0.2\n")
    (skip,) = _load(root).skipped
    assert skip.kind == "malformed label file" and "not UTF-8 text" in skip.reason


def test_boxes_outside_are_clipped_and_degenerate_ones_dropped_by_line(tmp_path):
    root = _dataset(tmp_path, {"a": ("0 0.95 0.5 0.2 0.2\n"      # right edge at 105: clipped
                                     "0 0.5 0.5 0 0.2\n"          # zero width: dropped
                                     "1 0.5 0.5 -0.1 0.2\n"       # inverted: dropped
                                     "1 1.5 0.5 0.2 0.2\n")})     # outside: dropped
    ds = _load(root)
    assert ds.samples[0].boxes.tolist() == [[85, 20, 100, 30]]
    assert ds.counts["boxes_clipped"] == 1 and ds.counts["boxes_dropped"] == 3
    assert ds.dropped == [
        "ds/labels/a.txt: line 2 'cat' (50, 20, 50, 30): zero width",
        "ds/labels/a.txt: line 3 'dog' (55, 20, 45, 30): inverted corners (xmax < xmin)",
        "ds/labels/a.txt: line 4 'dog' (140, 20, 160, 30): outside the 100x50 image"]


def test_polygon_lines_give_their_bounding_box(tmp_path):
    root = _dataset(tmp_path, {"a": "1 0.1 0.2 0.5 0.1 0.3 0.8\n"})
    sample = _load(root).samples[0]
    assert sample.boxes.tolist() == [[10, 5, 50, 40]] and sample.class_ids.tolist() == [1]


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    root = _dataset(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n", "b": "0 0.5 0.5 0.2 0.2\n",
                               "c": None})
    (root / "images" / "b.jpg").write_bytes(b"")
    (root / "images" / "c.jpg").write_text("not a picture")
    (root / "images" / "readme.txt").write_text("stray")
    ds = _load(root)
    assert [s.id for s in ds.samples] == ["a"]
    reasons = _reasons(ds)
    assert reasons["ds/images/b.jpg"].startswith("empty file (0 bytes)")
    assert reasons["ds/images/c.jpg"].startswith("not an image PIL can read")
    assert reasons["ds/images/readme.txt"] == "not an image file (extension '.txt')"
    assert ds.counts["images_unreadable"] == 2 and ds.counts["images"] == 3


def test_dataset_level_problems_are_one_line_errors(tmp_path):
    assert "folder not found" in _error(tmp_path / "missing")
    _label(tmp_path / "empty" / "data.yaml", "names: [cat]\n")
    assert "no images/ folder" in _error(tmp_path / "empty")
    root = _dataset(tmp_path / "twins", {"a": "0 0.5 0.5 0.2 0.2\n"})
    _image(root / "images" / "a.png")
    assert "share one label file" in _error(root)
    root = _dataset(tmp_path / "broken", {"a": "0 0.5\n"})
    assert "no usable image among the 1 found" in _error(root)


_token = st.one_of(st.sampled_from(["0", "1", "2", "-1", "0.5", "1e9", "nan", "inf", "x",
                                    "0.0", "1.5", "-0.2", "", "\t"]),
                   st.floats(-2, 3, allow_nan=False).map(repr))


@FUZZ
@given(st.lists(st.lists(_token, max_size=9).map(" ".join), max_size=6))
def test_fuzz_random_label_lines_never_crash(lines):
    with tempfile.TemporaryDirectory() as tmp:
        root = _dataset(Path(tmp), {"a": "0 0.5 0.5 0.2 0.2\n", "b": "\n".join(lines)})
        ds = _load(root)
    assert ds.samples[0].id == "a"
    for sample in ds.samples:
        x0, y0, x1, y1 = sample.boxes.T
        assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 100).all() and (y1 <= 50).all()
        assert (x1 > x0).all() and (y1 > y0).all()
    assert all("\n" not in s.reason for s in ds.skipped)
    assert ds.counts["samples"] == len(ds.samples) == 2 - len(ds.skipped)
