"""Tracking faults through the real CLI: a tracking server that accepts connections and never
answers costs a stage one bounded timeout (then nothing more is sent to it), and `visionpipe log`
says which local file is missing or malformed, or why MLflow did not take the run, in one line.

The silent server counts the connections it accepts. The bound: train's first request (the
probe that opens the run) is one attempt (MLflow's retries are 0 unless
MLFLOW_HTTP_REQUEST_MAX_RETRIES says otherwise, and these commands run without it); after its
timeout the stage sends nothing more, so train costs 1 connection; evaluate finds train's run
pending and sends nothing (0); a replay against it costs 1 more.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import (
    TINY_MODEL,
    HangingProxy,
    SilentServer,
    child_env,
    mlflow_server,
    prepare_project,
    tiny_params,
)
from visionpipe.tracking.mlflow_runs import RETRIES_ENV, TIMEOUT_ENV

TIMEOUT = 2  # the setting under test: tracking.timeout_s (MLFLOW_HTTP_REQUEST_TIMEOUT for log)
MODEL = TINY_MODEL


def cli(args: list[str], root: Path, uri: str, **env: str) -> subprocess.CompletedProcess:
    """`python -m visionpipe.cli ARGS` in ``root`` logging to ``uri``, as a person would run
    it: without MLflow's retry and timeout variables unless ``env`` sets them."""
    environ = child_env(MLFLOW_TRACKING_URI=uri, **env)
    for name in (RETRIES_ENV, TIMEOUT_ENV):
        if name not in env:
            environ.pop(name, None)
    return subprocess.run([sys.executable, "-m", "visionpipe.cli", *args, "--root", str(root),
                           "--params", str(root / "params.yaml")], cwd=root,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600, env=environ, check=False)


def lines(output: str) -> list[str]:
    return [ln for ln in output.splitlines() if ln.startswith("visionpipe:")]


@pytest.fixture(scope="module")
def silent():
    server = SilentServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def hung(tmp_path_factory, default_params_dict, silent):
    """A tiny MLP trained and evaluated through the CLI while the tracking server never
    answers: (project, train's result, evaluate's result, connections after each)."""
    data = tiny_params(default_params_dict)
    # params.yaml's tracking.timeout_s, MLflow's own variables unset (cli() drops them)
    data["tracking"].update(mlflow=True, system_metrics=True, timeout_s=TIMEOUT)
    root = tmp_path_factory.mktemp("silent-mlflow")
    prepare_project(root, data)
    train = cli(["train", "--model", MODEL], root, silent.uri)
    after_train = silent.accepted
    evaluate = cli(["evaluate", "--model", MODEL], root, silent.uri)
    state = json.loads((root / "models/mlp/mlflow_run.json").read_text())
    return root, train, evaluate, (after_train, silent.accepted), state


def test_a_silent_server_costs_train_one_timeout_and_evaluate_nothing(hung, silent):
    root, train, evaluate, (after_train, after_evaluate), state = hung
    assert train.returncode == 0, train.stdout[-3000:]
    assert "Traceback" not in train.stdout
    said = lines(train.stdout)
    assert len(said) == 1, said
    line = said[0]
    assert line.startswith(f"visionpipe: warning: MLflow at {silent.uri} did not answer within "
                           f"{TIMEOUT} s (")
    # urllib3's own words for the timeout it was given: the setting, not MLflow's 120 s.
    assert f"Read timed out. (read timeout={TIMEOUT})" in line
    assert "so nothing more was sent to it; not logged for mlp train: the run itself" in line
    assert line.endswith("replay with `visionpipe log --model mlp`.")
    assert after_train == 1
    # Evaluate finds train's run pending: it says so once and sends nothing.
    assert evaluate.returncode == 0, evaluate.stdout[-3000:]
    said = lines(evaluate.stdout)
    assert len(said) == 1 and f"MLflow at {silent.uri} not used: train's run is pending" \
        in said[0], said
    assert after_evaluate == 1
    assert state["status"] == "pending" and state["tracking_uri"] == silent.uri
    assert state["stages"] == {"train": "pending", "evaluate": "pending"}
    assert {"train: the run itself", "train: model", "evaluate: this stage (the run is not in "
            "MLflow)"} <= set(state["not_logged"])
    assert state["errors"]["train"].endswith(f"Read timed out. (read timeout={TIMEOUT})")
    assert state["errors"]["evaluate"] == f"train's run is pending at {silent.uri}"
    for path in ("models/mlp/model.keras", "reports/train/mlp/history.csv",
                 "reports/metrics/mlp.json"):
        assert (root / path).stat().st_size > 0, path


