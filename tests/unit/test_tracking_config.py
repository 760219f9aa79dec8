"""Where runs are logged, and that tracking settings are no stage's dependency."""

from __future__ import annotations

import yaml

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
