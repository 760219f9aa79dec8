"""`visionpipe benchmark`: how fast each model trains and serves on this machine, and why.

For every model in params.yaml (or those chosen), in one process and one run:

- training images/s: the production input pipeline (``data.pipeline.model_dataset`` with the
  model's cache, shuffle and prefetch params) feeding ``model.fit``, timed per epoch;
- the in-memory ideal: the same model and batches from tensors already in memory
  (``from_tensor_slices(...).cache()``), which bounds what any input pipeline can reach;
- a naive keras-io style pipeline: decode every epoch, no parallel calls, no cache, no
  prefetch;
- the input pipeline alone (first, decoding pass and cached passes);
- inference images/s in Keras, the SavedModel and TFLite, at batch 1 and the eval batch;
- FLOPs per image (TF profiler) and the achieved FLOP/s as a share of a float32 matmul peak
  measured by a probe in the same run;
- process peak memory; MLflow + codecarbon on against off; epoch time against dataset size
  (1x, 2x, 4x) and image size (native and half);
- precision: the model in float32 and in a mixed policy (mixed_bfloat16 on a CPU, the
  ``precision: auto`` choice where that is not float32), images/s and the headline test metric
  after the same short training from the same weights, with a verdict;
- threads: training images/s under a few (intra-op, inter-op) thread counts, each in a child
  process of its own (TensorFlow fixes them when its runtime starts);
- with ``--compare``: each model's images/s and share of the matmul peak beside an earlier
  benchmark.json's; with a GPU: per-model GPU rows (rates, share of the GPU's matmul peak in
  float32 and in the model's precision, device memory).

Models are built from params with random weights (speed does not depend on the weights).
Timed epochs cover a subset of each task's train split (``Settings.images``) so the run
stays in minutes; every figure is a median over ``repeats`` epochs or passes, and the
comparisons are ratios taken in the same run, as the machine may be busy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import pickle
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from visionpipe.config import Params
from visionpipe.layout import Layout
from visionpipe.timing import cores

TARGETS = {
    "train_vs_ideal": 0.95,      # training img/s >= 0.95x the in-memory ideal
    "train_vs_naive": 1.5,       # training img/s >= 1.5x the naive pipeline
    "input_vs_train": 3.0,       # input pipeline (cached passes) >= 3x training img/s
    "tracking_slowdown": 0.03,   # tracking on at most 3% slower than off
    "resnet_peak_fraction": 0.55,  # ResNet training FLOP/s >= 55% of the matmul peak
}
# The mixed policy keeps "the same quality" when its headline test metric (higher is better)
# is within this much (absolute) of float32's after the same short training.
PRECISION_TOLERANCE = 0.02
SECTIONS = ("precision", "threads", "scaling")  # what --skip may leave out

CONVENTIONS = {
    "flops": "forward FLOPs per image from the TensorFlow profiler (float_operation) on the "
             "frozen graph of model(x, training=False) at batch 1: a multiply-add counts 2 "
             "(a Dense layer of in->out units: 2*in*out, a Conv2D: 2*kh*kw*cin*cout per "
             "output pixel), element-wise ops (bias, batch norm, activations, softmax) 1 per "
             "element as the profiler counts them",
    "training_flops": "training FLOPs per image = 3 x forward (forward, then gradients with "
                      "respect to activations and to weights, each about one forward); the "
                      "optimizer update is not counted",
    "achieved_flops": "training images/s x training FLOPs per image",
    "peak": "float32 tf.matmul of n x n matrices (2*n^3 FLOPs each), median GFLOP/s over "
            "repeats for each n, best n kept; probed at the start and the end of the run, the "
            "higher of the two is the peak; the same probe in bfloat16/float16 (at the start) "
            "for the compute dtype of every mixed policy the run uses or compares; larger n "
            "on a GPU, where TensorFlow runs float32 matmuls in TF32 on Ampere and later "
            "unless that is turned off (gpu.tf32_matmul says which)",
    "training_rate": "images of the timed epochs / their wall time (on_epoch_begin to "
                     "on_epoch_end, no validation); the first epoch of a model (tracing, "
                     "cold cache) is a warm-up and not timed",
    "input_rate": "the production dataset iterated alone, batches pulled to the host; "
                  "cold: the first pass (decodes, fills the cache), warm: later passes",
    "inference_rate": "images per second of repeated calls on test images at a fixed batch, "
                      "after warm-up; TFLite runs one image per invoke (as on a device), so its "
                      "eval-batch figure is batch-1 invokes in a loop",
    "peak_memory": "process resident set high-water mark (VmHWM from /proc/self/status, reset "
                   "through /proc/self/clear_refs before each model): host memory of the whole "
                   "process (TensorFlow runtime, cached decoded images, model, optimizer); on a "
                   "GPU the device's peak from tf.config.experimental.get_memory_info as well; "
                   "the precision comparison runs first and its second model is dropped "
                   "before the mark is reset for memory_training",
    "precision": "float32 against a mixed policy, same weights, each model with its own "
                 "copy of the production pipeline (same seed: the same batches every epoch), "
                 "epochs taking turns; the training is the benchmark's subset for 1 + "
                 "precision_repeats epochs, then the task's headline test metric (as the "
                 "evaluate stage computes it) on the whole test split and the loss on the val "
                 "split; verdict 'faster at the same quality' only when the mixed policy "
                 "trains more images/s and its metric is within PRECISION_TOLERANCE",
    "threads": "tf.config.threading intra-op / inter-op counts (0: TensorFlow's default), "
               "set before the runtime starts in a child process per setting; the child "
               "measures as the main figures do (warm-up epoch, then repeats timed epochs of "
               "the production pipeline on the same subset); settings run one after another, "
               "not interleaved",
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """How much to measure: the full run (the defaults) or ``--quick`` (a smoke run)."""

    repeats: int = 4  # timed epochs, passes or call loops per figure; medians over them
    # Images per timed epoch, per task: the first records of the train split.
    images: tuple[tuple[str, int], ...] = (("classification", 1024), ("segmentation", 384),
                                           ("detection", 192))
    inference_seconds: float = 0.5  # wall time of one timed inference loop
    inference_batch: int | None = None  # None: evaluate.batch_size
    matmul_sizes: tuple[int, ...] = (1024, 2048)
    matmul_seconds: float = 1.0
    scaling_model: str = "resnet"  # the model timed at 1x/2x/4x data and two image sizes
    scaling_images: int = 512  # images of the 1x dataset
    # Precision comparison: timed epochs of each policy after one shared warm-up epoch (all
    # of them train: 1 + precision_repeats epochs on the subset before the quality check).
    precision_repeats: int = 2
    # Thread settings: the models each child times (the cheapest dense and convolutional
    # model to trace, and the detector, whose many small ops gain most from running several
    # at once), and the (intra_op, inter_op) pairs; None: derived from the core count.
    thread_models: tuple[str, ...] = ("mlp", "vgg", "yolo")
    thread_pairs: tuple[tuple[int, int], ...] | None = None
    gpu_matmul_sizes: tuple[int, ...] = (4096, 8192)  # a GPU needs larger matrices to fill
    skip: tuple[str, ...] = ()  # sections of SECTIONS left out
    quick: bool = False

    def images_for(self, task: str) -> int:
        return dict(self.images)[task]


QUICK = Settings(repeats=1, images=(("classification", 64), ("segmentation", 32),
                                    ("detection", 32)),
                 inference_seconds=0.05, inference_batch=16, matmul_sizes=(256, 512),
                 matmul_seconds=0.1, scaling_images=32, precision_repeats=1,
                 thread_models=("mlp",), thread_pairs=((0, 0), (1, 1)),
                 gpu_matmul_sizes=(1024, 2048), quick=True)


# --------------------------------------------------------------------------- measurements


def _median(values) -> float:
    return float(statistics.median(values))


def matmul_peak(sizes: tuple[int, ...], repeats: int, seconds: float,
                dtype: str = "float32") -> dict:
    """GFLOP/s of ``tf.matmul`` on n x n ``dtype`` matrices (on the default device: the GPU
    where there is one): the median of ``repeats`` timed loops for each n; the best n is this
    machine's peak for dense compute in that dtype."""
    import tensorflow as tf

    by_size = {}
    for n in sizes:
        a = tf.cast(tf.random.uniform((n, n), dtype=tf.float32), dtype)
        b = tf.cast(tf.random.uniform((n, n), dtype=tf.float32), dtype)
        tf.matmul(a, b).numpy()  # warm-up: thread pools, oneDNN primitives
        start = time.perf_counter()
        tf.matmul(a, b).numpy()
        calls = max(1, math.ceil(seconds / max(time.perf_counter() - start, 1e-6)))
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                c = tf.matmul(a, b)
            c.numpy()
            rates.append(2 * n**3 * calls / (time.perf_counter() - start) / 1e9)
        by_size[str(n)] = {"gflops": _median(rates), "repeats": rates, "calls": calls}
    best = max(by_size, key=lambda k: by_size[k]["gflops"])
    return {"gflops": by_size[best]["gflops"], "best_n": int(best), "by_size": by_size,
            "dtype": dtype}


def flops(model, input_shape: tuple[int, ...]) -> dict:
    """Forward FLOPs per image (the TF profiler count of cost.flops_per_image) and the
    training FLOPs per image, 3x forward (CONVENTIONS)."""
    from visionpipe.cost import flops_per_image

    forward = int(flops_per_image(model, tuple(input_shape)))
    return {"forward_per_image": forward, "training_per_image": 3 * forward}


