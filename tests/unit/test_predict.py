"""predict's own arithmetic: boxes back to the image's pixels, what an export predicts, and
flags over params."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from visionpipe.config import PredictConfig
from visionpipe.geometry import fit_boxes
from visionpipe.predict import kind_of, options_from, to_image_pixels


@pytest.mark.parametrize("policy", ["pad", "stretch", "crop"])
@pytest.mark.parametrize("hw", [(100, 150), (300, 120), (64, 64)])
def test_boxes_go_back_to_the_pixels_they_came_from(policy, hw):
    h, w = hw
    boxes = np.array([[10, 20, 60, 90], [0, 0, w, h], [w * 0.4, h * 0.3, w * 0.6, h * 0.7]],
                     np.float32)
    fitted = fit_boxes(boxes, hw, (64, 64), policy)
    back = to_image_pixels(fitted, hw, (64, 64), policy)
    # Crop cuts part of the image away: only boxes inside what it keeps come back whole.
    inside = [2] if policy == "crop" else [0, 1, 2]
    np.testing.assert_allclose(back[inside], np.minimum(boxes[inside], [w, h, w, h]),
                               atol=1e-3)
    assert (back >= 0).all() and (back[:, [0, 2]] <= w).all() and (back[:, [1, 3]] <= h).all()


def test_what_an_export_predicts_follows_its_outputs():
    assert kind_of({"outputs": {"scores": "", "class_id": "", "class_name": ""}}) == "labels"
    assert kind_of({"outputs": {"scores": "", "mask": ""}}) == "masks"
    assert kind_of({"outputs": {"boxes": "", "scores": "", "class_id": ""}}) == "boxes"


def test_flags_win_over_params_and_params_over_defaults():
    settings = PredictConfig(confidence=0.5, iou=0.6, max_detections=30, batch_size=4)
    none = argparse.Namespace(conf=None, iou=None, max_det=None, batch_size=None)
    assert options_from(none, settings).confidence == 0.5
    assert options_from(none, settings).trust_saved_model is False  # refused unless asked
    flags = argparse.Namespace(conf=0.1, iou=0.3, max_det=5, batch_size=2,
                               trust_saved_model=True)
    got = options_from(flags, settings)
    assert (got.confidence, got.iou, got.max_detections, got.batch_size) == (0.1, 0.3, 5, 2)
    assert got.trust_saved_model is True
    assert options_from(none, PredictConfig()).confidence == 0.25


@pytest.mark.parametrize("flag, value, message", [
    ("--conf", "1.5", "argument --conf: 1.5 is outside 0..1"),
    ("--iou", "high", "argument --iou: 'high' is not a number"),
    ("--max-det", "0", "argument --max-det: 0 is less than 1"),
    ("--batch-size", "2.5", "argument --batch-size: '2.5' is not a whole number"),
])
def test_bad_flags_get_one_line_errors(flag, value, message, capsys):
    from visionpipe.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["predict", "--model", "yolo", "--input", "x", "--output",
                                   "y", flag, value])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(message)


# --- what predict checks before it runs an export (issue 23) ---------------------------------

def test_input_links_pipes_and_loops_are_skipped_with_their_reason(tmp_path):
    import os

    from visionpipe.predict import list_files

    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    for name in ("b.png", "a.png", "sub/c.png", ".hidden.png"):
        (root / name).write_bytes(b"x")
    (root / "loop.png").symlink_to("loop.png")
    (root / "dangling.png").symlink_to("gone.png")
    (root / "sub" / "up").symlink_to("..")
    (root / "sub2").symlink_to("sub")
    os.mkfifo(root / "pipe.mp4")
    (root / "out").mkdir()  # predict's own output inside the input: not read, not listed
    (root / "out" / "rendered.png").write_bytes(b"x")
    skipped = []
    files = list_files(root, exclude=root / "out", skipped=skipped)
    assert [f.relative_to(root).as_posix() for f in files] == ["a.png", "b.png", "sub/c.png"]
    reasons = {s.path: s.reason for s in skipped}
    assert {s.path: s.kind for s in skipped} == {
        "dangling.png": "dangling symbolic link", "loop.png": "symbolic link loop",
        "pipe.mp4": "not a regular file (named pipe)", "sub/up": "symbolic link loop",
        "sub2": "folder already read"}
    assert reasons["dangling.png"].startswith("dangling symbolic link: points to gone.png")
    assert reasons["sub/up"] == ("symbolic link loop: the link leads back to ., which holds "
                                 "it, so it would be read forever; remove the link or point it "
                                 "elsewhere")
    assert reasons["sub2"].startswith("folder already read as sub ")


def test_every_risky_op_is_an_op_of_this_tensorflow():
    from tensorflow.core.framework import op_def_pb2
    from tensorflow.python.client import pywrap_tf_session

    from visionpipe.integrity import CHECKPOINT_OPS, RISKY_OPS

    registry = op_def_pb2.OpList()
    registry.ParseFromString(pywrap_tf_session.TF_GetBuffer(pywrap_tf_session.TF_GetAllOpList()))
    known = {op.name for op in registry.op}
    assert len(known) > 1000
    assert sorted(set(RISKY_OPS) - known) == []  # no typo: each name is a registered op
    assert set(RISKY_OPS) >= CHECKPOINT_OPS and "WriteFile" in RISKY_OPS
    assert {"PyFunc", "EagerPyFunc", "PyFuncStateless"} <= set(RISKY_OPS)
    assert not {"Conv2D", "MatMul", "Print", "ScalarSummary"} & set(RISKY_OPS)


def _export_folder(tmp_path):
    from visionpipe.integrity import record_files

    export = tmp_path / "export"
    (export / "saved_model" / "variables").mkdir(parents=True)
    (export / "model.tflite").write_bytes(b"tflite bytes")
    (export / "saved_model" / "saved_model.pb").write_bytes(b"graph")
    (export / "saved_model" / "variables" / "variables.index").write_bytes(b"index")
    return export, {"model": "vgg", "files": record_files(export)}


@pytest.mark.parametrize("damage, part, message", [
    (lambda e: (e / "model.tflite").write_bytes(b"tflite bytez"), "model.tflite",
     "model.tflite: changed or damaged since export (SHA-256 "),
    (lambda e: (e / "model.tflite").write_bytes(b"short"), "model.tflite",
     "model.tflite: changed or damaged since export (5 bytes; export.json records 12)"),
    (lambda e: (e / "saved_model" / "variables" / "variables.index").unlink(), "saved_model",
     "saved_model/variables/variables.index: missing; export.json lists it"),
    (lambda e: (e / "saved_model" / "extra.pb").write_bytes(b""), "saved_model",
     "saved_model/extra.pb: not one of the 2 file(s) export wrote"),
])
def test_checksums_name_the_file_and_what_to_do(tmp_path, damage, part, message):
    from visionpipe.errors import ModelError
    from visionpipe.integrity import verify_files

    export, meta = _export_folder(tmp_path)
    verify_files(export, meta, part, warn=pytest.fail)  # as written: passes, no warning
    damage(export)
    with pytest.raises(ModelError) as exc:
        verify_files(export, meta, part, warn=pytest.fail)
    text = str(exc.value)
    assert message in text and "\n" not in text, text
    assert text.endswith(f"restore the export with `dvc checkout {export}` (where DVC tracks "
                         "it) or rebuild it with `dvc repro export@vgg`")


def test_an_export_without_checksums_is_a_warning(tmp_path):
    from visionpipe.integrity import verify_files

    export, _ = _export_folder(tmp_path)
    warnings = []
    verify_files(export, {"model": "vgg"}, "saved_model", warn=warnings.append)
    assert warnings == [f"{export}/export.json records no checksums (an export written before "
                        f"visionpipe recorded them): {export}/saved_model cannot be verified; "
                        "rerun `dvc repro export@vgg` to record them"]


@pytest.mark.parametrize("edit, fragment", [
    ({"class_names": None}, "key 'class_names' is None; expected a non-empty list"),
    ({"class_names": []}, "key 'class_names' is []; expected a non-empty list"),
    ({"class_names": ["a", "a"]}, "key 'class_names' names a class twice"),
    ({"image_size": [64, 0]}, "key 'image_size' is [64, 0]; expected [height, width]"),
    ({"image_size": [64.0, 64]}, "key 'image_size' is [64.0, 64]"),
    ({"image_size": [True, 64]}, "key 'image_size' is [True, 64]"),
    ({"scale": "x" * 100}, "key 'scale' is 'xxxxxxxx"),
    ({"tile_overlap": float("nan")}, "key 'tile_overlap' is nan"),
    ({"task": 3}, "key 'task' is 3; expected a task name"),
    ({"outputs": None}, "key 'outputs' is None; expected a mapping"),
    ({"resize": None}, "key 'resize' is None; expected one of stretch, pad, crop"),
])
def test_export_json_keys_are_checked_with_their_types(tmp_path, edit, fragment):
    from visionpipe.errors import ModelError
    from visionpipe.geometry import RESIZE_POLICIES
    from visionpipe.integrity import MAX_SHOWN, check_meta

    meta = {"model": "vgg", "task": "classification", "class_names": ["a", "b"],
            "image_size": [64, 64], "resize": "stretch", "formats": {"tflite": {}},
            "outputs": {"scores": ""}}
    check_meta(meta, tmp_path / "export.json", RESIZE_POLICIES)  # as written: passes
    with pytest.raises(ModelError) as exc:
        check_meta({**meta, **edit}, tmp_path / "export.json", RESIZE_POLICIES)
    text = str(exc.value)
    assert text.startswith(f"{tmp_path / 'export.json'}: ") and fragment in text, text
    assert "dvc repro export@vgg" in text and "x" * MAX_SHOWN not in text  # values cut short
    assert len(text) < 300 + len(str(tmp_path)) * 2
