"""Hostile data folders through `visionpipe prepare` (issue 23): file names that are not UTF-8,
symbolic link loops and dangling links, folders and files this user may not read, named pipes
and oversized text files. Each is kept or skipped under its own reason, never a traceback, a
hang or a silent drop; the good images are all prepared.

Permission cases need a process the kernel refuses: as root (CI, this machine) the CLI runs
with CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH dropped (``setpriv``), so a mode-000 file owned
by root is unreadable to it, as it is to any user."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.helpers import child_env
from visionpipe.data.sources.coco import load_coco
from visionpipe.data.sources.files import (
    Lister,
    UnreadableFile,
    check_file,
    read_file,
    shown_text,
)
from visionpipe.data.sources.yolo_txt import load_yolo
from visionpipe.errors import DataError

MiB = 1 << 20


def _raw(path: Path, name: bytes) -> Path:
    """``path / name`` for a file name given as bytes (not UTF-8 allowed)."""
    return Path(os.fsdecode(os.fsencode(path) + b"/" + name))


def _png(path: Path, value: int = 0, size=(12, 10), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(np.full(shape, value, np.uint8)).save(path, format="PNG")
    return path


def _locked(path: Path) -> Path:
    path.chmod(0)
    return path


def _cli_prefix() -> list[str]:
    """How to run the CLI as a process that file permissions apply to."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permissions cannot be tested")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def _prepare(project: Path, task: str, prep: dict, repo_root: Path):
    """Run `visionpipe prepare --task <task>` in ``project`` with prepare.<task> updated by
    ``prep``; returns (exit code, output as checked UTF-8, report or None)."""
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["prepare"][task].update(prep)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = subprocess.run(
        [*_cli_prefix(), sys.executable, "-m", "visionpipe.cli", "prepare", "--task", task],
        cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300,
        env=child_env())
    output = result.stdout.decode("utf-8")  # strict: what it prints is valid UTF-8
    report_path = project / "reports" / "prepare" / f"{task}.json"
    report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.exists() \
        else None
    return result.returncode, output, report


def _records(project: Path, task: str) -> list[str]:
    from visionpipe.data import records

    return sorted(ex.id for split in ("train", "val", "test")
                  for ex in records.read_split(project / "data" / "prepared" / task, split))


def _skips(report: dict) -> dict[str, str]:
    return {item["path"]: item["kind"] for item in report["skipped"]["items"]}


# --- the CLI on hostile folders -------------------------------------------------------------

def test_hostile_image_folder_through_the_cli(tmp_path, repo_root):
    """Every hostile entry in one classification folder: kept or skipped with its reason."""
    ds = tmp_path / "ds"
    good = []
    for cls in ("cats", "dogs"):
        for i in range(4):
            good.append(f"{cls}/{i}.png")
            _png(ds / cls / f"{i}.png", 40 * i)
    # a class folder and file names that are not UTF-8 (Latin-1 bytes), and a newline
    latin = _raw(ds, b"f\xe9lins")
    for i in range(4):
        _png(latin / f"{i}.png", 30 * i)
        good.append(f"f\\xe9lins/{i}.png")
    _png(_raw(ds / "cats", b"\xff\xfe.png"), 200)
    good.append("cats/\\xff\\xfe.png")
    _png(ds / "cats" / "new\nline.png", 100)
    good.append("cats/new\\x0aline.png")
    # links: dangling, a loop on itself, a folder link back up, a linked folder outside
    (ds / "cats" / "dangling.png").symlink_to("missing.png")
    (ds / "cats" / "loop.png").symlink_to("loop.png")
    (ds / "cats" / "up").symlink_to("..")
    for i in range(2):
        _png(tmp_path / "more_dogs" / f"m{i}.png", 9 * i)
        good.append(f"dogs/linked/m{i}.png")
    (ds / "dogs" / "linked").symlink_to(tmp_path / "more_dogs", target_is_directory=True)
    # not regular, not readable
    os.mkfifo(ds / "dogs" / "pipe.png")
    _locked(_png(ds / "dogs" / "secret.png"))
    _png(ds / "dogs" / "locked" / "inside.png")
    _locked(ds / "dogs" / "locked")

    code, output, report = _prepare(tmp_path, "classification", {
        "source": "folder", "path": "ds", "image_size": [8, 8],
        "splits": {"train": 0.5, "val": 0.25, "test": 0.25}}, repo_root)
    assert code == 0, output
    assert "Traceback" not in output
    assert report["skipped"]["by_reason"] == {
        "dangling symbolic link": 1, "symbolic link loop": 2,
        "not a regular file (named pipe)": 1, "permission denied": 2}, report["skipped"]
    assert _skips(report) == {
        "ds/cats/up": "symbolic link loop", "ds/cats/dangling.png": "dangling symbolic link",
        "ds/cats/loop.png": "symbolic link loop", "ds/dogs/locked": "permission denied",
        "ds/dogs/pipe.png": "not a regular file (named pipe)",
        "ds/dogs/secret.png": "permission denied"}
    reasons = {item["path"]: item["reason"] for item in report["skipped"]["items"]}
    assert "points to missing.png" in reasons["ds/cats/dangling.png"]
    assert "chmod" in reasons["ds/dogs/locked"] and "chmod" in reasons["ds/dogs/secret.png"]
    assert "the link leads back to ds, which holds it" in reasons["ds/cats/up"]
    assert sorted(report["class_counts"]["train"]) == ["cats", "dogs", "f\\xe9lins"]
    assert report["source"]["file_names_escaped"] == 7  # six files and the folder name
    assert report["source"]["samples"] == len(good) == 16
    assert any("not valid UTF-8" in w for w in report["warnings"])
    assert _records(tmp_path, "classification") == sorted(good)
    # printed: every skip on its own line, and the warning
    assert "ds/dogs/pipe.png: not a regular file (named pipe)" in output
    assert "warning: 7 file or folder name(s) under ds are not valid UTF-8" in output


