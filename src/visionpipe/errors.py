"""Errors a user can cause; the CLI prints them on one line, without a traceback."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path


class VisionpipeError(Exception):
    """Base class: the message says what was wrong and what to do."""


class ParamsError(VisionpipeError):
    """params.yaml has an unknown key, a wrong type or an out-of-range value."""


class DataError(VisionpipeError):
    """A dataset, record file or manifest is missing, malformed or inconsistent."""


class SourceUnavailableError(DataError):
    """A data source cannot be reached (e.g. a TFDS download with no network)."""


class ModelError(VisionpipeError):
    """A model cannot be built, loaded or found."""


class ExportParityError(VisionpipeError):
    """An exported model disagrees with the Keras model beyond the allowed threshold."""


class TrainingDivergedError(VisionpipeError):
    """The training loss became NaN or infinite."""


# Writes that fail because the disk, a quota or a size limit is full: the errno and how
# TensorFlow's file writers word it ("<path>; No space left on device").
DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
             errno.EFBIG: "file too large (a file size limit was reached)"}


def disk_full_line(exc: BaseException) -> str | None:
    """One line for a write that failed because the disk (or quota, or size limit) is full,
    naming the file; None for any other error. Looks through chained exceptions."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        what, where = None, None
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            what, where = DISK_FULL[exc.errno], exc.filename
        else:  # tf.errors.ResourceExhaustedError and kin: "<path>; No space left on device"
            text = str(exc)
            for number, name in DISK_FULL.items():
                if os.strerror(number) in text:
                    found = re.search(r"(\S+); " + re.escape(os.strerror(number)), text)
                    what, where = name, found.group(1) if found else None
                    break
        if what is not None:
            place = f" while writing {_shown(where)}" if where else ""
            return (f"{what}{place}: free space on that disk (`df -h` shows it; `dvc gc "
                    "--workspace` drops cached versions nothing uses) and rerun; nothing "
                    "half-written was kept (`dvc checkout` restores a stage's previous outputs)")
        exc = exc.__cause__ or exc.__context__
    return None


def _shown(path) -> str:
    """``path`` relative to the working directory when it is under it."""
    full = Path(os.path.abspath(path))
    return full.relative_to(Path.cwd()).as_posix() if full.is_relative_to(Path.cwd()) else str(path)
