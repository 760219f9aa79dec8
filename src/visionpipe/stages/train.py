"""train: fit one model on its task's augmented train split, validating on the val split."""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import shutil
import tempfile
from pathlib import Path

import keras

from visionpipe import atomic, class_weights, finetune
from visionpipe.callbacks import Diverged, DivergenceGuard, EpochLine, LearningRateLogger
from visionpipe.checkpoints import (
    Checkpoints,
    EpochCheckpoint,
    ResumableEarlyStopping,
    State,
    fingerprint,
    replay_early_stopping,
)
from visionpipe.config import Params, TrainConfig
from visionpipe.console import fit_verbosity, is_verbose
from visionpipe.data import records
from visionpipe.data.pipeline import damaged_records, input_dataset, with_image_shape
from visionpipe.distribute import (
    Distribution,
    check_jit,
    fit_distributed,
    make_distribution,
    output_root,
    uneven_split_note,
    worker_params,
)
from visionpipe.errors import DataError, ModelError, TrainingDivergedError
from visionpipe.layout import Layout
from visionpipe.models import pretrained
from visionpipe.models.registry import create_model, parse_architecture
from visionpipe.models.saving import float32_model, load_model
from visionpipe.stages.common import measure_co2, set_seed
from visionpipe.tasks.registry import task_for
from visionpipe.tracking.mlflow_runs import RunLogger
from visionpipe.tracking.stage_logs import log_train
from visionpipe.training import (
    apply_threads,
    build_before_fit,
    dtype_policy,
    make_optimizer,
    resolve_precision,
)


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


def run(params: Params, model_name: str, layout: Layout) -> dict:
    """Train ``model_name``; write model.keras, model.json, checkpoints/ and history.csv.

    Under ``distribute: multi_worker`` every machine of the cluster runs this; only the chief
    writes into ``layout`` and tracks the run, the others into a temporary folder
    (visionpipe.distribute)."""
    cfg = params.model(model_name)
    # First: thread counts and a multi-worker strategy must be set before TensorFlow's runtime
    # starts (nothing before this line starts it: params, architectures, imports).
    threads = apply_threads(cfg.train, f"models.{model_name}.train", cfg.family)
    if "note" in threads:  # TensorFlow already ran in this process (train.run in-process)
        print(f"train@{model_name}: {threads['note']}", flush=True)
    dist = make_distribution(cfg.train.distribute, f"models.{model_name}.train.distribute")
    with output_root(layout.root, dist) as root:
        return _train(worker_params(params, dist), model_name, layout, Layout(root), dist,
                      threads)


