"""train: fit one model on its task's augmented train split, validating on the val split."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import math
import shutil
import tempfile
import time
from pathlib import Path

import keras

from visionpipe import atomic
from visionpipe.config import Params, TrainConfig
from visionpipe.console import epoch_line, fit_verbosity, is_verbose
from visionpipe.data import records
from visionpipe.data.pipeline import cache_mode, decoded_bytes, model_dataset
from visionpipe.distribute import (
    Distribution,
    check_jit,
    fit_multi_worker,
    make_distribution,
    output_root,
    worker_params,
)
from visionpipe.errors import ParamsError, TrainingDivergedError
from visionpipe.layout import Layout
from visionpipe.models.registry import create_model, parse_architecture
from visionpipe.models.saving import load_model
from visionpipe.stages.checkpoints import (
    Checkpoints,
    EpochCheckpoint,
    ResumableEarlyStopping,
    State,
    fingerprint,
    restore_weights,
)
from visionpipe.stages.common import measure_co2, set_seed
from visionpipe.tasks import get_task
from visionpipe.tracking.mlflow_runs import RunLogger
from visionpipe.tracking.stage_logs import log_train


def learning_rate(cfg: TrainConfig, steps_per_epoch: int):
    """The learning rate or per-step schedule named by ``cfg.lr_schedule``."""
    lr, total = cfg.learning_rate, cfg.epochs * steps_per_epoch
    schedules = keras.optimizers.schedules
    if cfg.lr_schedule == "step":
        return schedules.ExponentialDecay(lr, cfg.step_epochs * steps_per_epoch,
                                          cfg.step_factor, staircase=True)
    if cfg.lr_schedule == "cosine":
        return schedules.CosineDecay(lr, total, alpha=cfg.min_learning_rate / lr)
    if cfg.lr_schedule == "warmup_cosine":
        warmup = round(cfg.warmup_epochs * steps_per_epoch)
        return schedules.CosineDecay(0.0, max(1, total - warmup),
                                     alpha=cfg.min_learning_rate / lr, warmup_target=lr,
                                     warmup_steps=warmup)
    return lr


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """The optimizer named in params, with its learning rate (schedule) and weight decay."""
    lr = learning_rate(cfg, steps_per_epoch)
    wd = cfg.weight_decay or None
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(lr, momentum=cfg.momentum, weight_decay=wd)
    if cfg.optimizer == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=cfg.weight_decay)
    return keras.optimizers.Adam(lr, weight_decay=wd)


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


def divergence_message(model_name: str, cfg: TrainConfig, exc: Diverged, folder: Path,
                       state: State | None) -> str:
    """What happened, where, and what to do, on one line."""
    kept = (f"the last complete epoch ({state.epochs_done}) is kept in {folder / state.last}"
            if state is not None and state.last
            else "no epoch completed, so there is no checkpoint")
    return (f"train@{model_name} diverged: the loss became {exc.loss} at epoch {exc.epoch}, "
            f"step {exc.step}; lower models.{model_name}.train.learning_rate (now "
            f"{cfg.learning_rate:g}, e.g. to {cfg.learning_rate / 10:g}) or warm it up "
            f"(lr_schedule: warmup_cosine); {kept}")


def resume_point(checkpoints: Checkpoints, dist: Distribution) -> tuple[State | None, str]:
    """The state to resume from (None: epoch 1) and why, agreed by every worker.

    Workers that would start at different epochs would wait for each other forever; when they
    do not all see the same checkpoints (no shared folder), all of them start at epoch 1."""
    state, why = checkpoints.resumable()
    if dist.all_equal(state.epochs_done if state is not None else 0):
        return state, why
    return None, (f"not every worker sees the checkpoints in {checkpoints.folder} (put them "
                  "on a folder all machines share to resume); training starts at epoch 1")


def write_history(path: Path, history: dict[str, list[float]]) -> None:
    """history.csv: epoch (from 1, as the console, MLflow's steps, model.json and the plots
    number them), then the logged keys sorted."""
    keys = sorted(history)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["epoch", *keys])
    for epoch in range(len(history[keys[0]]) if keys else 0):
        writer.writerow([epoch + 1, *(history[k][epoch] for k in keys)])
    atomic.write_text(path, buf.getvalue())


def with_image_shape(to_model_io, size: tuple[int, int]):
    """``to_model_io`` with the images' static shape set (train and val images are all
    ``size``): a detector lays out its anchors from it."""
    import tensorflow as tf

    def fn(rec):
        return to_model_io({**rec, "image": tf.ensure_shape(rec["image"], (*size, 3))})

    if hasattr(to_model_io, "padding_values"):
        fn.padding_values = to_model_io.padding_values
    return fn


@contextlib.contextmanager
def dtype_policy(name: str):
    """Layers built inside compute in ``name`` (mixed_bfloat16: bfloat16 maths, float32
    variables); the global policy is float32 again afterwards, for the caller's models."""
    keras.mixed_precision.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


