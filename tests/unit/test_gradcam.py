"""Grad-CAM (visionpipe.gradcam): it finds the region a class depends on, its maths through a
nested keras.applications backbone equals a hand computation, a model with no convolution is
reported as such, and evaluate's grid shows the images it says it shows."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers
from PIL import Image

from visionpipe.config import EvaluateConfig
from visionpipe.gradcam import feature_layer, gradcam_png, heatmaps, select_images
from visionpipe.models.registry import create_model, get_family
from visionpipe.models.saving import load_model
from visionpipe.tasks.registry import get_task
from visionpipe.training import dtype_policy

SIZE, SIDE = 32, 8  # image side, side of the square that decides the class
COLOURS = ((230, 40, 40), (40, 40, 230))  # class 0: a red square, class 1: a blue one
DISTRACTOR = (40, 230, 40)  # a green square in every image, whatever its class


def squares(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noise images with the class's square in one quadrant and the distractor in another:
    images, labels, and (row, col) of the class square and of the distractor."""
    rng = np.random.default_rng(seed)
    x = np.clip(rng.normal(110, 35, (n, SIZE, SIZE, 3)), 0, 255).astype(np.float32)
    y = rng.integers(0, len(COLOURS), n)
    where = []
    for i in range(n):
        (r, c), (dr, dc) = [(16 * (q // 2) + rng.integers(0, 16 - SIDE + 1),
                             16 * (q % 2) + rng.integers(0, 16 - SIDE + 1))
                            for q in rng.permutation(4)[:2]]
        x[i, r:r + SIDE, c:c + SIDE] = COLOURS[y[i]]
        x[i, dr:dr + SIDE, dc:dc + SIDE] = DISTRACTOR
        where.append((r, c, dr, dc))
    return x, y, np.array(where)


def test_the_heat_lies_on_the_square_that_decides_the_class():
    """A GAP classifier learns which colour the square has (its place varies, so the region
    that decides is known per image); the heat of the predicted class sits on that square,
    not on the noise or the distractor."""
    keras.utils.set_random_seed(0)
    x_train, y_train, _ = squares(256, seed=0)
    x_test, y_test, where = squares(64, seed=1)
    inputs = keras.Input((SIZE, SIZE, 3))
    h = layers.Rescaling(1 / 255)(inputs)
    h = layers.Conv2D(16, 3, padding="same", activation="relu")(h)
    h = layers.MaxPooling2D()(h)
    h = layers.Conv2D(32, 3, padding="same", activation="relu", name="last_conv")(h)
    h = layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inputs, layers.Dense(2, activation="softmax")(h))
    model.compile(keras.optimizers.Adam(0.005), "sparse_categorical_crossentropy")
    model.fit(x_train, y_train, epochs=12, batch_size=32, verbose=0)
    accuracy = float((model.predict(x_test, verbose=0).argmax(1) == y_test).mean())
    assert accuracy >= 0.95, accuracy

    assert feature_layer(model) == ("last_conv",)
    heat = heatmaps(model, x_test)
    assert heat.shape == (64, SIZE, SIZE) and heat.dtype == np.float32
    assert np.isfinite(heat).all() and heat.min() >= 0 and np.allclose(heat.max((1, 2)), 1)
    ratio, over_distractor = [], []
    for hmap, (r, c, dr, dc) in zip(heat, where, strict=True):
        inside = np.zeros((SIZE, SIZE), bool)
        inside[r:r + SIDE, c:c + SIDE] = True
        ratio.append(hmap[inside].mean() / max(hmap[~inside].mean(), 1e-6))
        over_distractor.append(hmap[inside].mean() > 2 * hmap[dr:dr + SIDE, dc:dc + SIDE].mean())
    ratio = np.array(ratio)
    for k in range(len(COLOURS)):  # each class's heat, not only one class's
        mine = ratio[y_test == k]
        assert (mine >= 3).mean() >= 0.9 and np.median(mine) >= 4, (k, np.sort(mine))
    assert np.mean(over_distractor) >= 0.8, np.mean(over_distractor)


def applications(size: int, backbone: str = "mobilenet_v2", **arch) -> keras.Model:
    """The applications family's model: a keras.applications backbone nested as one layer
    named "backbone", between its preprocessing (if outside it) and a pooled softmax head."""
    return create_model("applications", (size, size, 3), 3,
                        {**get_family("applications").tiny, "backbone": backbone, **arch})


