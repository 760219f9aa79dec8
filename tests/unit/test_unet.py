"""U-Net family: shapes, layout from params, the input-size check, learning, saving; and the
U-Net on a keras.applications encoder (random or local weights: no network here)."""

from __future__ import annotations

import re

import keras
import numpy as np
import pytest

from tests.helpers import params_error
from visionpipe import finetune
from visionpipe.errors import ModelError, ParamsError
from visionpipe.models import pretrained
from visionpipe.models.registry import (
    create_model,
    get_family,
    known_families,
    parse_architecture,
)
from visionpipe.models.saving import load_model


def _layers(model, cls) -> list:
    return [layer for layer in model.layers if isinstance(layer, cls)]


def _images(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, height, width, 3)).astype(np.float32)


def test_unet_is_a_registered_segmentation_family():
    assert "unet" in known_families()
    assert get_family("unet").task == "segmentation"


@pytest.mark.parametrize("num_classes", [2, 5])
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_output_is_a_per_pixel_softmax_of_the_input_size(depth, num_classes):
    model = create_model("unet", (32, 32, 3), num_classes, {"depth": depth, "base_filters": 4})
    assert model.name == "unet"
    probs = model.predict(_images(2, 32, 32), verbose=0)
    assert probs.shape == (2, 32, 32, num_classes)
    assert probs.dtype == np.float32
    assert (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-5)
    # depth poolings: the bottleneck is 32 / 2**depth px with 4 * 2**depth channels.
    side = 32 // 2 ** depth
    assert model.get_layer("bottleneck_conv2").output.shape[1:] == (side, side, 4 * 2 ** depth)
    assert len(_layers(model, keras.layers.MaxPooling2D)) == depth


def test_layers_are_named_and_filters_double_per_level():
    model = create_model("unet", (32, 32, 3), 3, {"depth": 2, "base_filters": 8})
    for level, (filters, side) in enumerate([(8, 32), (16, 16)], start=1):
        for block in ("enc", "dec"):
            for c in (1, 2):
                conv = model.get_layer(f"{block}{level}_conv{c}")
                assert conv.kernel_size == (3, 3) and conv.padding == "same"
                assert conv.output.shape[1:] == (side, side, filters)
        assert model.get_layer(f"down{level}").output.shape[1:] == (side // 2, side // 2, filters)
        assert model.get_layer(f"up{level}").output.shape[1:] == (side, side, filters)
        # Skip connection: the encoder's features joined with the upsampled ones.
        concat = model.get_layer(f"dec{level}_concat")
        assert concat.output.shape[1:] == (side, side, 2 * filters)
        assert {t.name for t in concat.input} >= {model.get_layer(f"enc{level}_conv2_relu")
                                                  .output.name}
    assert model.get_layer("bottleneck_conv1").filters == 32
    head = model.get_layer("head_softmax")
    assert head.kernel_size == (1, 1) and head.filters == 3 and head.dtype_policy.name == "float32"


def test_transpose_and_bilinear_upsampling_use_different_layers():
    transpose = create_model("unet", (32, 32, 3), 2, {"depth": 3, "upsampling": "transpose"})
    ups = _layers(transpose, keras.layers.Conv2DTranspose)
    assert [u.name for u in ups] == ["up3", "up2", "up1"]
    assert all(u.kernel_size == (2, 2) and u.strides == (2, 2) for u in ups)
    assert not _layers(transpose, keras.layers.UpSampling2D)

    bilinear = create_model("unet", (32, 32, 3), 2, {"depth": 3, "upsampling": "bilinear"})
    ups = _layers(bilinear, keras.layers.UpSampling2D)
    assert [u.name for u in ups] == ["up3", "up2", "up1"]
    assert all(u.interpolation == "bilinear" for u in ups)
    assert not _layers(bilinear, keras.layers.Conv2DTranspose)
    assert [bilinear.get_layer(f"up{i}_conv").kernel_size for i in (3, 2, 1)] == [(3, 3)] * 3


def test_batch_norm_can_be_turned_off():
    with_bn = create_model("unet", (16, 16, 3), 2, {"depth": 2, "base_filters": 4})
    # two per block: 2 encoder levels, the bottleneck, 2 decoder levels.
    assert len(_layers(with_bn, keras.layers.BatchNormalization)) == 2 * 5
    without = create_model("unet", (16, 16, 3), 2, {"depth": 2, "base_filters": 4,
                                                    "batch_norm": False})
    assert not _layers(without, keras.layers.BatchNormalization)
    assert all(conv.use_bias for conv in _layers(without, keras.layers.Conv2D))


def test_dropout_sits_at_the_deepest_encoder_level_and_the_bottleneck():
    none = create_model("unet", (16, 16, 3), 2, {"depth": 3, "base_filters": 4})
    assert not _layers(none, keras.layers.Dropout)
    model = create_model("unet", (16, 16, 3), 2, {"depth": 3, "base_filters": 4, "dropout": 0.3})
    drops = _layers(model, keras.layers.Dropout)
    assert [(d.name, d.rate) for d in drops] == [("enc3_dropout", 0.3), ("bottleneck_dropout", 0.3)]


def test_parameter_count_grows_about_4x_when_filters_double():
    small = create_model("unet", (32, 32, 3), 3, {"depth": 4, "base_filters": 8})
    large = create_model("unet", (32, 32, 3), 3, {"depth": 4, "base_filters": 16})
    ratio = large.count_params() / small.count_params()
    assert 3.5 <= ratio <= 4.5, ratio


def test_input_size_not_a_multiple_names_size_depth_and_valid_sizes():
    with pytest.raises(ModelError) as err:
        create_model("unet", (100, 96, 3), 2, {"depth": 4})
    message = str(err.value)
    assert "\n" not in message
    assert message == ("unet: input size 100x96 is not a multiple of 2**depth = 16 (depth 4); "
                       "use e.g. 96x96 or 112x96 (prepare.segmentation.image_size / "
                       "crop_size), or lower architecture.depth")


@pytest.mark.parametrize(("shape", "depth", "sizes"), [
    ((33, 32, 3), 1, "32x32 or 34x32"),
    ((8, 8, 3), 4, "16x16"),  # nothing smaller than 16x16 is valid
    ((None, 100, 3), 3, "anyx96 or anyx104"),  # a None side is not checked
])
def test_input_size_suggestions(shape, depth, sizes):
    with pytest.raises(ModelError, match=f"use e.g. {re.escape(sizes)} "):
        create_model("unet", shape, 2, {"depth": depth})


@pytest.mark.parametrize(("arch", "message"), [
    ({"depth": 7}, r"params.yaml: models.unet.architecture.depth = 7: expected a value <= 6"),
    ({"depth": 0}, r"models.unet.architecture.depth = 0: expected a value >= 1"),
    ({"base_filters": 0}, r"models.unet.architecture.base_filters = 0: expected a value >= 1"),
    ({"dropout": 1.0}, r"models.unet.architecture.dropout = 1.0: expected a value < 1"),
    ({"upsampling": "nearest"}, (r"models.unet.architecture.upsampling = 'nearest': expected "
                                 r"one of 'transpose', 'bilinear'")),
])
def test_bad_params_name_the_key(arch, message):
    with pytest.raises(ParamsError, match=message):
        create_model("unet", (64, 64, 3), 3, arch)


def test_model_without_a_fixed_size_takes_any_multiple():
    model = create_model("unet", (None, None, 3), 3, {"depth": 3, "base_filters": 4})
    probs = model.predict(_images(1, 48, 80), verbose=0)
    assert probs.shape == (1, 48, 80, 3)
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-5)


