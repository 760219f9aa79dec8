"""`visionpipe predict` on exports that are not what export wrote (issue 23): export.json
records every file's SHA-256 and predict checks them; a malformed export.json, a damaged
SavedModel, TFLite or ONNX file, a SavedModel whose graph writes files, and links, pipes and
unreadable files in the input folder are each one line or a listed skip, never a traceback.

One tiny MLP is trained and exported by the real stages once; each test works on a copy."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import TINY_MODEL, child_env, prepare_project, tiny_params
from visionpipe.config import parse_params
from visionpipe.errors import ModelError
from visionpipe.integrity import record_files, saved_model_findings
from visionpipe.predict import Options, predict_folder

FORMATS = ["keras", "saved_model", "tflite", "tflite_int8", "onnx"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, default_params_dict):
    """models/mlp/export/ of a tiny MLP, written by the real train and export stages, and a
    folder of three test images."""
    from visionpipe.stages import export, train

    data = tiny_params(default_params_dict)
    data["export"].update(formats=FORMATS, parity_samples=8, representative_samples=16)
    # A 2-epoch model's int8 drift is no concern here.
    data["export"]["parity"]["tflite_int8"].update(max_abs_diff=1.0, min_agreement=0.0)
    root = tmp_path_factory.mktemp("integrity")
    layout = prepare_project(root, data)
    params = parse_params(data)
    train.run(params, TINY_MODEL, layout)
    export.run(params, TINY_MODEL, layout)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(
            images / f"{i}.png")
    return layout.export_dir(TINY_MODEL), images


def _copy(exported, where: Path) -> Path:
    out = where / "export"
    shutil.copytree(exported[0], out)
    return out


def _meta(export: Path) -> dict:
    return json.loads((export / "export.json").read_text())


def _write_meta(export: Path, meta: dict) -> None:
    (export / "export.json").write_text(json.dumps(meta))


def _rerecord(export: Path) -> None:
    """export.json's checksums made to match the files as they are now (an edited record)."""
    meta = _meta(export)
    meta["files"] = record_files(export)
    meta["files"].pop("export.json")
    _write_meta(export, meta)


def _predict(export: Path, images: Path, out: Path, fmt: str, *prefix: str):
    """`visionpipe predict` in a child process, from a folder without params.yaml."""
    cmd = [*prefix, sys.executable, "-m", "visionpipe.cli", "predict", "--model", TINY_MODEL,
           "--export-dir", str(export), "--input", str(images), "--output", str(out),
           "--format", fmt]
    return subprocess.run(cmd, cwd=out.parent, capture_output=True, text=True, timeout=300,
                          env=child_env())


def _one_error(result, *fragments: str) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("visionpipe:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# --- checksums ------------------------------------------------------------------------------

def test_export_records_every_file_it_wrote(exported):
    export, _ = exported
    record = _meta(export)["files"]
    on_disk = sorted(p.relative_to(export).as_posix() for p in export.rglob("*")
                     if p.is_file() and p.name != "export.json")
    assert sorted(record) == on_disk
    assert {"model.keras", "model.tflite", "model_int8.tflite", "model.onnx",
            "saved_model/saved_model.pb", "saved_model/variables/variables.index"} <= set(record)
    for rel, entry in record.items():
        data = (export / rel).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}, rel


def test_a_verified_export_predicts_without_warning(exported, tmp_path):
    export, images = exported
    result = _predict(export, images, tmp_path / "out", "saved_model")
    assert result.returncode == 0, result.stderr
    assert "visionpipe:" not in result.stderr, result.stderr  # no warning, no error
    predictions = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert predictions["count"] == 3 and predictions["skipped"]["count"] == 0
    # Our SavedModel passes the graph check; its saver does hold the checkpoint ops it is
    # allowed (so the check has something to tell apart).
    assert saved_model_findings(export / "saved_model") == []
    pb = (export / "saved_model" / "saved_model.pb").read_bytes()
    assert b"SaveV2" in pb and b"RestoreV2" in pb


def test_a_changed_file_is_named_with_what_to_do(exported, tmp_path):
    export = _copy(exported, tmp_path)
    path = export / "model.tflite"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte: same size, another SHA-256
    path.write_bytes(bytes(data))
    result = _predict(export, exported[1], tmp_path / "out", "tflite")
    _one_error(result, f"{path}: changed or damaged since export", "SHA-256",
               f"dvc checkout {export}", f"dvc repro export@{TINY_MODEL}")
    assert not (tmp_path / "out" / "predictions.json").exists()


