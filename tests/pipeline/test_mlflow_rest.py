"""MLflow is where models are compared: a real `mlflow server` on the database a real `dvc repro`
wrote, asked over its REST API for what the runs table shows (duration, Models, Dataset, headline
metrics, epochs) and for the registry's champion alias."""

from __future__ import annotations

import csv
import json
import shlex
import shutil
import urllib.request

import pytest

from tests.helpers import EPOCHS, copy_repo, mlflow_server, rest, run, shrink
from visionpipe.headline import headline

pytestmark = pytest.mark.slow

STAGES = ("train", "evaluate", "export")
RUNS_VIEW = "#/experiments/{}/runs?workflowType=machine_learning"
UI_COMMAND = "mlflow ui --backend-store-uri sqlite:///mlflow.db"  # run from the repo root


def _shrink(params: dict) -> None:
    """The shrunk pipeline (one MLP, 2 epochs), exporting TFLite only: the other formats are
    test_dvc_pipeline's business and would only add time here."""
    shrink(params)
    params["export"]["formats"] = ["tflite"]


def _read(repo, path: str) -> dict:
    return json.loads((repo / path).read_text())


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, repo_root):
    """The shrunk pipeline run once by `dvc repro`, logging to <repo>/mlflow.db."""
    repo = copy_repo(repo_root, tmp_path_factory.mktemp("mlflow-rest"), _shrink)
    result = run(["dvc", "repro"], repo, MLFLOW_TRACKING_URI=f"sqlite:///{repo / 'mlflow.db'}")
    assert result.returncode == 0, result.stdout[-4000:]
    return repo, result.stdout


@pytest.fixture(scope="module")
def server(pipeline):
    """A real `mlflow server` on a free port, started from the repository root with the
    backend store of the command export printed (`mlflow ui` is MLflow's alias of `mlflow
    server`): the REST answers below are what that command serves."""
    repo, output = pipeline
    printed = [ln for ln in output.splitlines() if ln.startswith("mlflow:")]
    assert len(printed) == 1 and printed[0].endswith(f"(start the UI: {UI_COMMAND})"), printed
    program, command, *args = shlex.split(UI_COMMAND)
    assert (program, command) == ("mlflow", "ui")
    with mlflow_server(repo, store_args=args) as base:
        yield base


