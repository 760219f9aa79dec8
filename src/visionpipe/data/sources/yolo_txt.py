"""YOLO txt detection folders, the layout ultralytics reads.

Layouts (``images`` and ``labels`` are ``images_dir`` and ``labels_dir``)::

    <root>/data.yaml
    <root>/images/a.jpg                <root>/labels/a.txt            (one folder)
    <root>/images/train/b.jpg          <root>/labels/train/b.txt      (ultralytics' split folders)
    <root>/train/images/c.jpg          <root>/train/labels/c.txt      (Roboflow's export)

The images folder is ``<root>/images``, or else every ``<root>/<split>/images``; it is read
with its sub-folders, and each image's label file is the same path under the labels folder
with ``.txt`` (ultralytics' ``/images/`` -> ``/labels/`` rule). A sample's id is its path
below the images folder without extension, after the split folder if any (``a``, ``train/b``,
``train/c``). The dataset's own train/val/test folders are pooled; prepare splits by shares.

Rules:

- Class names come from ``data.yaml``: ``names`` as a list or an ``{id: name}`` mapping with
  ids 0..n-1, and ``nc`` (which must agree when both are given; ``nc`` alone names the classes
  ``class_0`` ... as ultralytics does). Without a data.yaml, ``class_names`` gives them.
  A data.yaml that cannot be used is a DataError naming the file and the key.
- A label line is ``class cx cy w h``, normalised to the image's width and height (0..1), or a
  polygon ``class x1 y1 x2 y2 ...`` (3 points or more) whose bounding box is used, as
  ultralytics does. Pixels are ``(cx - w/2) * width`` etc., rounded to 1/1000 px: label files
  store about 6 digits, and the rounding brings a box drawn on whole pixels back onto them.
- An image without a label file is a background image (kept with zero boxes, counted), as in
  ultralytics; so is an empty label file. A label file without an image is skipped and listed.
- A label file with a malformed line (not 5 numbers nor a polygon, a non-number, a class that
  is not a whole number, a coordinate outside -1..2, which is pixels rather than a share of the
  image) or a class id outside the names leaves its image out: training on an image with one
  of its objects missing teaches the model that object is background. The file is skipped
  with a one-line reason naming the first bad line, and counted per reason.
- A label file that cannot be opened (a dangling link, no permission, a pipe or device, over
  16 MiB: :func:`~visionpipe.data.sources.files.read_file`) leaves its image out too, counted
  as ``label_files_unreadable``: an image whose labels exist but cannot be read is not a
  background image. Folders are listed by :class:`~visionpipe.data.sources.files.Lister`
  (links followed, loops and unreadable folders skipped); a file name that is not UTF-8 is
  kept, its id and shown paths written with backslash escapes.
- Boxes reaching outside the image are clipped, boxes without area dropped (counted and listed
  with their file and line), as for VOC (:mod:`visionpipe.data.sources.boxes`). YOLO has no
  ``difficult`` flag. Images are read in their stored orientation, as for VOC.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import yaml

from visionpipe.data.sources.boxes import Box, BoxDataset, dataset_of, make_sample
from visionpipe.data.sources.files import (
    DATA_YAML_LIMIT,
    MAX_LISTED,
    YOLO_LABEL_LIMIT,
    Lister,
    Skipped,
    UnreadableFile,
    display_path,
    exists,
    image_extensions,
    quoted,
    read_file,
    reason_kind,
    shown_text,
)
from visionpipe.data.sources.image_folder import decode
from visionpipe.errors import DataError

COORD_RANGE = (-1.0, 2.0)  # a normalised coordinate outside this is pixels, not a share


class _BadLabel(Exception):
    """A label file that leaves its image out: kind, and the one-line reason."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def _quote(text: str, limit: int = 30) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _shown(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# --- data.yaml ----------------------------------------------------------------------------