def _train(params: Params, model_name: str, layout: Layout, out: Layout,
           dist: Distribution, threads: dict) -> dict:
    """:func:`run` on one worker: data and checkpoints to resume from are read from
    ``layout``, outputs written to ``out``; ``threads``: TensorFlow's, as apply_threads set."""
    cfg = params.model(model_name)
    architecture = parse_architecture(cfg.family, cfg.architecture,
                                      f"models.{model_name}.architecture")
    # precision: auto becomes this machine's policy for everything below, the checkpoint
    # fingerprint too: a checkpoint trained in bfloat16 does not resume in float32 elsewhere.
    precision, precision_reason = resolve_precision(cfg.train.precision, cfg.family,
                                                    f"models.{model_name}.train")
    t = dataclasses.replace(cfg.train, precision=precision)
    if t.deterministic:  # before any op runs; recorded in model.json
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    set_seed(params.seed)
    task = task_for(cfg.family, cfg.task)
    train_dir, val_dir = layout.augmented(cfg.task), layout.prepared(cfg.task)
    # The shards are the bytes their manifests describe (a fraction of a second for the
    # default data); a mismatch names the shard and what restores it.
    restore = {d: records.restore_hint(d, layout.root) for d in (train_dir, val_dir)}
    manifest = records.verify_shards(train_dir, restore[train_dir])
    val_manifest = records.verify_shards(val_dir, restore[val_dir])
    names = manifest["class_names"]
    h, w = manifest["image_size"]
    # None, a list, or balanced: one weight per class (from the train split's counts).
    weights = class_weights.resolve(t.class_weights, train_dir, cfg.task, names,
                                    f"models.{model_name}.train.class_weights")
    io = with_image_shape(task.to_model_io(len(names)), (h, w))
    cache_dir = Path(tempfile.mkdtemp(prefix=f"visionpipe-cache-{model_name}-"))
    padding = task.padding_values()
    train_ds, _ = input_dataset(train_dir, "train", io, t, params.seed, cache_dir, padding)
    val_ds, _ = input_dataset(val_dir, "val", io, t, params.seed, cache_dir, padding)

    steps_per_epoch = math.ceil(manifest["counts"]["train"] / t.batch_size)

    key = f"models.{model_name}.train"
    plan: list[finetune.Phase] = []
    # Where the starting weights come from (None: random); a local file's SHA-256 is part of
    # what a checkpoint was trained from. A bad path is reported by the builder, named.
    with pretrained.context(f"models.{model_name}.architecture", layout.root):
        start = pretrained.record(architecture, layout.root)

    def compile_for(built: keras.Model, phase: finetune.Phase) -> None:
        """Set what trains in ``phase`` and compile with a fresh optimizer for it."""
        with dist.scope(), dtype_policy(t.precision):
            finetune.apply(built, phase, key, keep_statistics=start is not None)
            # Under mixed_float16 Keras wraps the optimizer in a LossScaleOptimizer itself.
            task.compile(built, make_optimizer(finetune.phase_config(t, phase),
                                               steps_per_epoch),
                         dataclasses.replace(t, class_weights=weights), architecture, len(names))

    def build(epochs_done: int = 0) -> keras.Model:
        """The compiled model before training (the same weights every time: seeded), set up
        as the phase a checkpoint after ``epochs_done`` epochs was saved in."""
        set_seed(params.seed)
        with dist.scope(), dtype_policy(t.precision), \
                pretrained.context(f"models.{model_name}.architecture", layout.root):
            built = create_model(cfg.family, (h, w, 3), len(names), architecture)
        if not plan:
            plan.extend(finetune.phases(t, pretrained.nested_backbone(built) is not None, key))
        compile_for(built, finetune.phase_at(plan, epochs_done))
        return built

    model = build()
    jit_compile = bool(model.jit_compile)  # what Keras made of "auto"
    check_jit(dist, jit_compile, f"models.{model_name}.train.jit_compile")
    note = uneven_split_note(manifest["counts"]["train"], t.batch_size, dist.replicas,
                             f"models.{model_name}.train.batch_size")
    if note is not None:
        print(f"train@{model_name}: {note}", flush=True)
    write_summary(model, out.model_summary(model_name))

    mode = "min" if t.monitor == "val_loss" else "max"
    trained_on = fingerprint(
        seed=params.seed, family=cfg.family, task=cfg.task, architecture=cfg.architecture,
        train=dataclasses.asdict(t), train_data=manifest["checksum"],
        val_data=val_manifest["checksum"], **({"start": start} if start else {}))
    ckpt = Checkpoints(out.checkpoints(model_name), trained_on, t.monitor)
    # A non-chief worker resumes from the chief's checkpoints (read only, on a shared folder).
    source = Checkpoints(layout.checkpoints(model_name), trained_on, t.monitor)
    state, why = resume_point(source, dist)
    if state is not None:  # a damaged file: the best epoch before it, or epoch 1
        if finetune.phase_at(plan, state.epochs_done) != plan[0]:  # saved after unfreezing
            model = build(state.epochs_done)
        with dist.scope():
            model, state, why = source.restore(state, model, build)
        # Every worker is here or none is (resume_point agreed on the epochs done); they
        # may disagree about a file only when they do not share the folder.
        if not dist.all_equal(state.epochs_done if state is not None else 0):
            model, state, why = build(0), None, (
                f"the workers found different complete epochs in {source.folder}; training "
                "starts at epoch 1")
    print(f"train@{model_name}: {why}", flush=True)
    if state is None:
        state = ckpt.reset()

    def early_stopping(restored: dict | None) -> ResumableEarlyStopping:
        return ResumableEarlyStopping(monitor=t.monitor, patience=t.early_stopping_patience,
                                      min_delta=t.early_stopping_min_delta, mode=mode,
                                      verbose=1, restored=restored)

    # Early stopping counts in the last phase only: after frozen epochs, fine-tuning still runs.
    last = plan[-1]
    early = None
    if t.early_stopping_patience:
        if state.epochs_done > last.start and state.early_stopping is None:  # rolled back
            state.early_stopping = replay_early_stopping(
                early_stopping(None), model, state.history[t.monitor][last.start:])
        early = early_stopping(state.early_stopping)
    fine_tuning = len(plan) > 1 or plan[0].unfreeze != "all"
    verbosity = fit_verbosity()
    run = RunLogger(params, model_name, out).start()
    if run.client is not None:
        for epoch in range(state.epochs_done):  # the epochs a killed run completed
            run.log_metrics({k: v[epoch] for k, v in state.history.items()},
                            step=epoch + 1, what="epoch metrics")

    def callbacks(phase: finetune.Phase) -> list:
        stops = early if phase is last else None
        found = [DivergenceGuard(), LearningRateLogger(),
                 *([finetune.TrainableLogger()] if fine_tuning else []),
                 *([stops] if stops else []), EpochCheckpoint(ckpt, state, mode, stops)]
        if verbosity == 0:  # not a terminal: one line per epoch instead of a progress bar
            found.append(EpochLine(model_name, t.epochs))
        if run.client is not None:
            found.append(run.keras_callback())
        return found

    try:
        with measure_co2(params, out, model_name, "train"), run.system_metrics(), \
                damaged_records(restore):
            for phase in plan:
                stopped = early is not None and state.early_stopping is not None and (
                    state.early_stopping["wait"] >= t.early_stopping_patience)
                if state.epochs_done >= phase.end or stopped:
                    continue
                if phase.index and state.epochs_done == phase.start:  # a new phase begins
                    compile_for(model, phase)
                if fine_tuning:
                    print(f"train@{model_name}: epochs {phase.start + 1}-{phase.end}: "
                          f"{phase.describe()}, learning rate {phase.learning_rate:g}, "
                          f"{finetune.trainable_params(model):,} trainable params", flush=True)
                if dist.own_loop:  # not Keras' fit under a strategy (visionpipe.distribute)
                    fit_distributed(model, dist.strategy, train_ds, validation_data=val_ds,
                                    epochs=phase.end, initial_epoch=state.epochs_done,
                                    callbacks=callbacks(phase), verbose=verbosity)
                else:
                    build_before_fit(model, train_ds.element_spec)  # one trace, not two
                    # shuffle=False: the dataset shuffles itself (Keras would warn otherwise).
                    model.fit(train_ds, validation_data=val_ds, epochs=phase.end,
                              shuffle=False, initial_epoch=state.epochs_done,
                              callbacks=callbacks(phase), verbose=verbosity)
    except (Diverged, DataError) as exc:
        if run.client is not None and run.run_id is not None:
            run.call("run status", "set_terminated", run.run_id, "FAILED")
        if isinstance(exc, DataError):  # a shard that fails to read (damaged_records)
            raise
        raise TrainingDivergedError(
            divergence_message(model_name, t, exc, ckpt.folder, ckpt.read_state())) from None
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)  # disk caches (auto, over the limit)

    final = state.history
    write_history(out.history(model_name), final)
    best = state.epochs_done - 1
    if t.restore_best:
        kept = ckpt.folder / state.best
        if not kept.is_file():  # a worker's best epoch from before a resume
            kept = source.folder / state.best
        try:
            model = load_model(kept)
            best = state.best_epoch - 1
        except ModelError as exc:  # damaged since it was saved (checked when resuming)
            print(f"train@{model_name}: the best epoch ({state.best_epoch}) cannot be "
                  f"restored: {exc}; keeping the last epoch ({state.epochs_done})", flush=True)
    # model.keras computes in float32 whatever the training precision (model.json says which):
    # evaluate, export and predict get one model that runs on every CPU and converts to TFLite.
    model = float32_model(model)
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
        "precision": precision,  # the policy used (params' auto resolved)
        "precision_setting": cfg.train.precision,
        "precision_reason": precision_reason,
        "threads": threads,
        "jit_compile": jit_compile,
        "distribute": dist.describe(),
        "train_dataset": {"path": str(train_dir.relative_to(layout.root)),
                          "checksum": manifest["checksum"], "count": manifest["counts"]["train"]},
        "val_dataset": {"checksum": val_manifest["checksum"],
                        "count": val_manifest["counts"]["val"]},
        "kept_epoch_metrics": {k: float(v[best]) for k, v in final.items()},
    }
    if weights is not None:  # the weights each class's loss had (balanced: as computed)
        meta["class_weights"] = class_weights.as_mapping(weights, names)
    if start is not None:  # where the weights came from (models starting from pretrained ones)
        meta["start_weights"] = start
    if fine_tuning:  # what trained when (history.csv's trainable_params: per epoch)
        meta["fine_tuning"] = [{"epochs": [p.start + 1, p.end], "trainable": p.describe(),
                                "learning_rate": p.learning_rate} for p in plan]
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
