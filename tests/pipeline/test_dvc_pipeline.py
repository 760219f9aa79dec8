"""The real `dvc repro` on shrunk params, in a temporary copy of the repo: every output checked."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import tensorflow as tf
import yaml
from PIL import Image

from tests.helpers import EPOCHS, SPLITS, child_env, copy_repo, mlflow_server, rest, run, shrink
from visionpipe.console import NOISE
from visionpipe.data import records
from visionpipe.models.saving import load_model

pytestmark = pytest.mark.slow

# What the first `dvc repro` printed (stdout and stderr together), for the console test.
REPRO: dict[str, str] = {}


@pytest.fixture(scope="module")
def repo(tmp_path_factory, repo_root):
    dst = copy_repo(repo_root, tmp_path_factory.mktemp("pipeline"), shrink)
    result = run(["dvc", "repro"], dst)
    assert result.returncode == 0, result.stdout[-4000:]
    ran = re.findall(r"Running stage '([^']+)'", result.stdout)
    assert ran == ["prepare@classification", "augment@classification", "train@mlp",
                   "evaluate@mlp", "export@mlp"]
    REPRO["output"] = result.stdout
    return dst


def test_console_shows_each_stage_result_and_no_library_noise(repo):
    out = REPRO["output"]
    meta = json.loads((repo / "models/mlp/model.json").read_text())
    metrics = json.loads((repo / "reports/metrics/mlp.json").read_text())
    export = json.loads((repo / "reports/export/mlp.json").read_text())
    test = metrics["test"]
    assert (f"prepare@classification: shapes: {SPLITS['train']} train, {SPLITS['val']} val, "
            f"{SPLITS['test']} test images, 4 classes, 0 skipped") in out
    assert f"augment@classification: {2 * SPLITS['train']} train images" in out
    for epoch in range(1, EPOCHS + 1):  # one line per epoch (not a terminal), from 1
        assert len(re.findall(rf"^train@mlp epoch {epoch}/{EPOCHS}: .*val_loss", out,
                              re.M)) == 1
    kept = meta["kept_epoch_metrics"]["val_loss"]
    assert (f"train@mlp: {EPOCHS} epochs; kept epoch {meta['kept_epoch']} "
            f"(val_loss {kept:.4g}); model: models/mlp/model.keras "
            f"({meta['params']:,} params)") in out
    assert (f"evaluate@mlp: test accuracy {test['accuracy']:.4f}, macro_f1 "
            f"{test['macro_f1']:.4f} (baseline majority_class: "
            f"{test['baseline']['accuracy']:.4f})") in out
    assert "evaluate@mlp: plots in reports/plots/mlp/" in out
    for fmt, check in export["formats"].items():
        line = re.search(rf"^export@mlp: {fmt} +.*$", out, re.M)
        assert line and "parity passed" in line[0], (fmt, line)
        limit = check["limits"]["label_agreement"]
        assert f"label_agreement {check['label_agreement']:.4g} (min {limit['min']:g})" in line[0]
        assert check["path"] in line[0]
    assert "export@mlp: saved_model on resized images" in out
    assert "next: `visionpipe summary`" in out
    assert re.search(r"#/experiments/\d+/runs\?workflowType=machine_learning", out)
    # None of the noise a user saw before: TensorFlow/absl C++ lines, CUDA probes, Keras'
    # ran-out-of-data warning, TFDS "downloading" the embedded data, model summaries,
    # progress bars in a log, MLflow's own INFO lines.
    for noise in ("cuInit", "cuda", "I0000", "absl", "oneDNN", "ran out of data",
                  "Downloading", "downloaded and prepared", "Total params", "Layer (type)",
                  "it/s]", "img/s]", "INFO mlflow", "Successfully registered",
                  "XNNPACK", "fully_quantize", "Traceback", "Warning:"):
        assert noise not in out, noise
    # The summary went to a file instead.
    summary = (repo / "reports/train/mlp/summary.txt").read_text()
    assert "Total params" in summary and f"{meta['params']:,}" in summary
    assert len(out.splitlines()) < 70, out


def test_verbose_brings_back_the_details(repo, tmp_path):
    """--verbose (or VISIONPIPE_VERBOSE=1) shows the model summary and TensorFlow's lines."""
    root = tmp_path / "verbose"
    for part in ("data/prepared", "data/augmented"):
        shutil.copytree(repo / part, root / part)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["models"]["mlp"]["train"]["epochs"] = 1
    params["tracking"].update(mlflow=False, codecarbon=False)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    result = run(["visionpipe", "train", "--model", "mlp", "--root", str(root), "--params",
                  str(root / "params.yaml"), "--verbose"], repo)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Total params" in result.stdout  # the model summary
    assert any(NOISE.match(line) for line in result.stdout.splitlines())  # TensorFlow's own
    assert "train@mlp: 1 epochs; kept epoch 1" in result.stdout


