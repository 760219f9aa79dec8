"""training.build_before_fit: the optimizer's and the compiled loss' variables exist before
``fit``, so Keras traces the train step once instead of twice, and training is unchanged."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from visionpipe.training import build_before_fit


class CountingModel(keras.Model):
    """A functional model that counts how often ``fit`` traces its train step."""

    traces = 0

    def train_step(self, data):
        CountingModel.traces += 1  # Python runs once per trace, not once per step
        return super().train_step(data)


def _model_and_data():
    """Two outputs with a loss each, as keras-cv's YOLOv8 compiles (a tracker per loss)."""
    keras.utils.set_random_seed(0)
    images = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(images)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = CountingModel(images, {"boxes": keras.layers.Dense(4, name="boxes")(x),
                                   "classes": keras.layers.Dense(3, name="classes")(x)})
    model.compile(optimizer=keras.optimizers.Adam(0.01),
                  loss={"boxes": "mse", "classes": "mse"})
    rng = np.random.default_rng(0)
    data = tf.data.Dataset.from_tensor_slices((
        rng.random((40, 8, 8, 3), dtype=np.float32),
        {"boxes": rng.random((40, 4), dtype=np.float32),
         "classes": rng.random((40, 3), dtype=np.float32)})).batch(16)  # 16, 16, 8
    return model, data


def _fit(prebuild: bool):
    model, data = _model_and_data()
    if prebuild:
        build_before_fit(model, data.element_spec)
        assert model.optimizer.built
    CountingModel.traces = 0
    history = model.fit(data, epochs=2, verbose=0, shuffle=False)
    return CountingModel.traces, model.get_weights(), history.history


def test_the_train_step_is_traced_once_and_trains_the_same():
    traces_before, weights_before, history_before = _fit(prebuild=False)
    traces, weights, history = _fit(prebuild=True)
    assert traces_before == 2  # variables created in the first trace: Keras traces again
    assert traces == 1
    assert history.keys() == history_before.keys() >= {"loss", "boxes_loss", "classes_loss"}
    for key, values in history.items():
        np.testing.assert_allclose(values, history_before[key], rtol=1e-6, err_msg=key)
    for a, b in zip(weights, weights_before, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