def test_tiny_unet_learns_a_brightness_threshold():
    keras.utils.set_random_seed(0)
    gray = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 1))
    x = np.repeat(gray, 3, axis=-1).astype(np.float32)
    mask = (gray[..., 0] > 128).astype(np.int64)
    y = keras.utils.to_categorical(mask, 2)
    model = create_model("unet", (32, 32, 3), 2, {"depth": 2, "base_filters": 8})
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="categorical_crossentropy")
    # 40 steps of 8 images, in 5 epochs rather than 40 (fewer epoch overheads).
    model.fit(np.tile(x, (8, 1, 1, 1)), np.tile(y, (8, 1, 1, 1)), epochs=5, batch_size=8,
              verbose=0)
    accuracy = (model.predict(x, verbose=0).argmax(axis=-1) == mask).mean()
    assert accuracy >= 0.95, accuracy


@pytest.mark.parametrize("upsampling", ["transpose", "bilinear"])
def test_save_and_safe_load_predict_identically(upsampling, tmp_path):
    keras.utils.set_random_seed(0)
    model = create_model("unet", (16, 16, 3), 3, {"depth": 2, "base_filters": 4, "dropout": 0.2,
                                                  "upsampling": upsampling})
    x = _images(4, 16, 16)
    y = keras.utils.to_categorical(np.random.default_rng(1).integers(0, 3, (4, 16, 16)), 3)
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)  # moves BN statistics off their init
    # Called eagerly, not through predict(): the same numbers without tracing a function.
    probs = np.asarray(model(x, training=False))
    path = tmp_path / "unet.keras"
    model.save(path)
    loaded = load_model(path)
    assert loaded.name == "unet"
    np.testing.assert_array_equal(np.asarray(loaded(x, training=False)), probs)


