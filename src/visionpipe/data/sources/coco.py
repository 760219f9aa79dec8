"""COCO JSON detection datasets: an instances file and a folder of images.

Layout (as CVAT, Roboflow and the COCO site export it)::

    <root>/annotations/instances_default.json     (``annotations_file``)
    <root>/images/a.jpg                           (``images_dir``/<file_name>)

Rules:

- The file is a JSON object with ``images`` (``id``, ``file_name``, ``width``, ``height``),
  ``annotations`` (``image_id``, ``category_id``, ``bbox`` = x, y, width, height in pixels,
  optionally ``iscrowd``) and ``categories`` (``id``, ``name``). A file that is not JSON, lacks
  one of the three lists, or has unusable categories or duplicate image ids or file names is
  a one-line DataError naming the file (and the entry, ``categories[3]``).
- Class ids are the categories sorted by id, renumbered 0..K-1 (COCO's own ids need not be
  contiguous: 1..90 for 80 classes); class names are their names.
- A sample's id is ``file_name`` without its extension; the image is
  ``<images_dir>/<file_name>``. An image listed without a file is skipped and listed; an
  image file that the JSON does not list is skipped and listed (the JSON is the dataset).
- An image listed with no annotations is a background image: kept with zero boxes, counted.
- ``iscrowd: 1`` boxes are kept and flagged ``difficult``, as VOC's difficult objects are:
  evaluate then ignores them (a detection on a crowd region is neither a hit nor a false
  alarm), which is what COCO's own evaluation does with crowd regions. Dropping them instead
  (as ultralytics' converter does) would make every correct detection of a person inside a
  crowd a false alarm. Training sees them as ordinary boxes, as it sees difficult ones.
- An annotation entry that cannot be used (no bbox of 4 finite numbers, an image or category
  id that is not a whole number) or whose ``category_id`` is not a category leaves its image out:
  training on an image with one of its objects missing teaches the model that object is
  background. The image is skipped with a one-line reason naming the entry, and counted per
  reason. An annotation of an image id the file does not list is skipped and listed.
- The images folder is listed by :class:`~visionpipe.data.sources.files.Lister` (links
  followed, loops and unreadable folders skipped); an image file that cannot be opened (a
  dangling link, no permission, a pipe or device) is skipped with its reason and counted in
  ``images_unreadable``. The annotations file must be a regular file (no size cap: a real one
  can be hundreds of MB). Ids and shown paths are valid UTF-8: bytes that are not (a file
  name, or a ``file_name`` with lone surrogates) are written with backslash escapes.
- An image whose listed ``width``/``height`` disagree with the file is skipped, naming both
  sizes, as for VOC. Boxes are clipped and dropped as for VOC
  (:mod:`visionpipe.data.sources.boxes`). Images are read in their stored orientation.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path, PurePosixPath

from visionpipe.data.sources.boxes import Box, BoxDataset, dataset_of, make_sample
from visionpipe.data.sources.files import (
    Lister,
    Skipped,
    UnreadableFile,
    display_path,
    exists,
    image_extensions,
    read_file,
    reason_kind,
    shown_text,
)
from visionpipe.data.sources.image_folder import decode
from visionpipe.errors import DataError


def _quote(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _whole(value: object) -> int | None:
    """``value`` as an int if it is a whole number (not a bool), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _load_json(path: Path, shown: str) -> dict:
    try:
        data = read_file(path, None, "COCO annotations file")  # no cap: see the docstring
    except UnreadableFile as exc:
        raise DataError(f"{shown}: cannot read the annotations file ({exc.reason})") from None
    try:
        doc = json.loads(data)
    except json.JSONDecodeError as exc:
        raise DataError(f"{shown}: not JSON (line {exc.lineno}, column {exc.colno}: "
                        f"{exc.msg}); export the COCO annotations again") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{shown}: not UTF-8 JSON (byte {exc.object[exc.start]:#04x} at "
                        f"position {exc.start})") from None
    except RecursionError:
        raise DataError(f"{shown}: nested too deeply to read") from None
    if not isinstance(doc, dict):
        raise DataError(f"{shown}: the top level is a JSON {type(doc).__name__}, not an "
                        "object with images, annotations and categories (COCO instances)")
    missing = [k for k in ("images", "annotations", "categories")
               if not isinstance(doc.get(k), list)]
    if missing:
        raise DataError(f"{shown}: no list {', '.join(missing)}; a COCO instances file has "
                        "images, annotations and categories (a captions or keypoints-only "
                        "file is not one)")
    return doc


def _categories(doc: dict, shown: str) -> tuple[list[str], dict[int, int]]:
    """Class names in category-id order and category id -> class id."""
    by_id: dict[int, str] = {}
    for i, cat in enumerate(doc["categories"]):
        where = f"{shown}: categories[{i}]"
        if not isinstance(cat, dict):
            raise DataError(f"{where} is {_quote(cat)}, not an object with id and name")
        cid, name = _whole(cat.get("id")), cat.get("name")
        if cid is None:
            raise DataError(f"{where}: id {_quote(cat.get('id'))} is not a whole number")
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{where}: name {_quote(name)} is not a non-empty string")
        if shown_text(name.strip()) != name.strip():  # reports print it on a line
            raise DataError(f"{where}: name {_quote(name)} holds a control character or an "
                            "escape that is no character (a lone surrogate); give a class "
                            "name of printable text")
        if cid in by_id:
            raise DataError(f"{where}: id {cid} is given twice ({by_id[cid]!r} and "
                            f"{name.strip()!r}); each category needs its own id")
        by_id[cid] = name.strip()
    if not by_id:
        raise DataError(f"{shown}: categories is empty; a detection dataset needs at least "
                        "one category")
    names = [by_id[c] for c in sorted(by_id)]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"{shown}: categories name {', '.join(map(repr, repeated))} more "
                        "than once; each class needs its own name")
    return names, {c: i for i, c in enumerate(sorted(by_id))}


