"""Image/mask pair folders for semantic segmentation: ``<root>/images/`` + ``<root>/masks/``.

Layout (the layout of the membrane set and of most segmentation datasets)::

    <root>/images/0.png    <root>/masks/0.png
    <root>/images/1.jpg    <root>/masks/1.png
    ...

Rules:

- An image and its mask are paired by file name without extension (``images/7.jpg`` goes with
  ``masks/7.png``); only files directly inside the two folders are read, hidden files
  (``.name``) are ignored, pairs come in sorted order and each Example's id is the shared stem.
- Files whose extension is not an image format PIL knows, and sub-folders, are returned as
  ``Skipped`` entries, like the image-folder source does. Files are opened as
  :func:`~visionpipe.data.sources.files.open_file` does: a dangling link, a file this user may
  not read or a pipe is skipped with its own reason. A file name that is not UTF-8 is kept; the
  pair's id and shown paths write its undecodable bytes as ``\\xNN``.
- ``mask_values`` maps each mask pixel value to a class name, e.g. ``{255: "cell",
  0: "membrane"}``; class ids follow the mapping's order (the first entry is class 0), so the
  returned mask holds class ids 0..K-1 as uint8 (H, W).
- Masks are label maps, read without EXIF rotation: mode L (grey), P (the palette indices are
  the values) and 1 (0/255) are used as they are; 16-bit grey with no value above 255, RGB whose
  three channels are equal, and grey/RGB/palette with a uniform alpha are read as grey. Colour
  masks, 16-bit values above 255, varying alpha and other modes are problems. Images are read by
  ``image_folder.load_image``: upright (EXIF) uint8 RGB.
- Images and masks keep their own size here; the caller resizes (nearest for masks).

Two kinds of trouble are told apart. A file that cannot be read at all (empty, truncated,
corrupt, not an image) is not fatal: its pair is left out and the file returned as a
``Skipped`` entry with the reason, so prepare counts and reports it. Problems that would make
the dataset wrong (a mask value outside ``mask_values``, image and mask of different sizes, an
image without a mask or a mask without an image, an unusable mask mode, a missing folder, no
pairs at all) are collected over all files and raised together as one DataError, the first
20 listed. A dataset in which no pair could be read is an error too.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from visionpipe.data.example import Example
from visionpipe.data.sources.files import (
    MAX_LISTED,
    Lister,
    Skipped,
    display_path,
    image_extensions,
    list_folder,
    reason_kind,
    shown_text,
)
from visionpipe.data.sources.image_folder import decode, load_image
from visionpipe.errors import DataError

_EXIF_ORIENTATION = 0x0112
_SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that turn the image by 90 degrees


class MaskFormatError(DataError):
    """A readable mask whose pixel format cannot hold class values (colour, 16-bit, alpha)."""


def _mask_values(mask_values: Mapping[int, str]) -> tuple[list[int], list[str]]:
    """The mapping's values and class names in order, or a DataError saying what is wrong."""
    if not isinstance(mask_values, Mapping) or not mask_values:
        raise DataError("mask_values: give a mapping of mask pixel value to class name, e.g. "
                        "{0: 'background', 255: 'object'}")
    values, names, wrong = [], [], []
    for value, name in mask_values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            wrong.append(f"{value!r} is not an integer pixel value")
        elif not 0 <= value <= 255:
            wrong.append(f"{value} (for {name!r}) is not 0..255; masks are 8-bit")
        if not isinstance(name, str) or not name.strip():
            wrong.append(f"class name {name!r} for value {value!r} is not a non-empty string")
        elif name in names:
            wrong.append(f"class name {name!r} is given for values {values[names.index(name)]!r}"
                         f" and {value!r}; names must be unique (one value per class)")
        values.append(value)
        names.append(name)
    if wrong:
        raise DataError("mask_values: " + "; ".join(wrong))
    return [int(v) for v in values], names


def _uniform_alpha(arr: np.ndarray, mode: str) -> np.ndarray:
    """The colour channels of ``arr`` if its last channel (alpha) is one value everywhere."""
    alpha = arr[..., -1]
    if alpha.size and (alpha != alpha.flat[0]).any():
        raise MaskFormatError(f"mode {mode} with varying transparency (alpha "
                              f"{int(alpha.min())}..{int(alpha.max())}); save the mask without "
                              "alpha, as 8-bit grey (mode L) or palette (mode P)")
    return arr[..., :-1]