def input_dataset(data_dir: Path, split: str, io, t: TrainConfig, seed: int, cache_dir: Path):
    """The train stage's input pipeline for one split (the train split shuffled with the
    seed), with the model's cache and determinism params; returns it and the cache mode
    ``auto`` resolved to. A disk cache goes under ``cache_dir``."""
    cache = cache_mode(t.cache, decoded_bytes(records.read_manifest(data_dir), split),
                       t.cache_limit_mb)
    ds = model_dataset(data_dir, split, io, t.batch_size, shuffle=split == "train",
                       shuffle_buffer=t.shuffle_buffer, seed=seed, cache=cache,
                       cache_file=cache_dir / split, deterministic=t.deterministic_input)
    return ds, cache


def compile_model(model: keras.Model, task, optimizer, t: TrainConfig, architecture,
                  num_classes: int) -> None:
    """Compile as training does: the task's loss and metrics (a detector compiles itself),
    with ``t.jit_compile``. Under mixed_float16 Keras wraps the optimizer in a
    LossScaleOptimizer itself."""
    if hasattr(task, "compile"):  # a model with its own losses (a detector)
        task.compile(model, optimizer, architecture)  # "auto" is Keras' compile default
        if t.jit_compile != "auto":  # it takes no jit_compile; the model's setter does
            model.jit_compile = t.jit_compile
    else:
        model.compile(optimizer=optimizer, loss=task.loss(t, num_classes),
                      metrics=task.metrics(num_classes), jit_compile=t.jit_compile)


def run(params: Params, model_name: str, layout: Layout) -> dict:
    """Train ``model_name``; write model.keras, model.json, checkpoints/ and history.csv.

    Under ``distribute: multi_worker`` every machine of the cluster runs this; only the chief
    writes into ``layout`` and tracks the run, the others into a temporary folder
    (visionpipe.distribute)."""
    cfg = params.model(model_name)
    # First: a multi-worker strategy must exist before TensorFlow's runtime starts.
    dist = make_distribution(cfg.train.distribute, f"models.{model_name}.train.distribute")
    with output_root(layout.root, dist) as root:
        return _train(worker_params(params, dist), model_name, layout, Layout(root), dist)