@pytest.mark.parametrize("damage, fragment", [
    ("flip", "variables/variables.data-00000-of-00001: changed or damaged since export"),
    ("remove", "variables/variables.index: missing; export.json lists it"),
    ("add", "saved_model/assets/extra.txt: not one of the 4 file(s) export wrote"),
    ("truncate", "saved_model/saved_model.pb: changed or damaged since export ("),
])
def test_every_file_of_the_saved_model_is_checked(exported, tmp_path, damage, fragment):
    export = _copy(exported, tmp_path)
    saved = export / "saved_model"
    if damage == "flip":
        data = saved / "variables" / "variables.data-00000-of-00001"
        raw = data.read_bytes()
        data.write_bytes(raw[:-1] + bytes([raw[-1] ^ 0xFF]))  # same size, another SHA-256
    elif damage == "remove":
        (saved / "variables" / "variables.index").unlink()
    elif damage == "add":
        (saved / "assets").mkdir(exist_ok=True)
        (saved / "assets" / "extra.txt").write_text("x")
    else:
        pb = saved / "saved_model.pb"
        pb.write_bytes(pb.read_bytes()[:100])
    assert len([r for r in _meta(export)["files"] if r.startswith("saved_model/")]) == 4
    with pytest.raises(ModelError, match="dvc repro export@mlp") as exc:
        predict_folder(export, exported[1], tmp_path / "out", "saved_model", Options())
    assert fragment in str(exc.value) and "\n" not in str(exc.value)


def test_an_export_from_before_checksums_runs_with_one_warning(exported, tmp_path):
    export = _copy(exported, tmp_path)
    meta = _meta(export)
    del meta["files"]
    _write_meta(export, meta)
    result = _predict(export, exported[1], tmp_path / "out", "tflite")
    assert result.returncode == 0, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("visionpipe:")]
    assert lines == [f"visionpipe: warning: {export}/export.json records no checksums (an "
                     "export written before visionpipe recorded them): "
                     f"{export}/model.tflite cannot be verified; rerun `dvc repro "
                     f"export@{TINY_MODEL}` to record them"], result.stderr
    assert json.loads((tmp_path / "out" / "predictions.json").read_text())["count"] == 3


# --- export.json ----------------------------------------------------------------------------

def _edit(key, value):
    """export.json's bytes with ``key`` set to ``value`` (KeyError: removed)."""
    def edit(meta):
        if value is KeyError:
            del meta[key]
        else:
            meta[key] = value
        return json.dumps(meta).encode()
    return edit


EDITS = {
    "missing class_names": (_edit("class_names", KeyError), "key 'class_names' is missing"),
    "image_size a string": (_edit("image_size", "16x16"),
                            "key 'image_size' is '16x16'; expected [height, width]"),
    "image_size another": (_edit("image_size", [20, 20]), "model.tflite: takes 16x16 images "
                           "but export.json's image_size is [20, 20]"),
    "not JSON": (lambda meta: json.dumps(meta).encode()[:-40], "export.json: not valid JSON ("),
    "not UTF-8": (lambda meta: b'{"model": "\xff"}', "export.json: not valid JSON ("),
    "a list": (lambda meta: b"[1, 2]", "holds a JSON array, not an object"),
    "resize unknown": (_edit("resize", "zoom"), "key 'resize' is 'zoom'; expected one of "
                                                "stretch, pad, crop"),
    "formats a list": (_edit("formats", ["tflite"]), "key 'formats' is ['tflite']"),
    "tile_overlap 2": (_edit("tile_overlap", 2), "key 'tile_overlap' is 2; expected a number"),
    "predict flag a string": (_edit("visionpipe_predict", "yes"),
                              "key 'visionpipe_predict' is 'yes'; expected true or false"),
    "files not a mapping": (_edit("files", ["model.tflite"]), "key 'files' is ['model.tflite']"),
    "files bad hash": (lambda meta: json.dumps({**meta, "files": {
        **meta["files"], "model.tflite": {"sha256": "abc", "bytes": 3}}}).encode(),
        "key files.'model.tflite' is {'sha256': 'abc', 'bytes': 3}"),
    "files outside": (lambda meta: json.dumps({**meta, "files": {
        **meta["files"], "../x": {"sha256": "0" * 64, "bytes": 3}}}).encode(),
        "key files.'../x'"),
}
THROUGH_CLI = ("missing class_names", "image_size a string", "not JSON")


