"""Datasets given as archives: ``prepare.<task>.path: my_photos.zip`` (or .tar, .tar.gz, .tgz,
.tar.bz2, .tar.xz) is extracted under ``data/extracted/<archive name>/`` and read from there.

Extraction refuses, before writing anything, any member that would land outside that folder:
absolute names, ``..`` components, links (symbolic or hard) and device files. The refusal is a
DataError naming the archive and the member. The folder is extracted again only when the
archive's checksum changes; an archive holding a single top folder is read from inside it.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from visionpipe.atomic import write_json
from visionpipe.data import records
from visionpipe.errors import DataError

SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
STAMP = ".visionpipe-archive.json"


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(SUFFIXES)


def _unsafe_name(name: str) -> str | None:
    """Why a member name would escape the target folder, or None."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":"):
        return "an absolute path"
    if ".." in PurePosixPath(posix).parts:
        return "a '..' component that leads outside the target folder"
    if "\0" in posix:
        return "a NUL character"
    return None


def _check_zip(archive: Path, zf: zipfile.ZipFile) -> None:
    for info in zf.infolist():
        why = _unsafe_name(info.filename)
        mode = info.external_attr >> 16
        if why is None and stat.S_ISLNK(mode):
            why = "a symbolic link"
        if why:
            raise _refused(archive, info.filename, why)


def _check_tar(archive: Path, tf: tarfile.TarFile) -> None:
    for member in tf.getmembers():
        why = _unsafe_name(member.name)
        if why is None and (member.issym() or member.islnk()):
            why = f"a link (to '{member.linkname}')"
        elif why is None and not (member.isfile() or member.isdir()):
            why = "a device, FIFO or other special file"
        if why:
            raise _refused(archive, member.name, why)


def _refused(archive: Path, member: str, why: str) -> DataError:
    return DataError(f"{archive}: refused to extract: member '{member}' is {why}; nothing was "
                     "extracted. Rebuild the archive with paths relative to its own top "
                     "folder and no links")


def safe_extract(archive: Path, target: Path) -> None:
    """Extract ``archive`` into ``target`` (replaced whole), refusing unsafe members."""
    archive, target = Path(archive), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                _check_zip(archive, zf)
                tmp.mkdir()
                zf.extractall(tmp)
        else:
            with tarfile.open(archive) as tf:
                _check_tar(archive, tf)
                tmp.mkdir()
                # The data filter repeats the checks above inside tarfile itself.
                tf.extractall(tmp, filter="data")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"{archive}: cannot be extracted ({type(exc).__name__}: {exc}); "
                        "check that the file is a complete .zip or .tar archive") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def source_folder(path: str, root: Path) -> Path:
    """The folder a prepare source reads: ``path`` (relative to ``root``) itself, or, for an
    archive, its extraction under ``root/data/extracted/``."""
    folder = Path(path)
    folder = folder if folder.is_absolute() else root / folder
    if not is_archive(folder) or folder.is_dir():
        return folder
    if not folder.is_file():
        raise DataError(f"{path}: archive not found (from prepare.<task>.path); give the path "
                        "of a .zip or .tar(.gz) file, or of a folder")
    target = root / "data" / "extracted" / folder.name
    checksum = records.checksum(folder.parent, [folder.name])
    stamp = target / STAMP
    try:
        fresh = json.loads(stamp.read_text(encoding="utf-8")).get("checksum") == checksum
    except (OSError, ValueError):
        fresh = False
    if not fresh:
        safe_extract(folder, target)
        write_json(stamp, {"archive": str(folder), "checksum": checksum})
    entries = [p for p in target.iterdir() if p.name != STAMP]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return target
