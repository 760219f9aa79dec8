"""Keras callbacks of the train stage: the learning rate in the logs, a stop at the first
non-finite loss, and one console line per epoch."""

from __future__ import annotations

import math
import time

import keras

from visionpipe.console import epoch_line


class LearningRateLogger(keras.callbacks.Callback):
    """Puts the learning rate each epoch started with into the logs (history.csv)."""

    def on_epoch_begin(self, epoch, logs=None):
        self._rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = self._rate


class Diverged(Exception):
    """Raised inside ``fit`` by :class:`DivergenceGuard`, before any epoch-end callback."""

    def __init__(self, epoch: int, step: int, loss: float):
        super().__init__(f"loss {loss} at epoch {epoch}, step {step}")
        self.epoch, self.step, self.loss = epoch, step, loss


class DivergenceGuard(keras.callbacks.Callback):
    """Stops training at the first batch whose loss is NaN or infinite.

    It raises rather than setting ``stop_training``: Keras would still end the epoch and let
    ModelCheckpoint overwrite ``last.keras`` with the broken weights. Raising keeps the last
    complete epoch's checkpoint as it was.
    """

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch + 1

    def on_train_batch_end(self, batch, logs=None):
        loss = float((logs or {}).get("loss", 0.0))
        if not math.isfinite(loss):
            raise Diverged(self._epoch, batch + 1, loss)


class EpochLine(keras.callbacks.Callback):
    """One line per epoch (when output is not a terminal): epoch from 1, metrics, time."""

    def __init__(self, model_name: str, epochs: int):
        super().__init__()
        self.model_name, self.epochs = model_name, epochs

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        print(epoch_line(self.model_name, epoch + 1, self.epochs, dict(logs or {}),
                         time.perf_counter() - self._start), flush=True)
