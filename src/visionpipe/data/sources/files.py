"""Files of a data folder: how they are listed and opened, how their paths are shown, and
what is skipped.

Shared by the folder sources (image folders, image/mask pairs, VOC, YOLO txt, COCO): every file
or folder that is not used becomes a :class:`Skipped` with its path as reports show it and the
reason, counted per reason (its ``kind``).

- :class:`Lister` lists folders. It follows symbolic links to folders, reads each folder once
  (a link back to a folder being read is a "symbolic link loop", a second link to a folder
  already read is skipped too), and a sub-folder it cannot list is a counted skip ("permission
  denied" says what to do); a top folder it cannot list is a DataError.
- :func:`open_file` opens a file for reading after checking with ``stat`` that it is a regular
  file: a named pipe would hang the read, a device never end it. Dangling links, link loops,
  files the user cannot read and non-regular files are :class:`UnreadableFile` errors whose
  reason starts with the kind counted. :func:`read_file` also refuses files over a size cap.
- :func:`shown_text` makes a file name valid one-line UTF-8 for ids, reports and the console:
  bytes that are not UTF-8 (Linux hands them to Python as surrogate escapes) are written
  ``\\xNN``; control characters too. Files with such names are kept; the listing counts them.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from visionpipe.config.rules import UNPRINTABLE
from visionpipe.errors import DataError

MAX_LISTED = 20  # problems listed in one error; the rest are counted

MiB = 1 << 20
# Caps on the text files read whole: far above any real one (a VOC XML or a YOLO label file is
# a few KB, a data.yaml less); a file over them is not what it is named. COCO JSON has none: a
# real one can be hundreds of MB, and a regular file is finite.
VOC_XML_LIMIT = 16 * MiB
YOLO_LABEL_LIMIT = 16 * MiB
DATA_YAML_LIMIT = 4 * MiB


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:  # the byte 0x80..0xff that was not UTF-8
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}"


def shown_text(text: str) -> str:
    """``text`` (a file name as the OS gave it) as valid one-line UTF-8: each byte that is not
    UTF-8 becomes ``\\xNN`` (the byte), each control character ``\\xNN`` or ``\\uNNNN``.

    Stable, and one-to-one except against a name that itself holds such escape text."""
    return UNPRINTABLE.sub(_escape, text)


def quoted(text: str) -> str:
    """``text`` quoted as messages show a name or an extension: ``repr`` of a valid name,
    ``'none'`` for an empty one, the :func:`shown_text` escapes between quotes otherwise."""
    if not text:
        return "'none'"
    return repr(text) if shown_text(text) == text else f"'{shown_text(text)}'"


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
    """``path`` (under ``root``) as reports show it: under ``shown_root``, with slashes, its
    name made valid UTF-8 (:func:`shown_text`)."""
    return os.path.join(shown_root, shown_text(Path(path).relative_to(root).as_posix()))


def image_extensions() -> frozenset[str]:
    """Lower-case file extensions (with the dot) of every format PIL can open."""
    return frozenset(ext for ext, fmt in Image.registered_extensions().items()
                     if fmt in Image.OPEN)


# --- opening one file -----------------------------------------------------------------------

class UnreadableFile(DataError):
    """A file that cannot be opened for reading. ``reason`` is ``"<kind>: <detail>"``, ``kind``
    what reports count it by ("permission denied", "dangling symbolic link", ...); the message
    is the reason unless given."""

    def __init__(self, kind: str, detail: str, message: str | None = None):
        self.kind, self.detail, self.reason = kind, detail, f"{kind}: {detail}"
        super().__init__(message or self.reason)


_FILE_TYPES = ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "named pipe"),
               (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
               (stat.S_ISBLK, "block device"))


def _not_regular(mode: int) -> UnreadableFile:
    what = next((name for test, name in _FILE_TYPES if test(mode)), "special file")
    return UnreadableFile(f"not a regular file ({what})", "only regular files are read (a "
                          "pipe or device could hang the read or never end); put the file itself "
                          "here")


def _os_problem(path: Path, exc: OSError) -> UnreadableFile:
    """What an OSError from stat or open of ``path`` means to the user."""
    if exc.errno == errno.ELOOP:
        return UnreadableFile("symbolic link loop", "the link (or a chain of links) leads back to "
                              "itself and never reaches a file; point it at the file or remove "
                              "it")
    if exc.errno in (errno.ENOENT, errno.ENOTDIR) and os.path.islink(path):
        try:
            target = shown_text(os.readlink(path))
        except OSError:
            target = "?"
        return UnreadableFile("dangling symbolic link", f"points to {target}, which does not "
                              "exist; fix or remove the link")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return UnreadableFile("permission denied", "this user may not read the file; make it "
                              "readable (chmod a+r) or run as a user who can read it")
    if exc.errno == errno.ENOENT:
        return UnreadableFile("file not found", "it was there when the folder was listed; run "
                              "again once nothing else is changing the folder")
    detail = exc.strerror or type(exc).__name__
    return UnreadableFile("cannot read the file", f"{detail} (errno {exc.errno})")


def _size(n: int) -> str:
    return f"{n / MiB:.1f} MiB" if n >= MiB else f"{n} bytes"


def check_file(path: Path) -> os.stat_result:
    """``stat`` of the regular file at ``path`` (links followed), or UnreadableFile saying why
    it cannot be read."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise _os_problem(Path(path), exc) from None
    except ValueError:  # a NUL byte, or text with no bytes (a lone surrogate from JSON)
        raise UnreadableFile("file not found", "the name cannot be a file name") from None
    if not stat.S_ISREG(info.st_mode):
        raise _not_regular(info.st_mode)
    return info