def test_prepare_manifest_counts_and_checksum(repo):
    out = repo / "data/prepared/classification"
    manifest = records.read_manifest(out)
    assert manifest["counts"] == SPLITS
    assert manifest["class_names"] == ["circle", "square", "triangle", "star"]
    assert manifest["image_size"] == [32, 32]
    assert manifest["source"]["kind"] == "shapes" and manifest["source"]["seed"] == 42
    for split, n in SPLITS.items():
        assert sum(manifest["class_counts"][split].values()) == n
        assert len(list(records.read_split(out, split))) == n
    shards = [s for v in manifest["splits"].values() for s in v["shards"]]
    assert len(manifest["splits"]["train"]["shards"]) == 2  # 96 records, 50 per shard
    assert records.checksum(out, shards) == manifest["checksum"]
    assert manifest["skipped"] == {"count": 0, "by_reason": {}, "items": []}
    report = json.loads((repo / "reports/prepare/classification.json").read_text())
    assert report["counts"] == SPLITS and report["checksum"] == manifest["checksum"]
    assert report["class_counts"] == manifest["class_counts"]
    first = next(records.read_split(out, "test"))
    assert first.image.shape == (32, 32, 3) and first.mask is None and first.boxes is None


def test_augment_doubles_train_split_and_draws_preview(repo):
    manifest = records.read_manifest(repo / "data/augmented/classification")
    assert manifest["counts"] == {"train": 2 * SPLITS["train"], "original": SPLITS["train"],
                                  "augmented": SPLITS["train"]}
    prepared = records.read_manifest(repo / "data/prepared/classification")
    assert manifest["source"]["from_checksum"] == prepared["checksum"]
    ids = [ex.id for ex in records.read_split(repo / "data/augmented/classification", "train")]
    assert ids[:2] == ["train-000000", "train-000000-aug0"]
    preview = Image.open(repo / "reports/plots/augment/classification.png")
    assert preview.size[0] > 8 * 32  # 8 tiles of 32 px, scaled up


