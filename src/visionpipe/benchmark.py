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
  (1x, 2x, 4x) and image size (native and half).

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
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from visionpipe.config import Params
from visionpipe.cost import cores
from visionpipe.layout import Layout

TARGETS = {
    "train_vs_ideal": 0.95,      # training img/s >= 0.95x the in-memory ideal
    "train_vs_naive": 1.5,       # training img/s >= 1.5x the naive pipeline
    "input_vs_train": 3.0,       # input pipeline (cached passes) >= 3x training img/s
    "tracking_slowdown": 0.03,   # tracking on at most 3% slower than off
    "resnet_peak_fraction": 0.55,  # ResNet training FLOP/s >= 55% of the matmul peak
}

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
            "higher of the two is the peak",
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
                   "GPU the device's peak from tf.config.experimental.get_memory_info as well",
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
    quick: bool = False

    def images_for(self, task: str) -> int:
        return dict(self.images)[task]


QUICK = Settings(repeats=1, images=(("classification", 64), ("segmentation", 32),
                                    ("detection", 32)),
                 inference_seconds=0.05, inference_batch=16, matmul_sizes=(256, 512),
                 matmul_seconds=0.1, scaling_images=32, quick=True)


# --------------------------------------------------------------------------- measurements


def _median(values) -> float:
    return float(statistics.median(values))


def matmul_peak(sizes: tuple[int, ...], repeats: int, seconds: float) -> dict:
    """float32 GFLOP/s of ``tf.matmul`` on n x n matrices: the median of ``repeats`` timed
    loops for each n; the best n is this machine's peak for dense compute."""
    import tensorflow as tf

    by_size = {}
    for n in sizes:
        a = tf.random.uniform((n, n), dtype=tf.float32)
        b = tf.random.uniform((n, n), dtype=tf.float32)
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
            "dtype": "float32"}


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
          steps_per_epoch: int):
    """The model of ``name`` built and compiled as the train stage does (random weights)."""
    from visionpipe.models.registry import create_model, parse_architecture
    from visionpipe.tasks.registry import task_for
    from visionpipe.training import dtype_policy, make_optimizer

    cfg = params.model(name)
    architecture = parse_architecture(cfg.family, cfg.architecture,
                                      f"models.{name}.architecture")
    with dtype_policy(cfg.train.precision):
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
    from visionpipe.serving import SavedModelRunner, TFLiteRunner
    from visionpipe.tasks.registry import task_for

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


def benchmark_model(params: Params, name: str, layout: Layout, settings: Settings,
                    tmp: Path) -> dict:
    """Every per-model figure (module docstring) for ``name``."""
    from visionpipe.data import records
    from visionpipe.data.pipeline import input_dataset, with_image_shape
    from visionpipe.tasks.registry import task_for

    cfg = params.model(name)
    t = cfg.train
    task = task_for(cfg.family, cfg.task)
    padding = task.padding_values()
    src = layout.augmented(cfg.task)
    manifest = records.read_manifest(src)
    names = manifest["class_names"]
    h, w = (int(d) for d in manifest["image_size"])
    io = with_image_shape(task.to_model_io(len(names)), (h, w))
    reset = reset_peak_memory()
    started = time.perf_counter()
    data_dir = tmp / "data"
    images = subset_split(src, "train", settings.images_for(cfg.task), data_dir)
    steps = math.ceil(images / t.batch_size)
    result: dict = {
        "family": cfg.family, "task": cfg.task, "image_size": [h, w],
        "batch_size": t.batch_size, "train_images_per_epoch": images, "steps_per_epoch": steps,
        "train_split_images": int(manifest["counts"]["train"]),
        "cores": cores(),
        "train_params": {"cache": t.cache, "shuffle_buffer": t.shuffle_buffer,
                         "deterministic_input": t.deterministic_input,
                         "precision": t.precision, "jit_compile": t.jit_compile,
                         "distribute": t.distribute},
    }
    ds, cache = input_dataset(data_dir, "train", io, t, params.seed, tmp, padding)
    result["train_params"]["cache_resolved"] = cache
    print(f"benchmark@{name}: input pipeline ({images} images)", flush=True)
    result["input_pipeline"] = input_pipeline(ds, settings.repeats)

    model = build(params, name, (h, w, 3), len(names), steps)
    result["params"] = int(model.count_params())
    result["train_params"]["jit_compile_resolved"] = bool(model.jit_compile)
    if t.distribute != "none":
        result["train_params"]["distribute_note"] = "the benchmark trains on one device"
    ideal_ds, ideal_images = in_memory_dataset(ds, padding)
    naive = naive_dataset(data_dir, io, t.batch_size, t.shuffle_buffer, params.seed, padding)
    naive_s, _ = iterate(naive)
    result["naive_input_images_per_s"] = images / naive_s  # the naive dataset alone, 1 pass
    print(f"benchmark@{name}: warm-up epoch (tracing)", flush=True)
    warm = timed_fit(model, ds, images, 1)
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
    result["training"]["warmup_epoch_seconds"] = warm["epoch_seconds"]
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
    result["_io"] = io
    result["_padding"] = padding
    return result


