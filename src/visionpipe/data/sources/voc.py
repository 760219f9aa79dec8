"""PASCAL VOC detection folders: ``<images>/<stem>.<ext>`` + ``<annotations>/<stem>.xml``.

Layout (as exported by LabelImg and CVAT; the two folders may also be one and the same)::

    <root>/images/raccoon-1.jpg    <root>/annotations/raccoon-1.xml
    <root>/images/raccoon-2.png    <root>/annotations/raccoon-2.xml

Rules:

- XML is parsed with defusedxml: a ``<!DOCTYPE>``, entity declarations and external references
  are refused for safety (billion laughs, ``SYSTEM "file:///etc/passwd"``); annotation tools
  never write them. Every problem in a file is a DataError naming the file.
- An image and its annotation are paired by file stem; ``<filename>`` inside the XML is not used.
  An image without an XML is *not* an image without objects: it is skipped and reported with the
  path looked for, as is an XML without an image. Unreadable images (empty, not an image) are
  skipped and reported like the image-folder source does; sizes are read without decoding.
- An XML whose ``<size>`` disagrees with the image's real (stored) size is skipped with both
  sizes: its boxes may belong to another resolution.
- Boxes are ``xmin, ymin, xmax, ymax`` in pixels as written, clipped to ``0..width`` and
  ``0..height`` (and counted); boxes with inverted corners, zero width or height, or nothing left
  inside the image are dropped, counted and listed per file. An XML with no ``<object>`` is a
  legitimate negative image (kept, zero boxes). ``<difficult>1</difficult>`` objects are kept
  and flagged (evaluation ignores them, as VOC does).
- An annotation file that cannot be opened (a dangling link, no permission, a pipe or device,
  over 16 MiB: :func:`~visionpipe.data.sources.files.read_file`) is skipped with its reason
  and its image left out (``annotations_unreadable``): it was never read, so it is not known to
  be wrong. Files are listed by :class:`~visionpipe.data.sources.files.Lister`; a file name that
  is not UTF-8 is kept, its id and shown paths written with backslash escapes.
- Malformed annotation files and objects whose class is not in a given class list make the
  dataset wrong: they are collected over all files and raised as one DataError, sorted by file.
  Without a class list the classes are the sorted names found in the paired annotation files.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.etree.ElementTree import Element, ParseError

import defusedxml.ElementTree as SafeET
from defusedxml import (
    DefusedXmlException,
    DTDForbidden,
    EntitiesForbidden,
    ExternalReferenceForbidden,
)

from visionpipe.data.sources.boxes import (
    Box,
    BoxDataset,
    BoxSample,
    dropped_lines,
    make_sample,
    recount,
)
from visionpipe.data.sources.files import (
    MAX_LISTED,
    VOC_XML_LIMIT,
    Lister,
    Skipped,
    UnreadableFile,
    display_path,
    image_extensions,
    list_folder,
    quoted,
    read_file,
    reason_kind,
    shown_text,
)
from visionpipe.data.sources.image_folder import decode
from visionpipe.errors import DataError

_REFUSED = ("is refused for safety (entity expansion and external references can exhaust "
            "memory or leak local files); annotation tools never write it: export the file "
            "again without a <!DOCTYPE>")


@dataclass(frozen=True)
class VocObject:
    """One ``<object>``: class name (stripped) and its box's corners as written."""

    name: str
    xmin: float
    ymin: float
    xmax: float
    ymax: float
    difficult: bool = False
    truncated: bool = False


@dataclass(frozen=True)
class Annotation:
    """One parsed VOC annotation file."""

    path: Path
    filename: str | None
    width: int
    height: int
    depth: int | None
    objects: tuple[VocObject, ...]


# What load_voc returns: the sample and dataset shared with the YOLO and COCO sources.
VocSample = BoxSample
VocDataset = BoxDataset


# --- one annotation file ------------------------------------------------------------------