def test_train_writes_model_history_and_checkpoints(repo):
    meta = json.loads((repo / "models/mlp/model.json").read_text())
    assert meta["task"] == "classification" and meta["epochs"] == EPOCHS
    assert meta["class_names"] == ["circle", "square", "triangle", "star"]
    with open(repo / "reports/train/mlp/history.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))  # as printed
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"} <= set(rows[0])
    assert float(rows[0]["learning_rate"]) == pytest.approx(1e-3)
    state = json.loads((repo / "models/mlp/checkpoints/state.json").read_text())
    assert state["finished"] and state["epochs_done"] == EPOCHS
    assert state["last"] == f"epoch-{EPOCHS:04d}.keras"
    assert meta["kept_epoch"] == state["best_epoch"]
    kept = rows[meta["kept_epoch"] - 1]  # model.json and history.csv number epochs alike
    assert int(kept["epoch"]) == meta["kept_epoch"]
    assert float(kept["val_loss"]) == meta["kept_epoch_metrics"]["val_loss"]
    assert sorted(p.name for p in (repo / "models/mlp/checkpoints").iterdir()) == sorted(
        {"state.json", state["last"], state["best"]})
    assert [float(r["val_loss"]) for r in rows] == state["history"]["val_loss"]
    last = load_model(repo / "models/mlp/checkpoints" / state["last"])
    assert last.count_params() == meta["params"]


def test_metrics_match_a_recomputation(repo):
    metrics = json.loads((repo / "reports/metrics/mlp.json").read_text())
    model = load_model(repo / "models/mlp/model.keras")
    test = list(records.read_split(repo / "data/prepared/classification", "test"))
    x = np.stack([ex.image for ex in test]).astype(np.float32)
    y = np.array([ex.label for ex in test])
    accuracy = float((model.predict(x, verbose=0).argmax(1) == y).mean())
    assert metrics["test"]["accuracy"] == pytest.approx(accuracy)
    probs = model.predict(x, verbose=0)
    top2 = np.argsort(-probs, axis=1)[:, :2]
    assert metrics["test"]["top_2_accuracy"] == pytest.approx(
        np.mean([label in row for label, row in zip(y, top2, strict=True)]))
    assert metrics["test"]["num_test_images"] == SPLITS["test"]
    majority = np.bincount(y, minlength=4).max() / len(y)
    assert metrics["test"]["baseline"]["accuracy"] == pytest.approx(majority)
    cost = metrics["cost"]
    assert cost["params"] == model.count_params()
    # One dense layer 3072 -> 32 dominates: at least its 2 * 3072 * 32 multiply-adds.
    assert 2 * 3072 * 32 <= cost["flops_per_image"] < 4 * 3072 * 32
    assert cost["model_file_bytes"] == (repo / "models/mlp/model.keras").stat().st_size
    assert cost["latency_ms_per_image"]["mean"] > 0
    assert cost["latency_ms_per_image"]["samples"] == 5
    rows = json.loads((repo / "reports/plots/mlp/confusion.json").read_text())
    assert len(rows) == SPLITS["test"]
    assert sum(r["actual"] == r["predicted"] for r in rows) == round(accuracy * len(rows))
    for png in ("confusion.png", "learning_curves.png", "misclassified.png"):
        assert Image.open(repo / "reports/plots/mlp" / png).size[0] > 100


def test_lr_schedule_and_early_stopping_from_params(repo, tmp_path):
    """Step decay halves the rate every epoch; min_delta 100 means no epoch after the first
    improves val_accuracy, so patience 2 stops training after epoch 3 of 8; the model kept is
    the first epoch with the highest val_accuracy."""
    root = tmp_path / "root"
    for part in ("data/prepared/classification", "data/augmented/classification"):
        shutil.copytree(repo / part, root / part)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["models"]["mlp"]["train"].update(
        epochs=8, learning_rate=0.004, lr_schedule="step", step_epochs=1, step_factor=0.5,
        monitor="val_accuracy", early_stopping_patience=2, early_stopping_min_delta=100.0)
    params["tracking"].update(mlflow=False, codecarbon=False)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = run(["visionpipe", "train", "--model", "mlp", "--root", str(root),
                  "--params", str(root / "params.yaml")], repo)
    assert result.returncode == 0, result.stdout[-3000:]
    with open(root / "reports/train/mlp/history.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["learning_rate"]) for r in rows] == pytest.approx([0.004, 0.002, 0.001])
    meta = json.loads((root / "models/mlp/model.json").read_text())
    assert meta["epochs"] == 3 and meta["stopped_early"] is True
    assert meta["monitor"] == "val_accuracy"
    val_acc = [float(r["val_accuracy"]) for r in rows]
    assert meta["kept_epoch"] == val_acc.index(max(val_acc)) + 1
    assert meta["kept_epoch_metrics"]["val_accuracy"] == pytest.approx(max(val_acc))
    # The kept model is that epoch's: its val accuracy recomputed from the files matches.
    model = load_model(root / "models/mlp/model.keras")
    val = list(records.read_split(root / "data/prepared/classification", "val"))
    x = np.stack([ex.image for ex in val]).astype(np.float32)
    y = np.array([ex.label for ex in val])
    assert float((model.predict(x, verbose=0).argmax(1) == y).mean()) == pytest.approx(
        max(val_acc), abs=1e-6)


def test_training_again_with_the_same_params_gives_identical_weights(repo, tmp_path):
    """Op determinism on (train.deterministic, the default): a second process, same params and
    seed, gives the pipeline's model bit for bit, and the same per-epoch history."""
    root = tmp_path / "root"
    for part in ("data/prepared/classification", "data/augmented/classification"):
        shutil.copytree(repo / part, root / part)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["tracking"].update(mlflow=False, codecarbon=False)  # not part of the model
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = run(["visionpipe", "train", "--model", "mlp", "--root", str(root),
                  "--params", str(root / "params.yaml")], repo)
    assert result.returncode == 0, result.stdout[-3000:]

    def weights(path):
        return hashlib.sha256(b"".join(np.ascontiguousarray(w).tobytes()
                                       for w in load_model(path).get_weights())).hexdigest()

    assert weights(root / "models/mlp/model.keras") == weights(repo / "models/mlp/model.keras")
    assert ((root / "reports/train/mlp/history.csv").read_text()
            == (repo / "reports/train/mlp/history.csv").read_text())
    first = json.loads((repo / "models/mlp/model.json").read_text())
    again = json.loads((root / "models/mlp/model.json").read_text())
    assert first["deterministic"] is True and again == first


def test_sigkill_mid_epoch_then_repro_resumes_from_the_last_checkpoint(repo, tmp_path):
    """`dvc repro` killed (SIGKILL, the whole process group) half an epoch after epoch 2's
    checkpoint: rerunning it trains epochs 3-4 only, from the persisted checkpoint, and ends
    with a complete model and a 4-row history whose first rows are the killed run's."""
    work = tmp_path / "work"
    shutil.copytree(repo, work, symlinks=True)
    params = yaml.safe_load((work / "params.yaml").read_text())
    # Batches of one: epochs long enough (a few hundred steps) to be killed in the middle of.
    params["models"]["mlp"]["train"].update(epochs=4, batch_size=1)
    params["tracking"].update(mlflow=False, codecarbon=False)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    state_file = work / "models/mlp/checkpoints/state.json"

    def epochs_done() -> int:
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):  # none yet, or the previous run's finished one
            return 0
        return 0 if state["finished"] else state["epochs_done"]

    proc = subprocess.Popen(["dvc", "repro", "train@mlp"], cwd=work, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)
    seen: dict[int, float] = {}
    deadline = time.time() + 300
    while epochs_done() < 2 and proc.poll() is None and time.time() < deadline:
        seen.setdefault(epochs_done(), time.time())
        time.sleep(0.01)
    assert epochs_done() == 2, proc.communicate()[0].decode()[-3000:]
    epoch_s = time.time() - seen.get(1, seen[0])
    time.sleep(epoch_s / 2)  # into the middle of epoch 3
    os.killpg(proc.pid, signal.SIGKILL)
    killed_output = proc.communicate()[0].decode()
    assert proc.returncode == -signal.SIGKILL
    killed = json.loads(state_file.read_text())
    assert 2 <= killed["epochs_done"] < 4 and not killed["finished"], killed_output[-2000:]
    assert "Epoch 4/4" not in killed_output
    # Nothing half-written: the checkpoint folder holds the state and the files it names. A
    # kill between a save's steps (model file renamed into place, then state.json, then the
    # stale files pruned) may leave one more whole checkpoint, the next epoch's or a stale
    # one, which the next save prunes; a half-written file only ever has a hidden name.
    named = {"state.json", killed["last"], killed["best"]}
    files = {p.name for p in state_file.parent.iterdir() if not p.name.startswith(".")}
    assert named <= files, (files, named)
    for extra in files - named:
        assert re.fullmatch(r"epoch-\d{4}\.keras", extra), files
        with zipfile.ZipFile(state_file.parent / extra) as whole:  # a .keras file is a zip
            assert whole.testzip() is None, extra

    result = run(["dvc", "repro", "train@mlp"], work)
    assert result.returncode == 0, result.stdout[-3000:]
    done = killed["epochs_done"]
    assert (f"train@mlp: resuming from {state_file.parent}/epoch-{done:04d}.keras: {done} "
            f"epoch(s) already done") in result.stdout
    assert re.findall(r"train@mlp epoch (\d+)/4", result.stdout) == [
        str(e) for e in range(done + 1, 5)]
    with open(work / "reports/train/mlp/history.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 5))
    for key, values in killed["history"].items():
        assert [float(r[key]) for r in rows[:done]] == values, key
    meta = json.loads((work / "models/mlp/model.json").read_text())
    assert meta["epochs"] == 4
    model = load_model(work / "models/mlp/model.keras")
    assert model.count_params() == meta["params"]
    final = json.loads(state_file.read_text())
    assert final["finished"] and final["epochs_done"] == 4
    assert {p.name for p in state_file.parent.iterdir() if not p.name.startswith(".")} == {
        "state.json", final["last"], final["best"]}  # pruned
    assert meta["kept_epoch"] == final["best_epoch"]
    assert "up to date" in run(["dvc", "status", "train@mlp"], work).stdout


def test_export_parity_report_and_files(repo):
    report = json.loads((repo / "reports/export/mlp.json").read_text())
    assert report["passed"] is True and report["samples"] == 16
    formats = report["formats"]
    assert list(formats) == ["keras", "saved_model", "tflite", "tflite_dynamic",
                             "tflite_int8", "onnx"]
    for name in ("saved_model", "tflite", "onnx"):
        assert formats[name]["max_abs_diff"] <= 1e-4 and formats[name]["label_agreement"] == 1.0
    for name, diff, agreement in (("tflite_dynamic", 0.05, 0.98), ("tflite_int8", 0.1, 0.95)):
        assert formats[name]["max_abs_diff"] <= diff
        assert formats[name]["thresholds"] == {"max_abs_diff": diff,
                                               "label_agreement": agreement}
    assert report["resized_input"]["passed"] is True
    export = repo / "models/mlp/export"
    for name, result in formats.items():
        path = export / result["path"]
        assert path.exists(), name
        if path.is_file():
            assert result["bytes"] == path.stat().st_size
    assert (export / "saved_model" / "saved_model.pb").is_file()
    interp = tf.lite.Interpreter(model_path=str(export / "model.tflite"))
    interp.allocate_tensors()
    detail = interp.get_input_details()[0]
    assert list(detail["shape"]) == [1, 32, 32, 3] and detail["dtype"] == np.uint8
    meta = json.loads((export / "export.json").read_text())
    assert meta["class_names"] == ["circle", "square", "triangle", "star"]
    assert meta["image_size"] == [32, 32] and set(meta["formats"]) == set(formats)


def test_model_card_quotes_the_pipeline_outputs(repo):
    card = (repo / "reports/model_cards/mlp.md").read_text()
    manifest = records.read_manifest(repo / "data/prepared/classification")
    metrics = json.loads((repo / "reports/metrics/mlp.json").read_text())
    export = json.loads((repo / "reports/export/mlp.json").read_text())
    assert card.startswith("# Model card: mlp\n")
    assert f"`{manifest['checksum']}`" in card
    assert "train 96, val 32, test 40" in card
    assert f"| accuracy | {metrics['test']['accuracy']:.4f} |" in card
    assert "hidden_units:\n    - 32" in card  # the params, as trained
    for name, result in export["formats"].items():
        assert f"| {name} | `{result['path']}` | {result['bytes']} |" in card
    for stage in ("train", "evaluate", "export"):
        assert f"| {stage} | measured |" in card  # CO2 per stage
    assert "dvc repro export@mlp" in card and "dvc pull models/mlp/export" in card


def test_predict_needs_only_the_export_folder(repo, tmp_path, datasets_dir):
    """predict on a machine with only the export folder: mixed sizes, a palette GIF, a file
    that is not an image; SavedModel and TFLite agree with the Keras model."""
    shipped = tmp_path / "elsewhere" / "export"
    shutil.copytree(repo / "models/mlp/export", shipped)
    images = tmp_path / "images"
    hymenoptera = datasets_dir / "hymenoptera"
    picked = [hymenoptera / "ants/imageNotFound.gif",
              *sorted((hymenoptera / "bees").iterdir())[:3]]
    for path in picked:
        (images / "real").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, images / "real" / path.name)
    test = list(records.read_split(repo / "data/prepared/classification", "test"))[:5]
    for ex in test:
        Image.fromarray(ex.image).save(images / f"{ex.id}.png")
    (images / "notes.txt").write_text("not an image")
    code = ("import sys\nfrom visionpipe.cli import main\nrc = main(sys.argv[1:])\n"
            "print('LOADED', sorted({m for m in sys.modules if m.startswith(("
            "'visionpipe.models', 'visionpipe.stages', 'visionpipe.tasks', "
            "'visionpipe.tracking')) and m not in ('visionpipe.tasks', "
            "'visionpipe.tasks.catalog')}))\n"
            "sys.exit(rc)\n")
    outputs = {}
    for fmt in ("saved_model", "tflite"):
        out = tmp_path / f"out-{fmt}"
        result = run([sys.executable, "-c", code, "predict", "--model", "mlp",
                      "--export-dir", str(shipped), "--input", str(images), "--output",
                      str(out), "--format", fmt], tmp_path / "elsewhere")
        assert result.returncode == 0, result.stdout[-3000:]
        # No training, model or tracking code (the task catalog is a table of names, read by
        # the params check; its package's __init__ holds only a docstring).
        assert "LOADED []" in result.stdout
        assert "notes.txt: not an image PIL can read" in result.stdout
        outputs[fmt] = json.loads((out / "predictions.json").read_text())
        assert outputs[fmt]["skipped"] == {"count": 1, "items": [
            {"path": "notes.txt", "reason": "not an image PIL can read",
             "kind": "not an image PIL can read"}]}
        files = [p["file"] for p in outputs[fmt]["predictions"]]
        assert files == sorted(f"{ex.id}.png" for ex in test) + [
            f"real/{name}" for name in sorted(p.name for p in picked)]
        for rec in outputs[fmt]["predictions"]:
            assert (out / "rendered" / f"{rec['file']}.png").is_file()
            assert len(rec["top_k"]) == 3 and rec["top_k"][0]["score"] == rec["score"]
    model = load_model(repo / "models/mlp/model.keras")
    by_file = {p["file"]: p for p in outputs["saved_model"]["predictions"]}
    for ex in test:  # at the model's size: exactly the Keras model's scores
        expected = model.predict(ex.image[None].astype(np.float32), verbose=0)[0]
        got = by_file[f"{ex.id}.png"]
        assert got["class_id"] == int(expected.argmax())
        assert got["score"] == pytest.approx(float(expected.max()), abs=1e-5)
    gif = by_file["real/imageNotFound.gif"]
    assert Image.open(hymenoptera / "ants/imageNotFound.gif").mode == "P"
    assert (gif["height"], gif["width"]) == Image.open(hymenoptera /
                                                       "ants/imageNotFound.gif").size[::-1]
    sizes = {(p["height"], p["width"]) for p in outputs["saved_model"]["predictions"]}
    assert len(sizes) >= 3  # mixed sizes went through one command
    labels = {fmt: [p["class_id"] for p in o["predictions"]] for fmt, o in outputs.items()}
    assert labels["saved_model"] == labels["tflite"]


def test_dvc_metrics_show_has_the_headline_figures_only(repo):
    result = run(["dvc", "metrics", "show", "--json"], repo)
    assert result.returncode == 0, result.stdout
    data = json.loads(result.stdout[result.stdout.index("{"):])
    (files,) = [rev["data"] for rev in data.values()]  # the workspace ("" in DVC 3.67)
    assert set(files) == {"reports/headline/mlp.json"}  # details are not DVC metrics
    shown = files["reports/headline/mlp.json"]["data"]
    metrics = json.loads((repo / "reports/metrics/mlp.json").read_text())
    assert set(shown) == {"accuracy", "macro_f1", "params", "latency_ms", "co2_g", "train_s"}
    assert shown["accuracy"] == round(metrics["test"]["accuracy"], 4)
    assert shown["params"] == metrics["cost"]["params"] and isinstance(shown["params"], int)
    assert shown["co2_g"] == pytest.approx(metrics["co2"]["emissions_kg"] * 1000, abs=1e-3)
    assert shown["train_s"] == pytest.approx(
        metrics["co2"]["by_stage"]["train"]["duration_s"], abs=0.06)
    table = run(["dvc", "metrics", "show"], repo)
    assert max(len(line) for line in table.stdout.splitlines()) < 120, table.stdout


def test_dvc_plots_have_titled_per_model_and_per_task_charts(repo):
    result = run(["dvc", "plots", "show", "--json"], repo)
    assert result.returncode == 0, result.stdout
    plots = json.loads(result.stdout[result.stdout.index("{"):])["data"]

    def title(name):
        content = plots[name][0]["content"]
        return content["title"] if isinstance(content["title"], str) else content["title"][
            "text"]

    assert title("reports/train/mlp/history.csv") == "mlp: validation loss per epoch"
    assert title("reports/plots/mlp/confusion.json") == "mlp: confusion matrix (test)"
    compare = "classification: validation accuracy per epoch"
    values = plots[compare][0]["content"]["data"]["values"]
    with open(repo / "reports/train/mlp/history.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(int(v["epoch"]), float(v["val_accuracy"])) for v in values] == [
        (int(r["epoch"]), float(r["val_accuracy"])) for r in rows]


def test_mlflow_server_returns_the_run_over_rest(repo):
    state = json.loads((repo / "models/mlp/mlflow_run.json").read_text())
    assert state["status"] == "logged"
    assert state["tracking_uri"] == f"sqlite:///{repo / 'mlflow.db'}"
    assert state["stages"] == {"train": "logged", "evaluate": "logged", "export": "logged"}
    metrics = json.loads((repo / "reports/metrics/mlp.json").read_text())
    manifest = records.read_manifest(repo / "data/prepared/classification")
    head = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    with mlflow_server(repo) as base:
        exp = rest(base, "experiments/get-by-name",
                   experiment_name="visionpipe-classification")["experiment"]
        assert exp["artifact_location"] == str(repo / "mlartifacts/visionpipe-classification")
        got = rest(base, "runs/get", run_id=state["run_id"])["run"]
        assert got["info"]["run_name"] == "mlp" and got["info"]["status"] == "FINISHED"
        assert got["info"]["experiment_id"] == exp["experiment_id"]
        tags = {t["key"]: t["value"] for t in got["data"]["tags"]}
        assert tags["dataset.checksum"] == manifest["checksum"]
        assert tags["dataset.name"] == "shapes" and tags["visionpipe.version"]
        assert tags["mlflow.source.git.commit"] == head
        params = {p["key"]: p["value"] for p in got["data"]["params"]}
        assert params["model.train.learning_rate"] == "0.001"
        assert params["model.architecture.hidden_units"] == "[32]"
        assert params["prepare.splits.train"] == str(float(SPLITS["train"]))
        values = {m["key"]: m["value"] for m in got["data"]["metrics"]}
        assert values["test.accuracy"] == pytest.approx(metrics["test"]["accuracy"])
        assert values["cost.params"] == metrics["cost"]["params"]
        assert values["co2.total.emissions_kg"] == pytest.approx(metrics["co2"]["emissions_kg"])
        assert values["export.tflite.label_agreement"] == 1.0
        assert any(k.startswith("system/cpu_utilization") for k in values)
        history = rest(base, "metrics/get-history", run_id=state["run_id"], metric_key="val_loss")
        assert sorted(m["step"] for m in history["metrics"]) == list(range(1, EPOCHS + 1))
        listed = rest(base, "artifacts/list", run_id=state["run_id"])
        top = {f["path"] for f in listed["files"]}
        # The model is a logged model of its own (test_mlflow_rest.py), not a run artifact.
        assert {"train", "evaluate", "export", "emissions"} <= top
        export_files = {f["path"] for f in rest(base, "artifacts/list", run_id=state["run_id"],
                                                  path="export")["files"]}
        assert {"export/mlp.md", "export/mlp.json", "export/model.onnx",
                "export/model_int8.tflite", "export/export.json"} <= export_files
        versions = rest(base, "model-versions/search", filter="name='visionpipe-mlp'")
        mine = [v for v in versions["model_versions"] if v["run_id"] == state["run_id"]]
        assert len(mine) == 1 and mine[0]["version"] == str(state["registered_model"]["version"])
        vtags = {t["key"]: t["value"] for t in mine[0]["tags"]}
        assert float(vtags["test.accuracy"]) == pytest.approx(metrics["test"]["accuracy"])
        assert vtags["export.parity_passed"] == "True"


def test_co2_is_measured_and_in_the_metrics(repo):
    metrics = json.loads((repo / "reports/metrics/mlp.json").read_text())
    co2 = metrics["co2"]
    assert co2["status"] == "measured" and set(co2["by_stage"]) == {"train", "evaluate"}
    assert co2["emissions_kg"] > 0 and co2["energy_kwh"] > 0 and co2["duration_s"] > 0
    assert co2["emissions_kg"] == pytest.approx(sum(s["emissions_kg"]
                                                    for s in co2["by_stage"].values()))
    assert co2["cpu_power_mode"] in {"rapl_reading", "tdp_estimate_from_cpu_load",
                                     "constant_estimate", "power_gadget_reading"}
    train = json.loads((repo / "reports/emissions/mlp/train.json").read_text())
    assert train["emissions_kg"] == pytest.approx(co2["by_stage"]["train"]["emissions_kg"])
    with open(repo / "reports/emissions/mlp/train.csv") as fh:
        row = next(csv.DictReader(fh))
    assert float(row["emissions"]) == pytest.approx(train["emissions_kg"])
    export = json.loads((repo / "reports/export/mlp.json").read_text())
    assert export["co2"]["stage"] == "export" and export["co2"]["emissions_kg"] > 0


def test_second_repro_is_up_to_date(repo):
    result = run(["dvc", "repro"], repo)
    assert result.returncode == 0, result.stdout
    assert "Running stage" not in result.stdout
    assert "up to date" in result.stdout


def test_changing_tracking_params_retrains_nothing(repo):
    params_path = repo / "params.yaml"
    original = params_path.read_text()
    params = yaml.safe_load(original)
    params["tracking"].update(country_iso_code="FRA", experiment_prefix="elsewhere",
                              system_metrics=False)
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        status = run(["dvc", "status"], repo)
    finally:
        params_path.write_text(original)
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout


def test_a_new_or_changed_weights_file_retrains(repo):
    """A model's local starting weights (architecture.weights: weights/<file>) are a dep of
    train: a file added to weights/ or changed there retrains; nothing else reruns for it."""
    added = repo / "weights" / "start.weights.h5"
    added.write_bytes(b"not yet a real file: dvc status only hashes it")
    try:
        status = run(["dvc", "status", "--json"], repo)
    finally:
        added.unlink()
    assert status.returncode == 0, status.stdout
    changed = json.loads(status.stdout)
    assert set(changed) == {"train@mlp"}, changed
    assert {"changed deps": {"weights": "modified"}} in changed["train@mlp"], changed
    assert "up to date" in run(["dvc", "status"], repo).stdout


def test_exp_run_with_new_learning_rate_reruns_only_the_mlp(repo):
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "pipeline outputs"], repo)
    # TFLite only in the experiment: the six formats are checked above; here they cost time.
    result = run(["dvc", "exp", "run", "-S", "models.mlp.train.learning_rate=0.002",
                  "-S", "export.formats=[tflite]"], repo)
    assert result.returncode == 0, result.stdout[-4000:]
    ran = re.findall(r"Running stage '([^']+)'", result.stdout)
    assert ran == ["train@mlp", "evaluate@mlp", "export@mlp"]
    with open(repo / "reports/train/mlp/history.csv") as fh:
        assert float(next(csv.DictReader(fh))["learning_rate"]) == pytest.approx(0.002)
    shown = run(["dvc", "exp", "show", "--json"], repo)
    assert shown.returncode == 0, shown.stdout
    data = json.loads(shown.stdout[shown.stdout.index("["):])
    experiments = [e for base in data for e in (base.get("experiments") or [])]
    assert experiments, data
    latest = experiments[0]["revs"][0]["data"]
    mlp_metrics = latest["metrics"]["reports/headline/mlp.json"]["data"]
    assert mlp_metrics["co2_g"] > 0 and 0 <= mlp_metrics["accuracy"] <= 1
    assert latest["params"]["params.yaml"]["data"]["models"]["mlp"]["train"][
        "learning_rate"] == 0.002
    # The README's comparison: the experiment's learning curve beside the baseline's.
    name = experiments[0]["revs"][0]["name"]
    diff = run(["dvc", "plots", "diff", "HEAD", name, "--json"], repo)
    assert diff.returncode == 0, diff.stdout
    curves = json.loads(diff.stdout[diff.stdout.index("{"):])["data"][
        "reports/train/mlp/history.csv"][0]
    assert curves["revisions"] == ["HEAD", name]
    by_rev = {}
    for value in curves["content"]["data"]["values"]:
        by_rev.setdefault(value["rev"], []).append(float(value["val_loss"]))
    with open(repo / "reports/train/mlp/history.csv") as fh:  # the experiment's, applied
        assert by_rev[name] == [float(r["val_loss"]) for r in csv.DictReader(fh)]
    assert len(by_rev["HEAD"]) == EPOCHS and by_rev["HEAD"] != by_rev[name]
    # The experiment logged a second MLflow run into the same database.
    state = json.loads((repo / "models/mlp/mlflow_run.json").read_text())
    assert state["status"] == "logged" and state["tracking_uri"] == f"sqlite:///{repo}/mlflow.db"
    from mlflow import MlflowClient

    logged = MlflowClient(state["tracking_uri"]).get_run(state["run_id"])
    exp_name = logged.data.tags["dvc.experiment"]
    assert exp_name and logged.info.run_name == f"mlp-{exp_name}"
    assert logged.data.params["model.train.learning_rate"] == "0.002"