def _images(doc: dict, shown: str, skipped: list[Skipped], counts: Counter
            ) -> tuple[dict[int, tuple[str, int, int]], set[int]]:
    """image id -> (file_name, width, height), and the ids of entries that were skipped as
    unusable (and counted)."""
    out: dict[int, tuple[str, int, int]] = {}
    left_out: set[int] = set()
    files: dict[str, int] = {}
    for i, entry in enumerate(doc["images"]):
        where = f"{shown}: images[{i}]"
        why = None
        if not isinstance(entry, dict):
            why = f"is {_quote(entry)}, not an object"
        else:
            iid, name = _whole(entry.get("id")), entry.get("file_name")
            width, height = _whole(entry.get("width")), _whole(entry.get("height"))
            if iid is None:
                why = f"id {_quote(entry.get('id'))} is not a whole number"
            elif not isinstance(name, str) or not name.strip():
                why = f"file_name {_quote(name)} is not a file name"
            elif (PurePosixPath(name.replace("\\", "/")).is_absolute()
                  or ".." in PurePosixPath(name.replace("\\", "/")).parts):
                why = f"file_name {_quote(name)} leaves the images folder"
            elif width is None or height is None or width < 1 or height < 1:
                why = (f"width/height {_quote(entry.get('width'))}/"
                       f"{_quote(entry.get('height'))} are not positive whole numbers")
        if why is not None:
            if isinstance(entry, dict) and _whole(entry.get("id")) is not None:
                left_out.add(_whole(entry.get("id")))
            counts["image_entries_malformed"] += 1
            skipped.append(Skipped(where, f"malformed image entry: {why}; its annotations "
                                   "are not used", "malformed image entry"))
            continue
        name = name.replace("\\", "/")
        if iid in out:
            raise DataError(f"{where}: id {iid} is also the id of {out[iid][0]!r}; image ids "
                            "must be unique")
        if name in files:
            raise DataError(f"{where}: file_name {name!r} is listed twice (ids {files[name]} "
                            f"and {iid}); list each image once")
        out[iid], files[name] = (name, width, height), iid
    return out, left_out - set(out)


def _bad_annotation(ann: object, category: dict[int, int]) -> tuple[str, str] | None:
    """(kind, why) if annotation ``ann`` (with a known image) cannot be used, else None."""
    bbox = ann.get("bbox")
    if (not isinstance(bbox, list) or len(bbox) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in bbox)):
        return "malformed annotation", f"bbox {_quote(bbox)} is not 4 finite numbers x, y, w, h"
    cid = _whole(ann.get("category_id"))
    if cid is None:
        return ("malformed annotation",
                f"category_id {_quote(ann.get('category_id'))} is not a whole number")
    if cid not in category:
        return "unknown class id", f"category_id {cid} is not one of the categories"
    crowd = ann.get("iscrowd", 0)
    if crowd not in (0, 1) or isinstance(crowd, float):
        return "malformed annotation", f"iscrowd {_quote(crowd)} is not 0 or 1"
    return None


