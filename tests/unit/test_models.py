"""Every registered family builds from its tiny preset, trains a step, saves, loads safely and
predicts the same; then the layouts and parameter counts of particular families."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from visionpipe.config import TrainConfig
from visionpipe.cost import flops_per_image
from visionpipe.data.sources.shapes import CLASS_NAMES, generate_example
from visionpipe.errors import ModelError, ParamsError
from visionpipe.models.registry import (
    Family,
    create_model,
    get_family,
    known_families,
    parse_architecture,
)
from visionpipe.models.saving import load_model
from visionpipe.tasks.registry import task_for

# Shapes images hold every target any task reads (label, mask, boxes); masks count the
# background as class 0.
NUM_CLASSES = len(CLASS_NAMES) + 1
BATCH = 2


def _batch(family: Family, task) -> tuple[np.ndarray, object]:
    """Two shapes images at the family's tiny input size, mapped to (inputs, targets) by the
    family's task as the input pipeline maps records, then batched (padded where the task
    says how)."""
    examples = [generate_example(0, "train", i, family.tiny_input) for i in range(BATCH)]
    records = [{"image": ex.image, "label": ex.label, "mask": ex.mask, "boxes": ex.boxes,
                "box_labels": ex.box_labels} for ex in examples]
    ds = tf.data.Dataset.from_generator(
        lambda: iter(records),
        output_signature={"image": tf.TensorSpec((*family.tiny_input, 3), tf.uint8),
                          "label": tf.TensorSpec((), tf.int64),
                          "mask": tf.TensorSpec(family.tiny_input, tf.uint8),
                          "boxes": tf.TensorSpec((None, 4), tf.float32),
                          "box_labels": tf.TensorSpec((None,), tf.int32)})
    ds = ds.map(task.to_model_io(NUM_CLASSES))
    padding = task.padding_values()
    ds = ds.batch(BATCH) if padding is None else ds.padded_batch(BATCH, padding_values=padding)
    x, y = next(iter(ds))
    return x.numpy(), keras.tree.map_structure(lambda t: t.numpy(), y)


def _outputs(model: keras.Model, x: np.ndarray) -> list[np.ndarray]:
    """The model's raw outputs, called eagerly (no traced function), flattened."""
    return [np.asarray(t) for t in keras.tree.flatten(model(x, training=False))]


@pytest.mark.parametrize("family", known_families())
def test_tiny_preset_parses(family):
    fam = get_family(family)
    params = parse_architecture(family, fam.tiny, f"models.{family}.architecture")
    assert isinstance(params, fam.params)
    # Every key of the preset reached the dataclass (none dropped or defaulted).
    for key, value in fam.tiny.items():
        got = getattr(params, key)
        assert (list(got) if isinstance(got, tuple) else got) == value, key
    assert len(fam.tiny_input) == 2 and all(side >= 16 for side in fam.tiny_input)


