"""Training that diverges stops at once, says where and what to do, and keeps the last good
checkpoint. (Run-to-run determinism is tested on the pipeline's own model, in
tests/pipeline/test_dvc_pipeline.py.)"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from visionpipe.models.saving import load_model
from visionpipe.config import TrainConfig
from visionpipe.layout import Layout
from visionpipe.stages.train import Diverged, DivergenceGuard, divergence_message


class _PoisonAtEpoch(keras.callbacks.Callback):
    """Sets every weight to NaN when epoch ``at`` (1-based) begins."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def on_epoch_begin(self, epoch, logs=None):
        if epoch + 1 == self.at:
            self.model.set_weights([np.full_like(w, np.nan) for w in self.model.get_weights()])


def test_nan_loss_stops_at_its_epoch_and_step_and_keeps_the_last_good_checkpoint(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    x = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    y = np.arange(40) % 3
    last = tmp_path / "last.keras"
    after_epoch_2 = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: epoch == 1 and after_epoch_2.append(
            [w.copy() for w in model.get_weights()]))
    with pytest.raises(Diverged) as info:
        # The guard comes first, as in train.run; the poison strikes as epoch 3 begins.
        model.fit(x, y, batch_size=10, epochs=5, verbose=0, shuffle=False,
                  callbacks=[DivergenceGuard(), record, keras.callbacks.ModelCheckpoint(
                      str(last)), _PoisonAtEpoch(3)])
    assert (info.value.epoch, info.value.step) == (3, 1) and math.isnan(info.value.loss)
    kept = load_model(last).get_weights()
    assert all(np.isfinite(w).all() for w in kept)
    for a, b in zip(kept, after_epoch_2[0], strict=True):
        np.testing.assert_array_equal(a, b)


def test_divergence_message_names_epoch_step_key_and_checkpoint(tmp_path):
    cfg = TrainConfig(learning_rate=0.5)
    late = divergence_message("mlp", cfg, Diverged(4, 17, float("inf")), Layout(tmp_path))
    assert late == (f"train@mlp diverged: the loss became inf at epoch 4, step 17; lower "
                    f"models.mlp.train.learning_rate (now 0.5, e.g. to 0.05) or warm it up "
                    f"(lr_schedule: warmup_cosine); the last complete epoch (3) is kept in "
                    f"{tmp_path}/models/mlp/checkpoints/last.keras")
    early = divergence_message("mlp", cfg, Diverged(1, 2, float("nan")), Layout(tmp_path))
    assert early.endswith("no epoch completed, so there is no checkpoint")
