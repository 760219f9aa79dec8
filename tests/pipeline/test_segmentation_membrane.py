"""Segmentation on real image/mask pairs (../shared/datasets/membrane): prepare cuts training
crops and keeps test slices whole; a U-Net trained on 128x128 crops predicts a 512x512 slice
in tiles as well as in one piece; its exports keep parity and serve masks."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from visionpipe.config import TrainConfig, parse_params
from visionpipe.data import records
from visionpipe.layout import Layout
from visionpipe.models.registry import create_model
from visionpipe.serving import FILES
from visionpipe.stages import augment, evaluate, export, prepare, train
from visionpipe.tasks.segmentation import SegmentationTask, mean_iou
from visionpipe.tiling import sliding_window, tile_starts

pytestmark = pytest.mark.slow

ARCH = {"depth": 3, "base_filters": 8}


@pytest.fixture(scope="module")
def membrane(tmp_path_factory, default_params_dict, datasets_dir):
    """Prepared membrane pairs in a temporary project, and a small U-Net trained on crops."""
    root = tmp_path_factory.mktemp("membrane")
    data = json.loads(json.dumps(default_params_dict))
    data["prepare"] = {"segmentation": {
        "source": "pairs", "path": str(datasets_dir / "membrane"),
        "mask_values": {255: "cell", 0: "membrane"}, "image_size": [512, 512],
        "crop_size": [128, 128], "splits": {"train": 0.7, "val": 0.1, "test": 0.2}}}
    data["augment"] = {}
    data["models"] = {"unet": {"family": "unet", "task": "segmentation",
                               "architecture": ARCH}}
    data["export"].update(formats=["keras", "saved_model", "tflite", "onnx"], parity_samples=6)
    data["tracking"].update(mlflow=False, codecarbon=False)
    params = parse_params(data)
    layout = Layout(root)
    manifest = prepare.run(params, "segmentation", layout)

    keras.utils.set_random_seed(0)
    train_set = list(records.read_split(layout.prepared("segmentation"), "train"))
    x = np.stack([ex.image for ex in train_set]).astype(np.float32)
    y = np.stack([ex.mask for ex in train_set]).astype(np.int32)
    task = SegmentationTask()
    model = create_model("unet", (128, 128, 3), 2, ARCH)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=task.loss(
        TrainConfig(loss="ce_dice"), 2))
    model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    layout.model_dir("unet").mkdir(parents=True, exist_ok=True)
    model.save(layout.model_file("unet"))
    return params, layout, manifest, model


def test_prepare_cuts_train_crops_and_keeps_test_slices_whole(membrane):
    _, layout, manifest, *_ = membrane
    assert manifest["class_names"] == ["cell", "membrane"]
    assert manifest["source"]["kind"] == "pairs" and manifest["source"]["pairs"] == 30
    assert manifest["skipped"]["count"] == 0
    # 30 pairs split 21 / 3 / 6; train and val cut into 4 x 4 crops of 128.
    assert manifest["counts"] == {"train": 21 * 16, "val": 3 * 16, "test": 6}
    assert manifest["image_size"] == [128, 128] and manifest["test_image_size"] == [512, 512]
    pixels = manifest["class_pixels"]
    assert sum(pixels["test"].values()) == 6 * 512 * 512
    assert 0.1 < pixels["train"]["membrane"] / sum(pixels["train"].values()) < 0.4
    test = list(records.read_split(layout.prepared("segmentation"), "test"))
    assert {ex.image.shape for ex in test} == {(512, 512, 3)}
    assert set(np.unique(np.stack([ex.mask for ex in test]))) == {0, 1}
    crop = next(records.read_split(layout.prepared("segmentation"), "train"))
    assert crop.image.shape == (128, 128, 3) and crop.id.endswith("-r0c0")


def test_tiled_prediction_of_a_whole_slice_matches_one_piece(membrane):
    _, layout, _, model, *_ = membrane
    slice_ = next(records.read_split(layout.prepared("segmentation"), "test"))
    image = slice_.image.astype(np.float32)
    tiled = sliding_window(lambda b: model.predict(b, verbose=0), image, (128, 128), 0.25)
    assert tiled.shape == (512, 512, 2)
    # U-Net is fully convolutional: the same weights at 512x512 see the slice in one piece.
    whole_model = create_model("unet", (512, 512, 3), 2, ARCH)
    whole_model.set_weights(model.get_weights())
    whole = whole_model.predict(image[None], verbose=0)[0]
    truth = slice_.mask
    iou_tiled = mean_iou(truth, tiled.argmax(-1), 2)
    iou_whole = mean_iou(truth, whole.argmax(-1), 2)
    assert iou_whole > 0.55, iou_whole  # the model has learned something to compare
    assert abs(iou_tiled - iou_whole) <= 0.02, (iou_tiled, iou_whole)
    # No grid of errors along the seams: pixels next to a tile edge are wrong no more often
    # than the rest (within a margin).
    wrong = tiled.argmax(-1) != truth
    near = np.zeros((512, 512), bool)
    for s in tile_starts(512, 128, 0.25):
        for edge in (s, s + 128):
            near[max(0, edge - 2):edge + 2, :] = True
            near[:, max(0, edge - 2):edge + 2] = True
    near[:4], near[-4:], near[:, :4], near[:, -4:] = False, False, False, False
    assert wrong[near].mean() <= wrong[~near].mean() * 1.25 + 0.01, (
        wrong[near].mean(), wrong[~near].mean())


def test_segmentation_stages_train_on_crops_and_evaluate_whole_images(tmp_path,
                                                                     default_params_dict):
    """The real augment, train and evaluate stages on tiny shapes: 16x16 crops of 32x32
    images, so evaluate predicts the whole test images through tiles."""
    data = json.loads(json.dumps(default_params_dict))
    data["prepare"] = {"segmentation": {"image_size": [32, 32], "crop_size": [16, 16],
                                        "splits": {"train": 48, "val": 8, "test": 6}}}
    data["augment"] = {"segmentation": {"copies": 1, "preview": 2}}
    data["models"] = {"unet": {"family": "unet", "task": "segmentation",
                               "architecture": {"depth": 2, "base_filters": 4},
                               "train": {"epochs": 3, "batch_size": 32, "loss": "ce_dice",
                                         "monitor": "val_mean_iou"}}}
    data["evaluate"].update(latency_samples=2, latency_warmup=1, gallery=2)
    data["tracking"].update(mlflow=False, codecarbon=False)
    params = parse_params(data)
    layout = Layout(tmp_path)
    prepare.run(params, "segmentation", layout)
    augment.run(params, "segmentation", layout)
    meta = train.run(params, "unet", layout)
    metrics = evaluate.run(params, "unet", layout)

    assert meta["image_size"] == [16, 16] and meta["monitor"] == "val_mean_iou"
    assert meta["train_dataset"]["count"] == 2 * 48 * 4  # originals + 1 copy, 4 crops each
    history = layout.history("unet").read_text().splitlines()
    column = history[0].split(",").index("val_mean_iou")
    ious = [float(line.split(",")[column]) for line in history[1:]]
    assert len(ious) == 3 and meta["kept_epoch"] == 1 + ious.index(max(ious))
    test = metrics["test"]
    assert test["num_test_images"] == 6 and test["num_test_pixels"] == 6 * 32 * 32
    assert metrics["cost"]["input_size"] == [16, 16]
    # The same figures from the saved model, tiled here.
    from visionpipe.models.saving import load_model

    task = SegmentationTask()
    truth = [ex.mask for ex in records.read_split(layout.prepared("segmentation"), "test")]
    images = np.stack([ex.image for ex in records.read_split(layout.prepared("segmentation"),
                                                              "test")]).astype(np.float32)
    again = task.evaluate(np.stack(truth), task.predict(load_model(layout.model_file("unet")),
                                                        images, 8, 0.25),
                          ["background", "circle", "square", "triangle", "star"],
                          params.evaluate)
    for key in ("pixel_accuracy", "mean_iou", "loss"):
        assert test[key] == pytest.approx(again[key], abs=1e-6)
    rows = json.loads((layout.plots("unet") / "per_class.json").read_text())
    assert [r["class"] for r in rows] == ["background", "circle", "square", "triangle", "star"]
    for name in ("misclassified.png", "confusion.png", "confusion.json", "learning_curves.png"):
        assert (layout.plots("unet") / name).stat().st_size > 0


@pytest.fixture(scope="module")
def exported(membrane, tmp_path_factory):
    """The membrane U-Net's export folder and parity report."""
    params, layout, *_ = membrane
    out = tmp_path_factory.mktemp("membrane-export")
    return out, export._export(params, "unet", layout, out)