@pytest.mark.parametrize("family", known_families())
def test_family_trains_saves_loads_and_predicts_identically(family, tmp_path):
    """Every registered family, from its tiny preset: compiled as the train stage compiles it
    (its task's loss and metrics), one training step moves its weights, and the .keras file
    loaded with safe_mode=True gives the same outputs bit for bit."""
    keras.utils.set_random_seed(0)
    fam = get_family(family)
    architecture = parse_architecture(family, fam.tiny, f"models.{family}.architecture")
    model = create_model(family, (*fam.tiny_input, 3), NUM_CLASSES, architecture)
    task = task_for(family, fam.task)  # the task with the hooks the family hands over
    task.compile(model, keras.optimizers.Adam(1e-3),
                 TrainConfig(batch_size=BATCH, jit_compile=False), architecture, NUM_CLASSES)
    # One step: tracing the train step would cost more than the step (YOLO's loss: 70 s
    # traced against 7 s eager); the traced path is what the pipeline tests run.
    model.run_eagerly = True
    x, y = _batch(fam, task)
    before = [w.copy() for w in model.get_weights()]
    history = model.fit(x, y, epochs=1, batch_size=BATCH, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights(),
                                                         strict=True))
    outputs = _outputs(model, x)
    assert outputs and all(o.shape[0] == BATCH and np.isfinite(o).all() for o in outputs)
    path = tmp_path / f"{family}.keras"
    model.save(path)
    loaded = load_model(path)
    after = _outputs(loaded, x)
    assert len(after) == len(outputs)
    for a, b in zip(after, outputs, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("family", [f for f in known_families()
                                    if get_family(f).task == "classification"])
def test_classifier_outputs_class_probabilities(family):
    fam = get_family(family)
    model = create_model(family, (*fam.tiny_input, 3), 4, fam.tiny)
    x = np.random.default_rng(0).uniform(0, 255, (3, *fam.tiny_input, 3)).astype(np.float32)
    probs = model.predict(x, verbose=0)
    assert probs.shape == (3, 4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_mlp_layout_follows_params():
    model = create_model("mlp", (16, 16, 3), 5, {"hidden_units": [32, 7], "batch_norm": False,
                                                 "dropout": 0.0})
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert [d.units for d in dense] == [32, 7, 5]
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
    # 16*16*3*32 + 32 + 32*7 + 7 + 7*5 + 5
    assert model.count_params() == 16 * 16 * 3 * 32 + 32 + 32 * 7 + 7 + 7 * 5 + 5


def test_flops_match_dense_arithmetic():
    model = create_model("mlp", (8, 8, 3), 4, {"hidden_units": [10], "batch_norm": False,
                                               "dropout": 0.0})
    flops = flops_per_image(model, (8, 8, 3))
    matmuls = 2 * (192 * 10 + 10 * 4)
    # Profiler counts matmuls (2 per MAC) plus bias adds, rescaling and softmax, all small.
    assert matmuls <= flops <= matmuls + 192 * 2 + 10 + 4 * 10


def test_unknown_family_lists_known():
    known = ", ".join(known_families())
    with pytest.raises(ModelError, match=f"^unknown model family 'nope'; known families: {known}$"):
        get_family("nope")


def test_bad_architecture_names_key():
    with pytest.raises(ParamsError, match=r"models.mlp.architecture.depth: unknown key"):
        create_model("mlp", (8, 8, 3), 2, {"depth": 3})


def test_unsafe_model_file_is_refused(tmp_path):
    inputs = keras.Input((4,))
    outputs = keras.layers.Lambda(lambda t: t * 2)(inputs)
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, outputs).save(path)
    with pytest.raises(ModelError, match="cannot be loaded safely"):
        load_model(path)


# --------------------------------------------------------------------------- vgg and resnet


def _convs(model, *, shortcuts: bool = False) -> list:
    return [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)
            and layer.name.endswith("_shortcut") == shortcuts]


def _trainable(model) -> int:
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


@pytest.mark.parametrize(("layout", "widths"), [
    ("vgg11", [16, 32, 64, 64, 128, 128, 128, 128]),
    ("vgg13", [16, 16, 32, 32, 64, 64, 128, 128, 128, 128]),
    ("vgg16", [16, 16, 32, 32, 64, 64, 64, 128, 128, 128, 128, 128, 128]),
])
def test_vgg_layout_counts_and_widths(layout, widths):
    model = create_model("vgg", (32, 32, 3), 4, {"layout": layout, "width_multiplier": 0.25})
    convs = _convs(model)
    assert [c.filters for c in convs] == widths
    assert all(c.kernel_size == (3, 3) and c.padding == "same" for c in convs)
    assert [layer.name for layer in model.layers if isinstance(layer, keras.layers.MaxPooling2D)
            ] == [f"block{b}_pool" for b in range(1, 6)]
    assert [d.units for d in model.layers if isinstance(d, keras.layers.Dense)] == [256, 4]


def test_vgg16_matches_the_paper_parameter_count():
    # Keras' VGG16(include_top=False) has 14,714,688 parameters; plus a 512 -> 1000 softmax.
    model = create_model("vgg", (32, 32, 3), 1000, {"layout": "vgg16", "width_multiplier": 1.0,
                                                   "batch_norm": False, "head_units": []})
    assert model.count_params() == 14_714_688 + 512 * 1000 + 1000


def test_vgg_small_input_pools_only_while_at_least_2px():
    model = create_model("vgg", (12, 12, 3), 3, {"pooling": "flatten", "head_units": [],
                                                 "width_multiplier": 0.125})
    pools = [layer for layer in model.layers if isinstance(layer, keras.layers.MaxPooling2D)]
    # 12 -> 6 -> 3 -> 1; blocks 4 and 5 still convolve, at 1x1.
    assert [p.name for p in pools] == ["block1_pool", "block2_pool", "block3_pool"]
    assert len(_convs(model)) == 8
    assert model.get_layer("flatten").output.shape[-1] == 64


def test_resnet20_cifar_has_20_weighted_layers_and_2_projections():
    model = create_model("resnet", (32, 32, 3), 10, {"variant": "cifar", "depth": 20})
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert len(_convs(model)) + len(dense) == 20
    assert [c.filters for c in _convs(model)] == [16] * 7 + [32] * 6 + [64] * 6
    projections = _convs(model, shortcuts=True)
    assert [(c.name, c.filters, c.strides) for c in projections] == [
        ("stage2_block1_shortcut", 32, (2, 2)), ("stage3_block1_shortcut", 64, (2, 2))]
    assert model.get_layer("global_pool").input.shape[1:] == (8, 8, 64)