def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_memory() -> bool:
    """Reset the process's RSS high-water mark (Linux: /proc/self/clear_refs, value 5) and the
    GPU's peak; False when the host mark cannot be reset (it then counts from process start)."""
    import tensorflow as tf

    for gpu in tf.config.list_logical_devices("GPU"):
        with contextlib.suppress(Exception):
            tf.config.experimental.reset_memory_stats(gpu.name)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory(reset: bool) -> dict:
    """Host RSS now and its high-water mark (bytes); GPU peak bytes where there is a GPU."""
    import resource

    import tensorflow as tf

    hwm = _status_kb("VmHWM")
    out = {"rss_bytes": _status_kb("VmRSS"),
           "peak_rss_bytes": hwm if hwm is not None else
           resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "peak_since": "reset before this model" if reset and hwm is not None
           else "process start"}
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        with contextlib.suppress(Exception):
            out["gpu_peak_bytes"] = int(tf.config.experimental.get_memory_info(
                gpus[0].name)["peak"])
    return out


def iterate(ds) -> tuple[float, int]:
    """Seconds to pull every batch of ``ds`` to the host, and the images in them."""
    import tensorflow as tf

    start, images = time.perf_counter(), 0
    for batch in ds:
        images += int(tf.nest.flatten(batch)[0].shape[0])
    return time.perf_counter() - start, images


def input_pipeline(ds, repeats: int) -> dict:
    """The dataset alone: the first pass (decode and fill the cache), then cached passes."""
    cold_s, images = iterate(ds)
    warm = [iterate(ds)[0] for _ in range(repeats)]
    return {"images": images, "cold_seconds": cold_s, "cold_images_per_s": images / cold_s,
            "warm_seconds": warm, "warm_images_per_s": images / _median(warm)}


def _epoch_timer():
    import keras

    class EpochTimer(keras.callbacks.Callback):
        """Wall time of each epoch, begin to end (after the other callbacks' epoch end)."""

        def __init__(self):
            super().__init__()
            self.times: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.times.append(time.perf_counter() - self._start)

    return EpochTimer()


def timed_fit(model, ds, images_per_epoch: int, repeats: int, warmup: int = 0,
              callbacks: tuple = ()) -> dict:
    """``model.fit`` for ``warmup + repeats`` epochs; the last ``repeats`` are timed."""
    timer = _epoch_timer()
    start = time.perf_counter()
    # shuffle=False: the datasets shuffle themselves, as in the train stage.
    model.fit(ds, epochs=warmup + repeats, shuffle=False, verbose=0,
              callbacks=[*callbacks, timer])
    total = time.perf_counter() - start
    timed = timer.times[warmup:]
    median = _median(timed)
    return {"images_per_epoch": images_per_epoch, "epoch_seconds": timed,
            "warmup_epoch_seconds": timer.times[:warmup], "median_epoch_seconds": median,
            "images_per_s": images_per_epoch / median, "fit_seconds": total}


def merge_fits(fits: list[dict]) -> dict:
    """One figure from several one-epoch ``timed_fit`` results: the median epoch."""
    times = [t for f in fits for t in f["epoch_seconds"]]
    images = fits[0]["images_per_epoch"]
    median = _median(times)
    return {"images_per_epoch": images, "epoch_seconds": times,
            "median_epoch_seconds": median, "images_per_s": images / median,
            "fit_seconds": sum(f["fit_seconds"] for f in fits)}


def inference_rate(fn, batch: np.ndarray, seconds: float, repeats: int) -> dict:
    """Images/s of ``fn(batch)`` (which returns host arrays): warm-up calls, then ``repeats``
    loops of about ``seconds`` each; the median loop."""
    fn(batch)
    fn(batch)
    start = time.perf_counter()
    fn(batch)
    calls = max(1, math.ceil(seconds / max(time.perf_counter() - start, 1e-6)))
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn(batch)
        rates.append(calls * len(batch) / (time.perf_counter() - start))
    return {"images_per_s": _median(rates), "batch_size": len(batch), "calls": calls,
            "repeats": rates}


# --------------------------------------------------------------------------- datasets


def subset_split(src: Path, split: str, count: int, dst: Path) -> int:
    """A dataset folder ``dst`` holding the first ``count`` records of ``src``'s split (the
    bytes as stored, same manifest otherwise), so the production pipeline reads it as is."""
    import tensorflow as tf

    from visionpipe.data import records

    manifest = records.read_manifest(src)
    files = [str(p) for p in records.shard_paths(src, split)]
    shard_size = int(manifest.get("shard_size") or 1000)
    dst.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    writer = None
    n = 0
    for n, rec in enumerate(tf.data.TFRecordDataset(files).take(count), start=1):
        if (n - 1) % shard_size == 0:
            if writer is not None:
                writer.close()
            names.append(f"{split}-{len(names):05d}.tfrecord")
            writer = tf.io.TFRecordWriter(str(dst / names[-1]))
        writer.write(rec.numpy())
    if writer is not None:
        writer.close()
    records.write_json(dst / records.MANIFEST, {
        **manifest, "counts": {**manifest.get("counts", {}), split: n},
        "splits": {split: {"count": n, "shards": names}}})
    return n


def naive_dataset(data_dir: Path, io, batch_size: int, shuffle_buffer: int, seed: int,
                  padding=None):
    """A keras-io style pipeline: parse and decode every record every epoch with plain
    ``map`` (no num_parallel_calls), shuffle, batch; no cache, no prefetch. tf.data's
    default options apply, as they would to such a script. ``padding``: the task's
    padding_values()."""
    import tensorflow as tf

    from visionpipe.data.pipeline import parse_record
    from visionpipe.data.records import shard_paths

    ds = tf.data.TFRecordDataset([str(p) for p in shard_paths(data_dir, "train")])
    ds = ds.map(parse_record).map(io).shuffle(shuffle_buffer, seed=seed)
    return (ds.batch(batch_size) if padding is None
            else ds.padded_batch(batch_size, padding_values=padding))


def in_memory_dataset(ds, padding=None):
    """The full batches of one pass of ``ds``, held in memory as tensors and served by
    ``from_tensor_slices(...).cache()`` (one element per batch), with ``ds``'s element
    spec (so ``fit`` reuses its traced step); returns the dataset and its image count."""
    import tensorflow as tf

    batches = [b for b in ds.as_numpy_iterator()]
    size = max(len(tf.nest.flatten(b)[0]) for b in batches)
    batches = [b for b in batches if len(tf.nest.flatten(b)[0]) == size]
    flat = [tf.nest.flatten(b) for b in batches]
    pads = tf.nest.flatten(padding) if padding is not None else [0] * len(flat[0])
    leaves = []
    for i, pad in enumerate(pads):
        arrays = [f[i] for f in flat]
        shape = np.max([a.shape for a in arrays], axis=0)
        leaves.append(np.stack([np.pad(a, [(0, s - d) for s, d in zip(shape, a.shape,
                                                                           strict=True)],
                                       constant_values=pad) for a in arrays]))
    spec = ds.element_spec

    def relax(*element):  # the production pipeline's (partly unknown) shapes
        element = element if len(element) > 1 else element[0]
        return tf.nest.map_structure(
            lambda t, s: tf.compat.v1.placeholder_with_default(t, s.shape), element, spec)

    memory = tf.data.Dataset.from_tensor_slices(tf.nest.pack_sequence_as(batches[0], leaves))
    memory = memory.cache().map(relax).prefetch(tf.data.AUTOTUNE)
    return memory, size * len(batches)


def resized_io(io, size: tuple[int, int]):
    """``io`` with the image resized to ``size`` (classification: the target is unchanged)."""
    import tensorflow as tf

    def fn(rec):
        x, y = io(rec)
        return tf.image.resize(x, size), y

    return fn


# --------------------------------------------------------------------------- one model