def _quote(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _parse_xml(data: bytes, shown: str) -> Element:
    try:
        return SafeET.fromstring(data, forbid_dtd=True, forbid_entities=True,
                                 forbid_external=True)
    except DTDForbidden:
        raise DataError(f"{shown}: declares a <!DOCTYPE>, which {_REFUSED}") from None
    except EntitiesForbidden:
        raise DataError(f"{shown}: declares an XML entity, which {_REFUSED}") from None
    except ExternalReferenceForbidden:
        raise DataError(f"{shown}: refers to an external resource, which {_REFUSED}") from None
    except DefusedXmlException:
        raise DataError(f"{shown}: uses an XML feature that {_REFUSED}") from None
    except ParseError as exc:  # the message carries expat's "line L, column C"
        raise DataError(f"{shown}: malformed XML ({exc}); fix the file or export it "
                        "again") from None
    except (LookupError, ValueError, TypeError) as exc:  # unusable encoding declaration
        detail = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise DataError(f"{shown}: malformed XML, its text cannot be decoded ({detail}); save "
                        "it as UTF-8") from None


def _text(parent: Element, tag: str) -> str | None:
    """Stripped text of ``parent``'s first ``<tag>`` child, or None when there is none."""
    child = parent.find(tag)
    return None if child is None else (child.text or "").strip()


def _number(parent: Element, tag: str, where: str) -> float:
    text = _text(parent, tag)
    if text is None:
        raise DataError(f"{where} has no <{tag}>")
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{where}: <{tag}> is {_quote(text)}, not a number") from None
    if not math.isfinite(value):
        raise DataError(f"{where}: <{tag}> is {_quote(text)}, not a finite number")
    return value


def _pixels(parent: Element, tag: str, where: str, minimum: int = 1) -> int:
    value = _number(parent, tag, where)
    if value < minimum or not value.is_integer():
        kind = "positive" if minimum > 0 else "non-negative"
        raise DataError(f"{where}: <{tag}> is {value:g}, not a {kind} whole number of pixels")
    return int(value)


def _flag(parent: Element, tag: str, where: str) -> bool:
    text = _text(parent, tag)
    if text is None or text.lower() in ("", "0", "false", "no"):
        return False
    if text.lower() in ("1", "true", "yes"):
        return True
    raise DataError(f"{where}: <{tag}> is {_quote(text)}; use 1 or 0")


def _object(element: Element, index: int, shown: str) -> VocObject:
    where = f"{shown}: object {index}"
    name = _text(element, "name")
    if not name:
        raise DataError(f"{where} has no <name>" if name is None else f"{where}: <name> is "
                        "empty")
    where = f"{where} ({_quote(name)})"
    box = element.find("bndbox")
    if box is None:
        raise DataError(f"{where} has no <bndbox>; give <bndbox> with xmin, ymin, xmax, ymax")
    corners = [_number(box, tag, f"{where} <bndbox>") for tag in ("xmin", "ymin", "xmax", "ymax")]
    return VocObject(name, *corners, difficult=_flag(element, "difficult", where),
                     truncated=_flag(element, "truncated", where))


def parse_annotation(path: str | os.PathLike, *, shown: str | None = None) -> Annotation:
    """Parse one PASCAL VOC XML file; any problem is a DataError naming the file.

    ``shown`` is how the file is written in messages (default: ``path`` as given).
    """
    path = Path(path)
    shown = shown if shown is not None else str(path)
    try:  # bytes: the parser honours the XML encoding declaration
        data = read_file(path, VOC_XML_LIMIT, "VOC annotation file")
    except UnreadableFile as exc:
        raise UnreadableFile(exc.kind, exc.detail, f"{shown}: cannot read the annotation file "
                             f"({exc.reason})") from None
    root = _parse_xml(data, shown)
    if root.tag != "annotation":
        raise DataError(f"{shown}: root element is <{_quote(str(root.tag))[1:-1]}>, not "
                        "<annotation>; expected PASCAL VOC XML (as LabelImg or CVAT export it)")
    size = root.find("size")
    if size is None:
        raise DataError(f"{shown}: no <size>; VOC annotations give the image's <size> with "
                        "<width> and <height>")
    where = f"{shown}: <size>"
    width, height = _pixels(size, "width", where), _pixels(size, "height", where)
    depth = None if not _text(size, "depth") else _pixels(size, "depth", where, minimum=0)
    objects = tuple(_object(el, i, shown) for i, el in enumerate(root.findall("object"), 1))
    return Annotation(path=path, filename=_text(root, "filename") or None, width=width,
                      height=height, depth=depth, objects=objects)


# --- a dataset ----------------------------------------------------------------------------

def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) as stored, read from the header without decoding the pixels."""
    return decode(path, lambda img: img.size, load=False)


def _list_annotations(folder: Path, root: Path, shown: str, same_folder: bool,
                      problems: list[str], skipped: list[Skipped], lister: Lister
                      ) -> dict[str, Path]:
    """``stem -> file`` for the .xml files directly in ``folder``; the rest to ``skipped``."""
    by_stem: dict[str, list[Path]] = {}
    name = shown_text(folder.name)
    for path, is_dir in lister.listing(folder):
        suffix = path.suffix.lower()
        if same_folder and suffix != ".xml":
            continue  # in a shared folder, the image listing reports everything else
        if is_dir:
            lister.note(path)
            skipped.append(Skipped(display_path(root, shown, path),
                                   f"folder inside {name}/ is not read; put the .xml "
                                   f"files directly in {name}/", "folder not read"))
        elif suffix != ".xml":
            skipped.append(Skipped(display_path(root, shown, path), "not a VOC annotation file "
                                   f"(extension {quoted(path.suffix)}, expected .xml)",
                                   "not a VOC annotation file"))
        else:
            by_stem.setdefault(path.stem, []).append(path)
    for stem, paths in by_stem.items():
        if len(paths) > 1:
            names = ", ".join(display_path(root, shown, p) for p in paths)
            problems.append(f"{names}: {len(paths)} annotation files share the name "
                            f"{quoted(stem)}; keep one per image")
    return {stem: paths[0] for stem, paths in by_stem.items()}


def _check_class_names(class_names: Sequence[str] | None) -> list[str] | None:
    if class_names is None:
        return None
    names = list(class_names) if not isinstance(class_names, str) else [class_names]
    bad = [repr(n) for n in names if not isinstance(n, str) or not n.strip() or n != n.strip()]
    repeated = sorted({n for n in names if isinstance(n, str) and names.count(n) > 1})
    if not names or bad or repeated:
        detail = ("it is empty" if not names else
                  f"{', '.join(bad)}: not a non-empty name without surrounding spaces" if bad
                  else f"{', '.join(map(repr, repeated))} given more than once")
        raise DataError(f"class_names: {detail}; give a list of unique class names as they "
                        "appear in <name>, e.g. ['raccoon']")
    return names


def _folder(root: Path, shown: str, folder: Path) -> str:
    """How a folder is written in messages (``shown`` itself for the common parent)."""
    rel = folder.relative_to(root).as_posix()
    return shown if rel == "." else os.path.join(shown, rel)


def _problem_message(shown: str, problems: list[str], unknown: Counter,
                     unknown_files: Counter) -> str:
    problems = sorted(problems)
    listed = "\n".join(f"  - {p}" for p in problems[:MAX_LISTED])
    if len(problems) > MAX_LISTED:
        listed += f"\n  ... and {len(problems) - MAX_LISTED} more"
    if unknown:
        listed += "\nunknown classes in all: " + ", ".join(
            f"{_quote(name)} ({n} object(s) in {unknown_files[name]} file(s))"
            for name, n in sorted(unknown.items()))
    return (f"{shown}: {len(problems)} problem(s) with the VOC annotations:\n{listed}\n"
            "fix or remove the malformed annotation files; for an unknown class, add the name "
            "to the class list (class_names) or remove those objects from the annotation files")


def load_voc(images_dir: str | os.PathLike, annotations_dir: str | os.PathLike,
             class_names: Sequence[str] | None = None, *, shown_root: str | None = None
             ) -> VocDataset:
    """Every image with a usable annotation file as a VocSample (see the module docstring).

    ``class_names`` fixes the classes and their ids (an object of another class is an error);
    without it the classes are the sorted names found. Paths in messages and reports are
    written relative to the folders' common parent, prefixed by ``shown_root`` (default: that
    parent as given). Raises one DataError listing every malformed annotation file and unknown
    class, sorted by file.
    """
    images_dir, annotations_dir = Path(images_dir), Path(annotations_dir)
    wanted = _check_class_names(class_names)
    try:
        root = Path(os.path.commonpath([images_dir, annotations_dir]))
    except ValueError:  # one relative, one absolute
        images_dir, annotations_dir = images_dir.absolute(), annotations_dir.absolute()
        root = Path(os.path.commonpath([images_dir, annotations_dir]))
    shown = shown_root if shown_root is not None else str(root)
    problems = [f"{_folder(root, shown, folder)}: {kind} folder not found"
                for folder, kind in ((images_dir, "image"), (annotations_dir, "annotation"))
                if not folder.is_dir()]
    if problems:
        raise DataError(f"{shown}: {'; '.join(problems)}; expected the images in one folder "
                        "and a PASCAL VOC .xml file of the same name for each in another")

    same_folder = images_dir.resolve() == annotations_dir.resolve()
    extensions = image_extensions()
    skipped: list[Skipped] = []
    lister = Lister(root, shown, skipped)
    images = list_folder(images_dir, "image", root, shown, extensions, problems, skipped,
                         lister)
    if same_folder:  # the annotations beside the images are not stray files
        skipped[:] = [s for s in skipped if not s.path.lower().endswith(".xml")]
    xmls = _list_annotations(annotations_dir, root, shown, same_folder, problems, skipped,
                             lister)
    counts: Counter = Counter({key: 0 for key in (
        "images", "annotation_files", "samples", "boxes", "boxes_clipped", "boxes_dropped",
        "difficult_boxes", "images_without_objects", "images_without_annotation",
        "annotations_without_image", "annotations_unreadable", "images_unreadable",
        "images_size_mismatch")})
    counts["images"], counts["annotation_files"] = len(images), len(xmls)
    shown_images, shown_xmls = (_folder(root, shown, images_dir),
                                _folder(root, shown, annotations_dir))
    for stem, path in sorted(images.items()):
        if stem not in xmls:
            counts["images_without_annotation"] += 1
            skipped.append(Skipped(display_path(root, shown, path),
                                   f"no annotation file; looked for {shown_xmls}/"
                                   f"{shown_text(stem)}.xml (an "
                                   "image without objects needs an annotation file with no "
                                   "<object>)", "no annotation file"))
    for stem, path in sorted(xmls.items()):
        if stem not in images:
            counts["annotations_without_image"] += 1
            skipped.append(Skipped(display_path(root, shown, path), "no image for this annotation; "
                                   f"looked for {shown_images}/{shown_text(stem)}.* (any image "
                                   "extension)",
                                   "no image for this annotation"))
    stems = sorted(set(images) & set(xmls), key=shown_text)  # in id order
    if not stems and not problems:
        raise DataError(f"{shown}: no image/annotation pairs ({len(images)} image(s) in "
                        f"{shown_images}/, {len(xmls)} .xml file(s) in {shown_xmls}/); pairs "
                        f"match by name: {shown_images}/a.jpg with {shown_xmls}/a.xml")

    usable: list[tuple[str, Annotation, int, int]] = []
    found: set[str] = set()
    unknown: Counter = Counter()  # objects per unknown class name
    unknown_files: Counter = Counter()  # files per unknown class name
    for stem in stems:
        shown_image = display_path(root, shown, images[stem])
        shown_xml = display_path(root, shown, xmls[stem])
        try:
            ann = parse_annotation(xmls[stem], shown=shown_xml)
        except UnreadableFile as exc:  # never read: not known to be wrong, so not a problem
            counts["annotations_unreadable"] += 1
            skipped.append(Skipped(shown_xml, f"{exc.reason} (its image {shown_image} is not "
                                   "used)", exc.kind))
            continue
        except DataError as exc:
            problems.append(str(exc))
            continue
        names = Counter(obj.name for obj in ann.objects)
        found.update(names)
        for name, n in sorted(names.items()) if wanted is not None else ():
            if name not in wanted:
                problems.append(f"{shown_xml}: unknown class {_quote(name)} ({n} object(s))")
                unknown[name] += n
                unknown_files[name] += 1
        try:
            width, height = _image_size(images[stem])
        except DataError as exc:
            counts["images_unreadable"] += 1
            skipped.append(Skipped(shown_image, f"{exc} (its annotation {shown_xml} is not "
                                                "used)", reason_kind(str(exc))))
            continue
        if (width, height) != (ann.width, ann.height):
            counts["images_size_mismatch"] += 1
            skipped.append(Skipped(shown_image, f"the image is {width}x{height} but its "
                                   f"annotation {shown_xml} gives <size> {ann.width}x"
                                   f"{ann.height}; the boxes may belong to another resolution: "
                                   "fix <size> or annotate the image again",
                                   "image size differs from its annotation"))
            continue
        usable.append((stem, ann, width, height))
    if problems:
        raise DataError(_problem_message(shown, problems, unknown, unknown_files))

    names_out = wanted if wanted is not None else sorted(found)
    ids = {name: i for i, name in enumerate(names_out)}
    samples = [make_sample(shown_text(stem), images[stem], xmls[stem], width, height,
                           [Box(o.name, o.xmin, o.ymin, o.xmax, o.ymax, o.difficult)
                            for o in ann.objects], ids,
                           shown_image=display_path(root, shown, images[stem]),
                           shown_annotation=display_path(root, shown, xmls[stem]))
               for stem, ann, width, height in usable]
    counts = recount(samples, counts)
    if lister.escaped:
        counts["file_names_escaped"] = lister.escaped
    if not samples:
        first = skipped[0] if skipped else None
        example = f", e.g. {first.path}: {first.reason}" if first else ""
        raise DataError(f"{shown}: none of the {len(stems)} image/annotation pair(s) could be "
                        f"used ({len(skipped)} file(s) skipped{example}); fix the files named")
    return BoxDataset(class_names=list(names_out), samples=samples, skipped=skipped,
                      dropped=dropped_lines(samples), counts=counts)