def test_resnet50_uses_bottlenecks_with_4_projections():
    model = create_model("resnet", (64, 64, 3), 10, {"variant": "imagenet", "depth": 50,
                                                     "width_multiplier": 0.25,
                                                     "small_input_stem": True})
    assert len(_convs(model, shortcuts=True)) == 4
    assert len(_convs(model)) == 1 + 3 * (3 + 4 + 6 + 3)
    for s, (blocks, width) in enumerate([(3, 16), (4, 32), (6, 64), (3, 128)], start=1):
        for b in range(1, blocks + 1):
            convs = [model.get_layer(f"stage{s}_block{b}_conv{i}") for i in (1, 2, 3)]
            assert [c.kernel_size for c in convs] == [(1, 1), (3, 3), (1, 1)]
            assert [c.filters for c in convs] == [width, width, 4 * width]
            assert model.get_layer(f"stage{s}_block{b}_add").output.shape[-1] == 4 * width
    assert model.get_layer("global_pool").input.shape[1:] == (8, 8, 512)


def _resnet18_trainable(widths: list[int], num_classes: int) -> int:
    """Torchvision's ResNet-18 count: bias-free convs, BN gamma+beta, fc with bias."""
    total = 7 * 7 * 3 * widths[0] + 2 * widths[0]
    cin = widths[0]
    for s, cout in enumerate(widths):
        for b in range(2):
            stride = 2 if s > 0 and b == 0 else 1
            total += 3 * 3 * cin * cout + 2 * cout + 3 * 3 * cout * cout + 2 * cout
            if stride != 1 or cin != cout:
                total += cin * cout + 2 * cout
            cin = cout
    return total + cin * num_classes + num_classes


def test_resnet18_parameter_count_matches_formula():
    model = create_model("resnet", (64, 64, 3), 10, {"variant": "imagenet", "depth": 18,
                                                     "width_multiplier": 0.25})
    # stem 2,384 + stages 9,344 + 33,088 + 131,712 + 525,568 + fc 1,290
    assert _resnet18_trainable([16, 32, 64, 128], 10) == 703_386
    assert _trainable(model) == 703_386
    # BN moving mean and variance: 2 per channel of every BN layer.
    bn_channels = sum(layer.gamma.shape[0] for layer in model.layers
                      if isinstance(layer, keras.layers.BatchNormalization))
    assert model.count_params() == 703_386 + 2 * bn_channels


@pytest.mark.parametrize(("depth", "expected"), [(18, 11_689_512), (50, 25_557_032)])
def test_resnet_full_width_matches_torchvision(depth, expected):
    model = create_model("resnet", (32, 32, 3), 1000, {"variant": "imagenet", "depth": depth})
    assert _trainable(model) == expected  # torchvision resnet18 / resnet50 parameters


@pytest.mark.parametrize(("arch", "message"), [
    ({"depth": 21}, (r"models.resnet.architecture.depth = 21: expected 6n\+2 >= 8 "
                     r"\(e.g. 20, 32, 44, 56, 110\) for variant 'cifar'")),
    ({"variant": "imagenet", "depth": 20},
     r"models.resnet.architecture.depth = 20: expected one of 18, 34, 50 for variant 'imagenet'"),
    ({"depth": 2}, r"models.resnet.architecture.depth = 2: expected a value >= 8"),
    ({"variant": "v2"}, (r"models.resnet.architecture.variant = 'v2': expected one of "
                         r"'cifar', 'imagenet'")),
])
def test_resnet_bad_params_name_the_key(arch, message):
    with pytest.raises(ParamsError, match=message):
        create_model("resnet", (32, 32, 3), 2, arch)


def test_resnet_depth_checked_when_given_a_dataclass():
    from visionpipe.models.resnet import ResNetParams
    with pytest.raises(ParamsError, match=r"architecture.depth = 22: expected 6n\+2"):
        create_model("resnet", (32, 32, 3), 2, ResNetParams(depth=22))


@pytest.mark.parametrize(("arch", "message"), [
    ({"layout": "vgg19"}, (r"models.vgg.architecture.layout = 'vgg19': expected one of "
                           r"'vgg11', 'vgg13', 'vgg16'")),
    ({"pooling": "max"}, r"models.vgg.architecture.pooling = 'max': expected one of"),
    ({"width_multiplier": 0}, (r"models.vgg.architecture.width_multiplier = 0.0: expected a "
                               r"value > 0")),
    ({"head_units": [0]}, r"models.vgg.architecture.head_units = \[0\]: expected every value"),
])
def test_vgg_bad_params_name_the_key(arch, message):
    with pytest.raises(ParamsError, match=message):
        create_model("vgg", (32, 32, 3), 2, arch)
