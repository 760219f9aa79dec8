"""Image folders: ``<root>/<class>/<image>``, the layout of Keras' and torchvision's loaders.

Every file under a class folder is read, through symbolic links to files and folders (see
:class:`~visionpipe.data.sources.files.Lister`); what cannot be used (not an image, corrupt,
truncated, empty, a dangling link, a file or folder this user may not read, a pipe or device)
is returned as a ``Skipped`` entry with its path and the reason, so prepare can list it in its
report and count it in the manifest. File names that are not UTF-8 are kept, their ids and
shown paths written with backslash escapes (:func:`~visionpipe.data.sources.files.shown_text`).
Images are converted to 8-bit RGB (palette, grey, grey+alpha, RGBA, CMYK, 16-bit), turned
upright by their EXIF orientation, and brought to the training size by a resize policy.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from visionpipe.data.example import Example
from visionpipe.data.sources.files import (
    Lister,
    Skipped,
    UnreadableFile,
    check_file,
    display_path,
    open_file,
    shown_text,
)
from visionpipe.errors import DataError
from visionpipe.geometry import fit_to_size


def to_uint8_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL mode as uint8 (H, W, 3): 16-bit and 32-bit grey are scaled, alpha dropped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        grey = np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when a palette with transparency goes to RGB
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def decode(path: Path, convert, *, load: bool = True):
    """Open ``path`` with PIL and return ``convert(image)``; a file that cannot be decoded
    (empty, not an image, corrupt, truncated, a decompression bomb) or opened (a dangling
    link, no permission, not a regular file: :func:`~visionpipe.data.sources.files.open_file`)
    is a DataError saying so. DataErrors raised by ``convert`` pass through. ``load=False``
    reads the header only (size and mode): a truncated file passes then."""
    with open_file(path) as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            raise DataError("empty file (0 bytes)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(fh) as img:
                    if load:
                        img.load()  # truncated or corrupt data fails here, not at open
                    return convert(img)
        except DataError:
            raise
        except Image.UnidentifiedImageError:
            raise DataError("not an image PIL can read") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise DataError("image too large (PIL decompression-bomb limit)") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            detail = " ".join(str(exc).split())[:120] or type(exc).__name__
            raise DataError(f"corrupt or truncated image: {detail}") from None


def load_image(path: Path) -> np.ndarray:
    """Decode ``path`` as upright uint8 RGB; raises DataError saying what is wrong."""
    return decode(path, lambda img: to_uint8_rgb(ImageOps.exif_transpose(img)))


def scan(root: Path, shown_root: str | None = None, lister: Lister | None = None
         ) -> tuple[list[str], list[tuple[Path, int]], list[Skipped]]:
    """Class names (sorted sub-folder names), (file, class index) pairs, and what was skipped
    while listing (loose files, folders that cannot be read, link loops).

    ``shown_root`` is how paths are written in reports (default: ``root`` as given); a
    ``lister`` given (to count escaped names) must list ``root`` with hidden files.
    """
    shown = shown_root if shown_root is not None else str(root)
    if not root.is_dir():
        raise DataError(f"{shown}: image folder not found; create it with one sub-folder of "
                        "images per class, or set prepare.<task>.path")
    lister = lister or Lister(root, shown, [], hidden=True)
    skipped = lister.skipped
    listed = lister.listing(root)
    class_dirs = [p for p, is_dir in listed if is_dir and not p.name.startswith(".")]
    if not class_dirs:
        raise DataError(f"{shown}: no class sub-folders; expected {shown}/<class>/<image> "
                        "with one sub-folder per class")
    if len(class_dirs) == 1:
        raise DataError(f"{shown}: one class folder ({shown_text(class_dirs[0].name)}); a "
                        "classifier needs at least two (it would call every image that class): "
                        "add a sub-folder of images for each other class")
    for path, is_dir in listed:
        if not is_dir:
            try:
                check_file(path)
                reason = "not inside a class folder"
            except UnreadableFile as exc:  # say why it is unreadable, not only where it is
                reason = exc.reason
            skipped.append(Skipped(display_path(root, shown, path), reason))
    lister.claim(class_dirs)  # a link from one class into another is the one skipped
    files: list[tuple[Path, int]] = []
    for index, folder in enumerate(class_dirs):
        lister.note(folder)
        files.extend((path, index) for path in lister.walk(folder, shared=True))
    return [shown_text(d.name) for d in class_dirs], files, skipped


def load_folder(root: Path, image_size: tuple[int, int], policy: str,
                shown_root: str | None = None, progress=None
                ) -> tuple[list[str], list[Example], list[Skipped]]:
    """Every usable image under ``root`` as an Example (id = path inside ``root``).

    Returns (class names, examples, skipped files). A class folder left with no usable
    image is an error naming it: training without that class would be silently wrong.
    """
    names, examples, skipped, _ = load_folder_counted(root, image_size, policy, shown_root,
                                                      progress)
    return names, examples, skipped


def load_folder_counted(root: Path, image_size: tuple[int, int], policy: str,
                        shown_root: str | None = None, progress=None
                        ) -> tuple[list[str], list[Example], list[Skipped], dict[str, int]]:
    """:func:`load_folder`, plus counts: ``file_names_escaped`` (files and folders whose name is
    not UTF-8, kept with escapes in their ids), only when there are any."""
    shown = shown_root if shown_root is not None else str(root)
    lister = Lister(root, shown, [], hidden=True)
    names, files, skipped = scan(root, shown, lister)
    examples: list[Example] = []
    iterator = progress(files) if progress else files
    for path, label in iterator:
        try:
            image = fit_to_size(load_image(path), image_size, policy)
        except DataError as exc:
            skipped.append(Skipped(display_path(root, shown, path), str(exc)))
            continue
        examples.append(Example(id=shown_text(path.relative_to(root).as_posix()), image=image,
                                label=label))
    counts = np.bincount([ex.label for ex in examples], minlength=len(names))
    empty = [names[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise DataError(f"{shown}: class folder(s) {', '.join(empty)} hold no usable image "
                        f"({len(skipped)} file(s) skipped in all); add images or remove the "
                        "folder")
    return names, examples, skipped, ({"file_names_escaped": lister.escaped}
                                      if lister.escaped else {})