def _values(img: Image.Image) -> np.ndarray:
    """The mask's pixel values as uint8 (H, W), or MaskFormatError saying what to do."""
    mode = img.mode
    if mode in ("L", "P"):
        return np.asarray(img, dtype=np.uint8)
    if mode == "1":
        return np.asarray(img, dtype=np.uint8) * np.uint8(255)
    if mode in ("LA", "La", "PA"):
        return _uniform_alpha(np.asarray(img), mode)[..., 0].astype(np.uint8)
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img)
        if arr.size and (arr.min() < 0 or arr.max() > 255 or (arr != np.round(arr)).any()):
            bits = "floating-point" if mode == "F" else "16/32-bit"
            raise MaskFormatError(f"{bits} mask (mode {mode}) with values "
                                  f"{arr.min():g}..{arr.max():g}; save it as 8-bit grey "
                                  "(mode L) or palette (mode P) with one value per class")
        return arr.astype(np.uint8)
    if mode in ("RGB", "RGBA", "RGBX"):
        arr = np.asarray(img)
        rgb = _uniform_alpha(arr, mode) if mode == "RGBA" else arr[..., :3]
        if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
            return rgb[..., 0].astype(np.uint8)
        colours = np.unique(rgb.reshape(-1, 3), axis=0)
        shown = ", ".join(str(tuple(int(c) for c in colour)) for colour in colours[:4])
        more = f", ... ({len(colours)} colours)" if len(colours) > 4 else ""
        raise MaskFormatError(f"colour mask (mode {mode}: {shown}{more}); save it as 8-bit "
                              "grey (mode L) or palette (mode P) with one value per class, "
                              "and map those values in mask_values")
    raise MaskFormatError(f"mask in mode {mode}, which holds no class values; save it as 8-bit "
                          "grey (mode L) or palette (mode P) with one value per class")


def load_mask(path: Path) -> np.ndarray:
    """Pixel values of the mask at ``path`` as uint8 (H, W), not EXIF-rotated.

    Raises DataError when the file cannot be read, and its subclass MaskFormatError when it
    is readable but its pixel format cannot hold class values.
    """
    return decode(path, _values)


def _size_hint(image_path: Path, mask_shape: tuple[int, ...]) -> str:
    """Why sizes may differ: the image is turned by EXIF orientation, the mask is not."""
    try:
        with Image.open(image_path) as img:
            orientation = img.getexif().get(_EXIF_ORIENTATION)
            stored = img.size
    except (OSError, SyntaxError, ValueError, EOFError):  # only a hint; the file was read
        return ""
    if orientation in _SWAPS_SIDES and stored == (mask_shape[1], mask_shape[0]):
        return (f" (the image is stored {stored[0]}x{stored[1]} and turned upright by its EXIF "
                f"orientation {orientation}; rotate the mask to match the upright image)")
    return ""


def _unexpected(values: np.ndarray, allowed: list[int]) -> list[tuple[int, int]]:
    """(value, pixel count) of every value in ``values`` that is not in ``allowed``."""
    counts = np.bincount(values.ravel(), minlength=256)
    counts[allowed] = 0
    return [(int(v), int(counts[v])) for v in np.flatnonzero(counts)]


def _problem_message(shown: str, images: str, masks: str, problems: list[str],
                     no_pairs: bool = False) -> str:
    listed = "\n".join(f"  - {p}" for p in problems[:MAX_LISTED])
    if len(problems) > MAX_LISTED:
        listed += f"\n  ... and {len(problems) - MAX_LISTED} more"
    advice = (f"each image in {images}/ needs a mask in {masks}/ with the same name (any image "
              "extension), the same width and height, and only values listed in mask_values; "
              "fix or remove the files named above and run again")
    if no_pairs:
        advice += f" (pairs match by name without extension: {images}/7.jpg with {masks}/7.png)"
    return f"{shown}: {len(problems)} problem(s) with the image/mask pairs:\n{listed}\n{advice}"


def load_pairs(root: Path, mask_values: Mapping[int, str], *, images: str = "images",
               masks: str = "masks", shown_root: str | None = None, progress=None
               ) -> tuple[list[str], list[Example], list[Skipped]]:
    """Every usable image/mask pair under ``root`` as an Example (id = the shared file stem).

    Returns (class names in ``mask_values`` order, examples, skipped files). ``shown_root`` is
    how paths are written in messages (default: ``root`` as given); ``progress`` optionally
    wraps the iteration over pairs (e.g. tqdm). Raises one DataError listing every problem
    that makes the dataset wrong (see the module docstring).
    """
    names, examples, skipped, _ = load_pairs_counted(
        root, mask_values, images=images, masks=masks, shown_root=shown_root,
        progress=progress)
    return names, examples, skipped