def by_hand(model: keras.Model, images: np.ndarray, inner: str) -> np.ndarray:
    """Grad-CAM of the predicted class written out: the feature map of the backbone's layer
    ``inner``, the gradient of the logit (average pooling, then the head's kernel and bias),
    channel weights, ReLU, resize, maximum."""
    backbone, head = model.get_layer("backbone"), model.layers[-1]
    taps = keras.Model(backbone.inputs, [backbone.get_layer(inner).output, backbone.output])
    names = [layer.name for layer in model.layers]
    x = tf.constant(images)
    x = model.get_layer("preprocess")(x) if "preprocess" in names else x
    with tf.GradientTape() as tape:
        fmap, last = taps(x, training=False)
        logits = tf.reduce_mean(last, axis=(1, 2)) @ head.kernel + head.bias
        score = tf.reduce_max(logits, axis=1)  # the predicted class's logit
    weights = tf.reduce_mean(tape.gradient(score, fmap), axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * fmap, axis=-1))
    cam = tf.image.resize(cam[..., None], images.shape[1:3], "bilinear").numpy()[..., 0]
    return cam / cam.max(axis=(1, 2), keepdims=True)


def test_a_nested_backbone_is_looked_into_and_the_maths_is_grad_cam(tmp_path):
    """64x64: the backbone's 2x2 output is the map, found after a save and a safe reload as
    evaluate loads; 32x32: that output is 1x1, so the map is the backbone's last layer with
    more than one position; a backbone taking the model's input directly (MobileNetV3, its
    preprocessing inside) too. Each equals the hand computation."""
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (4, 64, 64, 3)).astype(np.float32)
    applications(64).save(tmp_path / "model.keras")
    model = load_model(tmp_path / "model.keras")
    backbone = model.get_layer("backbone")
    assert feature_layer(model) == ("backbone", backbone.layers[-1].name)  # its output
    assert backbone.outputs[0].shape[1:3] == (2, 2)
    heat = heatmaps(model, images)
    assert heat.shape == (4, 64, 64) and np.isfinite(heat).all()
    assert heat.min() >= 0 and np.allclose(heat.max((1, 2)), 1) and heat.std() > 0.05
    np.testing.assert_allclose(heat, by_hand(model, images, backbone.layers[-1].name),
                               atol=1e-5)

    images = images[:, :32, :32]
    for small, layer in ((applications(32), "block_13_expand_relu"),
                         (applications(32, "mobilenet_v3_small", alpha=0.75), None)):
        backbone = small.get_layer("backbone")
        path = feature_layer(small)
        assert path[0] == "backbone" and len(path) == 2 and path[1] == (layer or path[1])
        assert backbone.get_layer(path[1]).output.shape[1:3] == (2, 2)
        assert backbone.outputs[0].shape[1:3] == (1, 1)
        heat = heatmaps(small, images)
        assert heat.shape == (4, 32, 32) and heat.min() >= 0 and heat.max() <= 1
        np.testing.assert_allclose(heat, by_hand(small, images, path[1]), atol=1e-5)


def test_flat_families_and_bfloat16_models_get_maps():
    """VGG's and ResNet's last convolution block (not a pooling after it); a model computing
    in bfloat16 gives float32 maps close to its float32 twin's."""
    vgg = get_family("vgg")
    assert feature_layer(create_model("vgg", (64, 64, 3), 4, {})) == ("block5_conv2_relu",)
    assert feature_layer(create_model("resnet", (32, 32, 3), 4, {})) == ("stage3_block3_out",)
    images = np.random.default_rng(1).uniform(0, 255, (6, 32, 32, 3)).astype(np.float32)
    keras.utils.set_random_seed(1)
    full = create_model("vgg", (32, 32, 3), 3, vgg.tiny)
    with dtype_policy("mixed_bfloat16"):
        half = create_model("vgg", (32, 32, 3), 3, vgg.tiny)
    half.set_weights(full.get_weights())
    assert half.get_layer(feature_layer(half)[0]).compute_dtype == "bfloat16"
    classes = full.predict(images, verbose=0).argmax(1)
    a, b = heatmaps(full, images, classes), heatmaps(half, images, classes)
    assert b.dtype == np.float32 and np.isfinite(b).all() and b.min() >= 0 and b.max() <= 1
    assert np.abs(a - b).mean() < 0.02, np.abs(a - b).mean()


