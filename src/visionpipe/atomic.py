"""Files written through a temporary name and renamed, so a kill never leaves half a file.

Every file a stage writes goes through :func:`atomic_path` (or, for a whole folder,
``stages.common.fresh_dir``). ``os.replace`` is atomic on POSIX and Windows when both names are
on one file system, which holds here: the temporary file sits beside its target. A process
killed while writing leaves the previous file (or none) plus a hidden ``.<name>.tmp<suffix>``
that the next write replaces.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def temporary_name(path: Path) -> Path:
    """``dir/.name.tmp.suffix`` for ``dir/name.suffix``: hidden, same folder, same suffix
    (Keras and matplotlib pick the format from it)."""
    return path.with_name(f".{path.stem}.tmp{path.suffix}")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is renamed to ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> Path:
    """Write UTF-8 text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: Path, data: Any) -> Path:
    """Write indented JSON atomically."""
    return write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