def _dvc_outputs(repo) -> list[str]:
    """Every output path dvc.lock records, data and models included."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return sorted({out["path"] for stage in lock["stages"].values()
                   for out in stage.get("outs", [])})


def _hashes(root, paths: list[str]) -> dict[str, str]:
    found = {}
    for rel in paths:
        path = root / rel
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            found[f.relative_to(root).as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()
    return found


def test_push_then_pull_in_a_fresh_clone_gives_identical_files(repo):
    """The default remote (a folder beside the repo): push, clone, pull, byte for byte."""
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "outputs to push"], repo)
    remote = repo.parent / "visionpipe-dvc-remote"  # .dvc/config: url = ../../<that>
    pushed = run(["dvc", "push"], repo)
    assert pushed.returncode == 0, pushed.stdout[-3000:]
    assert remote.is_dir() and any(remote.rglob("*"))
    clone = repo.parent / f"{repo.name}-clone"
    cloned = run(["git", "clone", "-q", str(repo), str(clone)], repo.parent)
    assert cloned.returncode == 0, cloned.stdout
    outs = _dvc_outputs(repo)
    assert {"data/prepared/classification", "data/augmented/classification",
            "models/mlp/model.keras", "models/mlp/export"} <= set(outs)
    assert not (clone / "models/mlp/model.keras").exists()
    pulled = run(["dvc", "pull"], clone)
    assert pulled.returncode == 0, pulled.stdout[-3000:]
    original, copy = _hashes(repo, outs), _hashes(clone, outs)
    assert len(original) > 20 and copy == original
    status = run(["dvc", "status"], clone)
    assert "Data and pipelines are up to date" in status.stdout, status.stdout
    again = run(["dvc", "repro"], clone)
    assert again.returncode == 0 and "Running stage" not in again.stdout, again.stdout[-3000:]


def test_failing_parity_fails_export_loudly(repo, tmp_path):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["export"]["formats"] = ["tflite"]
    params["export"]["parity"]["tflite"]["max_abs_diff"] = 1e-12  # TFLite is off by ~1e-7
    strict = tmp_path / "strict.yaml"
    strict.write_text(yaml.safe_dump(params, sort_keys=False))
    report_path = repo / "reports/export/mlp.json"
    # Run outside DVC, the stage rewrites these: put them back for the tests after this one.
    touched = [report_path, repo / "reports/emissions/mlp/export.json",
               repo / "reports/emissions/mlp/export.csv"]
    saved = {path: path.read_bytes() for path in touched}
    exported = sorted(p.name for p in (repo / "models/mlp/export").iterdir())
    try:
        result = run(["visionpipe", "export", "--model", "mlp", "--params", str(strict)], repo)
        report = json.loads((repo / "reports/export/mlp.json").read_text())
    finally:
        for path, content in saved.items():
            path.write_bytes(content)
    assert result.returncode == 2
    errors = [ln for ln in result.stdout.splitlines() if ln.startswith("visionpipe: error")]
    # One line: the failed measure, its value, its limit and the params key that sets it.
    assert len(errors) == 1 and re.search(
        r"export of mlp: parity failed: tflite: max_abs_diff \S+ above its limit 1e-12 "
        r"\(export\.parity\.tflite\.max_abs_diff\)", errors[0]), errors
    assert report["passed"] is False and report["formats"]["tflite"]["passed"] is False
    assert report["formats"]["tflite"]["thresholds"]["max_abs_diff"] == 1e-12
    # The previous export is left in place, not half-replaced.
    assert sorted(p.name for p in (repo / "models/mlp/export").iterdir()) == exported


def test_bad_params_fail_the_stage_with_one_line_and_lose_nothing(repo):
    # Last in this module: DVC removes a stage's outputs before running it.
    model_hash = (repo / "models/mlp/model.keras").read_bytes()
    params_path = repo / "params.yaml"
    original = params_path.read_text()
    params = yaml.safe_load(original)
    params["models"]["mlp"]["train"]["epochs"] = -3
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        result = run(["dvc", "repro"], repo)
    finally:
        params_path.write_text(original)
    assert result.returncode != 0
    errors = [ln for ln in result.stdout.splitlines() if ln.startswith("visionpipe: error")]
    assert errors == ["visionpipe: error: params.yaml: models.mlp.train.epochs = -3: "
                      "expected a value >= 1"]
    assert "Traceback" not in result.stdout
    assert not (repo / "models/mlp/model.keras").exists()
    # The previous outputs are in the DVC cache: checkout brings them back, byte for byte.
    result = run(["dvc", "checkout"], repo)
    assert result.returncode == 0, result.stdout
    assert (repo / "models/mlp/model.keras").read_bytes() == model_hash
    status = run(["dvc", "status"], repo)
    assert "up to date" in status.stdout, status.stdout
