"""Checkpoints that survive a kill, training that resumes from them, and training that
diverges: it stops at once, says where and what to do, and keeps the last good checkpoint.
(Run-to-run determinism and a SIGKILL under `dvc repro` are tested on the pipeline's own model,
in tests/pipeline/test_dvc_pipeline.py.)"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from visionpipe.callbacks import Diverged, DivergenceGuard
from visionpipe.checkpoints import (
    STATE_FILE,
    Checkpoints,
    EpochCheckpoint,
    ResumableEarlyStopping,
    replay_early_stopping,
    restore_weights,
)
from visionpipe.config import TrainConfig
from visionpipe.models.saving import load_model
from visionpipe.stages.train import divergence_message


class _PoisonAtEpoch(keras.callbacks.Callback):
    """Sets every weight to NaN when epoch ``at`` (1-based) begins."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def on_epoch_begin(self, epoch, logs=None):
        if epoch + 1 == self.at:
            self.model.set_weights([np.full_like(w, np.nan) for w in self.model.get_weights()])


X = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
Y = (X[:, 0] > 0).astype(int) + (X[:, 1] > 0.5)
FIT = dict(batch_size=10, shuffle=False, verbose=0, validation_data=(X, Y))


class _Killed(Exception):
    pass


class _KillAt(keras.callbacks.Callback):
    """Dies in the middle of epoch ``epoch`` (0-based), after batch ``batch``: what a SIGKILL
    does to the Python side of training (nothing after it runs)."""

    def __init__(self, epoch: int, batch: int = 1):
        super().__init__()
        self.epoch, self.batch = epoch, batch

    def on_epoch_begin(self, epoch, logs=None):
        self._now = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self._now, batch) == (self.epoch, self.batch):
            raise _Killed


def _model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(3, activation="softmax")])
    # A schedule and Adam's moments: both must come back from the checkpoint.
    model.compile(optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(
        0.05, 16)), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _train(folder, epochs=4, extra=(), model=None, initial_epoch=0, state=None):
    ckpt = Checkpoints(folder, "fp-1", "val_loss")
    state = state or ckpt.reset()
    model = model or _model()
    model.fit(X, Y, epochs=epochs, initial_epoch=initial_epoch,
              callbacks=[EpochCheckpoint(ckpt, state, "min"), *extra], **FIT)
    return model, ckpt


def test_training_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path):
    reference, ref_ckpt = _train(tmp_path / "reference")
    with pytest.raises(_Killed):
        _train(tmp_path / "run", extra=[_KillAt(epoch=2)])
    ckpt = Checkpoints(tmp_path / "run", "fp-1", "val_loss")
    state, why = ckpt.resumable()
    assert state.epochs_done == 2 and state.last == "epoch-0002.keras"
    assert why == f"resuming from {tmp_path}/run/epoch-0002.keras: 2 epoch(s) already done"
    model = _model(seed=1)  # other initial weights: the checkpoint's must replace them
    restore_weights(model, ckpt.folder / state.last)
    assert int(model.optimizer.iterations) == 2 * 4  # 2 epochs of 4 batches: the schedule's step
    _train(tmp_path / "run", model=model, initial_epoch=2, state=state)
    for a, b in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    resumed, uninterrupted = ckpt.read_state(), ref_ckpt.read_state()
    assert resumed.epochs_done == 4 and len(resumed.history["loss"]) == 4
    for key, values in uninterrupted.history.items():
        assert resumed.history[key] == pytest.approx(values, abs=1e-6), key


def test_state_names_the_last_and_first_best_epoch_and_nothing_else_is_kept(tmp_path):
    _, ckpt = _train(tmp_path, epochs=5)
    state = ckpt.read_state()
    val = state.history["val_loss"]
    best = min(range(5), key=val.__getitem__) + 1
    assert (state.last, state.best_epoch, state.best) == (
        "epoch-0005.keras", best, f"epoch-{best:04d}.keras")
    assert state.best_value == pytest.approx(val[best - 1])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        {STATE_FILE, state.last, state.best})
    # The files are the epochs they claim: the best one scores its recorded val_loss.
    kept = load_model(tmp_path / state.best)
    kept.compile(loss="sparse_categorical_crossentropy")
    assert kept.evaluate(X, Y, verbose=0, batch_size=10) == pytest.approx(val[best - 1],
                                                                           rel=1e-5)