def _set_environ(values: dict[str, str | None]) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@contextlib.contextmanager
def _environ(**values: str | None):
    """Environment variables set (None: removed) inside, restored afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        _set_environ(values)
        yield
    finally:
        _set_environ(saved)


def build(params: Params, name: str, input_shape: tuple[int, int, int], num_classes: int,
          steps_per_epoch: int, precision: str | None = None):
    """The model of ``name`` built and compiled as the train stage does (random weights), in
    ``precision`` (a Keras dtype policy; None: what params' precision resolves to here)."""
    from visionpipe.models.registry import create_model, parse_architecture
    from visionpipe.tasks.registry import task_for
    from visionpipe.training import dtype_policy, make_optimizer, resolve_precision

    cfg = params.model(name)
    architecture = parse_architecture(cfg.family, cfg.architecture,
                                      f"models.{name}.architecture")
    with dtype_policy(precision or resolve_precision(cfg.train.precision, cfg.family)[0]):
        model = create_model(cfg.family, input_shape, num_classes, architecture)
        task_for(cfg.family, cfg.task).compile(
            model, make_optimizer(cfg.train, steps_per_epoch), cfg.train, architecture,
            num_classes)
    return model


def tracked_fit(params: Params, name: str, layout: Layout, model, ds, images: int,
                repeats: int, tmp: Path) -> dict:
    """The fit with the train stage's tracking on: MLflow run (sqlite in ``tmp``), its epoch
    callback and system metrics, and codecarbon (offline) around it."""
    from visionpipe.stages.common import measure_co2
    from visionpipe.tracking.mlflow_runs import RunLogger

    root = tmp / "tracking"
    (root / "models" / name).mkdir(parents=True, exist_ok=True)
    if not (root / "data").exists():
        (root / "data").symlink_to(layout.root / "data")  # the run's dataset tags
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracking = dataclasses.replace(params.tracking, mlflow=True, codecarbon=True, uri=uri)
    tparams = dataclasses.replace(params, tracking=tracking)
    tlayout = Layout(root)
    with _environ(MLFLOW_TRACKING_URI=uri, DVC_ROOT=None):
        start = time.perf_counter()
        run = RunLogger(tparams, name, tlayout).start()
        start_s = time.perf_counter() - start
        callbacks = (run.keras_callback(),) if run.client is not None else ()
        with measure_co2(tparams, tlayout, name, "benchmark") as carbon, run.system_metrics():
            result = timed_fit(model, ds, images, repeats, callbacks=callbacks)
        start = time.perf_counter()
        run.finish("benchmark")
        finish_s = time.perf_counter() - start
    report = carbon.report
    return {**result, "run_start_seconds": start_s, "run_finish_seconds": finish_s,
            "mlflow_logged": run.client is not None and not run.not_logged,
            "system_metrics": params.tracking.system_metrics,
            "codecarbon_status": report.status, "cpu_power_mode": report.cpu_power_mode}


def _inference(params: Params, name: str, layout: Layout, model, size, class_names,
               settings: Settings, tmp: Path) -> dict:
    """Keras, SavedModel and TFLite images/s at batch 1 and at the eval batch."""
    import tensorflow as tf

    from visionpipe.cost import to_numpy
    from visionpipe.data import records
    from visionpipe.data.pipeline import test_arrays
    from visionpipe.formats import FIXED_SIGNATURE, WRITERS, write_saved_model
    from visionpipe.models.saving import float32_model
    from visionpipe.serving import SavedModelRunner, TFLiteRunner
    from visionpipe.tasks.registry import task_for

    model = float32_model(model)  # as train saves it: float32 whatever the training precision
    cfg = params.model(name)
    task = task_for(cfg.family, cfg.task)
    images, _, _ = test_arrays(layout.prepared(cfg.task), task.targets)
    images = images[:, :size[0], :size[1]]
    big = settings.inference_batch or params.evaluate.batch_size
    batches = {"batch_1": images[:1],
               "eval_batch": np.resize(images, (big, *images.shape[1:]))}
    out: dict = {}
    forward = tf.function(lambda x: model(x, training=False))
    out["keras"] = {k: inference_rate(lambda x: to_numpy(forward(x)), b,
                                      settings.inference_seconds, settings.repeats)
                    for k, b in batches.items()}
    out["keras"]["how"] = "tf.function of model(x, training=False), float32 input"

    formats = params.export_formats(name)
    manifest = records.read_manifest(layout.prepared(cfg.task))
    policy = manifest.get("resize") or params.prepare_for(cfg.task).resize
    model = task.export_model(model, params.export)
    archive = tmp / "saved_model"
    start = time.perf_counter()
    write_saved_model(task, model, tuple(size), class_names, policy, archive)
    export_s = time.perf_counter() - start
    runner = SavedModelRunner(archive, FIXED_SIGNATURE)
    out["saved_model"] = {k: inference_rate(runner.predict, b.astype(np.uint8),
                                            settings.inference_seconds, settings.repeats)
                          for k, b in batches.items()}
    out["saved_model"].update(how=f"signature {FIXED_SIGNATURE} (uint8 at the model's "
                                  "size, raw scores; the TFLite source)",
                              export_seconds=export_s,
                              shipped="yes" if "saved_model" in formats else
                              f"no: not in the export formats of {name}")
    if "tflite" not in formats:
        out["tflite"] = None
        out["tflite_reason"] = (f"tflite is not among models.{name}'s export formats "
                                f"({', '.join(formats)}): the project does not export it")
    else:
        path = tmp / "model.tflite"
        start = time.perf_counter()
        WRITERS["tflite"](path=path, archive=archive, representative=None)
        convert_s = time.perf_counter() - start
        lite = TFLiteRunner(path)
        out["tflite"] = {k: inference_rate(lite.predict, b.astype(np.uint8),
                                           settings.inference_seconds, settings.repeats)
                         for k, b in batches.items()}
        out["tflite"].update(how="tf.lite.Interpreter (serving.TFLiteRunner), float32 model, "
                                 "one image per invoke", convert_seconds=convert_s)
    return out


@dataclasses.dataclass(frozen=True)
class ModelInputs:
    """What training one model on its task's augmented train split needs."""

    cfg: object  # the model's ModelConfig
    task: object  # its Task
    src: Path  # the augmented train data
    manifest: dict
    names: list[str]  # class names
    size: tuple[int, int]  # (height, width)
    io: object  # record -> (inputs, targets), static image shape set
    padding: object  # the task's padding_values()


def model_inputs(params: Params, name: str, layout: Layout) -> ModelInputs:
    """The task, classes, image size and input function of ``name``, as the train stage
    reads them from the augmented data's manifest."""
    from visionpipe.data import records
    from visionpipe.data.pipeline import with_image_shape
    from visionpipe.tasks.registry import task_for

    cfg = params.model(name)
    task = task_for(cfg.family, cfg.task)
    src = layout.augmented(cfg.task)
    manifest = records.read_manifest(src)
    names = manifest["class_names"]
    h, w = (int(d) for d in manifest["image_size"])
    return ModelInputs(cfg=cfg, task=task, src=src, manifest=manifest, names=names, size=(h, w),
                       io=with_image_shape(task.to_model_io(len(names)), (h, w)),
                       padding=task.padding_values())


def compute_dtype(policy: str) -> str:
    """The dtype a Keras dtype policy computes in (mixed_bfloat16: bfloat16)."""
    return {"mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}.get(policy, policy)


def compared_policies(policy: str, auto: str) -> tuple[str, str]:
    """float32 and the mixed policy it is compared with: the production ``policy`` where it
    is mixed, else what ``precision: auto`` picks here where that is mixed, else
    mixed_bfloat16 (which runs on any CPU)."""
    return "float32", next(p for p in (policy, auto, "mixed_bfloat16") if p != "float32")


def precision_verdict(speedup: float, base: float | None, mixed: float | None,
                      tolerance: float = PRECISION_TOLERANCE) -> dict:
    """Faster or slower (``speedup``: the mixed policy's images/s over float32's) at the same,
    higher or lower quality (its headline metric against float32's, ``tolerance`` apart)."""
    speed = "faster" if speedup > 1 else "slower"
    if base is None or mixed is None or not (math.isfinite(base) and math.isfinite(mixed)):
        return {"metric_delta": None, "quality": "not comparable",
                "verdict": f"{speed}, quality not comparable (a test metric is missing)",
                "recommended": "float32"}
    delta = mixed - base
    quality = "the same" if abs(delta) <= tolerance else ("higher" if delta > 0 else "lower")
    better = speedup > 1 and quality != "lower"
    return {"metric_delta": delta, "quality": quality, "verdict": f"{speed} at {quality} quality",
            "recommended": "mixed" if better else "float32"}


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float, np.number)) else None


def quality(params: Params, m: ModelInputs, model, val_ds, test: tuple) -> dict:
    """The loss on the val split and the task's headline test metrics on ``test`` (images,
    truths), computed as the evaluate stage computes them."""
    from visionpipe.headline import test_metrics

    ev = params.evaluate
    val = model.evaluate(val_ds, verbose=0, return_dict=True)
    images, truths = test
    outputs = m.task.predict(m.task.evaluation_model(model, ev), images, ev.batch_size,
                             ev.tile_overlap)
    scores = m.task.evaluate(np.asarray(truths), outputs, m.names, ev)
    metrics = test_metrics(m.cfg.task)
    found = {k: _number(scores.get(k)) for k in metrics}
    return {"val_loss": float(val["loss"]), "test": found, "metric": found[metrics[0]]}