def _names_from(data: object, shown: str) -> list[str]:
    if not isinstance(data, dict):
        raise DataError(f"{shown}: expected a mapping with 'names' (and 'nc'), found "
                        f"{type(data).__name__}")
    names, nc = data.get("names"), data.get("nc")
    if nc is not None and (isinstance(nc, bool) or not isinstance(nc, int) or nc < 1):
        raise DataError(f"{shown}: nc = {_shown(nc)}: expected a whole number of "
                        "classes >= 1")
    if names is None:
        if nc is None:
            raise DataError(f"{shown}: no 'names'; give the class names as a list "
                            "(names: [cat, dog]) or a mapping (names: {0: cat, 1: dog})")
        return [f"class_{i}" for i in range(nc)]  # as ultralytics names them
    if isinstance(names, dict):
        keys = list(names)
        if any(isinstance(k, bool) or not isinstance(k, int) for k in keys) or sorted(
                keys) != list(range(len(keys))):
            raise DataError(f"{shown}: names has ids {_shown(keys)}; a mapping "
                            "needs the class ids 0..n-1, each once (names: {0: cat, 1: dog})")
        names = [names[i] for i in range(len(keys))]
    if not isinstance(names, list) or not names:
        raise DataError(f"{shown}: names = {_shown(names)}: expected a non-empty "
                        "list of class names, or an {id: name} mapping")
    out = []
    for i, name in enumerate(names):
        if isinstance(name, bool) or not isinstance(name, (str, int, float)) or not str(
                name).strip():
            raise DataError(f"{shown}: names[{i}] = {_shown(name)}: expected a "
                            "non-empty class name")
        if shown_text(str(name).strip()) != str(name).strip():  # reports print it on a line
            raise DataError(f"{shown}: names[{i}] = {_shown(name)}: holds a control character "
                            "or an escape that is no character (a lone surrogate); give a "
                            "class name of printable text")
        out.append(str(name).strip())
    repeated = sorted({n for n in out if out.count(n) > 1})
    if repeated:
        raise DataError(f"{shown}: names gives {', '.join(map(repr, repeated))} more than "
                        "once; each class needs its own name")
    if nc is not None and nc != len(out):
        raise DataError(f"{shown}: nc = {nc} but names lists {len(out)} class(es); make "
                        "them agree (or leave nc out)")
    return out


