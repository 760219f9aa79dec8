"""Tracking never loses work: an unreachable MLflow, a later replay, and concurrent writers."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from tests.helpers import EPOCHS, child_env, copy_repo, run, shrink

pytestmark = pytest.mark.slow

UNREACHABLE = "http://127.0.0.1:1"


def _shrink(params: dict) -> None:
    """The shrunk pipeline, exporting TFLite only: the formats are test_dvc_pipeline's and
    test_export_formats' business; here each export would only add seconds."""
    shrink(params)
    params["export"]["formats"] = ["tflite"]


@pytest.fixture(scope="module")
def offline_repo(tmp_path_factory, repo_root):
    """The shrunk pipeline run end to end while the MLflow backend is unreachable."""
    repo = copy_repo(repo_root, tmp_path_factory.mktemp("offline"), _shrink)
    result = run(["dvc", "repro"], repo, MLFLOW_TRACKING_URI=UNREACHABLE)
    assert result.returncode == 0, result.stdout[-4000:]
    return repo, result.stdout


def test_unreachable_backend_finishes_with_one_warning_per_stage(offline_repo):
    repo, output = offline_repo
    warnings = [ln for ln in output.splitlines() if "visionpipe: warning: MLflow" in ln]
    assert len(warnings) == 3, warnings
    train = next(w for w in warnings if "not logged for mlp train:" in w)
    assert f"MLflow at {UNREACHABLE} not reachable" in train
    for item in ("the run itself", "params", "epoch metrics", "history", "CO2", "model"):
        assert item in train
    assert "replay with `visionpipe log --model mlp`" in train
    for path in ("models/mlp/model.keras", "reports/train/mlp/history.csv",
                 "reports/metrics/mlp.json", "reports/export/mlp.json",
                 "models/mlp/export/model.tflite"):
        assert (repo / path).stat().st_size > 0, path
    state = json.loads((repo / "models/mlp/mlflow_run.json").read_text())
    assert state["status"] == "pending" and state["tracking_uri"] == UNREACHABLE
    assert state["stages"] == {"train": "pending", "evaluate": "pending", "export": "pending"}
    assert "train: model" in state["not_logged"]
    # Each stage's duration is kept for the replay: its CO2 report's.
    reports = {s: json.loads((repo / f"reports/emissions/mlp/{s}.json").read_text())
               for s in ("train", "evaluate", "export")}
    assert state["durations_s"] == pytest.approx(
        {s: r["duration_s"] for s, r in reports.items()}, abs=1e-3)
    assert not [ln for ln in output.splitlines() if ln.startswith("mlflow:")]  # no UI link
    assert not (repo / "mlflow.db").exists()