def test_a_replay_against_the_silent_server_says_so_and_costs_one_connection(hung, silent):
    root, *_ = hung
    before = silent.accepted
    result = cli(["log", "--model", MODEL], root, silent.uri, **{TIMEOUT_ENV: str(TIMEOUT)})
    assert result.returncode == 2, result.stdout[-3000:]
    said = lines(result.stdout)
    assert len(said) == 1 and "Traceback" not in result.stdout, result.stdout[-3000:]
    assert said[0].startswith(f"visionpipe: error: MLflow at {silent.uri} did not answer within "
                              f"{TIMEOUT} s (")
    assert "not logged: the run itself, params" in said[0]
    assert said[0].endswith("run `visionpipe log --model mlp` again once it answers")
    assert "still not reachable" not in said[0]
    assert silent.accepted == before + 1


def test_a_server_that_hangs_mid_stage_costs_one_timeout_then_the_run_replays(hung, tmp_path):
    """A real server behind a proxy that stops answering at the model's upload, after the
    run, its params and epoch metrics went through: train waits out that one request, then
    sends nothing more: not the end of the run (MLflow's `with start_run` exit sent one and
    waited out a second timeout), nothing at exit. System metrics are off here, so every
    request is the stage's own (their thread, a daemon, is told to stop, not waited on).
    Then `visionpipe log`, straight to the server, puts the whole run there."""
    from mlflow import MlflowClient

    root = Path(shutil.copytree(hung[0], tmp_path / "project"))
    shutil.rmtree(root / "models")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["tracking"]["system_metrics"] = False
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "store").mkdir()
    with mlflow_server(root / "store") as base:
        proxy = HangingProxy(base, "logged-models")
        try:
            result = cli(["train", "--model", MODEL], root, proxy.uri)
        finally:
            proxy.close()
        assert result.returncode == 0, result.stdout[-3000:]
        said = lines(result.stdout)
        assert len(said) == 1 and said[0].startswith(
            f"visionpipe: warning: MLflow at {proxy.uri} did not answer within {TIMEOUT} s"), said
        assert "not logged for mlp train: model" in said[0]
        assert len(proxy.hung) == 1 and "logged-models" in proxy.hung[0], proxy.hung

        replay = cli(["log", "--model", MODEL], root, base)
        assert replay.returncode == 0, replay.stdout[-3000:]
        assert lines(replay.stdout) == [], replay.stdout[-3000:]
        found = re.search(rf"logged mlp to {re.escape(base)}: experiment "
                          r"visionpipe-classification, run ([0-9a-f]{32})", replay.stdout)
        assert found, replay.stdout[-3000:]
        client = MlflowClient(base)
        got = client.get_run(found.group(1))
        assert got.info.status == "FINISHED"
        assert got.data.params["model.train.epochs"] == "2"
        steps = sorted(m.step for m in client.get_metric_history(got.info.run_id, "val_loss"))
        assert steps == [1, 2]
        models = client.search_logged_models([got.info.experiment_id])
        assert got.info.run_id in [m.source_run_id for m in models]
    state = json.loads((root / "models/mlp/mlflow_run.json").read_text())
    assert state["status"] == "logged" and state["run_id"] == got.info.run_id


# ------------------------------------------------ `visionpipe log` and its local files


def _remove(path: Path) -> None:
    path.unlink()


def _bad_history(path: Path) -> None:
    text = path.read_text().splitlines()
    cells = text[2].split(",")
    cells[1] = "n/a"
    path.write_text("\n".join([*text[:2], ",".join(cells), *text[3:]]) + "\n")