def test_a_half_written_epoch_file_is_never_named_and_is_removed(tmp_path):
    _, ckpt = _train(tmp_path, epochs=2)
    # What a kill between the model file and state.json leaves: a complete file no state names,
    # and a temporary one.
    (tmp_path / "epoch-0003.keras").write_bytes(b"PK\x03\x04 cut short")
    (tmp_path / ".epoch-0004.tmp.keras").write_bytes(b"PK")
    state, _ = ckpt.resumable()
    assert state.last == "epoch-0002.keras"
    load_model(tmp_path / state.last)  # complete and loadable
    ckpt.write(state)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({STATE_FILE, state.best,
                                                                 "epoch-0002.keras"})


def test_other_params_a_finished_run_or_a_broken_state_start_at_epoch_1(tmp_path):
    _, ckpt = _train(tmp_path, epochs=2)
    other = Checkpoints(tmp_path, "fp-2", "val_loss").resumable()
    assert other == (None, f"the checkpoints in {tmp_path} were made with other params or "
                           "data; training starts at epoch 1")
    assert Checkpoints(tmp_path, "fp-1", "val_accuracy").resumable()[0] is None
    state = ckpt.read_state()
    state.finished = True
    ckpt.write(state)
    assert ckpt.resumable() == (None, f"the checkpoints in {tmp_path} are from a finished run; "
                                      "training again from epoch 1")
    (tmp_path / STATE_FILE).write_text('{"fingerprint": ')
    assert ckpt.resumable() == (None, f"{tmp_path / STATE_FILE} cannot be read (not valid "
                                      "JSON: Expecting value: line 1 column 17 (char 16)); "
                                      "training starts at epoch 1")
    ckpt.reset()
    assert list(tmp_path.iterdir()) == []
    assert ckpt.resumable() == (None, "no checkpoint; training starts at epoch 1")


def test_early_stopping_counts_across_a_resume(tmp_path):
    """min_delta 100: no epoch after the first improves, so patience 2 stops after epoch 3,
    interrupted or not."""
    def stopper(restored=None):
        return ResumableEarlyStopping(monitor="val_loss", patience=2, min_delta=100.0,
                                      restored=restored)

    early = stopper()
    ckpt = Checkpoints(tmp_path / "a", "fp-1", "val_loss")
    _model().fit(X, Y, epochs=8, callbacks=[early, EpochCheckpoint(ckpt, ckpt.reset(), "min",
                                                                   early)], **FIT)
    assert ckpt.read_state().epochs_done == 3

    ckpt = Checkpoints(tmp_path / "b", "fp-1", "val_loss")
    early = stopper()
    with pytest.raises(_Killed):
        _model().fit(X, Y, epochs=8, callbacks=[early, EpochCheckpoint(ckpt, ckpt.reset(),
                                                                       "min", early),
                                                _KillAt(epoch=2)], **FIT)
    state, _ = ckpt.resumable()
    assert state.epochs_done == 2 and state.early_stopping["wait"] == 1
    model = _model()
    restore_weights(model, ckpt.folder / state.last)
    early = stopper(state.early_stopping)
    model.fit(X, Y, epochs=8, initial_epoch=2,
              callbacks=[early, EpochCheckpoint(ckpt, state, "min", early)], **FIT)
    assert ckpt.read_state().epochs_done == 3


def test_nan_loss_stops_at_its_epoch_and_step_and_keeps_the_last_good_checkpoint(tmp_path):
    model = _model()
    after_epoch_2 = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: epoch == 1 and after_epoch_2.append(
            [w.copy() for w in model.get_weights()]))
    ckpt = Checkpoints(tmp_path, "fp-1", "val_loss")
    with pytest.raises(Diverged) as info:
        # The guard comes first, as in train.run; the poison strikes as epoch 3 begins.
        model.fit(X, Y, epochs=5, callbacks=[DivergenceGuard(), record, EpochCheckpoint(
            ckpt, ckpt.reset(), "min"), _PoisonAtEpoch(3)], **FIT)
    assert (info.value.epoch, info.value.step) == (3, 1) and math.isnan(info.value.loss)
    state = ckpt.read_state()
    assert state.epochs_done == 2 and not state.finished
    kept = load_model(tmp_path / state.last).get_weights()
    assert all(np.isfinite(w).all() for w in kept)
    for a, b in zip(kept, after_epoch_2[0], strict=True):
        np.testing.assert_array_equal(a, b)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({STATE_FILE, state.last,
                                                                 state.best})