def read_data_yaml(path: Path, shown: str) -> list[str]:
    """The class names of an ultralytics data.yaml; any problem is a one-line DataError."""
    try:
        data = read_file(path, DATA_YAML_LIMIT, "data.yaml")
    except UnreadableFile as exc:
        raise DataError(f"{shown}: cannot be read ({exc.reason})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{shown}: cannot be read (not UTF-8: byte "
                        f"{exc.object[exc.start]:#04x} at position {exc.start}); save it as "
                        "UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "not YAML"
        raise DataError(f"{shown}: YAML syntax error{where}: {problem}") from None
    except RecursionError:
        raise DataError(f"{shown}: nested too deeply to read") from None
    return _names_from(data, shown)


# --- label files --------------------------------------------------------------------------

def _number(token: str, line: int) -> float:
    try:
        value = float(token)
    except ValueError:
        raise _BadLabel("malformed label file",
                        f"line {line}: {_quote(token)} is not a number") from None
    if not math.isfinite(value):
        raise _BadLabel("malformed label file",
                        f"line {line}: {_quote(token)} is not a finite number")
    return value


def parse_label_line(text: str, line: int, names: Sequence[str], width: int, height: int
                     ) -> Box:
    """One ``class cx cy w h`` (or polygon) line as a Box in pixels of a width x height image.
    Raises _BadLabel with the kind and a reason naming the line."""
    tokens = text.split()
    if len(tokens) != 5 and (len(tokens) < 7 or len(tokens) % 2 == 0):
        raise _BadLabel("malformed label file", f"line {line}: {len(tokens)} values; expected "
                        "5 ('class cx cy w h', normalised 0..1) or a polygon 'class x1 y1 x2 "
                        "y2 ...' of 3 points or more")
    values = [_number(t, line) for t in tokens]
    cls = values[0]
    if not cls.is_integer():
        raise _BadLabel("malformed label file",
                        f"line {line}: class {_quote(tokens[0])} is not a whole number")
    coords = values[1:]
    bad = next((t for t, v in zip(tokens[1:], coords, strict=True)
                if not COORD_RANGE[0] <= v <= COORD_RANGE[1]), None)
    if bad is not None:
        raise _BadLabel("malformed label file",
                        f"line {line}: coordinate {_quote(bad)} is not normalised (0..1 of the "
                        "image's width or height; pixels must be divided by them)")
    if not 0 <= cls < len(names):
        raise _BadLabel("unknown class id", f"line {line}: class id {int(cls)} is not in the "
                        f"{len(names)} class names (ids 0..{len(names) - 1})")
    if len(tokens) == 5:
        cx, cy, w, h = coords
        corners = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
    else:
        xs, ys = coords[0::2], coords[1::2]
        corners = (min(xs), min(ys), max(xs), max(ys))
    x0, y0, x1, y1 = (round(v * s, 3) for v, s in zip(corners, (width, height) * 2,
                                                       strict=True))
    return Box(names[int(cls)], x0, y0, x1, y1, where=f"line {line}")


def read_label_file(path: Path, names: Sequence[str], width: int, height: int) -> list[Box]:
    """Every box of a label file; _BadLabel on the first bad line (saying how many are bad).
    """
    try:
        text = read_file(path, YOLO_LABEL_LIMIT, "YOLO label file").decode("utf-8-sig")
    except UnreadableFile as exc:
        raise _BadLabel(exc.kind, exc.detail) from None
    except UnicodeDecodeError as exc:
        raise _BadLabel("malformed label file", f"not UTF-8 text (byte "
                        f"{exc.object[exc.start]:#04x} at position {exc.start})") from None
    boxes, bad = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            boxes.append(parse_label_line(line, number, names, width, height))
        except _BadLabel as exc:
            bad.append(exc)
    if bad:
        first = next((b for b in bad if b.kind == "malformed label file"), bad[0])
        more = f" (and {len(bad) - 1} more bad line(s))" if len(bad) > 1 else ""
        raise _BadLabel(first.kind, first.reason + more)
    return boxes


# --- a dataset ----------------------------------------------------------------------------

def _image_folders(root: Path, images: str, labels: str, lister: Lister
                   ) -> list[tuple[Path, Path, str]]:
    """(images folder, its labels folder, id prefix): <root>/images, else <root>/*/images."""
    if (root / images).is_dir():
        return [(root / images, root / labels, "")]
    return [(d / images, d / labels, d.name + "/")
            for d, is_dir in lister.listing(root) if is_dir and (d / images).is_dir()]


def load_yolo(root: str | os.PathLike, *, images: str = "images", labels: str = "labels",
              data_yaml: str = "data.yaml", class_names: Sequence[str] | None = None,
              shown_root: str | None = None) -> BoxDataset:
    """Every image of a YOLO txt dataset as a sample (see the module docstring).

    Paths in messages and reports are written under ``shown_root`` (default: ``root`` as
    given). Raises a one-line DataError for a dataset that cannot be read at all: no images
    folder, no usable class names, two images sharing one label file, no usable image.
    """
    root = Path(root)
    shown = shown_root if shown_root is not None else str(root)
    if not root.is_dir():
        raise DataError(f"{shown}: folder not found; expected {shown}/{data_yaml}, "
                        f"{shown}/{images}/ and {shown}/{labels}/ (YOLO txt, as ultralytics "
                        "reads it)")
    yaml_path = root / data_yaml
    if exists(yaml_path):  # a pipe or a dangling link is an error saying so, not "not found"
        names = read_data_yaml(yaml_path, display_path(root, shown, yaml_path))
        if class_names is not None and list(class_names) != names:
            raise DataError(f"{shown}: class_names {list(class_names)} disagree with "
                            f"{data_yaml}'s names {names}; give one of them (set class_names "
                            "to null to use data.yaml)")
    elif class_names is not None:
        names = list(class_names)
    else:
        raise DataError(f"{shown}/{data_yaml}: not found, and no class_names given; the "
                        "class names of a YOLO dataset come from its data.yaml (names: [cat, "
                        "dog])")
    skipped: list[Skipped] = []
    lister = Lister(root, shown, skipped)
    folders = _image_folders(root, images, labels, lister)
    if not folders:
        raise DataError(f"{shown}: no {images}/ folder, neither {shown}/{images}/ nor "
                        f"{shown}/<split>/{images}/; expected the images there and a label "
                        f"file for each in the {labels}/ folder beside it")

    extensions = image_extensions()
    counts: Counter = Counter({key: 0 for key in (
        "images", "label_files", "samples", "boxes", "boxes_clipped", "boxes_dropped",
        "difficult_boxes", "images_without_objects",
        "background_images", "label_files_without_image", "label_files_malformed",
        "label_files_unknown_class", "label_files_unreadable", "images_unreadable")})
    found: dict[str, tuple[Path, Path]] = {}  # id -> (image, label file)
    by_label: dict[Path, list[Path]] = {}
    for image_dir, label_dir, prefix in folders:
        for path in lister.walk(image_dir):
            rel = path.relative_to(image_dir)
            if path.suffix.lower() not in extensions:
                skipped.append(Skipped(display_path(root, shown, path), "not an image file "
                                       f"(extension {quoted(path.suffix)})",
                                       "not an image file"))
                continue
            label = (label_dir / rel).with_suffix(".txt")
            by_label.setdefault(label, []).append(path)
            found[prefix + rel.with_suffix("").as_posix()] = (path, label)  # shown later
    shared = [paths for paths in by_label.values() if len(paths) > 1]
    if shared:
        listed = "; ".join(", ".join(display_path(root, shown, p) for p in paths)
                           for paths in shared[:MAX_LISTED])
        raise DataError(f"{shown}: images that share one label file (same name, other "
                        f"extension): {listed}; keep one image per name")
    counts["images"] = len(found)
    for image_dir, label_dir, _ in folders:
        for path in lister.walk(label_dir) if label_dir.is_dir() else ():
            if path.suffix == ".cache":  # ultralytics' own label cache
                continue
            shown_label = display_path(root, shown, path)
            if path.suffix.lower() != ".txt":
                skipped.append(Skipped(shown_label, "not a YOLO label file (extension "
                                       f"{quoted(path.suffix)}, expected .txt)",
                                       "not a YOLO label file"))
                continue
            counts["label_files"] += 1
            if path not in by_label:
                counts["label_files_without_image"] += 1
                looked = display_path(root, shown, image_dir / path.relative_to(
                    label_dir).with_suffix(""))
                skipped.append(Skipped(shown_label, "label file without image; looked for "
                                       f"{looked}.* (any image extension)",
                                       "label file without image"))

    samples = []
    for sample_id, (path, label) in sorted(found.items(), key=lambda kv: shown_text(kv[0])):
        shown_image = display_path(root, shown, path)
        shown_label = display_path(root, shown, label)
        try:
            width, height = decode(path, lambda img: img.size, load=False)
        except DataError as exc:
            counts["images_unreadable"] += 1
            skipped.append(Skipped(shown_image, f"{exc} (its labels {shown_label} are not "
                                   "used)", reason_kind(str(exc))))
            continue
        objects: list[Box] = []
        labelled = exists(label)  # a pipe or dangling link there is no background image
        if labelled:
            try:
                objects = read_label_file(label, names, width, height)
            except _BadLabel as exc:
                key = {"malformed label file": "label_files_malformed",
                       "unknown class id": "label_files_unknown_class"}.get(
                           exc.kind, "label_files_unreadable")
                counts[key] += 1
                skipped.append(Skipped(shown_label, f"{exc.kind}: {exc.reason}; its image "
                                       f"{shown_image} is left out", exc.kind))
                continue
        samples.append(make_sample(shown_text(sample_id), path, label, width, height, objects,
                                   {n: i for i, n in enumerate(names)},
                                   shown_image=shown_image, shown_annotation=shown_label,
                                   background=not labelled))
    if lister.escaped:
        counts["file_names_escaped"] = lister.escaped
    return dataset_of(names, samples, skipped, counts, shown, f"the {len(found)} found")