def test_two_replays_at_once_log_everything_from_local_files(offline_repo, tmp_path):
    """`visionpipe log` replays the offline run from the local files. Two start together on a
    fresh database, as two queued experiments would: both runs are complete."""
    from mlflow import MlflowClient

    repo, _ = offline_repo
    db = tmp_path / "shared.db"
    env = child_env(MLFLOW_TRACKING_URI=f"sqlite:///{db}")
    procs = [subprocess.Popen(["visionpipe", "log", "--model", "mlp"], cwd=repo, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-2000:] for o in outputs]
    pattern = (rf"logged mlp to sqlite:///{re.escape(str(db))}: experiment "
               r"visionpipe-classification, run ([0-9a-f]{32})")
    matches = [re.search(pattern, o) for o in outputs]
    assert all(matches), [o[-2000:] for o in outputs]
    run_ids = {m.group(1) for m in matches}
    assert len(run_ids) == 2
    state = json.loads((repo / "models/mlp/mlflow_run.json").read_text())
    assert state["status"] == "logged" and state["run_id"] in run_ids
    metrics = json.loads((repo / "reports/metrics/mlp.json").read_text())
    # The database read directly (the REST API is test_dvc_pipeline's business).
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("visionpipe-classification")
    found = client.search_runs([exp.experiment_id])
    assert {r.info.run_id for r in found} == run_ids
    counts = {len(r.data.metrics) for r in found}
    assert len(counts) == 1 and counts.pop() > 20  # both runs complete, none cut short
    emissions = [json.loads((repo / f"reports/emissions/mlp/{s}.json").read_text())
                 for s in ("train", "evaluate", "export")]
    for got in found:
        values = got.data.metrics
        assert values["test.accuracy"] == pytest.approx(metrics["test"]["accuracy"])
        assert values["test_accuracy"] == pytest.approx(metrics["test"]["accuracy"], abs=5e-5)
        assert values["co2.train.emissions_kg"] > 0
        assert values["co2_g"] == pytest.approx(1000 * sum(e["emissions_kg"] for e in emissions))
        assert got.data.params["model.train.epochs"] == str(EPOCHS)
        history = client.get_metric_history(got.info.run_id, "val_loss")
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))
        top = {f.path for f in client.list_artifacts(got.info.run_id)}
        assert {"train", "evaluate", "export", "emissions"} <= top
        # As long as the stages' work took (their reports), not as long as the replay.
        work_ms = 1000 * sum(e["duration_s"] for e in emissions)
        assert got.info.end_time - got.info.start_time == pytest.approx(work_ms, abs=3)
    models = client.search_logged_models([exp.experiment_id])
    assert {m.source_run_id for m in models} == run_ids and len(models) == 2
    versions = client.search_model_versions("name='visionpipe-mlp'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert {v.run_id for v in versions} == run_ids
    assert {v.source for v in versions} == {f"models:/{m.model_id}" for m in models}
    champion = client.get_model_version_by_alias("visionpipe-mlp", "champion")
    assert str(champion.version) in {"1", "2"}  # equal figures: whichever ranked first
    assert champion.tags["export.parity_passed"] == "True"


def test_unreachable_replay_says_so_and_keeps_the_run_pending(offline_repo, tmp_path):
    repo, _ = offline_repo
    before = json.loads((repo / "models/mlp/mlflow_run.json").read_text())
    assert before["status"] == "logged"  # from the replays above
    result = run(["visionpipe", "log", "--model", "mlp"], repo, MLFLOW_TRACKING_URI=UNREACHABLE)
    assert result.returncode == 2
    assert "visionpipe: error: MLflow at http://127.0.0.1:1 still not reachable" in result.stdout
    assert "Traceback" not in result.stdout
    state = json.loads((repo / "models/mlp/mlflow_run.json").read_text())
    assert state["status"] == "pending" and state["tracking_uri"] == UNREACHABLE
    assert "replay: the run itself" in state["not_logged"]


def test_two_queued_experiments_at_once_log_to_the_parent_database(offline_repo):
    """`dvc queue start -j 2`: both run in DVC's temp copies, both land in <repo>/mlflow.db."""
    import time

    from mlflow import MlflowClient

    repo, _ = offline_repo
    assert run(["git", "add", "-A"], repo).returncode == 0
    assert run(["git", "commit", "-qm", "outputs"], repo).returncode == 0
    for lr in ("0.002", "0.003"):
        queued = run(["dvc", "exp", "run", "--queue", "-S",
                      f"models.mlp.train.learning_rate={lr}"], repo)
        assert queued.returncode == 0, queued.stdout
    # Output to a file, not a pipe: the queue's detached workers inherit it, and a pipe would
    # stay open until they exit (DVC stops an idle worker only after a minute without tasks).
    log = repo.parent / "queue-start.log"
    with open(log, "w") as out:
        started = subprocess.run(["dvc", "queue", "start", "-j", "2"], cwd=repo, stdout=out,
                                 stderr=subprocess.STDOUT, env=child_env(), timeout=300)
    assert started.returncode == 0, log.read_text()
    deadline = time.time() + 900
    try:
        while True:
            status = run(["dvc", "queue", "status"], repo).stdout
            if not re.search(r"\b(Running|Queued)\b", status) or time.time() > deadline:
                break
            time.sleep(5)
    finally:
        run(["dvc", "queue", "stop"], repo)  # the workers, now idle
    assert status.count("Success") == 2, status
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("visionpipe-classification")
    queued_runs = [r for r in client.search_runs([exp.experiment_id])
                   if r.data.tags.get("dvc.experiment")]
    assert sorted(r.data.params["model.train.learning_rate"] for r in queued_runs) == [
        "0.002", "0.003"]
    for r in queued_runs:
        assert r.info.status == "FINISHED"
        assert r.info.run_name == f"mlp-{r.data.tags['dvc.experiment']}"
        assert "test.accuracy" in r.data.metrics and "co2.total.emissions_kg" in r.data.metrics
    assert len({len(r.data.metrics) for r in queued_runs}) == 1
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db"))
