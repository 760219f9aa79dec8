"""Where runs are logged, and that tracking settings are no stage's dependency."""

from __future__ import annotations

import yaml

from tests.helpers import SilentServer
from visionpipe.config import load_params, parse_params
from visionpipe.layout import Layout
from visionpipe.tracking.mlflow_runs import artifact_location, flatten, numeric, tracking_uri


def _params(default_params_dict, **tracking):
    data = {**default_params_dict, "tracking": {**default_params_dict["tracking"], **tracking}}
    return parse_params(data)


def test_default_uri_is_absolute_sqlite_in_the_repo(default_params_dict, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    layout = Layout(tmp_path)
    assert tracking_uri(_params(default_params_dict), layout) == f"sqlite:///{tmp_path}/mlflow.db"
    assert artifact_location(layout, "e") == str(tmp_path / "mlartifacts" / "e")


def test_dvc_root_wins_so_temp_experiments_share_the_database(default_params_dict, tmp_path,
                                                             monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    temp_copy = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmp123"
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo"))
    uri = tracking_uri(_params(default_params_dict), Layout(temp_copy))
    assert uri == f"sqlite:///{tmp_path}/repo/mlflow.db"
    relative = tracking_uri(_params(default_params_dict, uri="sqlite:///runs/m.db"),
                            Layout(temp_copy))
    assert relative == f"sqlite:///{tmp_path}/repo/runs/m.db"


def test_environment_overrides_params(default_params_dict, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    params = _params(default_params_dict, uri="sqlite:////elsewhere.db")
    assert tracking_uri(params, Layout(tmp_path)) == "http://127.0.0.1:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking_uri(params, Layout(tmp_path)) == "sqlite:////elsewhere.db"


def test_flatten_and_numeric():
    data = {"a": {"b": 1, "c": [1, 2]}, "d": "x", "e": {"f": float("nan"), "g": True, "h": 2.5}}
    assert flatten(data) == {"a.b": 1, "a.c": [1, 2], "d": "x", "e.f": data["e"]["f"],
                             "e.g": True, "e.h": 2.5}
    assert numeric(data, "p.") == {"p.a.b": 1.0, "p.e.h": 2.5}


def test_no_stage_depends_on_tracking_params(repo_root):
    stages = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    deps = [key for stage in stages.values() for key in stage["do"].get("params", [])]
    assert deps and not any(str(k).startswith("tracking") for k in deps)


def test_every_model_is_a_dvc_artifact(repo_root):
    artifacts = yaml.safe_load((repo_root / "dvc.yaml").read_text())["artifacts"]
    for name in load_params(repo_root / "params.yaml").models:
        assert artifacts[name]["type"] == "model"
        assert artifacts[name]["path"] == f"models/{name}/export"
        assert artifacts[name]["labels"]


def test_credentials_in_params_are_refused_without_echoing_them(default_params_dict):
    import pytest

    from visionpipe.errors import ParamsError

    for uri in ("https://alice:s3cret@mlflow.example.com", "http://alice@127.0.0.1:5000/x"):
        with pytest.raises(ParamsError) as err:
            _params(default_params_dict, uri=uri)
        message = str(err.value)
        assert message.startswith("params.yaml: tracking.uri: holds credentials")
        assert "MLFLOW_TRACKING_USERNAME" in message and "MLFLOW_TRACKING_PASSWORD" in message
        assert "s3cret" not in message and "alice" not in message
    # An @ in the path or query is not a credential.
    assert _params(default_params_dict, uri="http://127.0.0.1:5000/a@b").tracking.uri


def test_credentials_from_the_environment_never_reach_the_logs_or_run_file(
        default_params_dict, tmp_path, monkeypatch, capsys):
    """A real RunLogger against an unreachable server whose URI carries a password."""
    import json

    from visionpipe.tracking.mlflow_runs import RunLogger, redact

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:s3cret@127.0.0.1:1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    assert redact("at http://alice:s3cret@127.0.0.1:1/api", "http://alice:s3cret@127.0.0.1:1") \
        == "at http://***@127.0.0.1:1/api"
    params = _params(default_params_dict)
    run = RunLogger(params, "mlp", Layout(tmp_path)).start()
    assert run.client is None and run.uri == "http://alice:s3cret@127.0.0.1:1"
    run.finish("train")
    err = capsys.readouterr().err
    assert "visionpipe: warning: MLflow at http://***@127.0.0.1:1 not reachable" in err
    state_text = (tmp_path / "models/mlp/mlflow_run.json").read_text()
    assert json.loads(state_text)["tracking_uri"] == "http://***@127.0.0.1:1"
    assert "s3cret" not in err + state_text and "alice" not in err + state_text


# ------------------------------------------ a tracking server that never answers, or refuses
# (tests.helpers.SilentServer)

def _unset(monkeypatch, name: str) -> None:
    """Remove ``name`` from the environment for this test, and whatever the code under test
    sets it to afterwards too (setenv records the original state, delenv the dummy)."""
    monkeypatch.setenv(name, "unset by the test")
    monkeypatch.delenv(name)


def test_the_request_timeout_is_the_setting_and_a_bad_one_is_refused(monkeypatch):
    import pytest

    from visionpipe.errors import VisionpipeError
    from visionpipe.tracking.mlflow_runs import REQUEST_TIMEOUT_S, TIMEOUT_ENV, request_timeout

    _unset(monkeypatch, TIMEOUT_ENV)
    assert request_timeout() == REQUEST_TIMEOUT_S == 15
    monkeypatch.setenv(TIMEOUT_ENV, "7")
    assert request_timeout() == 7
    for bad in ("abc", "0", "2.5", "-3"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(VisionpipeError) as err:
            request_timeout()
        assert str(err.value) == (f"MLFLOW_HTTP_REQUEST_TIMEOUT={bad!r}: not a whole number of "
                                  "seconds of at least 1; unset it (default 15) or set e.g. "
                                  "MLFLOW_HTTP_REQUEST_TIMEOUT=30")


def test_a_silent_server_costs_one_connection_then_nothing_is_sent(
        default_params_dict, tmp_path, monkeypatch, capsys):
    """A real RunLogger and MLflow client against a server that accepts and never answers:
    the first request times out after the setting (urllib3 says which timeout it was given),
    MLflow does not retry it, and nothing logged afterwards opens another connection."""
    import json
    import os

    from visionpipe.tracking.mlflow_runs import RETRIES_ENV, TIMEOUT_ENV, RunLogger

    with SilentServer() as silent:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", silent.uri)
        _unset(monkeypatch, TIMEOUT_ENV)  # params.yaml's tracking.timeout_s applies
        _unset(monkeypatch, RETRIES_ENV)  # the project's default applies: no retries
        default_params_dict["tracking"]["timeout_s"] = 1
        run = RunLogger(_params(default_params_dict), "mlp", Layout(tmp_path)).start()
        assert os.environ[RETRIES_ENV] == "0"
        assert silent.accepted == 1
        assert run.client is None and run.failure == "timeout" and run.timeout_s == 1
        assert run.error.endswith("Read timed out. (read timeout=1)"), run.error
        run.log_params({"seed": 1})
        run.log_metrics({"loss": 0.5}, step=1)
        run.log_files([tmp_path], "x", "files")
        state = run.finish("train")
        assert silent.accepted == 1
    said = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("visionpipe:")]
    assert len(said) == 1, said
    assert said[0].startswith(f"visionpipe: warning: MLflow at {silent.uri} did not answer "
                              "within 1 s (ReadTimeoutError: ")
    assert ("so nothing more was sent to it; not logged for mlp train: the run itself, params, "
            "metrics, files.") in said[0]
    assert said[0].endswith("replay with `visionpipe log --model mlp`.")
    assert state["status"] == "pending"
    written = json.loads((tmp_path / "models/mlp/mlflow_run.json").read_text())
    assert written["errors"]["train"] == run.error


def test_failures_are_told_apart_timeout_refused_and_an_answer(monkeypatch):
    """Real MLflow client requests: no answer in time, no connection, an HTTP error answer."""
    import socket

    from mlflow import MlflowClient

    from visionpipe.tracking.mlflow_runs import RETRIES_ENV, TIMEOUT_ENV, failure_kind

    monkeypatch.setenv(TIMEOUT_ENV, "1")
    monkeypatch.setenv(RETRIES_ENV, "0")

    def kind(uri: str) -> str:
        try:
            MlflowClient(uri).search_experiments(max_results=1)
        except Exception as exc:  # noqa: BLE001 - what MLflow raises is what is classified
            return failure_kind(exc)
        return "answered"

    with SilentServer() as silent:
        assert kind(silent.uri) == "timeout"
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    assert kind(f"http://127.0.0.1:{port}") == "unreachable"
    reply = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
             b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")
    with SilentServer(reply) as busy:
        assert kind(busy.uri) == "error"
        assert busy.accepted == 1  # not retried
    assert failure_kind(FileNotFoundError(2, "No such file")) == "error"


def _cli(args: list[str], cwd, **env: str):
    import subprocess
    import sys

    from tests.helpers import child_env

    return subprocess.run([sys.executable, "-m", "visionpipe.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env=child_env(**env), check=False)


def test_log_without_a_model_or_with_a_bad_timeout_is_one_line(tmp_path, repo_root):
    """`visionpipe log` in a project with no trained model names the model file and how to
    bring it back; a bad MLFLOW_HTTP_REQUEST_TIMEOUT is named before anything else."""
    (tmp_path / "params.yaml").write_text((repo_root / "params.yaml").read_text())
    db = tmp_path / "mlflow.db"
    cases = [({}, "visionpipe: error: models/mlp/model.keras: not found; restore it with "
                  "`dvc checkout models/mlp/model.keras` (or `dvc repro train@mlp`)"),
             ({"MLFLOW_HTTP_REQUEST_TIMEOUT": "soon"},
              "visionpipe: error: MLFLOW_HTTP_REQUEST_TIMEOUT='soon': not a whole number of "
              "seconds of at least 1; unset it (default 15) or set e.g. "
              "MLFLOW_HTTP_REQUEST_TIMEOUT=30")]
    for env, expected in cases:
        result = _cli(["log", "--model", "mlp"], tmp_path, MLFLOW_TRACKING_URI=f"sqlite:///{db}",
                      **env)
        assert result.returncode == 2, result.stderr[-2000:]
        said = [ln for ln in result.stderr.splitlines() if ln.startswith("visionpipe:")]
        assert said == [expected], result.stderr[-2000:]
        assert "Traceback" not in result.stderr
    assert not db.exists()