def test_hostile_pairs_through_the_cli(tmp_path, repo_root):
    """Image/mask pairs: a pair that is not UTF-8 is kept; a dangling link, a pipe, a file this
    user may not read and a link loop each leave their pair out under their own reason."""
    ds = tmp_path / "pairs"
    (ds / "masks").mkdir(parents=True)
    stems = [f"p{i}" for i in range(6)]
    for i, stem in enumerate(stems):
        _png(ds / "images" / f"{stem}.png", 20 * i, size=(32, 32))
        mask = np.zeros((32, 32), np.uint8)
        mask[: 4 + i] = 255
        Image.fromarray(mask).save(ds / "masks" / f"{stem}.png")
    _png(_raw(ds / "images", b"\xe9t\xe9.png"), 50, size=(32, 32))
    shutil.copy(ds / "masks" / "p1.png", _raw(ds / "masks", b"\xe9t\xe9.png"))
    for stem in ("dangling", "pipe", "secret", "loop"):
        shutil.copy(ds / "masks" / "p2.png", ds / "masks" / f"{stem}.png")
    (ds / "images" / "dangling.png").symlink_to("/nonexistent/x.png")
    os.mkfifo(ds / "images" / "pipe.png")
    _locked(_png(ds / "images" / "secret.png", size=(32, 32)))
    (ds / "images" / "loop.png").symlink_to("loop.png")

    code, output, report = _prepare(tmp_path, "segmentation", {
        "source": "pairs", "path": "pairs", "mask_values": {0: "bg", 255: "fg"},
        "image_size": [32, 32], "splits": {"train": 0.6, "val": 0.2, "test": 0.2}}, repo_root)
    assert code == 0, output
    assert "Traceback" not in output
    assert _skips(report) == {
        "pairs/images/dangling.png": "dangling symbolic link",
        "pairs/images/pipe.png": "not a regular file (named pipe)",
        "pairs/images/secret.png": "permission denied",
        "pairs/images/loop.png": "symbolic link loop"}
    source = report["source"]
    assert (source["pairs"], source["samples"], source["pairs_unreadable"]) == (11, 7, 4)
    assert source["file_names_escaped"] == 2
    assert _records(tmp_path, "segmentation") == sorted([*stems, "\\xe9t\\xe9"])
    assert "pairs/images/secret.png: permission denied" in output


