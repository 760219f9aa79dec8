"""A write that fails because the disk is full: one line naming the file, nothing half-written.

Two real ways to fill a disk, both through the CLI: a project on a 64 KiB tmpfs (ENOSPC from
the kernel; needs the right to mount, which root has here and in CI) and a process whose file
size limit (RLIMIT_FSIZE) is 1 KiB (EFBIG, the same code path for a quota or a limit). prepare
writes its shards through TensorFlow's TFRecordWriter, which words the error in its own text
("<path>; No space left on device"), so both the errno and the text are covered.
"""

from __future__ import annotations

import errno
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from visionpipe.errors import disk_full_line


def _project(root: Path, repo_root: Path) -> None:
    """A project whose classification data is a folder of 12 tiny images in two classes."""
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / "images" / cls).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / cls / f"{i}.png")
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["prepare"]["classification"].update(
        source="folder", path="images", image_size=[16, 16],
        splits={"train": 0.5, "val": 0.25, "test": 0.25})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _prepare(cwd: Path, preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "visionpipe.cli", "prepare", "--task",
                           "classification"], cwd=cwd, capture_output=True, text=True,
                          timeout=300, preexec_fn=preexec)


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("visionpipe:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def tmpfs(tmp_path):
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the size-limit "
                    "test covers the same code path")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_during_prepare_is_one_line_naming_the_shard(tmpfs, repo_root):
    _project(tmpfs, repo_root)
    line = _one_error_line(_prepare(tmpfs))
    assert line.startswith("visionpipe: error: no space left on device while writing "
                           "data/prepared/"), line
    assert ".tfrecord: free space on that disk" in line and "dvc checkout" in line
    # fresh_dir removed its temporary folder: no partial shards left behind
    assert not list((tmpfs / "data").rglob("*.tfrecord"))


def test_a_file_size_limit_during_prepare_is_one_line(tmp_path, repo_root):
    _project(tmp_path, repo_root)

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))

    line = _one_error_line(_prepare(tmp_path, limit))
    assert "file too large (a file size limit was reached) while writing data/prepared/" in line
    # the shapes default (generated straight into prepare's records): the same line, and a
    # full disk there is not "no network"
    folder_params = (tmp_path / "params.yaml").read_text()
    shutil.copy(repo_root / "params.yaml", tmp_path / "params.yaml")
    line = _one_error_line(_prepare(tmp_path, limit))
    assert line.startswith("visionpipe: error: file too large (a file size limit was reached) "
                           "while writing data/prepared/"), line
    assert line.count(".tfrecord") == 1 and "downloaded" not in line
    (tmp_path / "params.yaml").write_text(folder_params)
    assert not list((tmp_path / "data").rglob("*.tfrecord"))
    # the same folder prepares once the limit is gone: the failure lost nothing
    shutil.rmtree(tmp_path / "data", ignore_errors=True)
    assert _prepare(tmp_path).returncode == 0


def test_disk_full_line_reads_errno_tf_text_and_chains():
    assert disk_full_line(ValueError("no")) is None
    assert disk_full_line(OSError(errno.ENOENT, "missing", "x")) is None
    err = OSError(errno.ENOSPC, "No space left on device", "/elsewhere/m.keras")
    assert disk_full_line(err).startswith("no space left on device while writing "
                                          "/elsewhere/m.keras: ")
    wrapped = RuntimeError("saving failed")
    wrapped.__cause__ = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert disk_full_line(wrapped).startswith("disk quota exceeded: free space")
    tf_like = RuntimeError("/x/train-00000.tfrecord; No space left on device")
    assert "while writing /x/train-00000.tfrecord:" in disk_full_line(tf_like)
