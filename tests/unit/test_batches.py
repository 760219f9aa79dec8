"""batches.predict: model.predict with a padded last batch gives the same outputs for
every image, in one trace of the predict step."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from visionpipe import batches


class CountingModel(keras.Model):
    """Counts how often ``predict`` traces its step (Python runs once per trace)."""

    traces = 0

    def predict_step(self, data):
        CountingModel.traces += 1
        return super().predict_step(data)


def _model(dict_outputs: bool) -> keras.Model:
    keras.utils.set_random_seed(0)
    images = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu")(images)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    if dict_outputs:  # as a detector's predict returns boxes and classes
        return CountingModel(images, {"boxes": keras.layers.Dense(4)(x),
                                      "classes": keras.layers.Dense(2)(x)})
    return CountingModel(images, keras.layers.Dense(3, activation="softmax")(x))


@pytest.mark.parametrize("count,batch_size", [(50, 16), (7, 16), (32, 16), (1, 4)])
@pytest.mark.parametrize("dict_outputs", [False, True])
def test_outputs_are_predicts_and_the_step_is_traced_once(count, batch_size, dict_outputs):
    images = np.random.default_rng(count).random((count, 6, 6, 3), dtype=np.float32) * 255
    expected = _model(dict_outputs).predict(images, batch_size=batch_size, verbose=0)
    model = _model(dict_outputs)
    CountingModel.traces = 0
    got = batches.predict(model, images, batch_size)
    assert CountingModel.traces == 1
    pairs = ([(got[k], expected[k]) for k in ("boxes", "classes")] if dict_outputs
             else [(got, expected)])
    for a, b in pairs:
        assert a.shape == b.shape and a.shape[0] == count
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_plain_predict_traces_twice_for_a_smaller_last_batch():
    """What batches.predict avoids: 50 images at 16 end with a batch of 2."""
    model = _model(False)
    CountingModel.traces = 0
    model.predict(np.zeros((50, 6, 6, 3), np.float32), batch_size=16, verbose=0)
    assert CountingModel.traces == 2