@pytest.fixture(scope="module")
def logged(pipeline, server):
    """The run file, the experiment and the run as runs/search returns them."""
    repo, _ = pipeline
    state = _read(repo, "models/mlp/mlflow_run.json")
    assert state["status"] == "logged", state
    exp = rest(server, "experiments/get-by-name",
               experiment_name="visionpipe-classification")["experiment"]
    runs = rest(server, "runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
    assert [r["info"]["run_id"] for r in runs] == [state["run_id"]]
    return state, exp, runs[0]


def _metrics(run_json: dict) -> dict[str, float]:
    return {m["key"]: m["value"] for m in run_json["data"].get("metrics", [])}


def test_run_lasts_as_long_as_its_stages_work(pipeline, logged):
    """Not the wall time from train's start to export's end, during which the run stays open."""
    repo, _ = pipeline
    state, _, got = logged
    info = got["info"]
    assert info["status"] == "FINISHED"
    start, end = int(info["start_time"]), int(info["end_time"])
    reports = {s: _read(repo, f"reports/emissions/mlp/{s}.json") for s in STAGES}
    assert all(r["status"] == "measured" and r["duration_s"] > 0 for r in reports.values())
    work_s = sum(r["duration_s"] for r in reports.values())
    assert end - start == pytest.approx(1000 * work_s, abs=3)
    assert state["durations_s"] == pytest.approx({s: r["duration_s"]
                                                  for s, r in reports.items()}, abs=1e-3)
    # Export wrote its report just before logging, well after the run opened: evaluate and
    # export each started a process and loaded the model in between.
    export_end = (repo / "reports/export/mlp.json").stat().st_mtime * 1000
    assert export_end - start > (end - start) + 1000


def test_trained_model_is_a_logged_model_of_the_run_and_registered_from_it(
        pipeline, server, logged):
    repo, _ = pipeline
    state, exp, got = logged
    found = rest(server, "logged-models/search", {"experiment_ids": [exp["experiment_id"]]})
    assert len(found["models"]) == 1
    model = found["models"][0]
    info = model["info"]
    meta = _read(repo, "models/mlp/model.json")
    assert info["source_run_id"] == state["run_id"] and info["model_id"] == state["model_id"]
    assert info["name"] == "mlp" and info["status"] == "LOGGED_MODEL_READY"
    # The run lists it as its output at the kept epoch (the runs table's Models column).
    assert got["outputs"]["model_outputs"] == [{"model_id": info["model_id"],
                                                "step": meta["kept_epoch"]}]
    mlmodel = (repo / "mlartifacts" / "visionpipe-classification" / "models"
               / info["model_id"] / "artifacts" / "MLmodel").read_text()
    assert info["artifact_uri"].endswith(f"/models/{info['model_id']}/artifacts")
    assert "keras:" in mlmodel and "signature:" in mlmodel
    assert f"model_id: {info['model_id']}" in mlmodel
    # Its page shows the test metrics, measured on the prepared dataset.
    linked = {m["key"]: m for m in model["data"]["metrics"]}
    metrics = _read(repo, "reports/metrics/mlp.json")
    assert linked["test_accuracy"]["value"] == pytest.approx(headline(metrics)["accuracy"])
    assert linked["test_accuracy"]["dataset_name"] == "shapes"
    assert linked["val_loss"]["step"] == meta["kept_epoch"]
    versions = rest(server, "model-versions/search", filter="name='visionpipe-mlp'")
    [version] = versions["model_versions"]
    assert version["source"] == f"models:/{info['model_id']}"
    assert version["run_id"] == state["run_id"]


def test_prepared_dataset_is_the_runs_training_input(pipeline, logged):
    repo, _ = pipeline
    _, _, got = logged
    manifest = _read(repo, "data/prepared/classification/manifest.json")
    [entry] = got["inputs"]["dataset_inputs"]
    dataset = entry["dataset"]
    assert dataset["name"] == manifest["source"]["name"] == "shapes"
    algorithm, hexdigest = manifest["checksum"].split(":")
    assert algorithm == "sha256" and dataset["digest"] == hexdigest[:12]
    assert json.loads(dataset["source"]) == {"uri": "data/prepared/classification"}
    assert dataset["source_type"] == "local"
    assert json.loads(dataset["profile"])["counts"] == manifest["counts"]
    assert {t["key"]: t["value"] for t in entry["tags"]} == {"mlflow.data.context": "training"}


def test_headline_metrics_have_short_names_and_the_kept_epochs_values(pipeline, server,
                                                                      logged):
    repo, _ = pipeline
    state, _, got = logged
    values = _metrics(got)
    metrics = _read(repo, "reports/metrics/mlp.json")
    meta = _read(repo, "models/mlp/model.json")
    figures = headline(metrics)
    assert values["test_accuracy"] == pytest.approx(figures["accuracy"])
    assert values["test_macro_f1"] == pytest.approx(figures["macro_f1"])
    assert values["test_accuracy"] == pytest.approx(metrics["test"]["accuracy"], abs=5e-5)
    assert values["params"] == metrics["cost"]["params"] == meta["params"]
    assert values["latency_ms"] == pytest.approx(figures["latency_ms"])
    train = _read(repo, "reports/emissions/mlp/train.json")
    assert values["train_s"] == pytest.approx(round(train["duration_s"], 1))
    # The kept epoch's validation figures, not the last epoch's.
    kept = meta["kept_epoch_metrics"]
    assert values["kept_epoch"] == meta["kept_epoch"]
    assert values["best_val_loss"] == pytest.approx(kept["val_loss"])
    assert values["best_val_accuracy"] == pytest.approx(kept["val_accuracy"])
    with open(repo / "reports/train/mlp/history.csv") as fh:
        rows = list(csv.DictReader(fh))
    val_losses = [float(r["val_loss"]) for r in rows]
    assert values["best_val_loss"] == pytest.approx(min(val_losses))  # monitor val_loss
    assert float(rows[meta["kept_epoch"] - 1]["val_loss"]) == pytest.approx(kept["val_loss"])
    # CO2 in grams of all three stages; it grew as each stage added its own.
    kg = [_read(repo, f"reports/emissions/mlp/{s}.json")["emissions_kg"] for s in STAGES]
    assert all(k > 0 for k in kg)
    assert values["co2_g"] == pytest.approx(1000 * sum(kg), rel=1e-9)
    history = rest(server, "metrics/get-history", run_id=state["run_id"], metric_key="co2_g")
    grams = [m["value"] for m in sorted(history["metrics"], key=lambda m: m["timestamp"])]
    assert grams == pytest.approx([1000 * kg[0], 1000 * (kg[0] + kg[1]), 1000 * sum(kg)])
    short = ("test_accuracy", "test_macro_f1", "params", "latency_ms", "train_s", "kept_epoch",
             "best_val_loss", "best_val_accuracy", "co2_g")
    assert not [k for k in short if "." in k]
    # The detailed figures stay beside them.
    assert values["test.loss"] == pytest.approx(metrics["test"]["loss"])


def test_epochs_are_steps_from_one(pipeline, server, logged):
    repo, _ = pipeline
    state, _, _ = logged
    with open(repo / "reports/train/mlp/history.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))
    for key in ("loss", "val_loss", "accuracy", "val_accuracy", "learning_rate"):
        history = rest(server, "metrics/get-history", run_id=state["run_id"], metric_key=key)
        got = sorted((m["step"], m["value"]) for m in history["metrics"])
        assert [step for step, _ in got] == list(range(1, EPOCHS + 1)), key
        assert [v for _, v in got] == pytest.approx([float(r[key]) for r in rows]), key


def test_champion_alias_is_on_the_version_that_passed_export(pipeline, server, logged):
    repo, _ = pipeline
    state, _, _ = logged
    assert _read(repo, "reports/export/mlp.json")["passed"] is True
    champion = rest(server, "registered-models/alias", name="visionpipe-mlp",
                    alias="champion")["model_version"]
    assert champion["version"] == str(state["registered_model"]["version"]) == "1"
    assert champion["run_id"] == state["run_id"]
    tags = {t["key"]: t["value"] for t in champion["tags"]}
    assert tags["export.parity_passed"] == "True"
    metrics = _read(repo, "reports/metrics/mlp.json")
    assert float(tags["test.accuracy"]) == pytest.approx(metrics["test"]["accuracy"])
    assert float(tags["test_accuracy"]) == pytest.approx(headline(metrics)["accuracy"])


def test_champion_moves_only_to_a_better_version_that_passed_export(pipeline, logged,
                                                                    tmp_path, monkeypatch):
    """The ranking rule, on a copy of the pipeline's registry: new versions of the same
    logged model with other test figures and parity verdicts."""
    from mlflow import MlflowClient

    from visionpipe.tracking.mlflow_runs import update_champion

    repo, _ = pipeline
    state, _, _ = logged
    db = tmp_path / "copy.db"
    shutil.copy(repo / "mlflow.db", db)
    # MLflow's sqlite registry looks a models:/ source up through the default tracking URI:
    # the environment's, unless mlflow.set_tracking_uri ran earlier in this process (a stage
    # run in-process by an earlier test on the same worker), whose URI then wins; both point
    # at the copy here and are put back after.
    from mlflow.tracking._tracking_service import utils as tracking_utils

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.setattr(tracking_utils, "_tracking_uri", f"sqlite:///{db}")
    client = MlflowClient(f"sqlite:///{db}")
    name = "visionpipe-mlp"
    accuracy = _read(repo, "reports/metrics/mlp.json")["test"]["accuracy"]

    def new_version(score: float, passed: bool) -> str:
        client.create_model_version(
            name, state["model_uri"], run_id=state["run_id"],
            tags={"test.accuracy": str(score), "export.parity_passed": str(passed)})
        return update_champion(client, name, "classification")

    def champion() -> str:
        return str(client.get_model_version_by_alias(name, "champion").version)

    assert champion() == "1"
    assert new_version(min(accuracy + 0.3, 1.0), passed=False) == "1"  # v2 failed parity
    assert new_version(accuracy, passed=True) == "1"  # v3 only ties
    assert new_version(min(accuracy + 0.2, 1.0) - 1e-6, passed=True) == "4"  # v4 beats it
    assert champion() == "4"
    assert new_version(accuracy, passed=True) == "4"  # v5 is worse
    assert champion() == "4"


def test_export_prints_one_line_with_the_runs_view_and_the_ui_command(pipeline, server,
                                                                       logged):
    _, output = pipeline
    _, exp, _ = logged
    lines = [ln for ln in output.splitlines() if ln.startswith("mlflow:")]
    url = f"http://127.0.0.1:5000/{RUNS_VIEW.format(exp['experiment_id'])}"
    assert lines == [f"mlflow: mlp run mlp -> {url}  (start the UI: {UI_COMMAND})"]
    # The server started with that command's store serves the app at that address (the part
    # after # is the app's own route, read by the browser).
    with urllib.request.urlopen(url.replace("http://127.0.0.1:5000", server).split("#")[0],
                                timeout=30) as resp:
        assert resp.status == 200 and b"<html" in resp.read().lower()
