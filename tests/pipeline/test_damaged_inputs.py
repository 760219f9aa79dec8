"""Damaged inputs of train and evaluate through the real CLI (issue 23): a shard that is not
the bytes its manifest describes stops the stage with one line naming it and the command that
restores it; a damaged checkpoint named by checkpoints/state.json makes train fall back to the
earlier best epoch, or start over, and say which on one line."""

from __future__ import annotations

import csv
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import TINY_MODEL as MODEL
from tests.helpers import prepare_project, run, tiny_params
from visionpipe.data import records
from visionpipe.layout import Layout
from visionpipe.models.saving import load_model

pytestmark = pytest.mark.slow

PREPARED = "data/prepared/classification"
AUGMENTED = "data/augmented/classification"
RESTORE = {PREPARED: "restore it with `dvc checkout data/prepared/classification` (or "
                     "`dvc repro prepare@classification`)",
           AUGMENTED: "restore it with `dvc checkout data/augmented/classification` (or "
                      "`dvc repro augment@classification`)"}


def _cli(root: Path, stage: str = "train"):
    return run([sys.executable, "-m", "visionpipe.cli", stage, "--model", MODEL], root,
               timeout=300)


def _history(root: Path) -> list[dict]:
    with open(Layout(root).history(MODEL)) as fh:
        return list(csv.DictReader(fh))


def _state(root: Path) -> dict:
    return json.loads((Layout(root).checkpoints(MODEL) / "state.json").read_text())


def _edit_state(root: Path, **changes) -> None:
    path = Layout(root).checkpoints(MODEL) / "state.json"
    path.write_text(json.dumps({**_state(root), **changes}))


def _one_error_line(result) -> str:
    assert result.returncode == 2, result.stdout[-3000:]
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("visionpipe:")]
    assert len(lines) == 1 and "Traceback" not in result.stdout, result.stdout[-3000:]
    return lines[0].removeprefix("visionpipe: error: ")


def _line(result, prefix: str) -> str:
    """The one line of train's output that starts with ``prefix``."""
    assert result.returncode == 0, result.stdout[-3000:]
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith(prefix)]
    assert len(lines) == 1, result.stdout[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, default_params_dict) -> Path:
    """A tiny project, prepared, augmented and trained (2 epochs) by the real CLI."""
    root = tmp_path_factory.mktemp("damaged")
    prepare_project(root, tiny_params(default_params_dict, deterministic=True))
    result = _cli(root)
    assert result.returncode == 0, result.stdout[-3000:]
    return root


@pytest.fixture
def project(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "project"))


def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2 - 7])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("folder,shard,damage,why", [
    (AUGMENTED, "train-00001.tfrecord", _cut, "damaged (cut short: truncated record at "),
    (PREPARED, "val-00000.tfrecord", _flip, "damaged (a record fails its CRC check: "
                                             "corrupted record at "),
    (PREPARED, "val-00000.tfrecord", Path.unlink,
     f"missing (listed in {{root}}/{PREPARED}/manifest.json)"),
], ids=["truncated", "flipped-byte", "missing"])
def test_a_damaged_shard_stops_train_with_one_line_naming_it(project, folder, shard, damage,
                                                             why):
    before = _state(project)
    damage(project / folder / shard)
    line = _one_error_line(_cli(project))
    assert line.startswith(f"{project}/{folder}/{shard}: {why.format(root=project)}"), line
    assert line.endswith(f"; {RESTORE[folder]}")
    assert _state(project) == before  # checked before anything was trained or reset


def test_a_shard_that_fails_while_training_is_named_though_the_manifest_matched(project):
    """The manifest's checksum edited to match a damaged shard: the error comes from
    TensorFlow in the middle of fit, and the shards are read again to name it."""
    folder = project / AUGMENTED
    _flip(folder / "train-00001.tfrecord")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["checksum"] = records.checksum(folder, records.shard_names(manifest))
    (folder / "manifest.json").write_text(json.dumps(manifest))
    result = _cli(project)
    assert f"train@{MODEL}: the checkpoints in" in result.stdout  # training had started
    line = _one_error_line(result)
    assert line.startswith(f"{folder}/train-00001.tfrecord: damaged (a record fails its CRC "
                           "check: corrupted record at "), line
    assert line.endswith(f"; {RESTORE[AUGMENTED]}")


def test_a_damaged_test_shard_stops_evaluate_with_one_line(project):
    _flip(project / PREPARED / "test-00000.tfrecord")
    line = _one_error_line(_cli(project, "evaluate"))
    assert line.startswith(f"{project}/{PREPARED}/test-00000.tfrecord: damaged (a record "
                           "fails its CRC check: "), line
    assert line.endswith(f"; {RESTORE[PREPARED]}")