def test_hostile_voc_through_the_cli(tmp_path, repo_root, datasets_dir):
    """VOC: an annotation that is a named pipe (it hung prepare), one this user may not read,
    one over the size cap, a dangling image link, an image link loop and a pair whose names are
    not UTF-8, in one folder: the pipe is never opened, each is counted, the rest prepared."""
    raccoon = datasets_dir / "raccoon"
    if not (raccoon / "annotations").is_dir():
        pytest.skip(f"raccoon dataset not found under {datasets_dir}")
    ds = tmp_path / "voc"
    for sub in ("images", "annotations"):
        (ds / sub).mkdir(parents=True)
    stems = [f"raccoon-{i}" for i in range(1, 12)]
    for stem in stems:
        shutil.copy(raccoon / "images" / f"{stem}.jpg", ds / "images")
        shutil.copy(raccoon / "annotations" / f"{stem}.xml", ds / "annotations")
    images, annotations = ds / "images", ds / "annotations"
    (annotations / "raccoon-1.xml").unlink()
    os.mkfifo(annotations / "raccoon-1.xml")
    _locked(annotations / "raccoon-2.xml")
    with open(annotations / "raccoon-3.xml", "r+b") as fh:
        fh.truncate(17 * MiB)  # sparse: a 17 MiB file that takes no room
    (images / "raccoon-4.jpg").unlink()
    (images / "raccoon-4.jpg").symlink_to("gone.jpg")
    (images / "raccoon-5.jpg").unlink()
    (images / "raccoon-5.jpg").symlink_to("raccoon-5.jpg")
    os.rename(images / "raccoon-6.jpg", _raw(images, b"r\xe4ccoon-6.jpg"))
    os.rename(annotations / "raccoon-6.xml", _raw(annotations, b"r\xe4ccoon-6.xml"))

    code, output, report = _prepare(tmp_path, "detection", {
        "source": "voc", "path": "voc", "image_size": [64, 64], "class_names": ["raccoon"],
        "splits": {"train": 0.6, "val": 0.2, "test": 0.2}}, repo_root)
    assert code == 0, output
    assert "Traceback" not in output
    assert _skips(report) == {
        "voc/annotations/raccoon-1.xml": "not a regular file (named pipe)",
        "voc/annotations/raccoon-2.xml": "permission denied",
        "voc/annotations/raccoon-3.xml": "file too large",
        "voc/images/raccoon-4.jpg": "dangling symbolic link",
        "voc/images/raccoon-5.jpg": "symbolic link loop"}
    counts = report["source"]["annotations"]
    assert counts["annotations_unreadable"] == 3 and counts["images_unreadable"] == 2
    assert counts["samples"] == 6 and report["source"]["file_names_escaped"] == 2
    kept = sorted([*stems[6:], "r\\xe4ccoon-6"])
    assert _records(tmp_path, "detection") == kept
    reasons = {item["path"]: item["reason"] for item in report["skipped"]["items"]}
    assert reasons["voc/annotations/raccoon-1.xml"].endswith(
        "(its image voc/images/raccoon-1.jpg is not used)")
    assert "17.0 MiB, over the 16.0 MiB a VOC annotation file may be" in \
        reasons["voc/annotations/raccoon-3.xml"]


def test_an_unreadable_class_folder_is_one_line_through_the_cli(tmp_path, repo_root):
    """A whole class folder this user may not list: one error line naming it, nothing kept
    (a class silently missing would train a wrong model)."""
    for cls in ("cats", "dogs"):
        for i in range(2):
            _png(tmp_path / "ds" / cls / f"{i}.png", 60 * i)
    _locked(tmp_path / "ds" / "dogs")
    code, output, report = _prepare(tmp_path, "classification", {
        "source": "folder", "path": "ds", "image_size": [8, 8],
        "splits": {"train": 0.5, "val": 0.25, "test": 0.25}}, repo_root)
    assert code == 2, output
    lines = [ln for ln in output.splitlines() if ln.startswith("visionpipe:")]
    assert len(lines) == 1 and "ds/dogs: permission denied" in lines[0], output
    assert "chmod -R a+rX ds/dogs" in lines[0]
    assert "Traceback" not in output and report is None


# --- the shared walker and opener, in-process -----------------------------------------------