def test_an_mlp_is_not_convolutional_and_gets_no_file(tmp_path):
    """The MLP's input and rescaled image are 4-D but no convolution made them: no map, no
    file (an earlier run's is removed), and evaluate's line says why; gradcam_images: 0 is
    off, in so many words."""
    task = get_task("classification")
    mlp = create_model("mlp", (32, 32, 3), 3, get_family("mlp").tiny)
    assert feature_layer(mlp) is None
    with pytest.raises(ValueError, match="no convolutional feature map"):
        heatmaps(mlp, np.zeros((1, 32, 32, 3), np.float32))
    images = np.random.default_rng(2).uniform(0, 255, (8, 32, 32, 3)).astype(np.float32)
    y_true = np.arange(8) % 3
    probs = mlp.predict(images, verbose=0)
    (tmp_path / "gradcam.png").write_bytes(b"stale")
    out = task.explain(mlp, images, [str(i) for i in range(8)], y_true, probs,
                       ["a", "b", "c"], tmp_path, EvaluateConfig())
    assert out == {"summary": "no Grad-CAM: the model has no convolutional feature map",
                   "path": None}
    assert list(tmp_path.iterdir()) == []

    vgg = create_model("vgg", (32, 32, 3), 3, get_family("vgg").tiny)
    out = task.explain(vgg, images, [str(i) for i in range(8)], y_true, probs,
                       ["a", "b", "c"], tmp_path, EvaluateConfig(gradcam_images=0))
    assert out == {"summary": "Grad-CAM off (evaluate.gradcam_images: 0)", "path": None}
    assert list(tmp_path.iterdir()) == []
    # Segmentation and detection explain nothing.
    assert get_task("segmentation").explain(vgg, images, [], None, None, [], tmp_path,
                                            EvaluateConfig()) == {}


def test_the_grid_shows_the_most_confident_correct_and_wrong_images(tmp_path):
    rng = np.random.default_rng(3)
    n, names = 20, ["a", "b", "c"]
    images = rng.uniform(0, 255, (n, 32, 32, 3)).astype(np.float32)
    y_true = rng.integers(0, 3, n)
    confidence = rng.uniform(0.55, 0.95, n)
    y_pred = y_true.copy()
    wrong = np.array([1, 4, 7, 12, 15, 18])
    y_pred[wrong] = (y_true[wrong] + 1) % 3
    probs = np.full((n, 3), 0.0)
    probs[np.arange(n), y_pred] = confidence
    probs[np.arange(n), (y_pred + 1) % 3] = 1 - confidence
    model = create_model("vgg", (32, 32, 3), 3, get_family("vgg").tiny)
    task = get_task("classification")

    out = task.explain(model, images, [str(i) for i in range(n)], y_true, probs, names,
                       tmp_path, EvaluateConfig(gradcam_images=9))
    right = np.setdiff1d(np.arange(n), wrong)
    expected = [*right[np.argsort(-confidence[right])][:5],
                *wrong[np.argsort(-confidence[wrong])][:4]]
    assert out["shown"] == expected
    assert out["correct"] == [True] * 5 + [False] * 4
    assert out["path"] == tmp_path / "gradcam.png" and out["layer"] == "block5_conv2_relu"
    assert out["summary"] == ("Grad-CAM of 9 test images (5 correct, 4 wrong) at layer "
                              "block5_conv2_relu")
    with Image.open(out["path"]) as png:
        assert png.format == "PNG"
        width, height = png.size
        pixels = np.asarray(png.convert("RGB"))
    # 4 columns of 2.2 in at 100 dpi, 3 rows; trimmed to the drawing by bbox_inches="tight".
    assert 700 <= width <= 900 and 650 <= height <= 900, png.size
    assert pixels.std() > 20

    # More wrong images asked for than there are: the rest are correct ones; none wrong: said.
    shown, correct = select_images(y_true, probs, 16)
    assert correct.sum() == 10 and (~correct).sum() == 6 and len(set(shown.tolist())) == 16
    grid = gradcam_png(model, images, y_pred, probs, names, 4, tmp_path / "all_right.png")
    assert grid["correct"] == [True] * 4 and grid["shown"] == np.argsort(-confidence)[:4].tolist()
    assert "no misclassified test images" in grid["title"]
    assert (tmp_path / "all_right.png").stat().st_size > 10_000
