"""The sixth family (keras.applications backbones), starting weights from local files, and the
fine-tuning plan: blocks, what trains in each phase, and every bad value as one line naming
its key. Weight files are made here (no download: this machine has no network)."""

from __future__ import annotations

import shutil

import keras
import numpy as np
import pytest

from tests.helpers import params_error
from visionpipe import finetune
from visionpipe.config import TrainConfig
from visionpipe.models import pretrained
from visionpipe.models.applications import CaffePreprocess, build_backbone
from visionpipe.models.registry import create_model, parse_architecture
from visionpipe.models.saving import load_model

KEY = "models.net.architecture"
TINY = {"backbone": "mobilenet_v2", "alpha": 0.35}


def _build(root, size=32, **arch):
    with pretrained.context(KEY, root):
        return create_model("applications", (size, size, 3), 3, {**TINY, **arch})


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project root with weights/: a trained-looking source model (random, then its weights
    nudged so they differ from a fresh build) saved as .keras and as .weights.h5."""
    root = tmp_path_factory.mktemp("pretrained")
    (root / "weights").mkdir()
    source = _build(root)
    rng = np.random.default_rng(0)
    source.set_weights([w + rng.normal(0, 0.01, w.shape).astype(w.dtype)
                        for w in source.get_weights()])
    source.save(root / "weights" / "source.keras")
    source.get_layer("backbone").save_weights(root / "weights" / "source.weights.h5")
    # The legacy HDF5 layout of the *_notop.h5 files keras.applications downloads (Keras'
    # own writer of that layout; Keras 3's save_weights only writes .weights.h5).
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(root / "weights" / "source_notop.h5", "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, source.get_layer("backbone"))
    return root, source


def test_a_local_model_file_loads_its_backbone_exactly(project):
    root, source = project
    for name in ("weights/source.keras", "weights/source.weights.h5", "weights/source_notop.h5"):
        model = _build(root, weights=name)
        mine, theirs = model.get_layer("backbone"), source.get_layer("backbone")
        assert len(mine.weights) == len(theirs.weights) > 100
        for a, b in zip(mine.weights, theirs.weights, strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b)), (name, a.path)
        # The head is new (random): only the backbone is copied.
        assert not np.array_equal(np.asarray(model.get_layer("head_softmax").kernel),
                                  np.asarray(source.get_layer("head_softmax").kernel))


def test_a_file_of_another_architecture_or_place_is_one_line_naming_the_key(project, tmp_path):
    root, _ = project
    text = params_error(f"{KEY}.weights = 'weights/source.keras'", _build, root,
                        weights="weights/source.keras", alpha=0.5)
    assert "another architecture" in text and "has shape" in text
    params_error("another architecture", _build, root, weights="weights/source.weights.h5",
                 alpha=0.5)
    params_error("no such file", _build, root, weights="weights/missing.keras")
    outside = tmp_path / "elsewhere.keras"
    shutil.copy(root / "weights" / "source.keras", outside)
    text = params_error("must lie in weights/", _build, root, weights=str(outside))
    assert "cp " in text
    (root / "weights" / "notes.txt").write_text("not weights")
    params_error("expected a file ending in .keras", _build, root, weights="weights/notes.txt")
    # A model without a nested backbone: nothing to start from.
    create_model("mlp", (32, 32, 3), 3, {"hidden_units": [8]}).save(root / "weights" / "m.keras")
    params_error("has no nested 'backbone'", _build, root, weights="weights/m.keras")
    # A damaged weights file.
    (root / "weights" / "broken.weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    params_error("cannot be loaded into backbone", _build, root,
                 weights="weights/broken.weights.h5")


def test_bad_architecture_values_fail_at_parse_time_naming_the_key():
    params_error(f"{KEY}.weights = 'imagenet21k'", parse_architecture, "applications",
                 {**TINY, "weights": "imagenet21k"}, KEY)
    params_error(f"{KEY}.alpha = 0.5: only the MobileNets", parse_architecture, "applications",
                 {"backbone": "resnet50", "alpha": 0.5}, KEY)
    params_error(f"{KEY}.backbone", parse_architecture, "applications",
                 {"backbone": "resnet51"}, KEY)


def test_record_gives_the_file_and_its_sha256(project):
    import hashlib

    root, _ = project
    arch = parse_architecture("applications", {**TINY, "weights": "weights/source.keras"}, KEY)
    digest = hashlib.sha256((root / "weights" / "source.keras").read_bytes()).hexdigest()
    assert pretrained.record(arch, root) == {"weights": "weights/source.keras",
                                             "sha256": digest}
    assert pretrained.record(parse_architecture("applications", TINY, KEY), root) is None


def test_caffe_preprocessing_matches_keras_applications_and_reloads(tmp_path):
    x = np.random.default_rng(1).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    expected = keras.applications.imagenet_utils.preprocess_input(x.copy(), mode="caffe")
    layer = CaffePreprocess()
    np.testing.assert_allclose(np.asarray(layer(x)), expected, atol=1e-4)
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, CaffePreprocess()(inputs))
    model.save(tmp_path / "caffe.keras")
    np.testing.assert_allclose(np.asarray(load_model(tmp_path / "caffe.keras")(x)), expected,
                               atol=1e-4)


# Blocks per backbone from the papers' tables: MobileNetV2 1 + 16 bottlenecks; ResNet50 3+4+6+3;
# VGG16 5 conv stacks; EfficientNet-B0 1+2+2+3+3+4+1; MobileNetV3-Small 11 bneck blocks.
BLOCKS = {"mobilenet_v2": 17, "resnet50": 16, "vgg16": 5, "efficientnet_b0": 16,
          "mobilenet_v3_small": 11}


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_blocks_follow_the_papers_layouts(name):
    arch = parse_architecture("applications", {"backbone": name}, KEY)
    backbone = build_backbone(arch, (32, 32, 3))
    groups = finetune.blocks(backbone)
    assert len(groups) - 1 == BLOCKS[name], [g[0].name for g in groups]
    assert sum(len(g) for g in groups) == len(backbone.layers)


def test_unfreezing_the_top_blocks_trains_only_those_layers(project):
    root, _ = project
    model = _build(root)
    plan = finetune.phases(TrainConfig(epochs=4, freeze_epochs=1, unfreeze=2), True, "t")
    assert [(p.start, p.end, p.unfreeze, p.learning_rate) for p in plan] == [
        (0, 1, "frozen", 1e-3), (1, 4, 2, pytest.approx(1e-4))]
    backbone = model.get_layer("backbone")
    finetune.apply(model, plan[0], "t")
    assert [w.path for w in model.trainable_weights] == [
        "head_softmax/kernel", "head_softmax/bias"]
    finetune.apply(model, plan[1], "t")
    trained = {layer.name for layer in backbone.layers if layer.trainable and layer.weights}
    assert trained == {layer.name for layer in backbone.layers if layer.weights and (
        layer.name.startswith(("block_15_", "block_16_", "Conv_1")))}
    assert finetune.trainable_params(model) < model.count_params()
    finetune.apply(model, finetune.Phase(1, 1, 4, "all", 1e-4), "t")
    assert all(layer.trainable for layer in backbone.layers)
    params_error("t.unfreeze = 18: the backbone has 17 blocks", finetune.apply, model,
                 finetune.Phase(1, 1, 4, 18, 1e-4), "t")


def test_fine_tuning_values_are_checked_with_their_key():
    params_error("k.freeze_epochs = 2: this model has no pretrained backbone", finetune.phases,
                 TrainConfig(freeze_epochs=2), False, "k")
    params_error("k.unfreeze = 3", finetune.phases, TrainConfig(unfreeze=3), False, "k")
    params_error("k.freeze_epochs = 5: expected at most epochs (4)", finetune.phases,
                 TrainConfig(epochs=4, freeze_epochs=5), True, "k")
    params_error("k.fine_tune_learning_rate = 0.01: applies after frozen epochs", finetune.phases,
                 TrainConfig(fine_tune_learning_rate=0.01), True, "k")
    plan = finetune.phases(TrainConfig(epochs=3, freeze_epochs=3), True, "k")
    assert [(p.start, p.end, p.unfreeze) for p in plan] == [(0, 3, "frozen")]
    plan = finetune.phases(TrainConfig(epochs=3, freeze_epochs=1, unfreeze=0,
                                       fine_tune_learning_rate=0.05), True, "k")
    assert [(p.unfreeze, p.learning_rate) for p in plan] == [("frozen", 1e-3), ("frozen", 0.05)]
    assert finetune.phase_at(plan, 0) is plan[0] and finetune.phase_at(plan, 1) is plan[0]
    assert finetune.phase_at(plan, 2) is plan[1]
    assert finetune.phases(TrainConfig(epochs=3), False, "k")[0].unfreeze == "all"