def open_file(path: Path, *, limit: int | None = None, what: str = "file") -> BinaryIO:
    """``path`` opened for binary reading, once :func:`check_file` says it is a regular file
    (and, with ``limit``, of at most ``limit`` bytes); UnreadableFile otherwise."""
    info = check_file(path)
    if limit is not None and info.st_size > limit:
        raise _too_large(info.st_size, limit, what)
    try:
        # O_NONBLOCK: a pipe put in the file's place after the check cannot block the open.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise _os_problem(Path(path), exc) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _not_regular(mode)
    return os.fdopen(fd, "rb")


def _too_large(size: int, limit: int, what: str) -> UnreadableFile:
    return UnreadableFile("file too large", f"{_size(size)}, over the {_size(limit)} a {what} "
                          "may be (a real one is far smaller); check that it is the right file")


def read_file(path: Path, limit: int | None, what: str) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (None: any size; ``what`` names
    it in the message); UnreadableFile otherwise, also for an error while reading."""
    with open_file(path, limit=limit, what=what) as fh:
        try:
            data = fh.read() if limit is None else fh.read(limit + 1)
        except OSError as exc:  # EIO from a failing disk, a network share gone
            raise _os_problem(Path(path), exc) from None
    if limit is not None and len(data) > limit:  # it grew after the check
        raise _too_large(len(data), limit, what)
    return data


def exists(path: Path) -> bool:
    """Whether anything, even a dangling link, a pipe or a folder, is at ``path``."""
    return os.path.lexists(path)


# --- listing folders ------------------------------------------------------------------------

@dataclass
class Lister:
    """Lists the folders of one dataset under ``root`` (shown in reports as ``shown``); what
    cannot be listed goes to ``skipped``. ``hidden``: keep names starting with a dot.

    Symbolic links to folders are followed; each folder is read once per :meth:`walk` (or
    once in all for walks with ``shared``, after :meth:`claim`). ``escaped`` counts the listed
    paths whose names :func:`shown_text` changed.
    """

    root: Path
    shown: str
    skipped: list[Skipped]
    hidden: bool = False
    _seen: dict[tuple[int, int], str] = field(default_factory=dict)
    _escaped: set[str] = field(default_factory=set)

    @property
    def escaped(self) -> int:
        """How many listed files and folders have a name that is not UTF-8 (or holds control
        characters): kept, shown with backslash escapes."""
        return len(self._escaped)

    def _rel(self, path: Path) -> str | None:
        try:
            return Path(path).relative_to(self.root).as_posix()
        except ValueError:  # a folder given outside root (an absolute path in params)
            return None

    def show(self, path: Path) -> str:
        """``path`` as reports show it (as given if it is not under ``root``)."""
        rel = self._rel(path)
        return shown_text(str(path)) if rel is None else os.path.join(self.shown, shown_text(rel))

    def note(self, path: Path) -> None:
        """Count ``path`` if its name needs escapes to be shown."""
        rel = self._rel(path)
        rel = str(path) if rel is None else rel
        if shown_text(rel) != rel:
            self._escaped.add(rel)

    def _list(self, folder: Path) -> list[tuple[Path, bool]]:
        with os.scandir(folder) as it:
            entries = sorted((e.name, _is_dir(e)) for e in it
                             if self.hidden or not e.name.startswith("."))
        for name, is_dir in entries:
            if not is_dir:
                self.note(folder / name)
        return [(folder / name, is_dir) for name, is_dir in entries]

    def listing(self, folder: Path) -> list[tuple[Path, bool]]:
        """(entry, is a folder) for each entry directly in ``folder``, sorted by name. A
        folder that cannot be listed is a DataError saying what to do."""
        try:
            return self._list(folder)
        except OSError as exc:
            shown = self._folder(folder)
            raise DataError(f"{shown}: {listing_problem(exc, shown)}") from None

    def entries(self, folder: Path) -> tuple[list[Path], list[Path]]:
        """(sub-folders, other entries) directly in ``folder``, as :meth:`listing`."""
        listed = self.listing(folder)
        return ([p for p, is_dir in listed if is_dir], [p for p, is_dir in listed if not is_dir])

    def _folder(self, folder: Path) -> str:
        return self.shown if self._rel(folder) == "." else self.show(folder)

    def _key(self, folder: Path) -> tuple[int, int] | None:
        try:
            info = os.stat(folder)
        except OSError:
            return None
        return info.st_dev, info.st_ino

    def claim(self, folders: Iterable[Path]) -> None:
        """Mark ``folders`` as read by themselves, before any is walked (image-folder classes:
        a link from one class into another is then the one skipped)."""
        for folder in folders:
            key = self._key(folder)
            if key is not None:
                self._seen.setdefault(key, self._folder(folder))

    def walk(self, top: Path, *, shared: bool = False) -> list[Path]:
        """Every entry under ``top`` that is not a folder, in ``os.walk`` order (a folder's own
        entries by name, then each sub-folder's), following links to folders. A sub-folder
        that cannot be listed, a link loop and a folder reached a second time (in this walk,
        or with ``shared`` in any shared walk or claimed) are skipped, counted and listed;
        ``top`` itself not listable is a DataError."""
        files: list[Path] = []
        seen = self._seen if shared else {}
        key = self._key(top)
        shown_top = self._folder(top)
        if key is not None and seen.setdefault(key, shown_top) != shown_top:
            self._skip_again(top, seen[key])
            return files
        folders, others = self.entries(top)
        files.extend(others)
        stack = [(f, (key,)) for f in reversed(folders)]
        while stack:
            folder, above = stack.pop()
            self.note(folder)
            key = self._key(folder)
            ancestor = (seen.get(key, "?") if key is not None and key in above
                        else self._real_ancestor(folder, key))
            if ancestor is not None:
                self.skipped.append(Skipped(
                    self.show(folder), f"symbolic link loop: the link leads back to {ancestor}, "
                    "which holds it, so it would be read forever; remove the link or point it "
                    "elsewhere", "symbolic link loop"))
                continue
            if key is not None and key in seen:
                self._skip_again(folder, seen[key])
                continue
            if key is not None:
                seen[key] = self.show(folder)
            try:
                listed = self._list(folder)
            except OSError as exc:
                problem = listing_problem(exc, self.show(folder))
                self.skipped.append(Skipped(self.show(folder), problem, reason_kind(problem)))
                continue
            files.extend(p for p, is_dir in listed if not is_dir)
            stack.extend((p, (*above, key)) for p, is_dir in reversed(listed) if is_dir)
        return files

    def _real_ancestor(self, folder: Path, key: tuple[int, int] | None) -> str | None:
        """For a link to a folder: the folder holding the link, or one above it, that the link
        leads to (reading it would read the link again, forever), as shown; else None."""
        if key is None or not os.path.islink(folder):
            return None
        real = Path(os.path.realpath(folder.parent))
        for above in (real, *real.parents):
            if self._key(above) == key:
                rel = self._rel(above)
                if rel is None:  # the root itself reached through a link, or above it
                    inside = Path(os.path.realpath(self.root))
                    rel = (above.relative_to(inside).as_posix() if above.is_relative_to(inside)
                           else None)
                return shown_text(str(above)) if rel is None else (
                    self.shown if rel == "." else os.path.join(self.shown, shown_text(rel)))
        return None

    def _skip_again(self, folder: Path, first: str) -> None:
        self.skipped.append(Skipped(
            self.show(folder), f"folder already read as {first} (a symbolic link leads to it "
            "again); its files are read once", "folder already read"))


def _is_dir(entry: os.DirEntry) -> bool:
    """Whether ``entry`` is a folder or a link to one; a link that cannot be followed (a loop,
    no permission) is not: it is read as a file, and opening it says what is wrong."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def listing_problem(exc: OSError, shown: str) -> str:
    """Why a folder cannot be listed, and what to do, as '<kind>: <detail>'."""
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (f"permission denied: this user may not list the folder, so its files are not "
                f"read; make it readable (chmod -R a+rX {shown}) or run as a user who can "
                "read it")
    if exc.errno == errno.ELOOP:
        return "symbolic link loop: the link leads back to itself; remove it"
    detail = exc.strerror or type(exc).__name__
    return f"cannot list the folder: {detail} (errno {exc.errno})"


def list_folder(folder: Path, kind: str, root: Path, shown: str, extensions: frozenset[str],
                problems: list[str], skipped: list[Skipped],
                lister: Lister | None = None) -> dict[str, Path]:
    """``stem -> file`` for the image files directly in ``folder``; the rest to ``skipped``."""
    lister = lister or Lister(root, shown, skipped)
    by_stem: dict[str, list[Path]] = {}
    name = shown_text(folder.name)
    for path, is_dir in lister.listing(folder):
        if is_dir:
            lister.note(path)
            skipped.append(Skipped(display_path(root, shown, path),
                                   f"folder inside {name}/ is not read; put the {kind}s "
                                   f"directly in {name}/", "folder not read"))
        elif path.suffix.lower() not in extensions:
            skipped.append(Skipped(display_path(root, shown, path),
                                   f"not an image file (extension {quoted(path.suffix)})",
                                   "not an image file"))
        else:
            by_stem.setdefault(path.stem, []).append(path)
    for stem, paths in by_stem.items():
        if len(paths) > 1:
            shown_paths = ", ".join(display_path(root, shown, p) for p in paths)
            problems.append(f"{shown_paths}: {len(paths)} {kind}s share the name "
                            f"{quoted(stem)}; keep one {kind} per name")
    return {stem: paths[0] for stem, paths in by_stem.items()}
