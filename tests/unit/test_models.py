"""Every registered family builds, trains a step, saves, loads safely and predicts the same."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from visionpipe.errors import ModelError, ParamsError
from visionpipe.models.registry import create_model, get_family, known_families
from visionpipe.models.saving import load_model
from visionpipe.stages.evaluate import flops_per_image

TINY = {"mlp": {"hidden_units": [16, 8], "dropout": 0.1}}


@pytest.mark.parametrize("family", known_families())
def test_family_trains_saves_loads_and_predicts_identically(family, tmp_path):
    keras.utils.set_random_seed(0)
    fam = get_family(family)
    model = create_model(family, (32, 32, 3), 4, TINY.get(family, {}))
    assert fam.task == "classification"
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, size=(8, 32, 32, 3)).astype(np.float32)
    y = keras.utils.to_categorical(rng.integers(0, 4, size=8), 4)
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    before = [w.copy() for w in model.get_weights()]
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights(),
                                                         strict=True))
    probs = model.predict(x, verbose=0)
    assert probs.shape == (8, 4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    path = tmp_path / f"{family}.keras"
    model.save(path)
    loaded = load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), probs)


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
    with pytest.raises(ModelError, match="unknown model family 'nope'; known families: mlp"):
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