def test_non_regular_files_are_refused_before_opening():
    """A socket and a pipe: refused by stat, named by type (a short folder: socket paths are
    limited to about 100 bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="vp-"))
    try:
        os.mkfifo(folder / "pipe")
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(folder / "sock"))
            with pytest.raises(UnreadableFile) as info:
                check_file(folder / "sock")
            assert info.value.kind == "not a regular file (socket)"
        with pytest.raises(UnreadableFile) as info:
            read_file(folder / "pipe", 10, "label file")  # would block without the check
        assert info.value.kind == "not a regular file (named pipe)"
        with pytest.raises(UnreadableFile) as info:
            check_file(folder)
        assert info.value.kind == "not a regular file (folder)"
        with pytest.raises(UnreadableFile, match="file too large: 11 bytes, over the 10 bytes"):
            (folder / "big").write_bytes(b"x" * 11)
            read_file(folder / "big", 10, "label file")
        if Path("/dev/null").exists():
            with pytest.raises(UnreadableFile, match=r"not a regular file \(character device"):
                check_file(Path("/dev/null"))
    finally:
        shutil.rmtree(folder)


def test_yolo_pipe_label_and_data_yaml_are_named_not_hung(tmp_path):
    """YOLO: a label file that is a pipe leaves its image out (it is not a background image),
    counted as label_files_unreadable; a data.yaml that is a pipe is one error line."""
    root = tmp_path / "yolo"
    (root / "labels").mkdir(parents=True)
    (root / "data.yaml").write_text("names: [a]\n")
    for stem in ("a", "b"):
        _png(root / "images" / f"{stem}.png", size=(20, 20))
    (root / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    os.mkfifo(root / "labels" / "b.txt")
    (root / "images" / "loop").symlink_to("..", target_is_directory=True)
    _png(_raw(root / "images", b"\xff.png"), size=(20, 20))
    _raw(root / "labels", b"\xff.txt").write_text("0 0.5 0.5 0.4 0.4\n")
    ds = load_yolo(root, shown_root="y")
    assert [s.id for s in ds.samples] == ["\\xff", "a"]
    assert ds.counts["file_names_escaped"] == 2 and ds.counts["boxes"] == 2
    assert {s.path: s.kind for s in ds.skipped} == {
        "y/images/loop": "symbolic link loop",
        "y/labels/b.txt": "not a regular file (named pipe)"}
    assert ds.counts["label_files_unreadable"] == 1 and ds.counts["background_images"] == 0
    (root / "data.yaml").unlink()
    os.mkfifo(root / "data.yaml")
    with pytest.raises(DataError, match=r"^y/data\.yaml: cannot be read \(not a regular file "
                                        r"\(named pipe\)"):
        load_yolo(root, shown_root="y")


def test_coco_dangling_image_and_pipe_annotations(tmp_path):
    """COCO: a listed image that is a dangling link is unreadable, saying where it points; an
    annotations file that is a pipe is one error line, not "not found" and not a hang; a
    file_name with a lone surrogate is shown escaped."""
    root = tmp_path / "coco"
    _png(root / "images" / "a.png", size=(20, 20))
    (root / "images" / "b.png").symlink_to("nowhere.png")
    doc = {"images": [{"id": 1, "file_name": "a.png", "width": 20, "height": 20},
                      {"id": 2, "file_name": "b.png", "width": 20, "height": 20},
                      {"id": 3, "file_name": "c\udcff.png", "width": 20, "height": 20}],
           "annotations": [], "categories": [{"id": 1, "name": "x"}]}
    (root / "ann.json").write_text(json.dumps(doc))
    ds = load_coco(root / "ann.json", root / "images", root=root, shown_root="c")
    assert [s.id for s in ds.samples] == ["a"]
    kinds = {s.path: s.kind for s in ds.skipped}
    assert kinds == {"c/images/b.png": "dangling symbolic link",
                     "c/images/c\\xff.png": "no image for this annotation"}
    assert json.dumps([s.to_dict() for s in ds.skipped]).encode("utf-8")
    (root / "ann.json").unlink()
    os.mkfifo(root / "ann.json")
    with pytest.raises(DataError, match=r"^c/ann\.json: cannot read the annotations file "
                                        r"\(not a regular file \(named pipe\)"):
        load_coco(root / "ann.json", root / "images", root=root, shown_root="c")


@pytest.mark.parametrize("name", ["a\udcff", "two\nlines", "tab\there"])
def test_class_names_that_cannot_be_printed_on_a_line_are_refused(tmp_path, name):
    """data.yaml and COCO categories are text: a lone surrogate (a "\\udcff" escape) or a
    control character in a class name would break the report or the console line."""
    root = tmp_path / "yolo"
    _png(root / "images" / "a.png", size=(20, 20))
    (root / "data.yaml").write_text(yaml.safe_dump({"names": ["ok", name]}))
    with pytest.raises(DataError, match=r"^y/data\.yaml: names\[1\] = .*: holds a control "
                                        r"character or an escape that is no character"):
        load_yolo(root, shown_root="y")
    doc = {"images": [], "annotations": [], "categories": [{"id": 1, "name": name}]}
    (root / "ann.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"^c/ann\.json: categories\[0\]: name .* holds a "
                                        r"control character"):
        load_coco(root / "ann.json", root / "images", root=root, shown_root="c")


def test_a_folder_reached_twice_is_read_once(tmp_path):
    """Two links to one folder outside the dataset: its images are read once, the second link
    skipped as a folder already read (the same image twice could land in train and test)."""
    _png(tmp_path / "shared" / "s.png")
    root = tmp_path / "ds"
    root.mkdir()
    (root / "a").symlink_to(tmp_path / "shared", target_is_directory=True)
    (root / "b").symlink_to(tmp_path / "shared", target_is_directory=True)
    skipped = []
    files = Lister(root, "ds", skipped).walk(root)
    assert [f.relative_to(root).as_posix() for f in files] == ["a/s.png"]
    assert [(s.path, s.kind) for s in skipped] == [("ds/b", "folder already read")]
    assert "already read as ds/a" in skipped[0].reason


# --- names: property tests ------------------------------------------------------------------

def _unescape(text: str) -> bytes:
    """The name bytes :func:`shown_text` showed as ``text`` (for names without backslashes)."""
    out = re.sub(r"\\x([0-9a-f]{2})|\\u([0-9a-f]{4})",
                 lambda m: chr(0xDC00 + int(m[1], 16)) if m[1] and int(m[1], 16) >= 0x80
                 else chr(int(m[1] or m[2], 16)), text)
    return os.fsencode(out)


@given(st.binary(min_size=1, max_size=40))
def test_shown_text_is_valid_one_line_utf8_and_reversible(name):
    text = os.fsdecode(name)
    shown = shown_text(text)
    shown.encode("utf-8")  # no surrogate left
    assert len(shown.splitlines()) <= 1 and "\n" not in shown
    assert shown_text(shown) == shown
    if b"\\" not in name:
        assert _unescape(shown) == name  # one-to-one: the bytes come back
    if shown == text:
        assert name.decode("utf-8") == text


_names = st.binary(min_size=1, max_size=12).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b".."))


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_names, min_size=1, max_size=8, unique=True))
def test_any_byte_names_are_all_listed_and_shown(tmp_path, names):
    """Files with random byte names: each listed once, shown as valid UTF-8, the escaped ones
    counted; nothing dropped (hidden names included)."""
    root = Path(tempfile.mkdtemp(dir=tmp_path))
    for name in names:
        (_raw(root, name)).write_bytes(b"x")
    skipped = []
    lister = Lister(root, "r", skipped, hidden=True)
    files = lister.walk(root)
    assert skipped == []
    assert sorted(os.fsencode(f.name) for f in files) == sorted(names)
    shown = [lister.show(f) for f in files]
    for text in shown:
        text.encode("utf-8")
        assert "\n" not in text
    plain = sum(shown_text(os.fsdecode(n)) == os.fsdecode(n) for n in names)
    assert lister.escaped == len(names) - plain
    no_backslash = [s for s, f in zip(shown, files, strict=True)
                    if b"\\" not in os.fsencode(f.name)]
    assert len(set(no_backslash)) == len(no_backslash)


def test_a_tar_archive_with_names_that_are_not_utf8_keeps_them(tmp_path, repo_root):
    """A .tar.gz whose member names hold Latin-1 bytes (as tar keeps them from the system that
    made it): extracted, prepared, every image kept and named with escapes."""
    import tarfile

    src = tmp_path / "made" / "ds"
    for cls in ("cats", "dogs"):
        for i in range(6):
            name = b"caf\xe9-%d.png" % i if i < 2 else b"%d.png" % i
            _png(_raw(src / cls, name), value=40 * i + (cls == "dogs") * 7)
    project = tmp_path / "project"
    project.mkdir()
    with tarfile.open(project / "ds.tar.gz", "w:gz") as tar:
        tar.add(src, arcname="ds")
    code, output, report = _prepare(project, "classification", {
        "source": "folder", "path": "ds.tar.gz", "image_size": [16, 16],
        "splits": {"train": 0.5, "val": 0.25, "test": 0.25}}, repo_root)
    assert code == 0 and "Traceback" not in output, output
    ids = _records(project, "classification")
    assert len(ids) == 12
    assert {i for i in ids if "\\x" in i} == {f"{c}/caf\\xe9-{n}.png" for c in ("cats", "dogs")
                                             for n in (0, 1)}
    assert report["source"]["file_names_escaped"] == 4