def _paper_layout(depth: int, base: int, classes: int) -> tuple[list[str], int]:
    """Layer names and parameter count of the encoder-less U-Net with batch norm and transposed
    convolutions, from the paper's layout: 3x3 convs without bias + BN (4 numbers per channel),
    2x2 transposed convs with bias, a 1x1 softmax conv."""
    names, params, channels = ["image", "rescale"], 0, 3

    def double(name, cin, cout):
        count = 0
        for c, width_in in enumerate((cin, cout), start=1):
            names.extend([f"{name}_conv{c}", f"{name}_conv{c}_bn", f"{name}_conv{c}_relu"])
            count += 9 * width_in * cout + 4 * cout
        return count

    for level in range(1, depth + 1):
        filters = base * 2 ** (level - 1)
        params += double(f"enc{level}", channels, filters)
        names.append(f"down{level}")
        channels = filters
    params += double("bottleneck", channels, base * 2 ** depth)
    channels = base * 2 ** depth
    for level in range(depth, 0, -1):
        filters = base * 2 ** (level - 1)
        names.extend([f"up{level}", f"dec{level}_concat"])
        params += 4 * channels * filters + filters + double(f"dec{level}", 2 * filters, filters)
        channels = filters
    names.append("head_softmax")
    return names, params + channels * classes + classes


@pytest.mark.parametrize(("depth", "base"), [(2, 4), (4, 8)])  # (4, 8): params.yaml's U-Net
def test_without_an_encoder_the_unet_is_the_papers_layout(depth, base):
    names, params = _paper_layout(depth, base, 3)
    model = create_model("unet", (64, 64, 3), 3, {"depth": depth, "base_filters": base})
    assert [layer.name for layer in model.layers] == names
    assert model.count_params() == params
    # The new keys at their defaults build the same model, weight for weight.
    keras.utils.set_random_seed(0)
    plain = create_model("unet", (64, 64, 3), 3, {"depth": depth, "base_filters": base})
    keras.utils.set_random_seed(0)
    explicit = create_model("unet", (64, 64, 3), 3, {"depth": depth, "base_filters": base,
                                                     "encoder": "none", "weights": None,
                                                     "alpha": 1.0})
    assert explicit.get_config() == plain.get_config()
    for a, b in zip(plain.get_weights(), explicit.get_weights(), strict=True):
        assert np.array_equal(a, b)


KEY = "models.unet.architecture"
MOBILENET = {"encoder": "mobilenet_v2", "alpha": 0.35, "depth": 5, "base_filters": 4}
# The layers at strides 2, 4, 8, 16 that unet.SKIPS names, and the backbone's output channels.
ENCODERS = {"mobilenet_v2": (MOBILENET, 1280), "resnet50": ({"encoder": "resnet50"}, 2048),
            "efficientnet_b0": ({"encoder": "efficientnet_b0"}, 1280),
            "vgg16": ({"encoder": "vgg16"}, 512)}


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_each_encoder_builds_a_per_pixel_softmax_of_the_input_size(name):
    arch, bottom = ENCODERS[name]
    model = create_model("unet", (64, 64, 3), 3, {"depth": 5, "base_filters": 4, **arch})
    assert model.name == "unet"
    probs = np.asarray(model(_images(2, 64, 64), training=False))
    assert probs.shape == (2, 64, 64, 3) and probs.dtype == np.float32
    assert (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-5)
    backbone = model.get_layer("backbone")
    assert [tuple(o.shape[1:3]) for o in backbone.outputs] == [(32, 32), (16, 16), (8, 8),
                                                              (4, 4), (2, 2)]
    assert backbone.outputs[-1].shape[-1] == bottom
    assert len(finetune.blocks(backbone)) > 2  # the stem and several blocks to unfreeze
    assert finetune.block_count(model) == len(finetune.blocks(backbone)) - 1
    # Five decoder levels back to the input size; the skips join levels 5..2.
    assert [model.get_layer(f"up{i}").output.shape[1] for i in (5, 4, 3, 2, 1)] == [
        4, 8, 16, 32, 64]
    assert model.get_layer("dec1_conv2").output.shape[1:] == (64, 64, 4)
    assert model.get_layer("dec5_conv2").output.shape[1:] == (4, 4, 4 * 16)


