"""Datasets given as archives: extracted safely, or refused with the member named."""

from __future__ import annotations

import io
import json
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from visionpipe.data import archive
from visionpipe.data.sources import image_folder
from visionpipe.errors import DataError


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _info(name: str, kind=tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def _zip(path: Path, names: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in names.items():
            zf.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def _nothing_escaped(tmp_path: Path, before: set[Path]) -> None:
    assert set(tmp_path.parent.iterdir()) == before
    assert not (tmp_path / "root" / "data" / "extracted").exists() or not any(
        (tmp_path / "root" / "data" / "extracted").iterdir())


@pytest.mark.parametrize("name,why", [
    ("../escaped.txt", "a '..' component that leads outside the target folder"),
    ("images/../../escaped.txt", "a '..' component that leads outside the target folder"),
    ("/tmp/escaped.txt", "an absolute path"),
    ("C:/escaped.txt", "an absolute path"),
])
def test_zip_members_outside_the_target_are_refused_before_anything_is_written(
        tmp_path, name, why):
    zpath = _zip(tmp_path / "evil.zip", {"images/ok.txt": b"fine", name: b"owned"})
    before = set(tmp_path.parent.iterdir())
    with pytest.raises(DataError) as err:
        archive.source_folder(str(zpath), tmp_path / "root")
    assert str(err.value) == (
        f"{zpath}: refused to extract: member '{name}' is {why}; nothing was extracted. "
        "Rebuild the archive with paths relative to its own top folder and no links")
    _nothing_escaped(tmp_path, before)
    assert not (tmp_path / "root" / "data" / "extracted" / "evil.zip").exists()


def test_zip_symlink_is_refused(tmp_path):
    zpath = _zip(tmp_path / "link.zip", {"a.txt": b"x"}, links={"passwd": "/etc/passwd"})
    with pytest.raises(DataError, match="member 'passwd' is a symbolic link"):
        archive.safe_extract(zpath, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("member,why", [
    (_info("../escaped.txt"), "a '..' component"),
    (_info("/abs/escaped.txt"), "an absolute path"),
    (_info("data/passwd", tarfile.SYMTYPE, "/etc/passwd"), "a link (to '/etc/passwd')"),
    (_info("data/up", tarfile.SYMTYPE, "../../.."), "a link (to '../../..')"),
    (_info("data/hard", tarfile.LNKTYPE, "/etc/passwd"), "a link (to '/etc/passwd')"),
    (_info("data/dev", tarfile.CHRTYPE), "a device, FIFO or other special file"),
])
def test_tar_members_escaping_or_linking_out_are_refused(tmp_path, member, why):
    data = b"owned" if member.isfile() else None
    tpath = _tar(tmp_path / "evil.tar.gz", [(_info("data/ok.txt"), b"fine"), (member, data)])
    with pytest.raises(DataError) as err:
        archive.safe_extract(tpath, tmp_path / "out")
    assert f"member '{member.name}' is {why}" in str(err.value)
    assert str(err.value).startswith(f"{tpath}: refused to extract")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.tmp").exists()
    assert not (tmp_path / "escaped.txt").exists()


def test_a_truncated_or_fake_archive_is_a_clear_error(tmp_path):
    good = _zip(tmp_path / "good.zip", {"a/b.txt": b"x" * 5000})
    cut = tmp_path / "cut.zip"
    cut.write_bytes(good.read_bytes()[:100])
    with pytest.raises(DataError, match=r"cut.zip: cannot be extracted \(BadZipFile"):
        archive.safe_extract(cut, tmp_path / "out")
    fake = tmp_path / "fake.tar.gz"
    fake.write_bytes(b"not a tar at all")
    with pytest.raises(DataError, match=r"fake.tar.gz: cannot be extracted \(ReadError"):
        archive.safe_extract(fake, tmp_path / "out2")
    with pytest.raises(DataError, match=r"missing\.zip: archive not found"):
        archive.source_folder("missing.zip", tmp_path)


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_an_archived_image_folder_reads_like_the_folder(tmp_path, datasets_dir, kind):
    """hymenoptera (2 classes) packed with one top folder: the prepare source reads the same
    classes and pixels from the archive as from the folder."""
    src = datasets_dir / "hymenoptera"
    files = sorted(p for p in src.rglob("*") if p.is_file())[::10]  # every tenth file
    packed = tmp_path / f"hymenoptera.{kind}"
    if kind == "zip":
        _zip(packed, {f"hymenoptera/{p.relative_to(src)}": p.read_bytes() for p in files})
    else:
        with tarfile.open(packed, "w:gz") as tf:
            for p in files:
                tf.add(p, arcname=f"hymenoptera/{p.relative_to(src)}")
    plain = tmp_path / "plain"
    for p in files:
        (plain / p.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
        (plain / p.relative_to(src)).write_bytes(p.read_bytes())
    root = tmp_path / "root"
    folder = archive.source_folder(str(packed), root)
    assert folder == root / "data" / "extracted" / packed.name / "hymenoptera"
    a = image_folder.load_folder(folder, (32, 32), "stretch")
    b = image_folder.load_folder(plain, (32, 32), "stretch")
    assert a[0] == b[0] == ["ants", "bees"]
    assert [(ex.label, ex.image.tobytes()) for ex in a[1]] == [
        (ex.label, ex.image.tobytes()) for ex in b[1]]
    assert len(a[1]) + len(a[2]) == len(files)

    # Extracted once: a second call reuses it; a changed archive is extracted again.
    stamp = json.loads((folder.parent / archive.STAMP).read_text())
    marker = folder / "ants" / "marker"
    marker.write_text("kept while the archive is unchanged")
    assert archive.source_folder(str(packed), root) == folder and marker.exists()
    if kind == "zip":
        _zip(packed, {"only/x.txt": b"1"})
    else:
        _tar(packed, [(_info("only/x.txt"), b"1")])
    again = archive.source_folder(str(packed), root)
    assert again == root / "data" / "extracted" / packed.name / "only"
    assert not marker.exists() and (again / "x.txt").read_bytes() == b"1"
    assert json.loads((again.parent / archive.STAMP).read_text())["checksum"] != stamp[
        "checksum"]
