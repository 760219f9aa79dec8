"""The detection stages prepare -> augment -> train -> evaluate -> export on tiny shapes, in
this process: metrics equal a recomputation from the saved model, every plot is written, and
the SavedModel returns boxes in the input images' pixels."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from visionpipe.config import parse_params
from visionpipe.data import records
from visionpipe.layout import Layout

FORMATS = ("keras", "saved_model", "tflite", "tflite_int8", "onnx")
INT8_LIMITS = {"tflite_int8": {"max_abs_diff": 50.0, "min_agreement": 0.6, "max_map_drop": 0.1}}


@pytest.fixture(scope="module")
def detection_run(tmp_path_factory, default_params_dict):
    """Tiny shapes detection through every stage, in this process."""
    from visionpipe.stages import augment, evaluate, export, prepare, train

    data = json.loads(json.dumps(default_params_dict))
    data["tracking"].update(mlflow=False, codecarbon=False)
    data["prepare"]["detection"].update(splits={"train": 48, "val": 16, "test": 24})
    data["augment"]["detection"]["preview"] = 4
    yolo = data["models"]["yolo"]
    yolo["architecture"].update(width_multiplier=0.25)
    # The default's rate (0.05) is for batch 32 over 6000 images; at batch 16 on 48 images the
    # tiny head's raw outputs grew until the float32 formats differed from Keras by 9.
    yolo["train"].update(epochs=2, batch_size=16, learning_rate=0.02, warmup_epochs=0.5)
    data["evaluate"].update(latency_samples=2, latency_warmup=1, gallery=6)
    data["export"].update(parity_samples=8, parity_min_boxes=30, representative_samples=16)
    yolo["export_formats"] = list(FORMATS)
    # A 2-epoch detector: loose int8 limits (the default model's are in params.yaml).
    yolo["export_parity"] = {fmt: dict(limit) for fmt, limit in INT8_LIMITS.items()}
    params = parse_params(data)
    root = tmp_path_factory.mktemp("detection")
    layout = Layout(root)
    prepare.run(params, "detection", layout)
    augment.run(params, "detection", layout)
    train.run(params, "yolo", layout)
    evaluate.run(params, "yolo", layout)
    export.run(params, "yolo", layout)
    return params, layout


@pytest.mark.slow
def test_evaluate_metrics_equal_a_recomputation_from_the_saved_model(detection_run):
    from visionpipe.models.saving import load_model
    from visionpipe.models.yolo import detect, set_nms
    from visionpipe.tasks.detection_metrics import detection_metrics

    params, layout = detection_run
    test = json.loads(layout.metrics("yolo").read_text())["test"]
    model = load_model(layout.model_file("yolo"))
    set_nms(model, params.evaluate.nms)
    truths, images = [], []
    for ex in records.read_split(layout.prepared("detection"), "test"):
        images.append(ex.image)
        truths.append({"boxes": ex.boxes, "class_ids": ex.box_labels.astype(np.int64)})
    again = detection_metrics(truths, detect(model, np.stack(images).astype(np.float32), 8),
                              ["circle", "square", "triangle", "star"])
    for key in ("map_50_95", "map_50", "map_75", "precision", "recall", "instances"):
        assert test[key] == pytest.approx(again[key]), key
    assert test["images"] == test["num_test_images"] == 24
    assert test["nms"] == {"iou_threshold": 0.7, "confidence_threshold": 0.001,
                           "max_detections": 100}
    assert test["instances"] == sum(len(t["class_ids"]) for t in truths)


@pytest.mark.slow
def test_evaluate_writes_curves_confusion_and_gallery(detection_run):
    _, layout = detection_run
    out = layout.plots("yolo")
    for name in ("pr_curve.png", "f1_curve.png", "confusion.png", "misclassified.png",
                 "learning_curves.png"):
        with Image.open(out / name) as image:
            assert min(image.size) > 100, name
    rows = json.loads((out / "per_class.json").read_text())
    assert [r["class"] for r in rows] == ["circle", "square", "triangle", "star"]
    assert all({"ap_50", "ap_50_95", "precision", "recall", "f1"} <= set(r) for r in rows)
    cells = json.loads((out / "confusion.json").read_text())
    names = {"circle", "square", "triangle", "star", "background"}
    assert {c["actual"] for c in cells} <= names and {c["predicted"] for c in cells} <= names
    test = json.loads(layout.metrics("yolo").read_text())["test"]
    # Every truth box appears once in the matrix: found, confused or missed.
    assert sum(c["actual"] != "background" for c in cells) == test["instances"]


@pytest.mark.slow
def test_export_serves_boxes_in_the_input_images_pixels(detection_run):
    params, layout = detection_run
    report = json.loads(layout.export_report("yolo").read_text())
    assert report["passed"] and set(report["formats"]) == set(FORMATS)
    assert report["formats"]["keras"]["max_abs_diff"] == 0.0
    assert report["formats"]["saved_model"]["anchor_agreement"] == 1.0
    assert report["resized_input"]["detection_agreement"] >= 0.95
    meta = json.loads((layout.export_dir("yolo") / "export.json").read_text())
    assert meta["task"] == "detection" and "num_detections" in meta["outputs"]
    assert meta["decoder"] == {"kind": "yolov8_dfl", "box_channels": 64, "strides": [8, 16, 32]}
    assert meta["nms"] == {"iou_threshold": 0.7, "confidence_threshold": 0.25,
                           "max_detections": 100}
    served = tf.saved_model.load(str(layout.export_dir("yolo") / "saved_model"))
    image = np.zeros((1, 150, 90, 3), np.uint8)
    image[:, 40:100, 20:70] = 255
    out = served.signatures["serving_default"](images=tf.constant(image))
    n = int(out["num_detections"][0])
    boxes = out["boxes"][0].numpy()
    assert n <= 100 and np.all(boxes[n:] == -1)
    assert np.all((boxes[:n, 0::2] >= 0) & (boxes[:n, 0::2] <= 90))
    assert np.all((boxes[:n, 1::2] >= 0) & (boxes[:n, 1::2] <= 150))
    assert np.all(out["scores"][0, :n].numpy() >= params.export.nms.confidence_threshold)
    names = [s.decode() for s in out["class_name"][0].numpy()]
    assert set(names[:n]) <= {"circle", "square", "triangle", "star"}
    assert set(names[n:]) <= {""}


@pytest.mark.slow
def test_export_parity_is_judged_on_enough_boxes_with_map_and_box_agreement(detection_run):
    params, layout = detection_run
    report = json.loads(layout.export_report("yolo").read_text())
    truths = [len(ex.box_labels) for ex in records.read_split(layout.prepared("detection"),
                                                               "test")]
    # parity_samples (8) images hold fewer than parity_min_boxes (30): the first n that do.
    n = int(np.searchsorted(np.cumsum(truths), 30)) + 1
    assert sum(truths[:8]) < 30 <= sum(truths[:n]) and report["samples"] == n
    assert report["resized_input"]["images"] == n
    for fmt, result in report["formats"].items():
        assert result["images"] == n and result["truth_boxes"] == sum(truths[:n]), fmt
        assert result["map_50_drop"] == pytest.approx(result["map_50_keras"] - result["map_50"])
        assert result["failed"] == [] and result["passed"], (fmt, result)
        key = params.parity_key("yolo", fmt)
        assert result["limits"] == {
            "max_abs_diff": {"key": f"{key}.max_abs_diff", "max": params.parity("yolo", fmt)
                             .max_abs_diff},
            "box_agreement": {"key": f"{key}.min_agreement",
                              "min": params.parity("yolo", fmt).min_agreement},
            "map_50_drop": {"key": f"{key}.max_map_drop",
                            "max": params.parity("yolo", fmt).max_map_drop}}, fmt
    assert report["formats"]["tflite_int8"]["limits"]["map_50_drop"]["key"] == (
        "models.yolo.export_parity.tflite_int8.max_map_drop")
    for fmt in ("saved_model", "tflite", "onnx"):
        assert report["formats"][fmt]["box_agreement"] == 1.0
        assert report["formats"][fmt]["map_50_drop"] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.slow
def test_each_exported_raw_head_decodes_to_the_keras_models_detections(detection_run):
    """Each file run on its own (predict's runners: the full-int8 file's two outputs joined),
    its raw head decoded by box_decoding, against keras-cv's own decoding and NMS of the
    Keras model."""
    from visionpipe import box_decoding
    from visionpipe.models.saving import load_model
    from visionpipe.serving import open_runner
    from visionpipe.tasks.detection import match_share
    from visionpipe.tasks.registry import task_for

    params, layout = detection_run
    out = layout.export_dir("yolo")
    meta = json.loads((out / "export.json").read_text())
    pixels = np.stack([ex.image for ex in records.read_split(layout.prepared("detection"),
                                                             "test")])
    task = task_for("yolo", "detection")
    model = task.export_model(load_model(layout.model_file("yolo")), params.export)
    expected = task.hooks.detect(model, pixels.astype(np.float32), 32)  # keras-cv decoding
    nms = meta["nms"]
    decode = dict(confidence=nms["confidence_threshold"], iou=nms["iou_threshold"],
                  max_detections=nms["max_detections"], decoder=meta["decoder"])
    own = box_decoding.decode_raw(task.forward(model, pixels.astype(np.float32)),
                                  tuple(meta["image_size"]), **decode)
    assert match_share(expected, own) == (1.0, pytest.approx(0.0, abs=1e-3))
    for fmt in ("tflite", "tflite_int8", "onnx"):
        raw = open_runner(out, fmt, meta).predict(pixels)
        assert raw.shape == (len(pixels), 84, 64 + 4), fmt  # 64x64: 8x8 + 4x4 + 2x2 anchors
        got = box_decoding.decode_raw(raw, tuple(meta["image_size"]), **decode)
        share, _ = match_share(expected, got)
        assert share >= params.parity("yolo", fmt).min_agreement, (fmt, share)


@pytest.mark.slow
def test_predict_gives_every_format_the_saved_models_boxes_in_image_pixels(detection_run,
                                                                           tmp_path,
                                                                           monkeypatch):
    """predict on a folder of test images at other sizes: the SavedModel's fixed-size raw head
    decoded in NumPy and mapped back through the letterbox equals its own serving_default
    (in-graph resizing, decoding and mapping); TFLite, ONNX and full int8 give those boxes;
    COCO results and rendered copies follow; --conf keeps the boxes scoring that much."""
    from visionpipe.predict import COCO_FILE, Options, predict_folder
    from visionpipe.serving import TFLiteRunner
    from visionpipe.tasks.detection import match_share

    _, layout = detection_run
    export_dir = layout.export_dir("yolo")
    folder = tmp_path / "photos"
    folder.mkdir()
    sizes = [(64, 64), (120, 90), (75, 140)]
    for i, ex in enumerate(records.read_split(layout.prepared("detection"), "test")):
        h, w = sizes[i % 3]
        Image.fromarray(ex.image).resize((w, h), Image.BILINEAR).save(folder / f"{i:02d}.png")
    (folder / "readme.txt").write_text("not an image")
    options = Options(confidence=0.25, iou=0.7, max_detections=100, batch_size=5)
    batches = []  # images per call of the real TFLite runner: predict streams in batches
    real = TFLiteRunner.predict
    monkeypatch.setattr(TFLiteRunner, "predict",
                        lambda self, x: batches.append(len(x)) or real(self, x))
    runs = {fmt: predict_folder(export_dir, folder, tmp_path / fmt, fmt, options)
            for fmt in ("saved_model", "tflite", "onnx", "tflite_int8")}
    assert batches == [5, 5, 5, 5, 4] * 2  # tflite and tflite_int8: 24 images, 5 at a time
    ref = runs["saved_model"]
    assert ref["count"] == 24 and ref["skipped"]["count"] == 1
    assert ref["skipped"]["items"][0]["path"] == "readme.txt"
    served = tf.saved_model.load(str(export_dir / "saved_model")).signatures["serving_default"]
    total = 0
    for rec in ref["predictions"]:
        image = np.asarray(Image.open(folder / rec["file"]).convert("RGB"))
        assert (rec["height"], rec["width"]) == image.shape[:2]
        out = served(images=tf.constant(image[None]))
        n = int(out["num_detections"][0])
        dets = rec["detections"]
        assert len(dets) == n, rec["file"]
        if n:
            np.testing.assert_allclose([d["box"] for d in dets], out["boxes"][0, :n].numpy(),
                                       atol=0.02)
            assert [d["class_id"] for d in dets] == out["class_id"][0, :n].numpy().tolist()
        total += n
        assert (tmp_path / "saved_model" / "rendered" / f"{rec['file']}.png").is_file()
    assert total > 0 and ref["detections"] == total
    coco = json.loads((tmp_path / "saved_model" / COCO_FILE).read_text())
    assert len(coco) == total
    first = next(d for r in ref["predictions"] for d in r["detections"])
    x0, y0, x1, y1 = first["box"]
    assert coco[0]["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=0.02)
    for fmt in ("tflite", "onnx"):  # float32 files: the SavedModel's boxes
        for a, b in zip(ref["predictions"], runs[fmt]["predictions"], strict=True):
            assert [d["class_id"] for d in a["detections"]] == [
                d["class_id"] for d in b["detections"]], (fmt, a["file"])
            if a["detections"]:
                np.testing.assert_allclose([d["box"] for d in a["detections"]],
                                           [d["box"] for d in b["detections"]], atol=0.05)
    # Full int8 (two outputs, each dequantised and joined by the runner) moves boxes near the
    # cut-off of this 2-epoch model; mis-joined outputs would pair up none.
    share, _ = match_share(*[[{"boxes": np.reshape([d["box"] for d in r["detections"]],
                                                   (-1, 4)),
                               "class_ids": [d["class_id"] for d in r["detections"]],
                               "scores": [d["score"] for d in r["detections"]]}
                              for r in runs[fmt]["predictions"]]
                             for fmt in ("saved_model", "tflite_int8")], iou=0.5)
    assert share >= 0.5, share
    strict = predict_folder(export_dir, folder, tmp_path / "strict", "saved_model",
                            Options(confidence=0.5))
    kept = [d["score"] for r in strict["predictions"] for d in r["detections"]]
    assert all(s >= 0.5 for s in kept)
    assert len(kept) == sum(d["score"] >= 0.5 for r in ref["predictions"]
                            for d in r["detections"])


@pytest.mark.slow
def test_predict_reads_a_video_frame_by_frame_and_renders_one(detection_run, tmp_path):
    """A video in the folder: one record per frame, with index and time, whose boxes are the
    ones the same decoded frame gets as a PNG; the rendered frames make rendered/<file>.mp4."""
    from fractions import Fraction

    from visionpipe import video
    from visionpipe.predict import Options, predict_folder

    _, layout = detection_run
    export_dir = layout.export_dir("yolo")
    clip = tmp_path / "clip" / "street.mp4"
    writer = video.Writer(clip, Fraction(5))
    for ex in itertools.islice(records.read_split(layout.prepared("detection"), "test"), 10):
        writer.write(Image.fromarray(ex.image).resize((96, 80), Image.BILINEAR))
    writer.close()
    stills = tmp_path / "stills"
    stills.mkdir()
    for f in video.frames(clip):  # the same pixels predict decodes, as lossless PNGs
        Image.fromarray(f.image).save(stills / f"{f.index:02d}.png")
    options = Options(confidence=0.25, batch_size=4)
    got = predict_folder(export_dir, clip.parent, tmp_path / "out", "saved_model", options)
    want = predict_folder(export_dir, stills, tmp_path / "want", "saved_model", options)
    assert got["count"] == 10 and got["skipped"]["count"] == 0
    assert [(r["file"], r["frame"], r["time_s"]) for r in got["predictions"]] == [
        ("street.mp4", i, pytest.approx(i / 5)) for i in range(10)]
    assert all((r["height"], r["width"]) == (80, 96) for r in got["predictions"])
    assert [r["detections"] for r in got["predictions"]] == [
        r["detections"] for r in want["predictions"]]
    assert got["detections"] == want["detections"] > 0
    rendered = list(video.frames(tmp_path / "out" / "rendered" / "street.mp4.mp4"))
    assert len(rendered) == 10 and rendered[0].image.shape == (80, 96, 3)
    assert rendered[0].rate == 5


@pytest.mark.slow
def test_a_test_split_with_too_few_boxes_borrows_val_and_train_images_for_parity(
        detection_run, tmp_path):
    from visionpipe.model_card import _plain
    from visionpipe.stages import export

    params, layout = detection_run
    data = json.loads(json.dumps(_plain(params)))
    data["export"].update(formats=["keras"], parity_min_boxes=150)  # the cheapest format
    out = tmp_path / "export"
    out.mkdir()
    report = export._export(parse_params(data), "yolo", layout, out)
    boxes = {s: [len(ex.box_labels) for ex in records.read_split(layout.prepared("detection"),
                                                                 s)]
             for s in ("test", "val", "train")}
    assert sum(boxes["test"]) + sum(boxes["val"]) < 150  # the fixture's 24 + 16 images
    n = int(np.searchsorted(np.cumsum(boxes["test"] + boxes["val"] + boxes["train"]), 150)) + 1
    assert report["splits"] == ["test", "val", "train"] and report["samples"] == n
    result = report["formats"]["keras"]
    assert result["images"] == n and result["truth_boxes"] >= 150 and result["passed"], result