def derive(result: dict, peak_gflops: float) -> dict:
    """Ratios and FLOP/s from one model's measurements (every ratio a quotient of rates
    reported beside it)."""
    train = result["training"]["images_per_s"]
    ideal = result["ideal"]["images_per_s"]
    naive = result["naive"]["images_per_s"]
    warm = result["input_pipeline"]["warm_images_per_s"]
    on = result["tracking"]["on"]["images_per_s"]
    off = result["tracking"]["off"]["images_per_s"]
    achieved = train * result["flops"]["training_per_image"]
    ideal_achieved = ideal * result["flops"]["training_per_image"]
    return {
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
        output: Path | None = None, settings: Settings = Settings()) -> dict:
    """Benchmark ``models`` (default: every model in params); write benchmark.json and
    benchmark.png to ``output`` (default: ROOT/reports); return the report."""
    from visionpipe.errors import ParamsError
    from visionpipe.stages.common import set_seed
    from visionpipe.tasks.registry import task_class

    models = list(models or params.models)
    unknown = [m for m in models if m not in params.models]
    if unknown:
        raise ParamsError(f"--models: unknown model(s) {', '.join(unknown)}; params.yaml has "
                          f"{', '.join(params.models)}")
    output = Path(output) if output is not None else layout.root / "reports"
    set_seed(params.seed)
    started = time.perf_counter()
    report: dict = {"schema": 1, "mode": "quick" if settings.quick else "full",
                    "environment": environment(layout),
                    "settings": dataclasses.asdict(settings),
                    "conventions": CONVENTIONS, "targets_required": TARGETS}
    print("benchmark: matmul probe", flush=True)
    probe_start = matmul_peak(settings.matmul_sizes, settings.repeats, settings.matmul_seconds)
    results: dict = {}
    tmp = Path(tempfile.mkdtemp(prefix="visionpipe-benchmark-"))
    try:
        for name in models:
            results[name] = benchmark_model(params, name, layout, settings, tmp / name)
        scale_name = (settings.scaling_model if settings.scaling_model in results else next(
            (m for m in models if task_class(params.model(m).task).size_independent_targets),
            models[0]))
        report["scaling"] = scaling(params, scale_name, results[scale_name], settings,
                                    layout, tmp / "scaling")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("benchmark: matmul probe again", flush=True)
    probe_end = matmul_peak(settings.matmul_sizes, settings.repeats, settings.matmul_seconds)
    peak = max(probe_start["gflops"], probe_end["gflops"])
    report["matmul_peak"] = {"gflops": peak, "start": probe_start, "end": probe_end}
    for r in results.values():
        r["derived"] = derive(r, peak)
    report["models"] = {name: _public(r) for name, r in results.items()}
    report["targets"] = targets(report["models"])
    report["environment"]["loadavg_after"] = list(os.getloadavg())
    report["seconds"] = time.perf_counter() - started
    write(report, output)
    print(table(report))
    return report


def write(report: dict, output: Path) -> None:
    """benchmark.json and benchmark.png in ``output``."""
    from visionpipe import atomic

    output.mkdir(parents=True, exist_ok=True)
    atomic.write_text(output / "benchmark.json",
                      json.dumps(report, indent=2, default=_plain) + "\n")
    plot(report, output / "benchmark.png")


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
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Four panels: training rates, inference rates, share of peak, scaling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from visionpipe import atomic

    models = report["models"]
    names = list(models)
    x = np.arange(len(names))
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
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
    env = report["environment"]
    fig.suptitle(f"visionpipe benchmark ({report['mode']}), {env['cpu_count']} CPUs, "
                 f"TF {env['tensorflow']}, {env['date']}, load {env['loadavg_before'][0]:.1f}")
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