def _cut_json(path: Path) -> None:
    path.write_text(path.read_text()[:40])


def _not_a_zip(path: Path) -> None:
    path.write_bytes(b"not a keras archive")


RESTORE_HISTORY = ("restore it with `dvc checkout reports/train/mlp/history.csv` "
                   "(or `dvc repro train@mlp`)")
RESTORE_DATA = ("restore it with `dvc checkout data/prepared/classification` "
                "(or `dvc repro prepare@classification`)")


@pytest.mark.parametrize("path, damage, expected", [
    ("reports/train/mlp/history.csv", _remove,
     f"reports/train/mlp/history.csv: not found; {RESTORE_HISTORY}"),
    ("reports/train/mlp/history.csv", _bad_history,
     "reports/train/mlp/history.csv: line 3, column "),
    ("data/prepared/classification/manifest.json", _remove,
     f"data/prepared/classification/manifest.json: not found; {RESTORE_DATA}"),
    ("data/prepared/classification/manifest.json", _cut_json,
     "data/prepared/classification/manifest.json: not valid JSON ("),
    ("reports/metrics/mlp.json", _cut_json,
     "reports/metrics/mlp.json: not valid JSON ("),
    ("models/mlp/model.json", _remove,
     "models/mlp/model.json: not found; restore it with `dvc checkout models/mlp/model.json` "
     "(or `dvc repro train@mlp`)"),
    ("models/mlp/model.keras", _not_a_zip,
     "models/mlp/model.keras: cannot be loaded safely ("),
], ids=["history-missing", "history-not-a-number", "manifest-missing", "manifest-cut",
        "metrics-cut", "model-json-missing", "model-not-a-zip"])
def test_replay_names_a_missing_or_malformed_local_file(hung, tmp_path, path, damage,
                                                        expected):
    """One line naming the file and what brings it back; nothing is sent to the store (its
    database is never created) and MLflow is not blamed."""
    project = tmp_path / "project"
    shutil.copytree(hung[0], project)
    damage(project / path)
    db = tmp_path / "store" / "mlflow.db"
    result = cli(["log", "--model", MODEL], project, f"sqlite:///{db}")
    assert result.returncode == 2, result.stdout[-3000:]
    said = lines(result.stdout)
    assert len(said) == 1 and "Traceback" not in result.stdout, result.stdout[-3000:]
    assert said[0].startswith(f"visionpipe: error: {expected}"), said[0]
    assert "MLflow" not in said[0] and "reachable" not in said[0]
    if damage is not _remove:
        assert said[0].endswith("`)"), said[0]  # ... what brings it back
    assert not db.exists()


def test_replay_into_a_store_that_fails_says_why_not_unreachable(hung, tmp_path):
    """The store is there but its artifact folder cannot be made (a file stands where the
    folder goes): the line says MLflow failed and why, not that it is unreachable."""
    project = tmp_path / "project"
    shutil.copytree(hung[0], project)
    shutil.rmtree(project / "mlartifacts", ignore_errors=True)
    (project / "mlartifacts").write_text("a file where the artifact folder goes")
    db = tmp_path / "mlflow.db"
    result = cli(["log", "--model", MODEL], project, f"sqlite:///{db}")
    assert result.returncode == 2, result.stdout[-3000:]
    said = lines(result.stdout)
    assert len(said) == 1 and "Traceback" not in result.stdout, result.stdout[-3000:]
    line = said[0]
    assert line.startswith(f"visionpipe: error: MLflow at sqlite:///{db} failed (")
    assert "Not a directory" in line or "File exists" in line, line
    assert "not reachable" not in line
    assert re.search(r"not logged for mlp: dataset stats, .*\(run [0-9a-f]{32} holds the rest\)",
                     line), line
    assert line.endswith("fix that and run `visionpipe log --model mlp` again")
    state = json.loads((project / "models/mlp/mlflow_run.json").read_text())
    assert state["status"] == "pending" and "replay: dataset stats" in state["not_logged"]