def test_divergence_message_names_epoch_step_key_and_checkpoint(tmp_path):
    cfg = TrainConfig(learning_rate=0.5)
    _, ckpt = _train(tmp_path, epochs=3)
    late = divergence_message("mlp", cfg, Diverged(4, 17, float("inf")), tmp_path,
                              ckpt.read_state())
    assert late == (f"train@mlp diverged: the loss became inf at epoch 4, step 17; lower "
                    f"models.mlp.train.learning_rate (now 0.5, e.g. to 0.05) or warm it up "
                    f"(lr_schedule: warmup_cosine); the last complete epoch (3) is kept in "
                    f"{tmp_path}/epoch-0003.keras")
    early = divergence_message("mlp", cfg, Diverged(1, 2, float("nan")), tmp_path, None)
    assert early.endswith("no epoch completed, so there is no checkpoint")


# ------------------------------------------------- damaged checkpoints named by state.json


def _three_epochs(folder):
    """Checkpoints of epochs 1-3 whose best is epoch 1 (the val_loss written rises), and the
    weights after each epoch."""
    ckpt = Checkpoints(folder, "fp-1", "val_loss")
    state, model, weights = ckpt.reset(), _model(), {}
    for epoch, val_loss in enumerate([1.0, 1.5, 2.0], 1):
        model.fit(X, Y, batch_size=10, shuffle=False, verbose=0)
        weights[epoch] = model.get_weights()
        logs = {"loss": float(epoch), "val_loss": val_loss}
        for key, value in logs.items():
            state.history.setdefault(key, []).append(value)
        ckpt.save(state, model, epoch, logs, improved=epoch == 1)
    assert (state.last, state.best) == ("epoch-0003.keras", "epoch-0001.keras")
    return ckpt, weights


def _foreign(path):
    """A complete .keras file of another architecture (8 hidden units more)."""
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(X, Y, verbose=0)
    model.save(path)


def _damage(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif how == "not a zip":
        path.write_text("hello")
    elif how == "flipped byte":
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(flipped))
    elif how == "foreign":
        _foreign(path)
    else:
        path.unlink()


DAMAGE = {"truncated": "(not a whole .keras file: File is not a zip file)",
          "not a zip": "(not a whole .keras file: File is not a zip file)",
          "flipped byte": "(changed bytes: Bad CRC-32 for file 'model.weights.h5')",
          "foreign": "(another model's: its weights do not fit this one (A total of 2 objects "
                     "could not be loaded))",
          "missing": None}


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_last_epoch_falls_back_to_the_earlier_best_one(tmp_path, how):
    ckpt, weights = _three_epochs(tmp_path)
    _damage(tmp_path / "epoch-0003.keras", how)
    state, why = ckpt.resumable()
    assert state is not None and why.startswith("resuming from")
    built = []
    model, state, why = ckpt.restore(state, _model(seed=1),
                                     lambda _done: built.append(1) or _model())
    damaged = ("is missing" if DAMAGE[how] is None else f"is damaged {DAMAGE[how]}")
    assert why == (f"{tmp_path}/epoch-0003.keras {damaged}; resuming from epoch-0001.keras, "
                   "the best epoch (1): epochs 2-3 trained again")
    assert built == [1]  # a fresh model: the failed load may have set some weights
    assert _same(model.get_weights(), weights[1])
    assert (state.epochs_done, state.last, state.best, state.best_epoch) == (
        1, "epoch-0001.keras", "epoch-0001.keras", 1)
    assert state.history == {"loss": [1.0], "val_loss": [1.0]} and state.best_value == 1.0
    assert state.early_stopping is None  # train replays it (replay_early_stopping)


