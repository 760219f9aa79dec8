"""visionpipe.warm: under DVC a stage runs in a forked child of a warm worker, and gives the
same outputs, console lines and exit status as in a process of its own."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import child_env, tiny_params

STAGE = "prepare@classification"


def _env(**extra: str) -> dict[str, str]:
    """What DVC gives a stage command (DVC_STAGE), quiet console."""
    return child_env(DVC_STAGE=STAGE, VISIONPIPE_VERBOSE="", **extra)


def _project(root: Path, params: dict) -> Path:
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def _prepare(root: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["visionpipe", "prepare", "--task", "classification", "--root",
                           str(root), "--params", str(root / "params.yaml")],
                          capture_output=True, text=True, timeout=600, env=env, check=False)


def _socket(env: dict[str, str]) -> Path:
    """The worker's socket for this code and environment, as the stage command computes it."""
    out = subprocess.run([sys.executable, "-c", "from visionpipe import warm; "
                          "print(warm.socket_path(warm.fingerprint()))"],
                         capture_output=True, text=True, env=env, check=True)
    return Path(out.stdout.strip())


def _files(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _timing(root: Path) -> dict:
    return json.loads((root / "reports" / "timings" / f"{STAGE}.json").read_text())


def test_a_stage_in_the_warm_worker_matches_one_in_its_own_process(tmp_path,
                                                                  default_params_dict):
    params = tiny_params(default_params_dict)
    env = _env()
    sock = _socket(env)
    cold_root = _project(tmp_path / "cold", params)
    cold = _prepare(cold_root, _env(VISIONPIPE_WARM="0"))
    assert cold.returncode == 0, cold.stderr
    assert _timing(cold_root)["warm_worker"] is False

    # A stage under DVC starts a worker when none answers (and runs in its own process).
    first = _prepare(_project(tmp_path / "first", params), env)
    assert first.returncode == 0, first.stderr
    deadline = time.monotonic() + 300
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(1)
    assert sock.exists(), f"no warm worker at {sock} after 300 s"

    warm_root = _project(tmp_path / "warm", params)
    warm = _prepare(warm_root, env)
    assert warm.returncode == 0, warm.stderr
    timing = _timing(warm_root)
    assert timing["warm_worker"] is True
    # Counted from the command's own start, so the hand-over is in it, and TensorFlow's
    # import is not (the worker did it): the start-up is a fraction of the cold one.
    assert 0 < timing["startup_s"] < _timing(cold_root)["startup_s"]

    # Same bytes, same console lines (each names its own project folder), same exit status.
    prepared = Path("data") / "prepared" / "classification"
    assert _files(warm_root / prepared) == _files(cold_root / prepared)
    assert _files(warm_root / prepared)  # not two empty folders
    for ours, theirs in ((warm.stdout, cold.stdout), (warm.stderr, cold.stderr)):
        assert ours.replace(str(warm_root), "ROOT") == theirs.replace(str(cold_root), "ROOT")

    # A user's mistake: the same single line and exit status 2 through the worker.
    bad = {**params, "prepare": {**params["prepare"], "classification": {
        **params["prepare"]["classification"], "shard_size": 0}}}
    bad_cold = _prepare(_project(tmp_path / "bad_cold", bad), _env(VISIONPIPE_WARM="0"))
    assert sock.exists()
    bad_warm = _prepare(_project(tmp_path / "bad_warm", bad), env)
    assert bad_cold.returncode == bad_warm.returncode == 2
    lines = bad_warm.stderr.replace(str(tmp_path / "bad_warm"), "ROOT").splitlines()
    assert lines == bad_cold.stderr.replace(str(tmp_path / "bad_cold"), "ROOT").splitlines()
    assert len(lines) == 1 and lines[0].startswith("visionpipe: error: ")
    assert "shard_size" in lines[0]


def test_the_fingerprint_follows_import_time_settings_only():
    """Another TF_/KERAS_ value makes another worker; an unrelated variable does not."""
    from visionpipe import warm

    base = {"PATH": "/usr/bin", "HOME": "/root"}
    assert warm.fingerprint(base) == warm.fingerprint({**base, "DVC_STAGE": "train@mlp",
                                                        "MLFLOW_TRACKING_URI": "sqlite:///x"})
    assert warm.fingerprint(base) != warm.fingerprint({**base, "TF_CPP_MIN_LOG_LEVEL": "0"})
    assert warm.fingerprint(base) != warm.fingerprint({**base, "KERAS_HOME": "/tmp/k"})
    assert warm.socket_path(warm.fingerprint(base)).name == f"{warm.fingerprint(base)}.sock"


def test_only_stages_under_dvc_use_a_worker(monkeypatch):
    from visionpipe import cli, warm

    monkeypatch.delenv(warm.ENV, raising=False)
    monkeypatch.setenv("DVC_STAGE", "train@mlp")
    assert warm.enabled()
    # cli.main asks a worker for pipeline stages only: not predict, summary, benchmark, log.
    asked = []
    with monkeypatch.context() as patched:
        patched.setattr(warm, "run", lambda words: asked.append(words) or 7)
        assert cli.main(["train", "--model", "mlp"]) == 7
        assert asked == [["train", "--model", "mlp"]]
        with pytest.raises(SystemExit):  # parsed in this process: --input and --output missing
            cli.main(["predict", "--model", "mlp"])
        assert len(asked) == 1
    monkeypatch.setenv(warm.ENV, "0")
    assert not warm.enabled()
    monkeypatch.delenv(warm.ENV)
    monkeypatch.delenv("DVC_STAGE")
    assert not warm.enabled()
