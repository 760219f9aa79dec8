"""data/stats.py: what prepare draws of its splits, checked on small hand-made splits whose
numbers are worked out by hand; and train logging them to MLflow (real MLflow on sqlite)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionpipe.data import records
from visionpipe.data.example import Example
from visionpipe.data.stats import CLASS_BALANCE, PLOTS, STATS, describe
from visionpipe.layout import Layout

DETECTION_CLASSES = ["cat", "dog", "bird"]


def _write(data_dir, task, class_names, splits: dict[str, list[Example]], shard_size=2):
    """Splits written as prepare writes them (shards + manifest)."""
    manifest_splits = {}
    for split, examples in splits.items():
        count, shards = records.write_split(examples, data_dir, split, shard_size)
        manifest_splits[split] = {"count": count, "shards": shards}
    records.write_manifest(data_dir, {"task": task, "class_names": class_names,
                                      "image_size": [20, 40], "splits": manifest_splits,
                                      "source": {"name": "handmade"}})


def _image(h=20, w=40):
    return np.zeros((h, w, 3), np.uint8)


def _boxes(*boxes):
    return np.asarray(boxes, np.float32).reshape(-1, 4)


def _detection_splits():
    # 20x40 images (height x width). A: a 20x10 px cat (rel. 0.5 x 0.5) and a 4x5 px dog
    # (0.1 x 0.25); B: a 20x20 px cat (0.5 x 1.0); C: no box.
    train = [
        Example(id="a", image=_image(), boxes=_boxes([0, 0, 20, 10], [0, 0, 4, 5]),
                box_labels=np.array([0, 1], np.int32)),
        Example(id="b", image=_image(), boxes=_boxes([10, 0, 30, 20]),
                box_labels=np.array([0], np.int32)),
        Example(id="c", image=_image(), boxes=_boxes(), box_labels=np.zeros(0, np.int32)),
    ]
    # val: one 10x10 image holding a 5x10 px bird (rel. 0.5 x 1.0).
    val = [Example(id="v", image=_image(10, 10), boxes=_boxes([0, 0, 5, 10]),
                   box_labels=np.array([2], np.int32))]
    return {"train": train, "val": val}


@pytest.fixture(scope="module")
def detection(tmp_path_factory):
    root = tmp_path_factory.mktemp("detection")
    layout = Layout(root)
    _write(layout.prepared("detection"), "detection", DETECTION_CLASSES, _detection_splits())
    stats = describe(layout.prepared("detection"), "detection", DETECTION_CLASSES,
                     layout.data_stats("detection"))
    return layout, stats


def test_detection_counts_boxes_and_images_per_class(detection):
    layout, stats = detection
    assert json.loads((layout.data_stats("detection") / STATS).read_text()) == stats
    train = stats["splits"]["train"]
    assert (train["images"], train["described"], train["every"], train["boxes"]) == (3, 3, 1, 3)
    assert train["classes"] == {
        "cat": {"boxes": 2, "share": pytest.approx(2 / 3, abs=1e-6), "images": 2},
        "dog": {"boxes": 1, "share": pytest.approx(1 / 3, abs=1e-6), "images": 1},
        "bird": {"boxes": 0, "share": 0.0, "images": 0}}
    assert train["imbalance"] is None  # no bird
    assert train["boxes_per_image"]["histogram"] == {"0": 1, "1": 1, "2": 1}
    assert train["boxes_per_image"]["summary"]["mean"] == 1.0
    val = stats["splits"]["val"]
    assert val["classes"]["bird"] == {"boxes": 1, "share": 1.0, "images": 1}


def test_detection_box_sizes_and_aspect_ratios_are_relative_to_their_image(detection):
    _, stats = detection
    train = stats["splits"]["train"]
    sizes = sorted([math.sqrt(0.5 * 0.5), math.sqrt(0.1 * 0.25), math.sqrt(0.5 * 1.0)])
    summary = train["box_size"]["summary"]
    assert summary["min"] == pytest.approx(sizes[0], abs=1e-6)
    assert summary["median"] == pytest.approx(sizes[1], abs=1e-6)
    assert summary["max"] == pytest.approx(sizes[2], abs=1e-6)
    assert summary["mean"] == pytest.approx(sum(sizes) / 3, abs=1e-6)
    # 20 bins of 0.05: 0.158 in bin 3, 0.5 in bin 10, 0.707 in bin 14.
    hist = train["box_size"]["histogram"]
    assert len(hist["edges"]) == 21 and sum(hist["counts"]) == 3
    assert [i for i, c in enumerate(hist["counts"]) if c] == [3, 10, 14]
    aspect = train["aspect_ratio"]["summary"]  # width / height in pixels: 2.0, 0.8, 1.0
    assert (aspect["min"], aspect["median"], aspect["max"]) == pytest.approx((0.8, 1.0, 2.0))
    assert sum(train["aspect_ratio"]["histogram"]["counts"]) == 3
    assert train["box_width"]["max"] == pytest.approx(0.5)
    assert train["box_height"]["min"] == pytest.approx(0.25)
    assert train["box_height"]["max"] == pytest.approx(1.0)
    # The 10x10 val image: its own size, not the train images', is the reference.
    assert stats["splits"]["val"]["box_size"]["summary"]["max"] == pytest.approx(
        math.sqrt(0.5), abs=1e-6)


def test_class_balance_rows_for_dvc_plots(detection):
    layout, _ = detection
    rows = json.loads((layout.data_stats("detection") / CLASS_BALANCE).read_text())
    assert [r["bar"] for r in rows] == ["train: cat", "train: dog", "train: bird",
                                        "val: cat", "val: dog", "val: bird"]
    assert rows[0] == {"bar": "train: cat", "split": "train", "class": "cat", "unit": "boxes",
                       "count": 2, "share": pytest.approx(2 / 3, abs=1e-6)}
    assert [r["count"] for r in rows] == [2, 1, 0, 0, 0, 1]


def _png_ok(path):
    assert path.stat().st_size > 5000, path
    with Image.open(path) as img:
        assert img.format == "PNG" and min(img.size) > 200


def test_detection_plots_are_written(detection):
    layout, _ = detection
    folder = layout.data_stats("detection") / PLOTS
    assert sorted(p.name for p in folder.iterdir()) == ["boxes.png", "class_balance.png"]
    for path in folder.iterdir():
        _png_ok(path)


def test_classification_counts_images_per_class_and_samples_big_splits(tmp_path, capsys):
    names = ["a", "b", "c"]
    labels = {"train": [0, 0, 1, 2, 2, 2], "val": [1, 2]}
    _write(tmp_path / "data", "classification", names,
           {s: [Example(id=f"{s}{i}", image=_image(8, 8), label=lab)
                for i, lab in enumerate(v)] for s, v in labels.items()})
    stats = describe(tmp_path / "data", "classification", names, tmp_path / "out")
    train = stats["splits"]["train"]
    assert {n: c["images"] for n, c in train["classes"].items()} == {"a": 2, "b": 1, "c": 3}
    assert train["classes"]["c"]["share"] == 0.5 and train["imbalance"] == 3.0
    assert stats["splits"]["val"]["imbalance"] is None  # no "a"
    assert sorted(p.name for p in (tmp_path / "out" / PLOTS).iterdir()) == ["class_balance.png"]
    _png_ok(tmp_path / "out" / PLOTS / "class_balance.png")
    out = capsys.readouterr().out
    assert out.strip().count("\n") == 0 and out.startswith("prepare@classification: data stats")
    # More images than max_images: every 3rd (records 0 and 3: labels 0 and 2) is described.
    sampled = describe(tmp_path / "data", "classification", names, tmp_path / "out",
                       max_images=2)["splits"]["train"]
    assert (sampled["images"], sampled["described"], sampled["every"]) == (6, 2, 3)
    assert {n: c["images"] for n, c in sampled["classes"].items()} == {"a": 1, "b": 0, "c": 1}
    assert "1 in 3 images of train" in capsys.readouterr().out


def test_segmentation_pixels_and_coverage_per_class(tmp_path):
    names = ["background", "cell", "nucleus"]
    m1 = np.zeros((4, 5), np.uint8)             # all background
    m2 = np.zeros((4, 5), np.uint8)
    m2[0, :] = 1                                # 5 px cell: 0.25
    m3 = np.zeros((4, 5), np.uint8)
    m3[:2, :] = 2                               # 10 px nucleus: 0.5
    m3[2, :2] = 1                               # 2 px cell: 0.1
    masks = [m1, m2, m3]
    _write(tmp_path / "data", "segmentation", names,
           {"train": [Example(id=str(i), image=_image(4, 5), mask=m)
                      for i, m in enumerate(masks)]})
    stats = describe(tmp_path / "data", "segmentation", names, tmp_path / "out")
    train = stats["splits"]["train"]
    assert train["pixels"] == 60
    classes = train["classes"]
    assert {n: (c["pixels"], c["images"]) for n, c in classes.items()} == {
        "background": (43, 3), "cell": (7, 2), "nucleus": (10, 1)}
    assert classes["nucleus"]["share"] == pytest.approx(10 / 60, abs=1e-6)
    cell = classes["cell"]["coverage"]  # over the images holding it: 0.25 and 0.1
    assert cell["summary"]["min"] == pytest.approx(0.1)
    assert cell["summary"]["max"] == pytest.approx(0.25)
    assert cell["summary"]["mean"] == pytest.approx(0.175)
    assert [i for i, c in enumerate(cell["histogram"]["counts"]) if c] == [2, 5]
    background = classes["background"]["coverage"]["summary"]  # 1.0, 0.75, 0.4
    assert (background["min"], background["median"], background["max"]) == pytest.approx(
        (0.4, 0.75, 1.0))
    assert train["imbalance"] == pytest.approx(43 / 7, abs=1e-6)
    folder = tmp_path / "out" / PLOTS
    assert sorted(p.name for p in folder.iterdir()) == ["class_balance.png", "coverage.png"]
    for path in folder.iterdir():
        _png_ok(path)


def test_a_rerun_drops_plots_of_another_task(tmp_path):
    """Stale PNGs do not survive a rerun (a task's folder rewritten after a source change)."""
    names = ["a", "b"]
    _write(tmp_path / "data", "classification", names,
           {"train": [Example(id=str(i), image=_image(8, 8), label=i % 2) for i in range(4)]})
    (tmp_path / "out" / PLOTS).mkdir(parents=True)
    (tmp_path / "out" / PLOTS / "boxes.png").write_bytes(b"old")
    describe(tmp_path / "data", "classification", names, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out" / PLOTS).iterdir()] == ["class_balance.png"]


def test_train_logs_the_dataset_stats_to_mlflow(detection, default_params_dict, tmp_path,
                                                monkeypatch):
    """log_train logs reports/prepare/<task>/ as the run's data/ artifacts (real MLflow on
    sqlite; the rest of log_train, which needs a trained model, is cut short)."""
    from mlflow import MlflowClient

    from visionpipe.config import parse_params
    from visionpipe.tracking import stage_logs
    from visionpipe.tracking.mlflow_runs import RunLogger

    layout, stats = detection
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    data = {**default_params_dict,
            "tracking": {**default_params_dict["tracking"], "mlflow": True,
                         "system_metrics": False}}
    model = next(m for m, spec in data["models"].items() if spec["task"] == "detection")
    run = RunLogger(parse_params(data), model, layout).start()
    assert run.client is not None, run.error

    class Logged(Exception):
        pass

    original = stage_logs.log_data_stats

    def stop_after(logger):
        original(logger)
        raise Logged

    monkeypatch.setattr(stage_logs, "log_data_stats", stop_after)
    with pytest.raises(Logged):
        stage_logs.log_train(run)
    assert not run.not_logged, (run.not_logged, run.error)
    client = MlflowClient(uri)
    top = {f.path for f in client.list_artifacts(run.run_id, "data")}
    assert top == {"data/stats.json", "data/class_balance.json", "data/plots"}
    plots = {f.path: f.file_size for f in client.list_artifacts(run.run_id, "data/plots")}
    assert set(plots) == {"data/plots/boxes.png", "data/plots/class_balance.png"}
    assert all(size > 5000 for size in plots.values())
    local = client.download_artifacts(run.run_id, "data/stats.json", str(tmp_path))
    assert json.loads(Path(local).read_text()) == stats