def error_line(exc: BaseException) -> str:
    """One line saying why ``exc`` was raised: its type and the line of its message that
    names the failing op where Keras wraps it (ANSI colours removed)."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = next((x for x in lines if "does not match" in x or "Op has type" in x),
                lines[0] if lines else "")
    return f"{type(exc).__name__}: {line}"[:400]


def compare_precision(params: Params, name: str, layout: Layout, settings: Settings, model,
                      policy: str, m: ModelInputs, data_dir: Path, images: int, steps: int,
                      tmp: Path) -> dict:
    """``model`` (built in ``policy``) against a copy with the same weights in the other of
    compared_policies(): training images/s of each, epochs taking turns, then the quality
    that training reached (CONVENTIONS["precision"]). A copy that cannot train in its policy
    is reported with the error (the production model's own failure is raised)."""
    import gc

    from visionpipe.data import records
    from visionpipe.data.pipeline import input_dataset, test_arrays
    from visionpipe.headline import primary
    from visionpipe.training import resolve_precision

    t = m.cfg.train
    auto, reason = resolve_precision("auto")
    compared = compared_policies(policy, auto)
    started = time.perf_counter()
    models, failed = {policy: model}, {}
    initial = model.get_weights()
    datasets = {}
    for p in compared:  # each its own pipeline, same seed: the same batches epoch by epoch
        (tmp / p).mkdir(parents=True, exist_ok=True)
        datasets[p], _ = input_dataset(data_dir, "train", m.io, t, params.seed, tmp / p,
                                       m.padding)
    print(f"benchmark@{name}: precision: warm-up epoch (tracing) of {' and '.join(compared)}",
          flush=True)
    warm = {}
    for p in compared:
        try:
            if p not in models:
                models[p] = build(params, name, (*m.size, 3), len(m.names), steps, p)
                models[p].set_weights(initial)
            warm[p] = timed_fit(models[p], datasets[p], images, 1)
        except Exception as exc:  # a family that cannot train in p: a finding, not a crash
            if p == policy:
                raise
            failed[p] = error_line(exc)
            models.pop(p, None)
    runs: dict[str, list[dict]] = {p: [] for p in models}
    for r in range(settings.precision_repeats):
        print(f"benchmark@{name}: precision: repeat {r + 1}/{settings.precision_repeats}: "
              f"{', '.join(models)}", flush=True)
        for p in models:
            runs[p].append(timed_fit(models[p], datasets[p], images, 1))
    print(f"benchmark@{name}: precision: test metric and val loss of "
          f"{' and '.join(models)}", flush=True)
    prepared = layout.prepared(m.cfg.task)
    (tmp / "val").mkdir(parents=True, exist_ok=True)
    val_ds, _ = input_dataset(prepared, "val", m.io, t, params.seed, tmp / "val", m.padding)
    test_images, truths, _ = test_arrays(prepared, m.task.targets)
    base, mixed = compared
    out: dict = {
        "compared": list(compared), "production": policy,
        "auto": {"policy": auto, "reason": reason},
        "how": (f"both from the same weights, trained on the first {images} train images for "
                f"1 + {settings.precision_repeats} epochs (the warm-up and the timed epochs), "
                f"then {primary(m.cfg.task)} on the {len(test_images)} test images and the "
                f"loss on the val split (conventions.precision)"),
        "images_per_epoch": images, "epochs_trained": 1 + settings.precision_repeats,
        "test_images": len(test_images),
        "val_images": int(records.read_manifest(prepared)["counts"]["val"]),
        "metric": primary(m.cfg.task), "tolerance": PRECISION_TOLERANCE,
    }
    # keras-cv's detector re-makes its train function when evaluation_model sets its NMS,
    # which would trace the production model's training step again; the step does not decode
    # boxes, so the traced one is kept.
    traced = model.train_function
    for p in compared:
        if p in failed:
            out[p] = {"error": failed[p], "compute_dtype": compute_dtype(p)}
            continue
        fit = merge_fits(runs[p])
        fit["warmup_epoch_seconds"] = warm[p]["epoch_seconds"]
        fit["compute_dtype"] = compute_dtype(p)
        start = time.perf_counter()
        fit.update(quality(params, m, models[p], val_ds, (test_images, truths)))
        fit["quality_seconds"] = time.perf_counter() - start
        out[p] = fit
    model.train_function = traced
    if failed:
        out.update(speedup=None, paired_speedup=None, val_loss_delta=None, metric_delta=None,
                   quality="not comparable", recommended=base,
                   verdict=f"does not train in {', '.join(failed)} ({'; '.join(failed.values())})")
    else:
        out["speedup"] = out[mixed]["images_per_s"] / out[base]["images_per_s"]
        out["paired_speedup"] = _median([b["images_per_s"] / a["images_per_s"] for a, b in
                                         zip(runs[base], runs[mixed], strict=True)])
        out["val_loss_delta"] = out[mixed]["val_loss"] - out[base]["val_loss"]
        out.update(precision_verdict(out["speedup"], out[base]["metric"],
                                     out[mixed]["metric"]))
        out["recommended"] = mixed if out["recommended"] == "mixed" else base
    out["seconds"] = time.perf_counter() - started
    models.clear()  # the other policy's model and the pipelines' caches go
    datasets.clear()
    gc.collect()
    return out


def benchmark_model(params: Params, name: str, layout: Layout, settings: Settings,
                    tmp: Path) -> dict:
    """Every per-model figure (module docstring) for ``name``."""
    from visionpipe.data.pipeline import input_dataset
    from visionpipe.training import resolve_precision

    m = model_inputs(params, name, layout)
    cfg = m.cfg
    t = cfg.train
    padding, names, io = m.padding, m.names, m.io
    h, w = m.size
    reset = reset_peak_memory()
    started = time.perf_counter()
    data_dir = tmp / "data"
    images = subset_split(m.src, "train", settings.images_for(cfg.task), data_dir)
    steps = math.ceil(images / t.batch_size)
    policy, why = resolve_precision(t.precision, cfg.family)
    result: dict = {
        "family": cfg.family, "task": cfg.task, "image_size": [h, w],
        "batch_size": t.batch_size, "train_images_per_epoch": images, "steps_per_epoch": steps,
        "train_split_images": int(m.manifest["counts"]["train"]),
        "cores": cores(),
        "train_params": {"cache": t.cache, "shuffle_buffer": t.shuffle_buffer,
                         "deterministic_input": t.deterministic_input,
                         "precision": t.precision, "precision_resolved": policy,
                         "precision_reason": why, "jit_compile": t.jit_compile,
                         "distribute": t.distribute},
    }
    ds, cache = input_dataset(data_dir, "train", io, t, params.seed, tmp, padding)
    result["train_params"]["cache_resolved"] = cache
    print(f"benchmark@{name}: input pipeline ({images} images)", flush=True)
    result["input_pipeline"] = input_pipeline(ds, settings.repeats)

    model = build(params, name, (h, w, 3), len(names), steps, policy)
    result["params"] = int(model.count_params())
    result["train_params"]["jit_compile_resolved"] = bool(model.jit_compile)
    if t.distribute != "none":
        result["train_params"]["distribute_note"] = "the benchmark trains on one device"
    if "precision" in settings.skip:
        result["precision"] = None
        print(f"benchmark@{name}: warm-up epoch (tracing)", flush=True)
        warmup = timed_fit(model, ds, images, 1)["epoch_seconds"]
    else:  # first: both policies start from the model's fresh weights
        result["precision"] = compare_precision(params, name, layout, settings, model, policy,
                                                m, data_dir, images, steps, tmp / "precision")
        warmup = result["precision"][policy]["warmup_epoch_seconds"]
        reset = reset_peak_memory() and reset  # without the other policy's model
    ideal_ds, ideal_images = in_memory_dataset(ds, padding)
    naive = naive_dataset(data_dir, io, t.batch_size, t.shuffle_buffer, params.seed, padding)
    naive_s, _ = iterate(naive)
    result["naive_input_images_per_s"] = images / naive_s  # the naive dataset alone, 1 pass
    # One epoch of each variant in turn, repeat after repeat: a machine whose load drifts
    # slows every variant alike, and each repeat gives a paired ratio.
    variants = {
        "training": lambda: timed_fit(model, ds, images, 1),
        "ideal": lambda: timed_fit(model, ideal_ds, ideal_images, 1),
        "naive": lambda: timed_fit(model, naive, images, 1),
        "tracking_on": lambda: tracked_fit(params, name, layout, model, ds, images, 1, tmp),
    }
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    for r in range(settings.repeats):
        print(f"benchmark@{name}: repeat {r + 1}/{settings.repeats}: production, in-memory "
              "ideal, naive, tracking on", flush=True)
        for key, fit in variants.items():
            runs[key].append(fit())
    ideal_ds = None  # frees the in-memory copy (the lambdas above read it when called)
    for key, fits in runs.items():
        result[key] = merge_fits(fits)
    result["training"]["warmup_epoch_seconds"] = warmup
    result["training"]["warmup_is"] = ("this model's first epoch, in the precision comparison"
                                       if result["precision"] else "its first epoch")
    on = result.pop("tracking_on")
    on.update({k: v for k, v in runs["tracking_on"][-1].items()
               if k not in on})  # status fields of the last tracked run
    result["tracking"] = {"on": on, "off": result["training"],
                          "off_is": "the production training epochs, interleaved with these"}
    result["paired"] = {  # medians of the per-repeat ratios of adjacent epochs
        "train_vs_ideal": _median([a["images_per_s"] / b["images_per_s"] for a, b in
                                   zip(runs["training"], runs["ideal"], strict=True)]),
        "train_vs_naive": _median([a["images_per_s"] / b["images_per_s"] for a, b in
                                   zip(runs["training"], runs["naive"], strict=True)]),
        "tracking_slowdown": _median([a["images_per_s"] / b["images_per_s"] - 1 for a, b in
                                      zip(runs["training"], runs["tracking_on"], strict=True)]),
        "epoch_spread": (max(result["training"]["epoch_seconds"])
                         / min(result["training"]["epoch_seconds"])),
    }
    result["memory_training"] = peak_memory(reset)

    print(f"benchmark@{name}: FLOPs and inference", flush=True)
    result["flops"] = flops(model, (h, w, 3))
    result["inference"] = _inference(params, name, layout, model, (h, w), names, settings,
                                     tmp / "export")
    result["memory"] = peak_memory(reset)
    result["seconds"] = time.perf_counter() - started
    result["_model"] = model  # scaling reuses it; dropped before writing
    result["_data"] = data_dir  # the subset, which the threads section's children read
    result["_io"] = io
    result["_padding"] = padding
    return result


def derive(result: dict, peak_gflops: float, peaks: dict[str, float] | None = None) -> dict:
    """Ratios and FLOP/s from one model's measurements (every ratio a quotient of rates
    reported beside it). ``peaks``: matmul GFLOP/s per dtype, for the share of the peak of
    the dtype the model computes in and of each policy of its precision comparison."""
    train = result["training"]["images_per_s"]
    ideal = result["ideal"]["images_per_s"]
    naive = result["naive"]["images_per_s"]
    warm = result["input_pipeline"]["warm_images_per_s"]
    on = result["tracking"]["on"]["images_per_s"]
    off = result["tracking"]["off"]["images_per_s"]
    per_image = result["flops"]["training_per_image"]
    achieved = train * per_image
    ideal_achieved = ideal * per_image
    out = {
        "train_vs_ideal": train / ideal,
        "train_vs_naive": train / naive,
        "input_vs_train": warm / train,
        "input_cold_vs_train": result["input_pipeline"]["cold_images_per_s"] / train,
        "tracking_on_vs_off": on / off,
        "tracking_slowdown": off / on - 1.0,
        "achieved_gflops": achieved / 1e9,
        "peak_fraction": achieved / (peak_gflops * 1e9),
        "ideal_peak_fraction": ideal_achieved / (peak_gflops * 1e9),
    }
    peaks = {"float32": peak_gflops, **(peaks or {})}
    dtype = compute_dtype(result["train_params"].get("precision_resolved", "float32"))
    if dtype != "float32" and dtype in peaks:
        out["own_dtype"] = dtype
        out["own_dtype_peak_fraction"] = achieved / (peaks[dtype] * 1e9)
    section = result.get("precision")
    if section:
        out["precision_peak_fraction"] = {}
        for p in section["compared"]:
            dt = compute_dtype(p)
            if dt in peaks and "error" not in section[p]:
                out["precision_peak_fraction"][p] = (section[p]["images_per_s"] * per_image
                                                     / (peaks[dt] * 1e9))
    return out


def scaling(params: Params, name: str, result: dict, settings: Settings, layout: Layout,
            tmp: Path) -> dict:
    """Epoch time of ``name`` at 1x, 2x and 4x ``settings.scaling_images`` train images
    (distinct records), and at 1x with the images resized to half their side."""
    from visionpipe.data import records
    from visionpipe.data.pipeline import input_dataset
    from visionpipe.tasks.registry import task_class

    cfg = params.model(name)
    t = cfg.train
    src = layout.augmented(cfg.task)
    available = int(records.read_manifest(src)["counts"]["train"])
    base = max(t.batch_size, min(settings.scaling_images, available // 4))
    model, io, padding = result["_model"], result["_io"], result["_padding"]
    out: dict = {"model": name, "base_images": base, "repeats": settings.repeats,
                 "how": "production pipeline + fit, the model already traced; one untimed "
                        "epoch first (cold cache)"}
    for k in (1, 2, 4):
        data = tmp / f"x{k}"
        images = subset_split(src, "train", base * k, data)
        ds, _ = input_dataset(data, "train", io, t, params.seed, data, padding)
        print(f"benchmark scaling: {name} at {k}x ({images} images)", flush=True)
        out[f"{k}x"] = timed_fit(model, ds, images, settings.repeats, warmup=1)
    out["epoch_time_2x_vs_1x"] = (out["2x"]["median_epoch_seconds"]
                                  / out["1x"]["median_epoch_seconds"])
    out["epoch_time_4x_vs_1x"] = (out["4x"]["median_epoch_seconds"]
                                  / out["1x"]["median_epoch_seconds"])
    h, w = result["image_size"]
    if not task_class(cfg.task).size_independent_targets:
        out["half_size"] = None
        out["half_size_reason"] = "image-size scaling needs targets that do not move with size"
        return out
    half = (h // 2, w // 2)
    manifest = records.read_manifest(src)
    model_half = build(params, name, (*half, 3), len(manifest["class_names"]),
                       math.ceil(base / t.batch_size))
    ds, _ = input_dataset(tmp / "x1", "train", resized_io(io, half), t, params.seed,
                          tmp / "half")
    print(f"benchmark scaling: {name} at {half[0]}x{half[1]}", flush=True)
    out["half_size"] = {"image_size": list(half), "params": int(model_half.count_params()),
                        "flops": flops(model_half, (*half, 3)),
                        **timed_fit(model_half, ds, out["1x"]["images_per_epoch"],
                                    settings.repeats, warmup=1)}
    out["native_size"] = {"image_size": [h, w], "median_epoch_seconds":
                          out["1x"]["median_epoch_seconds"]}
    out["epoch_time_half_vs_native"] = (out["half_size"]["median_epoch_seconds"]
                                        / out["1x"]["median_epoch_seconds"])
    return out


# --------------------------------------------------------------------------- threads

CHILD_TIMEOUT_S = 900  # one thread setting's child process (TensorFlow start, traces, epochs)


def thread_pairs(n: int) -> list[tuple[int, int]]:
    """(intra_op, inter_op) settings for ``n`` cores: TensorFlow's default (0, 0), all cores
    in one op and one op at a time (n, 1), a single thread (1, 1), all cores with two ops at
    once (n, 2), and one thread per op with ``n`` ops at once (1, n: threads auto's choice for
    a family registered with one_thread_per_op on a small CPU)."""
    pairs: list[tuple[int, int]] = []
    for pair in ((0, 0), (n, 1), (1, 1), (n, 2), (1, n)):
        if pair not in pairs:
            pairs.append(pair)
    return pairs


def pair_key(intra: int, inter: int) -> str:
    """``"intra/inter"``, the key of a thread setting in the report (0: TensorFlow's)."""
    return f"{intra}/{inter}"


def run_threads_child(params: Params, layout: Layout, data: dict[str, Path], repeats: int,
                      intra: int, inter: int, tmp: Path) -> dict:
    """One thread setting measured in a fresh Python process (threads_child); its report, or
    an ``error`` naming what went wrong."""
    from visionpipe import atomic

    tmp.mkdir(parents=True, exist_ok=True)
    spec_path, out_path = tmp / f"spec-{intra}-{inter}.pickle", tmp / f"out-{intra}-{inter}.json"
    spec = {"params": params, "root": str(layout.root), "repeats": repeats, "intra_op": intra,
            "inter_op": inter, "data": {m: str(p) for m, p in data.items()},
            "output": str(out_path)}
    with atomic.atomic_path(spec_path) as path:
        path.write_bytes(pickle.dumps(spec))
    entry: dict = {"intra_op": intra, "inter_op": inter, "loadavg_before": list(os.getloadavg())}
    start = time.perf_counter()
    command = [sys.executable, "-m", "visionpipe.benchmark", "--threads-child", str(spec_path)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, check=False,
                              timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        entry["error"] = f"the child process ran past {CHILD_TIMEOUT_S} s and was stopped"
        return entry
    entry["wall_seconds"] = time.perf_counter() - start
    if proc.returncode != 0 or not out_path.exists():
        last = [line for line in proc.stderr.splitlines() if line.strip()][-1:]
        entry["error"] = (f"the child process exited with {proc.returncode}: "
                          f"{last[0] if last else 'no message'}")
        return entry
    entry.update(json.loads(out_path.read_text()))
    return entry


def threads_child(spec_path: Path) -> None:
    """In a child process: set the thread counts before TensorFlow's runtime starts, then time
    each model as the main figures do; the report goes to the spec's ``output`` file."""
    from visionpipe import atomic
    from visionpipe.training import apply_threads

    spec = pickle.loads(Path(spec_path).read_bytes())
    params: Params = spec["params"]
    start = time.perf_counter()
    any_model = params.model(next(iter(spec["data"]))).train  # only the counts are read
    effect = apply_threads(dataclasses.replace(any_model, intra_op_threads=spec["intra_op"],
                                               inter_op_threads=spec["inter_op"]),
                           "benchmark threads")
    # After the counts are set: these start nothing, but nothing may run before them.
    from visionpipe.data import records
    from visionpipe.data.pipeline import input_dataset
    from visionpipe.stages.common import set_seed

    layout = Layout(Path(spec["root"]))
    tmp = Path(tempfile.mkdtemp(prefix="visionpipe-benchmark-threads-"))
    timed: dict = {}
    try:
        for name, data in spec["data"].items():
            set_seed(params.seed)
            m = model_inputs(params, name, layout)
            t = m.cfg.train
            (tmp / name).mkdir()
            ds, _ = input_dataset(Path(data), "train", m.io, t, params.seed, tmp / name,
                                  m.padding)
            images = int(records.read_manifest(Path(data))["counts"]["train"])
            model = build(params, name, (*m.size, 3), len(m.names),
                          math.ceil(images / t.batch_size))
            timed[name] = timed_fit(model, ds, images, spec["repeats"], warmup=1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    atomic.write_text(Path(spec["output"]), json.dumps(
        {"in_effect": {k: effect[k] for k in ("intra_op", "inter_op")}, "models": timed,
         "child_seconds": time.perf_counter() - start},
        default=_plain))


def thread_settings(params: Params, layout: Layout, results: dict, settings: Settings,
                    tmp: Path) -> dict:
    """Training images/s of a few models under each (intra_op, inter_op) setting, each
    setting in a child process (CONVENTIONS["threads"])."""
    import tensorflow as tf

    started = time.perf_counter()
    chosen = [m for m in settings.thread_models if m in results] or [next(iter(results))]
    pairs = list(settings.thread_pairs or thread_pairs(cores()))
    out: dict = {
        "how": CONVENTIONS["threads"], "cores": cores(), "models": chosen,
        "models_why": ("the models of settings.thread_models that this run benchmarks (else "
                       "its first model): each setting costs a TensorFlow start and a trace "
                       "of every model it times, so the cheapest dense and convolutional "
                       "models stand for the rest, with the detector, the model of many "
                       "small ops"),
        "main_process": {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                         "inter_op": tf.config.threading.get_inter_op_parallelism_threads()},
        "settings": []}
    for intra, inter in pairs:
        print(f"benchmark threads: intra_op {intra}, inter_op {inter} (0: TensorFlow's "
              f"default) for {', '.join(chosen)}, in a child process", flush=True)
        out["settings"].append(run_threads_child(
            params, layout, {m: results[m]["_data"] for m in chosen}, settings.repeats, intra,
            inter, tmp / pair_key(intra, inter).replace("/", "-")))
    done = [s for s in out["settings"] if "error" not in s]
    default = next((s for s in done if (s["intra_op"], s["inter_op"]) == (0, 0)), None)
    out["by_model"] = {}
    for m in chosen:
        rates = {pair_key(s["intra_op"], s["inter_op"]): s["models"][m]["images_per_s"]
                 for s in done}
        row: dict = {"images_per_s": rates,
                     "main_process_images_per_s": results[m]["training"]["images_per_s"]}
        if default is not None:
            base = default["models"][m]["images_per_s"]
            row["vs_default"] = {k: v / base for k, v in rates.items()}
        if rates:
            row["best"] = max(rates, key=rates.get)
        out["by_model"][m] = row
    out["errors"] = [f"{pair_key(s['intra_op'], s['inter_op'])}: {s['error']}"
                     for s in out["settings"] if "error" in s]
    out["seconds"] = time.perf_counter() - started
    return out


# --------------------------------------------------------------------------- before / after


def read_previous(path: Path) -> dict:
    """An earlier benchmark.json for ``--compare``; an error saying what to pass otherwise."""
    from visionpipe.errors import VisionpipeError

    hint = ("copy reports/benchmark.json aside before the run (cp reports/benchmark.json "
            "/tmp/benchmark-before.json) and pass the copy")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VisionpipeError(f"--compare {path}: no such file; {hint}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VisionpipeError(f"--compare {path}: not readable as JSON ({exc}); {hint}") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise VisionpipeError(f"--compare {path}: not a benchmark.json (no models section); "
                              f"{hint}")
    return data


def _figures(r: dict) -> dict:
    """A model's figures the before/after comparison shows (None where a run lacks one)."""
    return {"images_per_s": _number((r.get("training") or {}).get("images_per_s")),
            "peak_fraction": _number((r.get("derived") or {}).get("peak_fraction")),
            "batch_size": r.get("batch_size"),
            "train_images_per_epoch": r.get("train_images_per_epoch"),
            "image_size": r.get("image_size"),
            "precision": (r.get("train_params") or {}).get(
                "precision_resolved", (r.get("train_params") or {}).get("precision"))}


def _run_facts(report: dict) -> dict:
    env = report.get("environment") or {}
    return {"date": env.get("date"), "git_commit": env.get("git_commit"),
            "mode": report.get("mode"), "cpu_count": env.get("cpu_count"),
            "gpus": env.get("gpus"),
            "matmul_peak_gflops": _number((report.get("matmul_peak") or {}).get("gflops"))}


def compare_runs(previous: dict, path: Path, report: dict) -> dict:
    """Each model in both runs, by name: training images/s and share of the matmul peak before
    and after, with each run's batch size (the models' params may have changed between)."""
    out: dict = {"before": {"path": str(path), **_run_facts(previous)},
                 "after": _run_facts(report),
                 "how": "by model name; before: the --compare file, after: this run; each "
                        "share of the peak is against its own run's float32 matmul probe; "
                        "params may differ between the runs (batch size, images per timed "
                        "epoch and precision shown for each)",
                 "models": {},
                 "only_before": [m for m in previous["models"] if m not in report["models"]],
                 "only_after": [m for m in report["models"] if m not in previous["models"]]}
    for name, after in report["models"].items():
        before = previous["models"].get(name)
        if not isinstance(before, dict):
            continue
        b, a = _figures(before), _figures(after)
        row: dict = {"before": b, "after": a}
        if b["images_per_s"] and a["images_per_s"]:
            row["images_per_s_after_vs_before"] = a["images_per_s"] / b["images_per_s"]
        if b["peak_fraction"] is not None and a["peak_fraction"] is not None:
            row["peak_fraction_after_minus_before"] = a["peak_fraction"] - b["peak_fraction"]
        out["models"][name] = row
    return out


# --------------------------------------------------------------------------- GPU


def gpu_rows(report: dict, peaks: dict[str, float]) -> dict:
    """Per model on the GPU: training and inference images/s, the share of the GPU's matmul
    peak in float32 and in the dtype the model computes in, and the device's peak memory.
    (The whole run is on the GPU where there is one: these rows gather its GPU figures.)"""
    rows = {}
    for name, r in report["models"].items():
        d, inf = r["derived"], r["inference"]
        rows[name] = {
            "precision": r["train_params"]["precision_resolved"],
            "jit_compile": r["train_params"]["jit_compile_resolved"],
            "batch_size": r["batch_size"],
            "training_images_per_s": r["training"]["images_per_s"],
            "inference_images_per_s": {
                f"{f}_{b}": inf[f][b]["images_per_s"] for f in ("keras", "saved_model")
                for b in ("batch_1", "eval_batch")},
            "peak_fraction_float32": d["peak_fraction"],
            "own_dtype": d.get("own_dtype", "float32"),
            "peak_fraction_own_dtype": d.get("own_dtype_peak_fraction", d["peak_fraction"]),
            "gpu_peak_bytes_training": r["memory_training"].get("gpu_peak_bytes"),
            "gpu_peak_bytes": r["memory"].get("gpu_peak_bytes"),
        }
    import tensorflow as tf

    from visionpipe.training import gpu_devices

    return {"devices": gpu_devices(), "matmul_peak_gflops": peaks,
            "tf32_matmul": bool(tf.config.experimental.tensor_float_32_execution_enabled()),
            "models": rows}


# --------------------------------------------------------------------------- targets


def _target(name: str, model: str, value: float, limit: float, higher: bool) -> dict:
    met = value >= limit if higher else value <= limit
    entry = {"target": name, "model": model, "required": f"{'>=' if higher else '<='} {limit}",
             "value": value, "met": bool(met)}
    if not met:
        entry["missed_by"] = abs(limit - value)
        entry["missed_by_relative"] = abs(limit - value) / limit
    return entry


def targets(models: dict) -> list[dict]:
    """Each target of the issue with the measured value, met or not, and by how much."""
    out = []
    for name, r in models.items():
        d = r["derived"]
        checks = [_target("train_vs_ideal", name, d["train_vs_ideal"],
                          TARGETS["train_vs_ideal"], True),
                  _target("train_vs_naive", name, d["train_vs_naive"],
                          TARGETS["train_vs_naive"], True),
                  _target("input_vs_train", name, d["input_vs_train"],
                          TARGETS["input_vs_train"], True),
                  _target("tracking_slowdown", name, d["tracking_slowdown"],
                          TARGETS["tracking_slowdown"], False)]
        if r["family"] == "resnet":
            checks.append(_target("resnet_peak_fraction", name, d["peak_fraction"],
                                  TARGETS["resnet_peak_fraction"], True))
        for check in checks:
            if not check["met"]:
                check["why"] = _why(check["target"], r)
        out.extend(checks)
    return out


def _why(target: str, r: dict) -> str:
    """What the run's own figures say about a missed target."""
    d, p = r["derived"], r["paired"]
    noise = (f"production epochs of this run varied {p['epoch_spread']:.2f}x between "
             f"fastest and slowest (machine load, see environment.loadavg_*)")
    if target == "train_vs_ideal":
        return (f"paired per-repeat ratio {p['train_vs_ideal']:.2f}; the input pipeline alone "
                f"delivers {d['input_vs_train']:.1f}x the training rate, so it is not starved "
                f"of decoded images; not isolated by this run: the likely cost is tf.data's "
                f"own threads (shuffle, batch copy, prefetch) sharing {r['cores']} cores with "
                f"the training step; {noise}")
    if target == "train_vs_naive":
        return (f"paired per-repeat ratio {p['train_vs_naive']:.2f}; the naive dataset alone "
                f"delivers {r['naive_input_images_per_s']:.0f} img/s, "
                f"{r['naive_input_images_per_s'] / r['training']['images_per_s']:.1f}x what "
                f"the model trains on, so decoding every epoch with a plain map costs little "
                f"next to the model's steps (in-memory ideal "
                f"{r['ideal']['images_per_s']:.0f} img/s): the model is the bottleneck and "
                f"no pipeline can be 1.5x faster than the ideal allows; {noise}")
    if target == "input_vs_train":
        return ("the cached dataset pulled batch by batch to Python is slower than 3x "
                f"training; {noise}")
    if target == "tracking_slowdown":
        on = r["tracking"]["on"]
        return (f"paired per-repeat slowdown {p['tracking_slowdown']:+.1%}; "
                f"{on['median_epoch_seconds'] - r['training']['median_epoch_seconds']:+.2f} s "
                f"per timed epoch of {r['train_images_per_epoch']} images: the MLflow epoch "
                f"log, system-metrics sampling and the codecarbon thread cost a fixed time per "
                f"epoch and per second, a larger share of these short epochs than of a full "
                f"epoch of {r['train_split_images']} images; {noise}")
    if target == "resnet_peak_fraction":
        return (f"the in-memory ideal reaches {d['ideal_peak_fraction']:.0%} of the matmul "
                f"peak too, so the shortfall is in the model's own kernels, not the input: "
                f"at {r['image_size'][0]}x{r['image_size'][1]} with "
                f"{r['flops']['forward_per_image'] / 1e6:.0f} MFLOP per image the convolutions "
                f"(few channels), batch norm and element-wise ops run far below dense-matmul "
                f"efficiency; {noise}")
    return ""


# --------------------------------------------------------------------------- report


def environment(layout: Layout) -> dict:
    """What the figures depend on: versions, CPUs, GPUs, load, commit, date."""
    import keras
    import tensorflow as tf

    from visionpipe.tracking.mlflow_runs import git_commit

    return {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "git_commit": git_commit(layout.root),
            "python": platform.python_version(), "tensorflow": tf.__version__,
            "keras": keras.__version__, "machine": platform.machine(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "cores_available": cores(),
            "gpus": [g.name for g in tf.config.list_physical_devices("GPU")],
            "loadavg_before": list(os.getloadavg())}


def _public(result: dict) -> dict:
    return {k: v for k, v in result.items() if not k.startswith("_")}


def run(params: Params, layout: Layout, models: list[str] | None = None,
        output: Path | None = None, settings: Settings = Settings(),
        compare: Path | None = None, json_name: str = "benchmark.json") -> dict:
    """Benchmark ``models`` (default: every model in params); write ``json_name`` (and the
    PNG of the same stem) to ``output`` (default: ROOT/reports); return the report.
    ``compare``: an earlier benchmark.json to set each model's figures beside."""
    import tensorflow as tf

    from visionpipe.errors import ParamsError
    from visionpipe.stages.common import set_seed
    from visionpipe.tasks.registry import task_class
    from visionpipe.training import (
        apply_threads,
        cpu_bf16_flags,
        resolve_precision,
        resolve_threads,
    )

    models = list(models or params.models)
    unknown = [m for m in models if m not in params.models]
    if unknown:
        raise ParamsError(f"--models: unknown model(s) {', '.join(unknown)}; params.yaml has "
                          f"{', '.join(params.models)}")
    previous = read_previous(compare) if compare is not None else None
    output = Path(output) if output is not None else layout.root / "reports"
    # Before TensorFlow's runtime starts: the first model's thread counts for this process.
    first = params.model(models[0])
    threads = apply_threads(first.train, f"models.{models[0]}.train", first.family)
    if len({tuple(resolve_threads(params.model(m).train, params.model(m).family)[0].values())
            for m in models}) > 1:
        threads["note"] = (f"the models' thread counts differ; this process uses "
                           f"models.{models[0]}.train's (one setting per process; the "
                           f"threads section times each setting)")
    set_seed(params.seed)
    started = time.perf_counter()
    auto, reason = resolve_precision("auto")
    report: dict = {"schema": 2, "mode": "quick" if settings.quick else "full",
                    "environment": {**environment(layout), "threads": threads},
                    "settings": dataclasses.asdict(settings),
                    "conventions": CONVENTIONS, "targets_required": TARGETS,
                    "precision_auto": {"policy": auto, "reason": reason,
                                       "cpu_bf16_flags": cpu_bf16_flags()}}
    on_gpu = bool(tf.config.list_physical_devices("GPU"))
    sizes = settings.gpu_matmul_sizes if on_gpu else settings.matmul_sizes
    print("benchmark: matmul probe", flush=True)
    probe_start = matmul_peak(sizes, settings.repeats, settings.matmul_seconds)
    policies = {resolve_precision(params.model(m).train.precision, params.model(m).family)[0]
                for m in models}
    if "precision" not in settings.skip:
        policies |= {compared_policies(p, auto)[1] for p in policies}
    low = {}
    for dtype in sorted({compute_dtype(p) for p in policies} - {"float32"}):
        print(f"benchmark: matmul probe in {dtype}", flush=True)
        low[dtype] = matmul_peak(sizes, settings.repeats, settings.matmul_seconds, dtype)
    results: dict = {}
    tmp = Path(tempfile.mkdtemp(prefix="visionpipe-benchmark-"))
    try:
        for name in models:
            results[name] = benchmark_model(params, name, layout, settings, tmp / name)
        if "scaling" in settings.skip:
            report["scaling"] = None
        else:
            scale_name = (settings.scaling_model if settings.scaling_model in results else next(
                (m for m in models
                 if task_class(params.model(m).task).size_independent_targets), models[0]))
            report["scaling"] = scaling(params, scale_name, results[scale_name], settings,
                                        layout, tmp / "scaling")
        report["threads"] = (None if "threads" in settings.skip else
                             thread_settings(params, layout, results, settings, tmp / "threads"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("benchmark: matmul probe again", flush=True)
    probe_end = matmul_peak(sizes, settings.repeats, settings.matmul_seconds)
    peak = max(probe_start["gflops"], probe_end["gflops"])
    peaks = {"float32": peak, **{dt: probe["gflops"] for dt, probe in low.items()}}
    report["matmul_peak"] = {"gflops": peak, "dtype": "float32", "start": probe_start,
                             "end": probe_end, "by_dtype": peaks, "other_dtypes": low}
    for r in results.values():
        r["derived"] = derive(r, peak, peaks)
    report["models"] = {name: _public(r) for name, r in results.items()}
    report["targets"] = targets(report["models"])
    report["compare"] = (compare_runs(previous, Path(compare), report)
                         if previous is not None else None)
    report["gpu"] = gpu_rows(report, peaks) if on_gpu else None
    if not on_gpu:
        report["gpu_reason"] = "no GPU visible to TensorFlow: every figure is the CPU's"
    report["environment"]["loadavg_after"] = list(os.getloadavg())
    report["seconds"] = time.perf_counter() - started
    write(report, output, json_name)
    print(table(report))
    return report


def write(report: dict, output: Path, json_name: str = "benchmark.json") -> None:
    """``json_name`` (benchmark.json) and the PNG of the same stem in ``output``."""
    from visionpipe import atomic

    output.mkdir(parents=True, exist_ok=True)
    atomic.write_text(output / json_name, json.dumps(report, indent=2, default=_plain) + "\n")
    plot(report, output / Path(json_name).with_suffix(".png").name)


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def table(report: dict) -> str:
    """A short text table of the key figures."""
    head = (f"{'model':8} {'train':>8} {'ideal':>8} {'naive':>8} {'/ideal':>7} {'/naive':>7} "
            f"{'input':>8} {'keras1':>8} {'saved1':>8} {'tflite1':>8} {'GFLOP/img':>10} "
            f"{'%peak':>6} {'trk%':>6} {'peakMB':>7}")
    lines = [f"matmul peak {report['matmul_peak']['gflops']:.1f} GFLOP/s (float32); "
             "rates in images/s", head]
    for name, r in report["models"].items():
        d, inf = r["derived"], r["inference"]
        lite = inf["tflite"]["batch_1"]["images_per_s"] if inf["tflite"] else float("nan")
        lines.append(
            f"{name:8} {r['training']['images_per_s']:8.0f} {r['ideal']['images_per_s']:8.0f} "
            f"{r['naive']['images_per_s']:8.0f} {d['train_vs_ideal']:7.2f} "
            f"{d['train_vs_naive']:7.2f} {r['input_pipeline']['warm_images_per_s']:8.0f} "
            f"{inf['keras']['batch_1']['images_per_s']:8.0f} "
            f"{inf['saved_model']['batch_1']['images_per_s']:8.0f} {lite:8.0f} "
            f"{r['flops']['forward_per_image'] / 1e9:10.4f} {100 * d['peak_fraction']:6.1f} "
            f"{100 * d['tracking_slowdown']:6.1f} "
            f"{r['memory']['peak_rss_bytes'] / 2**20:7.0f}")
    missed = [t for t in report["targets"] if not t["met"]]
    lines.append(f"targets: {len(report['targets']) - len(missed)} met, {len(missed)} missed"
                 + "".join(f"\n  missed {t['target']} ({t['model']}): {t['value']:.3f}, "
                           f"required {t['required']}" for t in missed))
    for part in (precision_table, threads_table, compare_table, gpu_table):
        lines += part(report)
    return "\n".join(lines)


def _fmt(value, spec: str, width: int) -> str:
    return f"{value:{width}{spec}}" if isinstance(value, (int, float)) else f"{'-':>{width}}"


def precision_table(report: dict) -> list[str]:
    """float32 against the mixed policy per model: rates, their quotient, metric, verdict."""
    rows = [(n, r["precision"]) for n, r in report["models"].items() if r.get("precision")]
    if not rows:
        return []
    auto = report["precision_auto"]
    lines = [f"precision (auto here: {auto['policy']}; {auto['reason']}); quality after "
             f"{rows[0][1]['epochs_trained']} epochs of the subset, same within "
             f"{PRECISION_TOLERANCE} on the metric",
             f"{'model':8} {'mixed':>14} {'f32 img/s':>9} {'mix img/s':>9} {'mix/f32':>7} "
             f"{'metric':>9} {'f32':>6} {'mixed':>6} {'valloss':>13} verdict"]
    for name, p in rows:
        base, mixed = (p[k] for k in p["compared"])
        lines.append(
            f"{name:8} {p['compared'][1]:>14} {_fmt(base.get('images_per_s'), '.0f', 9)} "
            f"{_fmt(mixed.get('images_per_s'), '.0f', 9)} {_fmt(p['speedup'], '.2f', 7)} "
            f"{p['metric']:>9} {_fmt(base.get('metric'), '.3f', 6)} "
            f"{_fmt(mixed.get('metric'), '.3f', 6)} {_fmt(base.get('val_loss'), '.3f', 6)}/"
            f"{_fmt(mixed.get('val_loss'), '.3f', 6)} {p['verdict']}")
    return lines


def threads_table(report: dict) -> list[str]:
    """Training images/s per thread setting and model."""
    th = report.get("threads")
    if not th:
        return []
    keys = [pair_key(s["intra_op"], s["inter_op"]) for s in th["settings"]]
    lines = ["threads: training images/s per intra_op/inter_op (0: TensorFlow's default), "
             "one child process each",
             f"{'model':8} " + " ".join(f"{k:>8}" for k in keys) + f" {'main':>8} best"]
    for name, row in th["by_model"].items():
        lines.append(f"{name:8} " + " ".join(_fmt(row["images_per_s"].get(k), ".0f", 8)
                                             for k in keys)
                     + f" {row['main_process_images_per_s']:8.0f} {row.get('best', '-')}")
    lines += [f"  failed {e}" for e in th["errors"]]
    return lines


def compare_table(report: dict) -> list[str]:
    """Before (the --compare file) and after, per model: batch, images/s, share of peak."""
    cmp = report.get("compare")
    if not cmp:
        return []
    lines = [f"before ({cmp['before']['date']}, {cmp['before']['path']}) -> this run: "
             "training images/s and % of the float32 matmul peak",
             f"{'model':8} {'batch':>9} {'before':>8} {'after':>8} {'x':>6} "
             f"{'%pk bef':>7} {'%pk aft':>7}"]
    for name, row in cmp["models"].items():
        b, a = row["before"], row["after"]
        pct = {k: 100 * v["peak_fraction"] if v["peak_fraction"] is not None else None
               for k, v in (("b", b), ("a", a))}
        lines.append(f"{name:8} {str(b['batch_size']) + '->' + str(a['batch_size']):>9} "
                     f"{_fmt(b['images_per_s'], '.0f', 8)} {_fmt(a['images_per_s'], '.0f', 8)} "
                     f"{_fmt(row.get('images_per_s_after_vs_before'), '.2f', 6)} "
                     f"{_fmt(pct['b'], '.1f', 7)} {_fmt(pct['a'], '.1f', 7)}")
    for key in ("only_before", "only_after"):
        if cmp[key]:
            lines.append(f"  {key.replace('_', ' ')}: {', '.join(cmp[key])}")
    return lines


def gpu_table(report: dict) -> list[str]:
    """The GPU rows: rates, shares of the GPU's peaks, device memory."""
    gpu = report.get("gpu")
    if not gpu:
        return []
    devices = ", ".join(f"{d['device_name'] or d['name']} (cc {d['compute_capability']})"
                        for d in gpu["devices"])
    peaks = ", ".join(f"{k} {v:.0f}" for k, v in gpu["matmul_peak_gflops"].items())
    lines = [f"GPU {devices}; matmul peak GFLOP/s: {peaks}",
             f"{'model':8} {'precision':>15} {'train':>8} {'keras1':>8} {'kerasB':>8} "
             f"{'%pk f32':>7} {'%pk own':>7} {'GPU MB':>7}"]
    for name, g in gpu["models"].items():
        mem = g["gpu_peak_bytes"] / 2**20 if g["gpu_peak_bytes"] is not None else None
        lines.append(f"{name:8} {g['precision']:>15} {g['training_images_per_s']:8.0f} "
                     f"{g['inference_images_per_s']['keras_batch_1']:8.0f} "
                     f"{g['inference_images_per_s']['keras_eval_batch']:8.0f} "
                     f"{100 * g['peak_fraction_float32']:7.1f} "
                     f"{100 * g['peak_fraction_own_dtype']:7.1f} {_fmt(mem, '.0f', 7)}")
    return lines


def plot(report: dict, path: Path) -> None:
    """Six panels: training rates, inference rates, share of peak (and before, with
    --compare), scaling, float32 against the mixed policy, thread settings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from visionpipe import atomic

    models = report["models"]
    names = list(models)
    x = np.arange(len(names))
    fig, axes = plt.subplots(3, 2, figsize=(13, 13))
    ax = axes[0][0]
    series = {"production": [models[m]["training"]["images_per_s"] for m in names],
              "in-memory ideal": [models[m]["ideal"]["images_per_s"] for m in names],
              "naive": [models[m]["naive"]["images_per_s"] for m in names],
              "tracking on": [models[m]["tracking"]["on"]["images_per_s"] for m in names],
              "input alone": [models[m]["input_pipeline"]["warm_images_per_s"] for m in names]}
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        ax.bar(x + i * width - 0.4 + width / 2, values, width, label=label)
    ax.set(xticks=x, xticklabels=names, yscale="log", ylabel="images/s",
           title="Training (and input pipeline alone)")
    ax.legend(fontsize=8)

    ax = axes[0][1]
    fmts = [(f, b) for f in ("keras", "saved_model", "tflite") for b in ("batch_1", "eval_batch")]
    width = 0.8 / len(fmts)
    for i, (f, b) in enumerate(fmts):
        values = [(models[m]["inference"][f] or {}).get(b, {}).get("images_per_s", 0.0)
                  if models[m]["inference"].get(f) else 0.0 for m in names]
        ax.bar(x + i * width - 0.4 + width / 2, values, width, label=f"{f} {b}")
    ax.set(xticks=x, xticklabels=names, yscale="log", ylabel="images/s", title="Inference")
    ax.legend(fontsize=8)

    ax = axes[1][0]
    ax.bar(x - 0.2, [100 * models[m]["derived"]["peak_fraction"] for m in names], 0.4,
           label="production training")
    ax.bar(x + 0.2, [100 * models[m]["derived"]["ideal_peak_fraction"] for m in names], 0.4,
           label="in-memory ideal")
    ax.axhline(100 * TARGETS["resnet_peak_fraction"], color="k", ls="--", lw=1,
               label="ResNet target")
    before = (report.get("compare") or {}).get("models", {})
    shown = [(i, before[m]["before"]["peak_fraction"]) for i, m in enumerate(names)
             if m in before and before[m]["before"]["peak_fraction"] is not None]
    if shown:
        ax.plot([i - 0.2 for i, _ in shown], [100 * v for _, v in shown], "kx", ms=9,
                label=f"before ({report['compare']['before']['date']})")
    ax.set(xticks=x, xticklabels=names, ylabel="% of matmul peak",
           title=f"Achieved training FLOP/s (peak {report['matmul_peak']['gflops']:.0f} "
                 "GFLOP/s)")
    ax.legend(fontsize=8)

    ax = axes[1][1]
    sc = report.get("scaling") or {}
    if "1x" in sc:
        ks = [1, 2, 4]
        ax.plot(ks, [sc[f"{k}x"]["median_epoch_seconds"] for k in ks], "o-",
                label=f"{sc['model']}, native size")
        ax.plot(ks, [sc["1x"]["median_epoch_seconds"] * k for k in ks], ":", color="grey",
                label="linear")
        if sc.get("half_size"):
            ax.plot([1], [sc["half_size"]["median_epoch_seconds"]], "s",
                    label=f"half size {sc['half_size']['image_size']}")
        ax.set(xticks=ks, xlabel=f"dataset size (x {sc['base_images']} images)",
               ylabel="seconds per epoch", title="Scaling")
        ax.legend(fontsize=8)
    else:
        ax.set_axis_off()

    ax = axes[2][0]
    compared = [m for m in names if models[m].get("precision")]
    if compared:
        xs = np.arange(len(compared))
        for i in range(2):  # float32, then the mixed policy
            values, labels = [], set()
            for m in compared:
                p = models[m]["precision"]
                policy = p["compared"][i]
                labels.add(policy)
                values.append(p[policy].get("images_per_s", 0.0))  # 0: it does not train
            ax.bar(xs + (i - 0.5) * 0.4, values, 0.4, label=" / ".join(sorted(labels)))
        ax.set(xticks=xs, yscale="log", ylabel="training images/s",
               title=f"Precision (auto here: {report['precision_auto']['policy']})")
        ax.set_xticklabels([f"{m}\n" + (f"{p['speedup']:.2f}x, {p['quality']}"
                                         if p["speedup"] else "fails")
                            for m, p in ((m, models[m]["precision"]) for m in compared)],
                           fontsize=8)
        ax.legend(fontsize=8)
    else:
        ax.set_axis_off()

    ax = axes[2][1]
    th = report.get("threads")
    if th and th["by_model"]:
        keys = [pair_key(s["intra_op"], s["inter_op"]) for s in th["settings"]
                if "error" not in s]
        rows = list(th["by_model"])
        xs = np.arange(len(rows))
        width = 0.8 / max(1, len(keys))
        for i, k in enumerate(keys):
            ax.bar(xs + i * width - 0.4 + width / 2,
                   [th["by_model"][m]["images_per_s"][k] for m in rows], width,
                   label=f"intra/inter {k}")
        ax.set(xticks=xs, xticklabels=rows, ylabel="training images/s",
               title=f"Thread settings ({th['cores']} cores; 0: TensorFlow's default)")
        ax.legend(fontsize=8)
    else:
        ax.set_axis_off()
    env = report["environment"]
    fig.suptitle(f"visionpipe benchmark ({report['mode']}), {env['cpu_count']} CPUs, "
                 f"TF {env['tensorflow']}, {env['date']}, load {env['loadavg_before'][0]:.1f}")
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """``python -m visionpipe.benchmark --threads-child SPEC``: one setting of the threads
    section, run by ``visionpipe benchmark`` in a process of its own."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m visionpipe.benchmark",
        description="The child process of `visionpipe benchmark`'s thread settings (run "
                    "`visionpipe benchmark` instead).")
    parser.add_argument("--threads-child", type=Path, required=True, metavar="SPEC",
                        help="the pickled spec the parent wrote")
    threads_child(parser.parse_args(argv).threads_child)
    return 0


if __name__ == "__main__":
    sys.exit(main())