def _train(params: Params, model_name: str, layout: Layout, out: Layout,
           dist: Distribution) -> dict:
    """:func:`run` on one worker: data and checkpoints to resume from are read from
    ``layout``, outputs written to ``out``."""
    cfg = params.model(model_name)
    architecture = parse_architecture(cfg.family, cfg.architecture,
                                      f"models.{model_name}.architecture")
    t = cfg.train
    if t.deterministic:  # before any op runs; recorded in model.json
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    set_seed(params.seed)
    task = get_task(cfg.task)
    train_dir, val_dir = layout.augmented(cfg.task), layout.prepared(cfg.task)
    manifest = records.read_manifest(train_dir)
    val_manifest = records.read_manifest(val_dir)
    names = manifest["class_names"]
    h, w = manifest["image_size"]
    io = with_image_shape(task.to_model_io(len(names)), (h, w))
    cache_dir = Path(tempfile.mkdtemp(prefix=f"visionpipe-cache-{model_name}-"))
    train_ds, _ = input_dataset(train_dir, "train", io, t, params.seed, cache_dir)
    val_ds, _ = input_dataset(val_dir, "val", io, t, params.seed, cache_dir)

    steps_per_epoch = math.ceil(manifest["counts"]["train"] / t.batch_size)
    if t.class_weights is not None and len(t.class_weights) != len(names):
        raise ParamsError(f"params.yaml: models.{model_name}.train.class_weights = "
                          f"{list(t.class_weights)}: expected one weight per class, "
                          f"{len(names)} in class order ({', '.join(names)})")
    with dist.scope(), dtype_policy(t.precision):
        model = create_model(cfg.family, (h, w, 3), len(names), architecture)
        compile_model(model, task, make_optimizer(t, steps_per_epoch), t, architecture,
                      len(names))
    jit_compile = bool(model.jit_compile)  # what Keras made of "auto"
    check_jit(dist, jit_compile, f"models.{model_name}.train.jit_compile")
    write_summary(model, out.model_summary(model_name))

    mode = "min" if t.monitor == "val_loss" else "max"
    trained_on = fingerprint(
        seed=params.seed, family=cfg.family, task=cfg.task, architecture=cfg.architecture,
        train=dataclasses.asdict(t), train_data=manifest["checksum"],
        val_data=val_manifest["checksum"])
    ckpt = Checkpoints(out.checkpoints(model_name), trained_on, t.monitor)
    # A non-chief worker resumes from the chief's checkpoints (read only, on a shared folder).
    source = Checkpoints(layout.checkpoints(model_name), trained_on, t.monitor)
    state, why = resume_point(source, dist)
    print(f"train@{model_name}: {why}", flush=True)
    if state is None:
        state = ckpt.reset()
    else:
        with dist.scope():
            restore_weights(model, source.folder / state.last)
    early = None
    if t.early_stopping_patience:
        early = ResumableEarlyStopping(monitor=t.monitor, patience=t.early_stopping_patience,
                                       min_delta=t.early_stopping_min_delta, mode=mode,
                                       verbose=1, restored=state.early_stopping)
    callbacks = [DivergenceGuard(), LearningRateLogger(), *([early] if early else []),
                 EpochCheckpoint(ckpt, state, mode, early)]
    verbosity = fit_verbosity()
    if verbosity == 0:  # not a terminal: one line per epoch instead of a progress bar
        callbacks.append(EpochLine(model_name, t.epochs))
    run = RunLogger(params, model_name, out).start()
    if run.client is not None:
        callbacks.append(run.keras_callback())
        for epoch in range(state.epochs_done):  # the epochs a killed run completed
            run.log_metrics({k: v[epoch] for k, v in state.history.items()},
                            step=epoch + 1, what="epoch metrics")
    try:
        with measure_co2(params, out, model_name, "train"), run.system_metrics():
            stopped = early is not None and state.early_stopping is not None and (
                state.early_stopping["wait"] >= t.early_stopping_patience)
            if state.epochs_done < t.epochs and not stopped:
                if dist.kind == "multi_worker":  # Keras' fit fails under its strategy
                    fit_multi_worker(model, dist.strategy, train_ds, validation_data=val_ds,
                                     epochs=t.epochs, initial_epoch=state.epochs_done,
                                     callbacks=callbacks, verbose=verbosity)
                else:
                    # shuffle=False: the dataset shuffles itself (Keras would warn otherwise).
                    model.fit(train_ds, validation_data=val_ds, epochs=t.epochs,
                              shuffle=False, initial_epoch=state.epochs_done,
                              callbacks=callbacks, verbose=verbosity)
    except Diverged as exc:
        if run.client is not None and run.run_id is not None:
            run.call("run status", "set_terminated", run.run_id, "FAILED")
        raise TrainingDivergedError(
            divergence_message(model_name, t, exc, ckpt.folder, ckpt.read_state())) from None
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)  # disk caches (auto, over the limit)

    final = state.history
    write_history(out.history(model_name), final)
    if t.restore_best:
        kept = ckpt.folder / state.best
        if not kept.is_file():  # a worker's best epoch from before a resume
            kept = source.folder / state.best
        model = load_model(kept)
        best = state.best_epoch - 1
    else:
        best = state.epochs_done - 1
    with atomic.atomic_path(out.model_file(model_name)) as tmp:
        model.save(tmp)
    meta = {
        "name": model_name,
        "family": cfg.family,
        "task": cfg.task,
        "class_names": names,
        "image_size": [h, w],
        "input": "float32 RGB pixels in 0..255, shape (batch, height, width, 3)",
        "params": model.count_params(),
        "epochs": len(final["loss"]),
        "stopped_early": len(final["loss"]) < t.epochs,
        "kept_epoch": best + 1,
        "monitor": t.monitor,
        "deterministic": t.deterministic,
        "precision": t.precision,
        "jit_compile": jit_compile,
        "distribute": dist.describe(),
        "train_dataset": {"path": str(train_dir.relative_to(layout.root)),
                          "checksum": manifest["checksum"], "count": manifest["counts"]["train"]},
        "val_dataset": {"checksum": val_manifest["checksum"],
                        "count": val_manifest["counts"]["val"]},
        "kept_epoch_metrics": {k: float(v[best]) for k, v in final.items()},
    }
    records.write_json(out.model_meta(model_name), meta)
    # Last: a kill before this line leaves an unfinished state, and the rerun only rewrites
    # the outputs above (no epoch left to train); after it, a rerun trains from epoch 1.
    state.finished = True
    ckpt.write(state)
    log_train(run, model, live_epochs=run.client is not None)
    run.finish("train")
    if dist.is_chief:
        print(train_lines(model_name, meta, out), flush=True)
    return meta


def train_lines(model_name: str, meta: dict, layout: Layout) -> str:
    """What train found, for the console: epochs run, the kept epoch and its monitored value,
    and where the model is."""
    epochs, kept = meta["epochs"], meta["kept_epoch"]
    stopped = " (stopped early)" if meta["stopped_early"] else ""
    value = meta["kept_epoch_metrics"].get(meta["monitor"])
    shown = f"{meta['monitor']} {value:.4g}" if value is not None else meta["monitor"]
    path = layout.model_file(model_name).relative_to(layout.root)
    return (f"train@{model_name}: {epochs} epochs{stopped}; kept epoch {kept} "
            f"({shown}); model: {path} ({meta['params']:,} params)")


def write_summary(model: keras.Model, path: Path) -> None:
    """Keras' model summary to ``path`` (reports/train/<model>/summary.txt), and to the
    console only when verbose."""
    lines: list[str] = []
    model.summary(print_fn=lambda line, **_: lines.append(line), line_length=110)
    atomic.write_text(path, "\n".join(lines) + "\n")
    if is_verbose():
        print("\n".join(lines), flush=True)


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
