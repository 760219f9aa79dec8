"""models.saving.float32_model: a model trained under a mixed policy, rebuilt to compute in
float32 around the same variables (what train saves as model.keras)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from visionpipe.models.saving import float32_model
from visionpipe.tasks.segmentation import SegmentationLoss
from visionpipe.training import dtype_policy


def _mixed_model(policy: str) -> keras.Model:
    """A small segmenter built under ``policy``: a nested functional block (as keras.applications
    backbones are nested), a float32 softmax head, compiled with a project loss."""
    with dtype_policy(policy):
        keras.utils.set_random_seed(0)
        inner_in = keras.Input((8, 8, 4))
        inner = keras.Model(inner_in, keras.layers.Conv2D(6, 3, padding="same",
                                                          activation="relu")(inner_in),
                            name="block")
        images = keras.Input((8, 8, 3))
        x = keras.layers.Conv2D(4, 3, padding="same", name="stem")(images)
        x = keras.layers.BatchNormalization(name="bn")(x)
        x = inner(x)
        out = keras.layers.Conv2D(5, 1, activation="softmax", dtype="float32", name="head")(x)
        model = keras.Model(images, out)
    model.compile(optimizer="adam", loss=SegmentationLoss("ce_dice", 5))
    return model


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_a_mixed_model_becomes_float32_with_the_same_variables(policy):
    model = _mixed_model(policy)
    assert model.get_layer("stem").compute_dtype == policy.split("_")[1]
    rebuilt = float32_model(model)
    assert rebuilt is not model and not rebuilt.compiled
    policies = {layer.dtype_policy.name for layer in rebuilt._flatten_layers()}
    assert policies == {"float32"}
    assert rebuilt.get_layer("block").get_layer(index=1).compute_dtype == "float32"
    for before, after in zip(model.get_weights(), rebuilt.get_weights(), strict=True):
        assert np.array_equal(before, after)
    x = np.random.default_rng(0).uniform(0, 1, (4, 8, 8, 3)).astype(np.float32)
    exact = np.asarray(rebuilt(x))
    assert exact.dtype == np.float32
    # The mixed model's outputs are the float32 ones within 16-bit rounding, not equal.
    rounded = np.asarray(model(x))
    assert 0 < np.abs(rounded - exact).max() < 0.1


def test_a_float32_model_comes_back_as_it_is():
    model = _mixed_model("float32")
    assert float32_model(model) is model