@pytest.mark.parametrize("case", sorted(EDITS))
def test_a_malformed_export_json_is_one_line_naming_the_key(exported, tmp_path, case):
    edit, fragment = EDITS[case]
    export = _copy(exported, tmp_path)
    (export / "export.json").write_bytes(edit(_meta(export)))
    if case in THROUGH_CLI:
        _one_error(_predict(export, exported[1], tmp_path / "out", "tflite"),
                   f"{export}/export.json", fragment)
        return
    with pytest.raises(ModelError) as exc:
        predict_folder(export, exported[1], tmp_path / "out", "tflite", Options())
    message = str(exc.value)
    assert message.startswith((f"{export}/export.json: ", f"{export}/model.tflite: ",
                               f"{export}: ")), message
    assert fragment in message and "\n" not in message, message


# --- damaged files whose checksums match ----------------------------------------------------

@pytest.mark.parametrize("fmt, part, damage, fragment", [
    # 100 bytes of a .tflite: the memory-mapped loader crashed the process on such a file.
    ("tflite", "model.tflite", 100, "model.tflite: not a loadable TFLite model ("),
    ("onnx", "model.onnx", 0.5, "model.onnx: not a loadable ONNX model ("),
    ("saved_model", "saved_model/saved_model.pb", 0.5,
     "saved_model: not a readable SavedModel (Cannot parse file"),
    ("saved_model", "saved_model/variables/variables.data-00000-of-00001", "garbage",
     "saved_model: not a loadable SavedModel ("),
])
def test_a_damaged_file_with_matching_checksum_is_one_line(exported, tmp_path, fmt, part,
                                                           damage, fragment):
    export = _copy(exported, tmp_path)
    path = export / part
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(np.random.default_rng(1).bytes(len(data)))
    else:
        path.write_bytes(data[:damage if isinstance(damage, int) else int(len(data) * damage)])
    _rerecord(export)  # export.json edited too: the checksums pass
    line = _one_error(_predict(export, exported[1], tmp_path / "out", fmt), fragment,
                      "dvc repro export@")
    assert str(export) in line and len(line) < 500


# --- a SavedModel is a program ---------------------------------------------------------------

def _hostile_saved_model(path: Path, body, size: int = 16, classes: int = 4) -> None:
    """A SavedModel with predict's signature (uint8 images in, scores out) whose function
    also runs ``body(images)``."""
    import tensorflow as tf

    class Hostile(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8,
                                                    name="images")])
        def serve(self, images):
            body(images)
            return {"scores": tf.fill([tf.shape(images)[0], classes], 1.0 / classes)}

    module = Hostile()
    shutil.rmtree(path, ignore_errors=True)
    tf.saved_model.save(module, str(path), signatures={"serving_fixed_size": module.serve,
                                                       "serving_default": module.serve})