def test_a_damaged_best_epoch_leaves_the_last_as_the_best(tmp_path):
    ckpt, weights = _three_epochs(tmp_path)
    _foreign(tmp_path / "epoch-0001.keras")
    state, _ = ckpt.resumable()
    model, state, why = ckpt.restore(state, _model(seed=1), lambda _done: _model())
    assert why == (f"{tmp_path}/epoch-0001.keras (the best epoch, 1) is damaged "
                   f"{DAMAGE['foreign']}; resuming from epoch-0003.keras: 3 epoch(s) already "
                   "done, the best of them now this last one")
    assert _same(model.get_weights(), weights[3])
    assert (state.epochs_done, state.best, state.best_epoch, state.best_value) == (
        3, "epoch-0003.keras", 3, 2.0)
    # The next save keeps only what the state names: the damaged file goes.
    ckpt.write(state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0003.keras", STATE_FILE]


def test_damaged_with_no_earlier_good_epoch_starts_over_on_a_fresh_model(tmp_path):
    ckpt, _ = _three_epochs(tmp_path)
    _damage(tmp_path / "epoch-0001.keras", "truncated")
    _damage(tmp_path / "epoch-0003.keras", "flipped byte")
    state, _ = ckpt.resumable()
    model, state, why = ckpt.restore(state, _model(seed=1), lambda _done: _model())
    assert state is None and why == (
        f"{tmp_path}/epoch-0003.keras is damaged {DAMAGE['flipped byte']}, and "
        f"epoch-0001.keras too {DAMAGE['truncated']}; no earlier epoch is kept (only the last "
        "and the best are), so training starts over at epoch 1")
    assert _same(model.get_weights(), _model().get_weights())
    assert int(model.optimizer.iterations) == 0

    # One file, last and best at once (the usual case: the last epoch was the best).
    _, first = _train(tmp_path / "one", epochs=1)
    _foreign(first.folder / "epoch-0001.keras")
    state, _ = first.resumable()
    assert state is not None and state.last == state.best
    _, state, why = first.restore(state, _model(seed=1), lambda _done: _model())
    assert state is None and why.endswith(
        f"epoch-0001.keras is damaged {DAMAGE['foreign']}; no earlier epoch is kept (only the "
        "last and the best are), so training starts over at epoch 1")


@pytest.mark.parametrize("text,why", [
    ("[]", "not what train writes: holds a JSON list, not an object"),
    ("\xff", "not UTF-8 text"),
    ('{"fingerprint": "fp-1", "monitor": "val_loss", "oops": 1}', "not what train writes: "
     "unknown keys 'oops'"),
    ('{"monitor": "val_loss"}', "not what train writes: no fingerprint or monitor"),
    ('{"fingerprint": "fp-1", "monitor": "val_loss", "epochs_done": "2"}',
     "fingerprint, monitor, epochs_done, finished or format has the wrong type"),
    ('{"fingerprint": "fp-1", "monitor": "val_loss", "epochs_done": 1, "last": 5}',
     "last = 5 is not the file of epoch 1"),
    ('{"fingerprint": "fp-1", "monitor": "val_loss", "epochs_done": 1, '
     '"last": "../../model.keras"}', "last = '../../model.keras' is not the file of epoch 1"),
    ('{"fingerprint": "fp-1", "monitor": "val_loss", "epochs_done": 2, '
     '"last": "epoch-0002.keras", "history": {"loss": [1.0]}}',
     "history is not one number per completed epoch (2) for each key"),
])
def test_a_state_file_that_is_not_what_train_writes_starts_at_epoch_1(tmp_path, text, why):
    _train(tmp_path, epochs=2)
    (tmp_path / STATE_FILE).write_bytes(text.encode("latin-1"))
    state, line = Checkpoints(tmp_path, "fp-1", "val_loss").resumable()
    assert state is None and why in line
    assert line.startswith(f"{tmp_path / STATE_FILE} cannot be read (")
    assert line.endswith("); training starts at epoch 1")


def test_early_stopping_replayed_from_the_history_matches_its_counters(tmp_path):
    """What train gives a state rolled back to its best epoch: early stopping's counters
    recomputed from the monitored values up to it, as they were recorded then."""
    def stopper():
        return ResumableEarlyStopping(monitor="val_loss", patience=10, min_delta=0.02,
                                      mode="min")

    ckpt = Checkpoints(tmp_path, "fp-1", "val_loss")
    state, early, recorded = ckpt.reset(), stopper(), []
    keep = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: recorded.append(dict(state.early_stopping)))
    model = _model()
    model.fit(X, Y, epochs=6, callbacks=[early, EpochCheckpoint(ckpt, state, "min", early),
                                         keep], **FIT)
    assert len({r["wait"] for r in recorded}) > 1  # some epochs improve by 0.02, some not
    for epoch in range(1, 7):
        assert replay_early_stopping(stopper(), model, state.history["val_loss"][:epoch]
                                     ) == recorded[epoch - 1], epoch
