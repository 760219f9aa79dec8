"""A temporary copy of the repository where the real `dvc repro` runs."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import yaml

GIT = ["git", "-c", "user.name=visionpipe-tests", "-c", "user.email=tests@visionpipe.invalid",
       "-c", "commit.gpgsign=false"]


# `dvc exp run` commits experiments: give it an identity on machines that have none.
IDENTITY = {f"GIT_{who}_{what}": value for who in ("AUTHOR", "COMMITTER")
            for what, value in (("NAME", "visionpipe-tests"),
                                ("EMAIL", "tests@visionpipe.invalid"))}


def run(cmd: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a command, returning its result with stdout and stderr merged."""
    return subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout, env={**os.environ, **IDENTITY},
                          check=False)


def copy_repo(src: Path, dst: Path, edit_params: Callable[[dict], None] | None = None) -> Path:
    """Copy the files git knows of (tracked or not ignored), edit params, commit."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=src, capture_output=True, check=True)
    for name in filter(None, listed.stdout.decode().split("\0")):
        path = src / name
        if path.is_file() and not name.startswith(("data/", "models/", "reports/")):
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dst / name)
    (dst / "dvc.lock").unlink(missing_ok=True)
    if edit_params is not None:
        params = yaml.safe_load((dst / "params.yaml").read_text())
        edit_params(params)
        (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], GIT + ["add", "-A"], GIT + ["commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dst, check=True, capture_output=True)
    return dst