def load_coco(annotations: str | os.PathLike, images_dir: str | os.PathLike, *,
              root: str | os.PathLike | None = None, shown_root: str | None = None
              ) -> BoxDataset:
    """Every image of a COCO instances file as a sample (see the module docstring).

    Paths in messages and reports are written relative to ``root`` (default: the two paths'
    common parent), under ``shown_root`` (default: ``root`` as given). Raises a one-line
    DataError for a file that cannot be used at all and when no image is usable.
    """
    annotations, images_dir = Path(annotations), Path(images_dir)
    root = Path(root) if root is not None else Path(os.path.commonpath(
        [annotations.absolute(), images_dir.absolute()]))
    shown = shown_root if shown_root is not None else str(root)
    annotations, images_dir = annotations.absolute(), images_dir.absolute()
    root = root.absolute()

    def show(path: Path) -> str:
        try:
            return display_path(root, shown, path)
        except ValueError:  # given outside root (an absolute annotations_file)
            return shown_text(str(path))

    if not exists(annotations):  # a pipe or a dangling link: _load_json says what it is
        raise DataError(f"{show(annotations)}: COCO annotations file not found; set "
                        "annotations_file to the instances JSON (e.g. "
                        "annotations/instances_default.json)")
    if not images_dir.is_dir():
        raise DataError(f"{show(images_dir)}: image folder not found; images are read from "
                        "images_dir/<file_name>")
    shown_json = show(annotations)
    doc = _load_json(annotations, shown_json)
    names, category = _categories(doc, shown_json)

    skipped: list[Skipped] = []
    counts: Counter = Counter({key: 0 for key in (
        "images", "image_entries", "annotations", "samples", "boxes", "boxes_clipped",
        "boxes_dropped", "difficult_boxes", "images_without_objects",
        "background_images", "images_without_annotation", "annotations_without_image",
        "image_entries_malformed", "annotations_unknown_image", "images_with_malformed_annotation",
        "images_with_unknown_class", "images_unreadable", "images_size_mismatch")})
    entries, left_out = _images(doc, shown_json, skipped, counts)
    counts["image_entries"], counts["annotations"] = len(doc["images"]), len(doc["annotations"])

    per_image: dict[int, list[tuple[int, dict]]] = {iid: [] for iid in entries}
    bad: dict[int, tuple[str, str]] = {}  # image id -> (kind, first reason)
    for i, ann in enumerate(doc["annotations"]):
        where = f"annotations[{i}]"
        iid = _whole(ann.get("image_id")) if isinstance(ann, dict) else None
        if iid in left_out:  # its image entry is skipped, saying so
            continue
        if not isinstance(ann, dict) or iid is None or iid not in per_image:
            counts["annotations_unknown_image"] += 1
            what = (f"is {_quote(ann)}, not an object" if not isinstance(ann, dict) else
                    f"image_id {_quote(ann.get('image_id'))} is not an image of this file")
            skipped.append(Skipped(f"{shown_json}: {where}", f"annotation of no listed image: "
                                   f"{what}", "annotation of no listed image"))
            continue
        problem = _bad_annotation(ann, category)
        if problem is not None and iid not in bad:
            label = f"{where}" + (f" (id {ann['id']})" if _whole(ann.get("id")) is not None
                                  else "")
            bad[iid] = (problem[0], f"{label}: {problem[1]}")
        per_image[iid].append((i, ann))

    extensions = image_extensions()
    listed = {images_dir / name for name, _, _ in entries.values()}
    lister = Lister(root, shown, skipped)
    for path in lister.walk(images_dir):
        if path.suffix.lower() not in extensions:
            continue  # a folder of images may hold other files; only images are counted
        counts["images"] += 1
        if path not in listed:
            counts["images_without_annotation"] += 1
            skipped.append(Skipped(show(path), f"image not listed in {shown_json}; COCO lists "
                                   "every image of the dataset under images",
                                   "image not listed in the annotations file"))

    samples = []
    for iid, (name, width, height) in sorted(entries.items(), key=lambda e: e[1][0]):
        path = images_dir / name
        shown_image = show(path)
        if not exists(path):  # a pipe or dangling link is unreadable, said by decode
            counts["annotations_without_image"] += 1
            skipped.append(Skipped(shown_image, f"no image file for {shown_json}'s image id "
                                   f"{iid}; looked for {shown_image}", "no image for this "
                                   "annotation"))
            continue
        if iid in bad:
            kind, why = bad[iid]
            counts["images_with_malformed_annotation" if kind == "malformed annotation"
                   else "images_with_unknown_class"] += 1
            skipped.append(Skipped(shown_image, f"{kind}: {shown_json} {why}; the image is "
                                   "left out", kind))
            continue
        try:
            size = decode(path, lambda img: img.size, load=False)
        except DataError as exc:
            counts["images_unreadable"] += 1
            skipped.append(Skipped(shown_image, f"{exc} (its annotations in {shown_json} are "
                                   "not used)", reason_kind(str(exc))))
            continue
        if size != (width, height):
            counts["images_size_mismatch"] += 1
            skipped.append(Skipped(shown_image, f"the image is {size[0]}x{size[1]} but "
                                   f"{shown_json} gives {width}x{height} for image id {iid}; the "
                                   "boxes may belong to another resolution: fix width/height "
                                   "or annotate the image again",
                                   "image size differs from its annotation"))
            continue
        objects = []
        for i, ann in per_image[iid]:
            x, y, w, h = (float(v) for v in ann["bbox"])
            crowd = ann.get("iscrowd", 0) == 1
            objects.append(Box(names[category[_whole(ann["category_id"])]], x, y, x + w, y + h,
                               difficult=crowd, where=f"annotations[{i}]"))
        samples.append(make_sample(shown_text(PurePosixPath(name).with_suffix("").as_posix()), path,
                                   annotations, width, height, objects,
                                   {n: i for i, n in enumerate(names)},
                                   shown_image=shown_image, shown_annotation=shown_json,
                                   background=not objects))
    samples.sort(key=lambda s: s.id)  # as VOC and YOLO order them (by id, not file name)
    if lister.escaped:
        counts["file_names_escaped"] = lister.escaped
    return dataset_of(names, samples, skipped, counts, shown_json, f"the {len(entries)} listed")