def load_pairs_counted(root: Path, mask_values: Mapping[int, str], *, images: str = "images",
                       masks: str = "masks", shown_root: str | None = None, progress=None
                       ) -> tuple[list[str], list[Example], list[Skipped], dict[str, int]]:
    """:func:`load_pairs`, plus counts taken after decoding: ``pairs`` found, ``samples``
    (pairs read), ``pairs_unreadable`` (left out because a file of the pair did not decode;
    ``pairs == samples + pairs_unreadable``), and ``file_names_escaped`` (files whose name is
    not UTF-8, kept with escapes) only when there are any."""
    values, names = _mask_values(mask_values)
    lut = np.zeros(256, np.uint8)
    lut[values] = np.arange(len(values), dtype=np.uint8)
    allowed_text = ", ".join(str(v) for v in values)

    root = Path(root)
    shown = shown_root if shown_root is not None else str(root)
    if not root.is_dir():
        raise DataError(f"{shown}: dataset folder not found; expected {shown}/{images}/ with "
                        f"the images and {shown}/{masks}/ with a mask of the same name for each")
    problems: list[str] = []
    for sub, kind in ((images, "image"), (masks, "mask")):
        if not (root / sub).is_dir():
            problems.append(f"{shown}/{sub}: {kind} folder not found")
    if problems:
        raise DataError(_problem_message(shown, images, masks, problems))

    extensions = image_extensions()
    skipped: list[Skipped] = []
    lister = Lister(root, shown, skipped)
    image_files = list_folder(root / images, "image", root, shown, extensions, problems,
                              skipped, lister)
    mask_files = list_folder(root / masks, "mask", root, shown, extensions, problems, skipped,
                             lister)
    for stem, path in sorted(image_files.items()):
        if stem not in mask_files:
            problems.append(f"{display_path(root, shown, path)}: image without a mask; looked for "
                            f"{shown}/{masks}/{shown_text(stem)}.* (any image extension)")
    for stem, path in sorted(mask_files.items()):
        if stem not in image_files:
            problems.append(f"{display_path(root, shown, path)}: mask without an image; looked for "
                            f"{shown}/{images}/{shown_text(stem)}.* (any image extension)")
    stems = sorted(set(image_files) & set(mask_files))
    if not stems:
        found = f"{len(image_files)} image(s), {len(mask_files)} mask(s)"
        problems.append(f"{shown}: no image/mask pairs ({found} found)")
        raise DataError(_problem_message(shown, images, masks, problems, no_pairs=True))

    examples: list[Example] = []
    unreadable = 0
    iterator = progress(stems) if progress else stems
    for stem in iterator:
        image_path, mask_path = image_files[stem], mask_files[stem]
        shown_image, shown_mask = (display_path(root, shown, image_path),
                                   display_path(root, shown, mask_path))
        image = mask = None
        try:
            image = load_image(image_path)
        except DataError as exc:
            skipped.append(Skipped(shown_image, f"{exc} (its mask {shown_mask} is not used)",
                                   reason_kind(str(exc))))
        try:
            mask = load_mask(mask_path)
        except MaskFormatError as exc:
            problems.append(f"{shown_mask}: {exc}")
        except DataError as exc:
            skipped.append(Skipped(shown_mask, f"{exc} (its image {shown_image} is not used)",
                                   reason_kind(str(exc))))
        ok = image is not None and mask is not None
        unreadable += not ok
        if mask is not None:
            unexpected = _unexpected(mask, values)
            if unexpected:
                found = ", ".join(f"{v} ({n} px)" for v, n in unexpected[:10])
                if len(unexpected) > 10:
                    found += f", ... and {len(unexpected) - 10} more values"
                lossy = (" (JPEG is lossy and blurs edges: save masks as PNG)"
                         if mask_path.suffix.lower() in (".jpg", ".jpeg") else "")
                problems.append(f"{shown_mask}: values not in mask_values: {found}; allowed: "
                                f"{allowed_text}{lossy}")
                ok = False
        if image is not None and mask is not None and image.shape[:2] != mask.shape:
            (ih, iw), (mh, mw) = image.shape[:2], mask.shape
            problems.append(f"{shown_image} is {iw}x{ih} but its mask {shown_mask} is {mw}x{mh}"
                            + _size_hint(image_path, mask.shape))
            ok = False
        if ok and not problems:
            examples.append(Example(id=shown_text(stem), image=image, mask=lut[mask]))
    if problems:
        raise DataError(_problem_message(shown, images, masks, problems))
    if not examples:
        raise DataError(f"{shown}: none of the {len(stems)} image/mask pair(s) could be read "
                        f"({len(skipped)} file(s) skipped, e.g. {skipped[0].path}: "
                        f"{skipped[0].reason}); replace the unreadable files")
    counts = {"pairs": len(stems), "samples": len(examples), "pairs_unreadable": unreadable}
    if lister.escaped:
        counts["file_names_escaped"] = lister.escaped
    return names, examples, skipped, counts