def test_a_damaged_prepared_shard_stops_export_with_one_line(project):
    _flip(project / PREPARED / "train-00000.tfrecord")  # int8 calibration reads the train split
    line = _one_error_line(_cli(project, "export"))
    assert line.startswith(f"{project}/{PREPARED}/train-00000.tfrecord: damaged (a record "
                           "fails its CRC check: "), line
    assert line.endswith(f"; {RESTORE[PREPARED]}")


def test_a_damaged_prepared_shard_stops_augment_and_keeps_its_output(project):
    before = (project / AUGMENTED / "manifest.json").read_bytes()
    _cut(project / PREPARED / "train-00000.tfrecord")
    result = run([sys.executable, "-m", "visionpipe.cli", "augment", "--task",
                  "classification"], project, timeout=300)
    line = _one_error_line(result)
    assert line.startswith(f"{project}/{PREPARED}/train-00000.tfrecord: damaged (cut short: "
                           "truncated record at "), line
    assert line.endswith(f"; {RESTORE[PREPARED]}")
    assert (project / AUGMENTED / "manifest.json").read_bytes() == before  # not replaced


def test_a_truncated_last_checkpoint_resumes_from_the_earlier_best_one(project):
    """A learning rate too small to change any prediction: val_accuracy never improves on
    epoch 1, which stays the best (kept) beside the last. A run killed after epoch 3's
    checkpoint (state not finished) whose epoch-0003.keras was then cut short resumes from
    epoch 1 and trains epochs 2-3 again."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["models"][MODEL]["train"].update(epochs=3, learning_rate=1e-9,
                                            monitor="val_accuracy")
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _cli(project).returncode == 0
    first = _history(project)
    state = _state(project)
    assert (state["last"], state["best"]) == ("epoch-0003.keras", "epoch-0001.keras")
    _edit_state(project, finished=False)
    folder = Layout(project).checkpoints(MODEL)
    _cut(folder / "epoch-0003.keras")

    result = _cli(project)
    assert _line(result, f"train@{MODEL}: {folder}") == (
        f"train@{MODEL}: {folder}/epoch-0003.keras is damaged (not a whole .keras file: File "
        "is not a zip file); resuming from epoch-0001.keras, the best epoch (1): epochs 2-3 "
        "trained again")
    assert re.findall(rf"train@{MODEL} epoch (\d)/3", result.stdout) == ["2", "3"]
    again = _history(project)
    assert [int(r["epoch"]) for r in again] == [1, 2, 3]
    assert again[0] == first[0]  # epoch 1 kept from the first run
    state = _state(project)
    assert state["finished"] and (state["last"], state["best"]) == (
        "epoch-0003.keras", "epoch-0001.keras")
    load_model(folder / "epoch-0003.keras")  # whole again
    assert json.loads(Layout(project).model_meta(MODEL).read_text())["kept_epoch"] == 1


def _foreign_checkpoint(path: Path) -> None:
    """A complete .keras file of the MLP family with other hidden units."""
    from visionpipe.models.registry import create_model

    model = create_model("mlp", (16, 16, 3), 4, {"hidden_units": [8]})
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.save(path)


@pytest.mark.parametrize("damage,why", [
    ("foreign", "{folder}/epoch-0002.keras is damaged (another model's: its weights do not "
                "fit this one (A total of 2 objects could not be loaded)); no earlier epoch is "
                "kept (only the last and the best are), so training starts over at epoch 1"),
    ("garbage", "{folder}/state.json cannot be read (not valid JSON: Expecting value: line 1 "
                "column 1 (char 0)); training starts at epoch 1"),
], ids=["foreign", "garbage"])
def test_a_foreign_checkpoint_or_a_garbled_state_starts_over(project, trained, damage, why):
    """The last epoch (also the best) of another architecture, or a state.json that is not
    JSON: training starts over, and gives what a first run gives."""
    folder = Layout(project).checkpoints(MODEL)
    assert _state(project)["last"] == _state(project)["best"] == "epoch-0002.keras"
    if damage == "foreign":
        _edit_state(project, finished=False)
        _foreign_checkpoint(folder / "epoch-0002.keras")
    else:
        (folder / "state.json").write_text("not json at all")
    result = _cli(project)
    assert _line(result, f"train@{MODEL}: {folder}") == (
        f"train@{MODEL}: " + why.format(folder=folder))
    assert _history(project) == _history(trained)  # deterministic: the same as a first run
    assert _state(project)["finished"]