def test_a_saved_model_that_writes_a_file_is_refused(exported, tmp_path):
    import tensorflow as tf

    export = _copy(exported, tmp_path)
    marker = tmp_path / "written-by-the-model.txt"
    _hostile_saved_model(export / "saved_model",
                         lambda images: tf.io.write_file(str(marker), "a SavedModel wrote this"))
    _rerecord(export)  # an export.json that vouches for it: only the graph check stops it
    line = _one_error(_predict(export, exported[1], tmp_path / "out", "saved_model"),
                      f"{export}/saved_model: refused: its graph holds WriteFile (writes "
                      "files, in __inference_serve", "--format tflite or onnx",
                      "--trust-saved-model")
    assert "a visionpipe export holds no such ops" in line
    assert not marker.exists()
    # Trusted (predict's --trust-saved-model), it runs, and the file appears: the refusal
    # stopped a real write.
    trusted = subprocess.run(
        [sys.executable, "-m", "visionpipe.cli", "predict", "--model", TINY_MODEL,
         "--export-dir", str(export), "--input", str(exported[1]), "--output",
         str(tmp_path / "trusted"), "--format", "saved_model", "--trust-saved-model"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=child_env())
    assert trusted.returncode == 0, trusted.stderr
    assert json.loads((tmp_path / "trusted" / "predictions.json").read_text())["count"] == 3
    assert marker.read_text() == "a SavedModel wrote this"


def _risky_bodies(tmp_path: Path) -> dict:
    import tensorflow as tf

    where = str(tmp_path / "x")
    return {
        "ReadFile": lambda images: tf.io.read_file(where),
        "MatchingFiles": lambda images: tf.io.matching_files(where + "*"),
        "EagerPyFunc": lambda images: tf.py_function(lambda x: x, [images], tf.uint8),
        "PrintV2": lambda images: tf.print("hello", output_stream=f"file://{where}"),
        "SaveV2": lambda images: tf.raw_ops.SaveV2(
            prefix=where, tensor_names=["images"], shape_and_slices=[""], tensors=[images]),
        "CreateSummaryFileWriter": lambda images: tf.raw_ops.CreateSummaryFileWriter(
            writer=tf.raw_ops.SummaryWriter(), logdir=where, max_queue=1, flush_millis=1,
            filename_suffix=""),
        "TFRecordDataset": lambda images: tf.data.TFRecordDataset(where).reduce(
            0, lambda n, _: n + 1),
    }


@pytest.mark.parametrize("op", ["ReadFile", "MatchingFiles", "EagerPyFunc", "PrintV2",
                                "SaveV2", "CreateSummaryFileWriter", "TFRecordDataset"])
def test_risky_ops_are_found_wherever_the_serving_function_calls_them(tmp_path, op):
    _hostile_saved_model(tmp_path / "sm", _risky_bodies(tmp_path)[op])
    findings = saved_model_findings(tmp_path / "sm")
    assert op in {f.op for f in findings}, findings
    # Found inside the functions the signature calls, not in the saver.
    assert {f.where for f in findings if f.op == op} - {"the saver", "the top-level graph"}


def test_harmless_printing_is_not_refused(tmp_path):
    import tensorflow as tf

    _hostile_saved_model(tmp_path / "sm", lambda images: tf.print("to stderr only"))
    assert saved_model_findings(tmp_path / "sm") == []


# --- the input folder -----------------------------------------------------------------------

def _without_file_permissions() -> list[str]:
    """How to run the CLI as a process that file permissions apply to (root: drop the
    capabilities that bypass them)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permissions cannot be tested")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def test_links_pipes_and_unreadable_files_in_the_input_are_listed_skips(exported, tmp_path):
    export, images = exported
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    for name in ("a.png", "b.png"):
        shutil.copy(images / "0.png", folder / name)
    shutil.copy(images / "0.png", os.fsdecode(os.fsencode(folder) + b"/caf\xe9.png"))
    (folder / "sub").mkdir()
    shutil.copy(images / "1.png", folder / "sub" / "c.png")
    (folder / "loop.png").symlink_to("loop.png")
    (folder / "ping.png").symlink_to("pong.png")
    (folder / "pong.png").symlink_to("ping.png")
    (folder / "dangling.png").symlink_to("gone.png")
    (folder / "sub" / "up").symlink_to("..")  # a folder loop
    (folder / "sub2").symlink_to("sub")  # a second way to sub/ (read after it)
    os.mkfifo(folder / "pipe.png")
    os.mkfifo(folder / "clip.mp4")  # a video reader would block on it
    locked = folder / "locked.png"
    shutil.copy(images / "2.png", locked)
    locked.chmod(0)
    result = _predict(export, folder, tmp_path / "out", "tflite", *_without_file_permissions())
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    out = json.loads((tmp_path / "out" / "predictions.json").read_text())
    # A name that is not UTF-8 is kept, written with an escape (as prepare writes it).
    assert [p["file"] for p in out["predictions"]] == ["a.png", "b.png", "caf\\xe9.png",
                                                       "sub/c.png"]
    assert (tmp_path / "out" / "rendered" / "caf\\xe9.png.png").is_file()
    kinds = {s["path"]: s["kind"] for s in out["skipped"]["items"]}
    assert kinds == {
        "loop.png": "symbolic link loop", "ping.png": "symbolic link loop",
        "pong.png": "symbolic link loop", "dangling.png": "dangling symbolic link",
        "sub/up": "symbolic link loop", "sub2": "folder already read",
        "pipe.png": "not a regular file (named pipe)",
        "clip.mp4": "not a regular file (named pipe)", "locked.png": "permission denied"}
    assert out["skipped"]["count"] == 9
    for path in kinds:  # each listed on the console with its reason
        assert f"  {path}: " in result.stderr, result.stderr