def _build(root, size=32, **arch):
    with pretrained.context(KEY, root):
        return create_model("unet", (size, size, 3), 3, {**MOBILENET, **arch})


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project root whose weights/ holds an applications classifier (MobileNetV2 0.35, its
    weights nudged off a fresh build's) and one of another width (0.5)."""
    root = tmp_path_factory.mktemp("unet_weights")
    (root / "weights").mkdir()
    classifier = create_model("applications", (64, 64, 3), 3,
                              {"backbone": "mobilenet_v2", "alpha": 0.35})
    rng = np.random.default_rng(0)
    classifier.set_weights([w + rng.normal(0, 0.01, w.shape).astype(w.dtype)
                            for w in classifier.get_weights()])
    classifier.save(root / "weights" / "classifier.keras")
    create_model("applications", (32, 32, 3), 3, {"backbone": "mobilenet_v2", "alpha": 0.5}
                 ).save(root / "weights" / "wider.keras")
    return root, classifier


def _assert_same_backbone(model, source) -> None:
    mine, theirs = model.get_layer("backbone"), source.get_layer("backbone")
    assert len(mine.weights) == len(theirs.weights) > 100
    for a, b in zip(mine.weights, theirs.weights, strict=True):
        assert a.path == b.path
        assert np.array_equal(np.asarray(a), np.asarray(b)), a.path


def _moved_by_a_training_call(model, x) -> set[str]:
    """Batch-norm moving means that one training-mode call changes."""
    before = {v.path: np.asarray(v).copy() for v in model.weights if "moving_mean" in v.path}
    model(x, training=True)
    return {v.path for v in model.weights
            if v.path in before and not np.array_equal(before[v.path], np.asarray(v))}


DECODER_BN = {f"dec{i}_conv{c}_bn/moving_mean" for i in range(1, 6) for c in (1, 2)}


def test_an_applications_classifier_backbone_loads_exactly_and_saves(project, tmp_path):
    root, classifier = project
    model = _build(root, weights="weights/classifier.keras")
    _assert_same_backbone(model, classifier)
    x = _images(2, 32, 32)
    # Unfrozen with pretrained weights, as train sets it: the backbone's batch norm keeps the
    # statistics it came with, even in a training step; the decoder's move.
    finetune.apply(model, finetune.Phase(0, 0, 1, "all", 1e-3), "t", keep_statistics=True)
    assert _moved_by_a_training_call(model, x) == DECODER_BN
    _assert_same_backbone(model, classifier)
    model.save(tmp_path / "unet.keras")
    loaded = load_model(tmp_path / "unet.keras")
    assert loaded.name == "unet"
    np.testing.assert_array_equal(np.asarray(loaded(x, training=False)),
                                  np.asarray(model(x, training=False)))
    # A U-Net of the same encoder is a source too.
    (tmp_path / "unet.keras").rename(root / "weights" / "unet.keras")
    _assert_same_backbone(_build(root, weights="weights/unet.keras"), classifier)
    # Without keep_statistics (random weights) the backbone's batch norm learns as usual.
    finetune.apply(loaded, finetune.Phase(0, 0, 1, "all", 1e-3), "t")
    assert _moved_by_a_training_call(loaded, x) > DECODER_BN


def test_weight_files_of_another_architecture_or_missing_name_the_key(project):
    root, _ = project
    text = params_error(f"{KEY}.weights = 'weights/wider.keras'", _build, root,
                        weights="weights/wider.keras")
    assert "another architecture" in text
    params_error(f"{KEY}.weights = 'weights/missing.keras': no such file", _build, root,
                 weights="weights/missing.keras")
    # The classifier is MobileNetV2: not a VGG16 encoder.
    text = params_error(f"{KEY}.weights = 'weights/classifier.keras'", _build, root,
                        weights="weights/classifier.keras", encoder="vgg16", alpha=1.0)
    assert "another architecture" in text


@pytest.mark.parametrize(("arch", "message"), [
    ({"weights": "imagenet"}, f"{KEY}.weights = 'imagenet': the U-Net without an encoder"),
    ({"weights": "weights/a.keras"}, f"{KEY}.weights = 'weights/a.keras': the U-Net without"),
    ({"encoder": "vgg16"}, f"{KEY}.depth = 4: an encoder has 5 levels"),
    ({"encoder": "vgg16", "depth": 5, "alpha": 0.5}, f"{KEY}.alpha = 0.5: only the mobilenet_v2"),
    ({"alpha": 0.5}, f"{KEY}.alpha = 0.5: only the mobilenet_v2"),
    ({**MOBILENET, "weights": "imagenet21k"}, f"{KEY}.weights = 'imagenet21k': expected null"),
    ({"encoder": "mobilenet_v3"}, f"{KEY}.encoder = 'mobilenet_v3': expected one of 'none'"),
])
def test_bad_encoder_params_fail_at_parse_time_naming_the_key(arch, message):
    params_error(message, parse_architecture, "unet", arch, KEY)


def test_an_encoder_needs_input_sides_multiple_of_32():
    with pytest.raises(ModelError) as err:
        create_model("unet", (100, 96, 3), 2, {"encoder": "vgg16", "depth": 5})
    assert str(err.value) == ("unet: input size 100x96 is not a multiple of 32 (the stride of "
                              "encoder vgg16); use e.g. 96x96 or 128x96 "
                              "(prepare.segmentation.image_size / crop_size)")