def test_exported_formats_keep_parity_and_serve_masks(exported):
    out, report = exported
    assert report["agreement_key"] == "mask_iou"
    assert report["passed"] is True, json.dumps(report, indent=1)
    for fmt in ("saved_model", "tflite", "onnx"):
        result = report["formats"][fmt]
        assert result["max_abs_diff"] <= 1e-4 and result["mask_iou"] >= 0.99, (fmt, result)
    import tensorflow as tf

    served = tf.saved_model.load(str(out / FILES["saved_model"])).signatures[
        "serving_default"](images=tf.constant(np.zeros((2, 200, 136, 3), np.uint8)))
    # Scores at the training scale (prepare's 512x512, tiled), the mask at the input's size.
    assert served["mask"].shape == (2, 200, 136) and served["scores"].shape == (2, 512, 512, 2)
    meta = json.loads((out / "export.json").read_text())
    assert meta["task"] == "segmentation" and "mask" in meta["outputs"]


def test_a_crop_trained_unet_is_served_and_predicted_at_its_training_scale(membrane, exported,
                                                                           tmp_path):
    """The SavedModel takes a whole slice at any size, resizes it to prepare's 512x512 and
    tiles it as evaluate does (not squeezed to the 128x128 crop size); predict on the TFLite
    file tiles on the host the same way: masks agree with serving_default and evaluate's own
    tiled prediction, and each image's class shares add up to one."""
    import tensorflow as tf
    from PIL import Image

    from visionpipe.predict import Options, predict_folder

    params, layout, _, model = membrane
    out, _ = exported
    meta = json.loads((out / "export.json").read_text())
    assert meta["scale"] == [512, 512] and meta["image_size"] == [128, 128]
    assert meta["tile_overlap"] == params.evaluate.tile_overlap
    test = list(records.read_split(layout.prepared("segmentation"), "test"))[:2]
    folder = tmp_path / "slices"
    folder.mkdir()
    Image.fromarray(test[0].image).save(folder / "a.png")
    Image.fromarray(test[1].image).resize((300, 400), Image.BILINEAR).save(folder / "b.png")
    serve = tf.saved_model.load(str(out / FILES["saved_model"])).signatures["serving_default"]
    whole = serve(images=tf.constant(test[0].image[None]))
    assert whole["scores"].shape == (1, 512, 512, 2) and whole["mask"].shape == (1, 512, 512)
    tiled = SegmentationTask().predict(model, test[0].image[None].astype(np.float32), 16,
                                       params.evaluate.tile_overlap)
    assert (whole["mask"][0].numpy() == tiled[0].argmax(-1)).mean() > 0.999
    for fmt in ("saved_model", "tflite"):
        result = predict_folder(out, folder, tmp_path / fmt, fmt, Options(batch_size=1))
        assert [r["file"] for r in result["predictions"]] == ["a.png", "b.png"]
        for rec in result["predictions"]:
            image = np.asarray(Image.open(folder / rec["file"]).convert("RGB"))
            mask = np.asarray(Image.open(tmp_path / fmt / rec["mask"]))
            assert mask.shape == image.shape[:2] == (rec["height"], rec["width"])
            served = serve(images=tf.constant(image[None]))["mask"][0].numpy()
            assert (mask == served).mean() > 0.999, (fmt, rec["file"])
            shares = rec["class_shares"]
            assert set(shares) == {"cell", "membrane"}
            assert sum(shares.values()) == pytest.approx(1.0, abs=1e-5)
            assert shares["membrane"] == pytest.approx((mask == 1).mean(), abs=1e-6)
            assert (tmp_path / fmt / "rendered" / f"{rec['file']}.png").is_file()
    # A video of the two slices: a mask per frame under masks/<file>/, equal to the mask of
    # the same decoded frame given as an image; the overlays make rendered/<file>.mp4.
    from fractions import Fraction

    from visionpipe import video

    clip = tmp_path / "clip" / "stack.mp4"
    writer = video.Writer(clip, Fraction(2))
    for ex in test:
        writer.write(ex.image)
    writer.close()
    decoded = tmp_path / "decoded"
    decoded.mkdir()
    for f in video.frames(clip):
        Image.fromarray(f.image).save(decoded / f"{f.index}.png")
    got = predict_folder(out, clip.parent, tmp_path / "video", "saved_model", Options())
    want = predict_folder(out, decoded, tmp_path / "frames", "saved_model", Options())
    assert [(r["frame"], r["mask"]) for r in got["predictions"]] == [
        (0, "masks/stack.mp4/000000.png"), (1, "masks/stack.mp4/000001.png")]
    for rec, ref in zip(got["predictions"], want["predictions"], strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "video" / rec["mask"])),
                                      np.asarray(Image.open(tmp_path / "frames" / ref["mask"])))
        assert rec["class_shares"] == ref["class_shares"]
    assert len(list(video.frames(tmp_path / "video" / "rendered" / "stack.mp4.mp4"))) == 2
