"""Files of a data folder: which are images, how their paths are shown, and what is skipped.

Shared by the folder sources (image folders, image/mask pairs, VOC): every file that is not
used becomes a :class:`Skipped` with its path as reports show it and the reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

MAX_LISTED = 20  # problems listed in one error; the rest are counted


def reason_kind(reason: str) -> str:
    """A reason without its detail: 'corrupt or truncated image: ...' -> before ': '."""
    return reason.split(": ")[0]


@dataclass(frozen=True)
class Skipped:
    """A file that was not used, and why.

    ``kind`` is the reason without the details of this file, what reports count skipped files
    by (default: the reason up to its first ': ')."""

    path: str
    reason: str
    kind: str = ""

    def __post_init__(self) -> None:
        if not self.kind:
            object.__setattr__(self, "kind", reason_kind(self.reason))

    def to_dict(self) -> dict:
        return {"path": self.path, "reason": self.reason, "kind": self.kind}


def display_path(root: Path, shown_root: str, path: Path) -> str:
    """``path`` (under ``root``) as reports show it: under ``shown_root``, with slashes."""
    return os.path.join(shown_root, path.relative_to(root).as_posix())


def image_extensions() -> frozenset[str]:
    """Lower-case file extensions (with the dot) of every format PIL can open."""
    return frozenset(ext for ext, fmt in Image.registered_extensions().items()
                     if fmt in Image.OPEN)


def list_folder(folder: Path, kind: str, root: Path, shown: str, extensions: frozenset[str],
                problems: list[str], skipped: list[Skipped]) -> dict[str, Path]:
    """``stem -> file`` for the image files directly in ``folder``; the rest to ``skipped``."""
    by_stem: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            skipped.append(Skipped(display_path(root, shown, path),
                                   f"folder inside {folder.name}/ is not read; put the {kind}s "
                                   f"directly in {folder.name}/", "folder not read"))
        elif path.suffix.lower() not in extensions:
            skipped.append(Skipped(display_path(root, shown, path),
                                   f"not an image file (extension {path.suffix or 'none'!r})",
                                   "not an image file"))
        else:
            by_stem.setdefault(path.stem, []).append(path)
    for stem, paths in by_stem.items():
        if len(paths) > 1:
            shown_paths = ", ".join(display_path(root, shown, p) for p in paths)
            problems.append(f"{shown_paths}: {len(paths)} {kind}s share the name {stem!r}; keep "
                            f"one {kind} per name")
    return {stem: paths[0] for stem, paths in by_stem.items()}
