"""params.yaml -> frozen dataclasses; unknown keys, wrong types and out-of-range values are errors.

Every error names the key (dotted path), the value found and what is allowed, on one line.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from visionpipe.errors import ParamsError

TASKS = ("classification", "segmentation", "detection")
# Segmentation catalog datasets whose mask values are known: value -> class name.
KNOWN_MASK_VALUES = {"oxford_iiit_pet": {1: "pet", 2: "background", 3: "border"}}


def spec(default: Any = dataclasses.MISSING, *, ge=None, gt=None, le=None, lt=None,
         min_len: int | None = None, max_len: int | None = None, factory=None) -> Any:
    """A dataclass field carrying the range a params value must lie in."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "min_len": min_len, "max_len": max_len}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class SplitSizes:
    """How many examples go to each split (generated sources) or which share (real data)."""

    train: float = spec(ge=0)
    val: float = spec(ge=0)
    test: float = spec(ge=0)


@dataclass(frozen=True)
class PrepareConfig:
    """prepare.<task>: where a task's data comes from and how it is split and stored."""

    source: Literal["shapes", "tfds", "folder", "pairs", "voc"] = "shapes"
    tfds_name: str | None = None
    tfds_data_dir: str | None = None
    # folder: one sub-folder per class; pairs: path/<images_dir>/<name>.png with
    # path/<masks_dir>/<name>.png; voc: path/<images_dir>/<name>.jpg with PASCAL VOC XML
    # path/<annotations_dir>/<name>.xml. Relative paths start at the project root; a .zip or
    # .tar(.gz) is extracted first. dvc.yaml lists it as prepare's dependency, so it must exist
    # even for the other sources.
    path: str = "data/raw"
    images_dir: str = "images"
    masks_dir: str = "masks"
    annotations_dir: str = "annotations"
    # Detection from voc: the classes, in id order (an object of another class is an error);
    # null: the sorted names found in the annotation files.
    class_names: tuple[str, ...] | None = spec(None, min_len=1)
    # Segmentation from pairs or tfds: mask pixel value -> class name, e.g. {255: cell,
    # 0: membrane}; class ids follow this order. Other values in a mask are an error.
    mask_values: dict[int, str] | None = None
    image_size: tuple[int, int] = spec((64, 64), ge=8, le=4096)
    # How an image of another shape reaches image_size: stretch (ignore aspect ratio), pad
    # (keep it, letterbox with black bars) or crop (keep it, fill and cut the centre).
    resize: Literal["stretch", "pad", "crop"] = "stretch"
    splits: SplitSizes = spec(factory=lambda: SplitSizes(4000, 500, 500))
    shard_size: int = spec(1000, ge=1)
    # Segmentation: cut train and val images into non-overlapping crops of this size (what
    # the model trains on); test images stay at image_size and evaluate predicts them with
    # overlapping tiles (evaluate.tile_overlap).
    crop_size: tuple[int, int] | None = spec(None, ge=8, le=4096)


@dataclass(frozen=True)
class AugmentConfig:
    """augment.<task>: how many augmented copies of the train split, and which transforms."""

    copies: int = spec(1, ge=0, le=100)
    keep_original: bool = True
    flip_horizontal: bool = True
    flip_vertical: bool = False
    scale: tuple[float, float] = spec((1.0, 1.0), gt=0, le=4)
    translate: float = spec(0.0, ge=0, le=0.5)
    rotate: float = spec(0.0, ge=0, le=180)
    brightness: float = spec(0.0, ge=0, le=1)
    contrast: float = spec(0.0, ge=0, le=1)
    noise: float = spec(0.0, ge=0, le=100)
    # Detection: a box moved partly out of the image is clipped to it, or dropped when less
    # than this share of its area stays inside (drops are counted in the manifest).
    box_min_visible: float = spec(0.25, ge=0, le=1)
    preview: int = spec(16, ge=1, le=256)


@dataclass(frozen=True)
class TrainConfig:
    """models.<name>.train: how one model is fitted."""

    epochs: int = spec(10, ge=1, le=10000)
    batch_size: int = spec(64, ge=1, le=65536)
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    learning_rate: float = spec(1e-3, gt=0, le=10)
    momentum: float = spec(0.9, ge=0, lt=1)
    weight_decay: float = spec(0.0, ge=0, le=1)
    label_smoothing: float = spec(0.0, ge=0, lt=1)
    # Learning rate over training: constant; step (times step_factor every step_epochs);
    # cosine (down to min_learning_rate); warmup_cosine (linear from 0 over warmup_epochs,
    # then cosine). Schedules advance every batch.
    lr_schedule: Literal["constant", "step", "cosine", "warmup_cosine"] = "constant"
    warmup_epochs: float = spec(1.0, ge=0, le=10000)
    step_epochs: int = spec(10, ge=1, le=10000)
    step_factor: float = spec(0.1, gt=0, le=1)
    min_learning_rate: float = spec(0.0, ge=0, le=10)
    # The validation figure that picks the best epoch (lowest loss or highest accuracy) for
    # restore_best and early stopping.
    monitor: Literal["val_loss", "val_accuracy", "val_mean_iou"] = "val_loss"
    # Stop after this many epochs without a better monitored value (0: train all epochs).
    early_stopping_patience: int = spec(0, ge=0, le=10000)
    early_stopping_min_delta: float = spec(0.0, ge=0)  # smaller improvements don't count
    shuffle_buffer: int = spec(10000, ge=1)
    restore_best: bool = True  # final model = the best epoch by `monitor`
    # Segmentation: per-pixel cross_entropy, soft dice, or ce_dice (their sum); class_weights
    # (one per class, in class order) weight both. Classification uses cross-entropy.
    loss: Literal["cross_entropy", "dice", "ce_dice"] = "cross_entropy"
    class_weights: tuple[float, ...] | None = spec(None, ge=0, le=1000, min_len=1)
    # TensorFlow op determinism: same params and seed give the same weights, run after run,
    # on any device. Off by default: on this 2-core CPU it made training about 2x slower, and
    # CPU runs here already repeat bit for bit without it (docs/training.md, "Determinism").
    deterministic: bool = False
    # Speed switches (docs/performance.md); each is recorded in model.json and MLflow.
    # precision: the Keras dtype policy. mixed_float16 (GPUs) trains with a LossScaleOptimizer;
    # mixed_bfloat16 needs no loss scaling and also runs on CPUs. Softmax outputs stay float32.
    precision: Literal["float32", "mixed_float16", "mixed_bfloat16"] = "float32"
    # XLA compilation of the train step: auto is Keras' choice (on with a GPU, off on CPUs).
    jit_compile: bool | Literal["auto"] = "auto"
    # none: one device; mirrored: every GPU (or CPU device) of this machine, model.fit under
    # tf.distribute.MirroredStrategy; multi_worker: several machines, MultiWorkerMirroredStrategy
    # from TF_CONFIG (or SLURM), a custom training loop (docs/training.md, "Training on a cluster").
    # batch_size is the global batch, split over the replicas.
    distribute: Literal["none", "mirrored", "multi_worker"] = "none"
    # Decoded train/val images are cached after the first epoch: auto keeps them in memory
    # when they fit in cache_limit_mb and on disk (a temporary file) otherwise.
    cache: Literal["auto", "memory", "disk", "none"] = "auto"
    cache_limit_mb: int = spec(4096, ge=0)
    # tf.data parallel decoding keeps record order (with the seeded shuffle, the same batches
    # every run); false lets finished records jump the queue: faster, batches differ per run.
    deterministic_input: bool = True


@dataclass(frozen=True)
class ModelConfig:
    """models.<name>: one trained model: its family, task, architecture and training."""

    family: str
    task: Literal["classification", "segmentation", "detection"]
    architecture: dict = spec(factory=dict)
    train: TrainConfig = spec(factory=TrainConfig)
    export_formats: tuple[ExportFormat, ...] | None = spec(None, min_len=1)  # None: export.formats
    # Thresholds of this model that replace export.parity.<format> (e.g. a segmentation
    # model's max_abs_diff is a maximum over every pixel's scores).
    export_parity: dict[str, ParityThreshold] = spec(factory=dict)


@dataclass(frozen=True)
class NMSConfig:
    """Non-maximum suppression of a detector's boxes (evaluate.nms, export.nms)."""

    iou_threshold: float = spec(0.7, gt=0, le=1)  # a box overlapping a kept one more is removed
    confidence_threshold: float = spec(0.25, ge=0, le=1)  # boxes scoring lower are not kept
    max_detections: int = spec(100, ge=1, le=10000)  # per image, best first


@dataclass(frozen=True)
class EvaluateConfig:
    """evaluate: test-split evaluation and cost measurement."""

    batch_size: int = spec(256, ge=1)
    latency_samples: int = spec(50, ge=1, le=10000)
    latency_warmup: int = spec(5, ge=0, le=1000)
    top_k: int = spec(2, ge=1, le=1000)  # top_<k>_accuracy, k capped at the number of classes
    gallery: int = spec(16, ge=0, le=256)  # misclassified test images shown, most confident first
    # Segmentation: test images larger than the model's input are predicted in tiles that
    # overlap by this fraction, blended so seams do not show.
    tile_overlap: float = spec(0.25, ge=0, le=0.9)
    # Detection: mAP integrates precision down to low confidences, so nearly every box is kept
    # (as ultralytics' val does with conf 0.001); export.nms is what deployment keeps.
    nms: NMSConfig = spec(factory=lambda: NMSConfig(confidence_threshold=0.001))


ExportFormat = Literal["keras", "saved_model", "tflite", "tflite_dynamic", "tflite_int8", "onnx"]
EXPORT_FORMATS: tuple[str, ...] = typing.get_args(ExportFormat)
# What `visionpipe predict` can run: every format but the .keras file (that needs Keras).
PredictFormat = Literal["saved_model", "tflite", "tflite_dynamic", "tflite_int8", "onnx"]
PREDICT_FORMATS: tuple[str, ...] = typing.get_args(PredictFormat)


@dataclass(frozen=True)
class ParityThreshold:
    """export.parity.<format>: how far an exported format may drift from the Keras model."""

    max_abs_diff: float = spec(1e-4, ge=0)  # largest |output difference| over the samples
    min_agreement: float = spec(0.99, ge=0, le=1)  # the task's agreement (label agreement)


def _default_parity() -> dict[str, ParityThreshold]:
    # Float formats match to rounding; int8 ones within a few quantisation steps, and full
    # int8 (activations too) may flip a near-tie.
    return {"keras": ParityThreshold(max_abs_diff=0.0, min_agreement=1.0),
            "saved_model": ParityThreshold(), "tflite": ParityThreshold(),
            "tflite_dynamic": ParityThreshold(max_abs_diff=0.05, min_agreement=0.98),
            "tflite_int8": ParityThreshold(max_abs_diff=0.1, min_agreement=0.95),
            "onnx": ParityThreshold()}


@dataclass(frozen=True)
class ExportConfig:
    """export: deployable formats and the parity each must keep with the Keras model."""

    formats: tuple[ExportFormat, ...] = spec(("keras", "saved_model", "tflite"), min_len=1)
    parity_samples: int = spec(200, ge=1)
    # Train images that calibrate tflite_int8's activation ranges.
    representative_samples: int = spec(100, ge=1, le=100000)
    parity: dict[str, ParityThreshold] = spec(factory=_default_parity)
    # SavedModel on images of another size (resized inside the graph) against the Keras model
    # on the same images resized as prepare resizes them: the task's agreement at least this.
    resize_min_agreement: float = spec(0.95, ge=0, le=1)
    # Detection: the suppression baked into exported detectors (what `visionpipe predict` and
    # a deployment see).
    nms: NMSConfig = spec(factory=NMSConfig)


@dataclass(frozen=True)
class PredictConfig:
    """predict: `visionpipe predict` on a folder of new images."""

    format: PredictFormat = "saved_model"
    top_k: int = spec(3, ge=1, le=1000)  # classes listed per image, best first
    render: bool = True  # draw the prediction onto a copy of each image


@dataclass(frozen=True)
class TrackingConfig:
    """tracking: where runs are logged. No stage depends on it: changing it retrains nothing."""

    mlflow: bool = True
    uri: str | None = None  # default sqlite:///<repo>/mlflow.db; MLFLOW_TRACKING_URI overrides
    experiment_prefix: str = "visionpipe"  # experiment per task: <prefix>-<task>
    system_metrics: bool = True
    system_metrics_interval: float = spec(2.0, gt=0, le=3600)
    codecarbon: bool = True
    country_iso_code: str = "USA"  # grid carbon intensity used by the offline estimate


@dataclass(frozen=True)
class Params:
    """The whole of params.yaml."""

    seed: int = spec(42, ge=0, lt=2**31)
    prepare: dict[str, PrepareConfig] = spec(factory=dict)
    augment: dict[str, AugmentConfig] = spec(factory=dict)
    models: dict[str, ModelConfig] = spec(factory=dict)
    evaluate: EvaluateConfig = spec(factory=EvaluateConfig)
    export: ExportConfig = spec(factory=ExportConfig)
    predict: PredictConfig = spec(factory=PredictConfig)
    tracking: TrackingConfig = spec(factory=TrackingConfig)

    def model(self, name: str) -> ModelConfig:
        """The config of model ``name``; an unknown name lists the known ones."""
        if name not in self.models:
            known = ", ".join(sorted(self.models)) or "(none)"
            raise ParamsError(f"params.yaml: models.{name}: no such model; known: {known}")
        return self.models[name]

    def export_formats(self, name: str) -> tuple[str, ...]:
        """The formats model ``name`` is exported to: its own list, else export.formats."""
        return self.model(name).export_formats or self.export.formats

    def parity(self, name: str, fmt: str) -> ParityThreshold:
        """Format ``fmt``'s thresholds for model ``name``: its own, else export.parity's."""
        return self.model(name).export_parity.get(fmt) or self.export.parity[fmt]

    def prepare_for(self, task: str) -> PrepareConfig:
        """The prepare section of ``task``."""
        if task not in self.prepare:
            raise ParamsError(f"params.yaml: prepare.{task}: missing; the models of task "
                              f"'{task}' need a data section there")
        return self.prepare[task]

    def augment_for(self, task: str) -> AugmentConfig:
        """The augment section of ``task`` (defaults: no transform, no copies)."""
        return self.augment.get(task, AugmentConfig(copies=0, flip_horizontal=False))


# --------------------------------------------------------------------------- validation


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is bool:
        return "true or false"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
        return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    if origin in (dict, Mapping):
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in typing.get_args(tp))
    return str(tp)


def _fail(path: str, value: Any, allowed: str) -> typing.NoReturn:
    raise ParamsError(f"params.yaml: {path} = {value!r}: expected {allowed}")


def _check_range(path: str, value: Any, meta: Mapping) -> None:
    bounds = [("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
              ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")]
    items = value if isinstance(value, tuple) else (value,)
    if isinstance(value, tuple):
        if meta.get("min_len") is not None and len(value) < meta["min_len"]:
            _fail(path, list(value), f"at least {meta['min_len']} item(s)")
        if meta.get("max_len") is not None and len(value) > meta["max_len"]:
            _fail(path, list(value), f"at most {meta['max_len']} item(s)")
    for item in items:
        if not isinstance(item, (int, float)) or isinstance(item, bool):
            continue
        for key, ok, sign in bounds:
            bound = meta.get(key)
            if bound is not None and not ok(item, bound):
                shown = list(value) if isinstance(value, tuple) else value
                wanted = "every value " if isinstance(value, tuple) else "a value "
                _fail(path, shown, f"{wanted}{sign} {bound}")


def convert(tp: Any, value: Any, path: str, meta: Mapping | None = None) -> Any:
    """Check ``value`` against type ``tp`` and return it in that type (lists become tuples)."""
    meta = meta or {}
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(arg, value, path, meta)
            except ParamsError:
                continue
        _fail(path, value, _describe(tp))
    if tp is bool:
        if not isinstance(value, bool):
            _fail(path, value, "true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(path, value, "an integer")
        _check_range(path, value, meta)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(path, value, "a number")
        if value != value or value in (float("inf"), float("-inf")):
            _fail(path, value, "a finite number")
        _check_range(path, float(value), meta)
        return float(value)
    if tp is str:
        if not isinstance(value, str) or not value:
            _fail(path, value, "a non-empty string")
        return value
    if origin is Literal:
        if value not in typing.get_args(tp):
            _fail(path, value, _describe(tp))
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            _fail(path, value, _describe(tp))
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            out = tuple(convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        else:
            if len(value) != len(args):
                _fail(path, list(value), _describe(tp))
            out = tuple(convert(a, v, f"{path}[{i}]") for i, (a, v) in
                        enumerate(zip(args, value, strict=True)))
        _check_range(path, out, meta)
        return out
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            _fail(path, value, "a mapping")
        args = typing.get_args(tp)
        if not args:
            return dict(value)
        key_tp, val_tp = args
        return {convert(key_tp, k, f"{path}.{k}"): convert(val_tp, v, f"{path}.{k}")
                for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return parse_dataclass(tp, value, path)
    raise TypeError(f"unsupported params type {tp!r} at {path}")  # a bug in the schema


def parse_dataclass(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown and missing keys."""
    where = path or "(top level)"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ParamsError(f"params.yaml: {where} = {data!r}: expected {_describe(cls)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise ParamsError(f"params.yaml: {key}: unknown key; allowed keys in {where}: "
                          + ", ".join(fields))
    kwargs = {}
    for name, f in fields.items():
        key = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = convert(hints[name], data[name], key, f.metadata)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ParamsError(f"params.yaml: {key}: missing; expected {_describe(hints[name])}")
    return cls(**kwargs)


def _check_consistency(params: Params) -> None:
    uri = params.tracking.uri or ""
    if "@" in uri.partition("://")[2].partition("/")[0]:
        raise ParamsError("params.yaml: tracking.uri: holds credentials (user@ or "
                          "user:password@); params are committed and logged, so put them in "
                          "the environment instead: MLFLOW_TRACKING_USERNAME and "
                          "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN), and give the "
                          "URI without them")
    for task in params.prepare:
        if task not in TASKS:
            raise ParamsError(f"params.yaml: prepare.{task}: unknown task; allowed: "
                              + ", ".join(TASKS))
    for task in params.augment:
        if task not in TASKS:
            raise ParamsError(f"params.yaml: augment.{task}: unknown task; allowed: "
                              + ", ".join(TASKS))
    overrides = [(f"models.{n}.export_parity", m.export_parity) for n, m in params.models.items()]
    for where, parity in [("export.parity", params.export.parity), *overrides]:
        for fmt in parity:
            if fmt not in EXPORT_FORMATS:
                raise ParamsError(f"params.yaml: {where}.{fmt}: unknown format; allowed: "
                                  + ", ".join(EXPORT_FORMATS))
    for task, cfg in params.prepare.items():
        key = f"prepare.{task}"
        if cfg.source == "tfds" and not cfg.tfds_name:
            raise ParamsError(f"params.yaml: {key}.tfds_name = None: expected a TFDS catalog "
                              "name (e.g. mnist) when source is 'tfds'")
        if cfg.source == "folder" and task != "classification":
            raise ParamsError(f"params.yaml: {key}.source = 'folder': class folders give "
                              f"labels only, task '{task}' needs "
                              + ("masks" if task == "segmentation" else "boxes"))
        if cfg.source == "pairs" and task != "segmentation":
            raise ParamsError(f"params.yaml: {key}.source = 'pairs': image/mask pairs are "
                              f"segmentation data, not {task}")
        if cfg.source == "voc" and task != "detection":
            raise ParamsError(f"params.yaml: {key}.source = 'voc': PASCAL VOC boxes are "
                              f"detection data, not {task}")
        if cfg.class_names is not None and cfg.source != "voc":
            _fail(f"{key}.class_names", list(cfg.class_names), "null: a class list is read "
                  "from the data for sources other than voc")
        if task == "detection" and cfg.resize == "crop":
            _fail(f"{key}.resize", cfg.resize, "'pad' (letterbox, keeps the aspect ratio) or "
                  "'stretch' for detection: a crop would cut boxes")
        if task == "segmentation":
            if cfg.source in ("pairs", "tfds") and not cfg.mask_values and not (
                    cfg.source == "tfds" and cfg.tfds_name in KNOWN_MASK_VALUES):
                raise ParamsError(f"params.yaml: {key}.mask_values = None: expected a mapping "
                                  "of mask pixel value to class name, e.g. {255: cell, "
                                  "0: membrane}")
            if cfg.mask_values is not None:
                bad = [v for v in cfg.mask_values if not 0 <= v <= 255]
                if bad:
                    _fail(f"{key}.mask_values", cfg.mask_values,
                          f"8-bit mask values 0..255 as keys (found {bad})")
                if len(set(cfg.mask_values.values())) != len(cfg.mask_values):
                    _fail(f"{key}.mask_values", cfg.mask_values, "a different class name "
                          "for each value")
            if cfg.resize != "stretch":
                _fail(f"{key}.resize", cfg.resize, "'stretch' for segmentation (pad and crop "
                      "would need an ignore label for the added mask pixels)")
            if cfg.crop_size is not None and any(
                    c > s for c, s in zip(cfg.crop_size, cfg.image_size, strict=True)):
                _fail(f"{key}.crop_size", list(cfg.crop_size),
                      f"at most image_size ({list(cfg.image_size)}) in each dimension")
        elif cfg.crop_size is not None:
            _fail(f"{key}.crop_size", list(cfg.crop_size), "null: crops are for segmentation")
        elif cfg.mask_values is not None:
            _fail(f"{key}.mask_values", cfg.mask_values, "null: masks are for segmentation")
        if cfg.source == "shapes":
            for split in ("train", "val", "test"):
                n = getattr(cfg.splits, split)
                if n != int(n) or n < 1:
                    raise ParamsError(f"params.yaml: {key}.splits.{split} = {n!r}: expected a "
                                      "whole number of examples >= 1 for source 'shapes'")
    for name, model in params.models.items():
        t = model.train
        if t.min_learning_rate > t.learning_rate:
            raise ParamsError(f"params.yaml: models.{name}.train.min_learning_rate = "
                              f"{t.min_learning_rate!r}: expected at most learning_rate "
                              f"({t.learning_rate!r})")
        if t.lr_schedule == "warmup_cosine" and t.warmup_epochs >= t.epochs:
            raise ParamsError(f"params.yaml: models.{name}.train.warmup_epochs = "
                              f"{t.warmup_epochs!r}: expected fewer than epochs ({t.epochs}) "
                              "so the cosine part has steps")
        if model.task != "segmentation":
            key = f"models.{name}.train"
            if t.loss != "cross_entropy":
                _fail(f"{key}.loss", t.loss, f"'cross_entropy' for a {model.task} model "
                      "(dice and ce_dice are segmentation losses)")
            if t.class_weights is not None:
                _fail(f"{key}.class_weights", list(t.class_weights),
                      f"null for a {model.task} model (class weights apply to segmentation)")
            if t.monitor == "val_mean_iou":
                _fail(f"{key}.monitor", t.monitor, f"val_loss or val_accuracy for a "
                      f"{model.task} model (val_mean_iou is segmentation's)")
        formats = params.export_formats(name)
        if len(set(formats)) != len(formats):
            where = f"models.{name}.export_formats" if model.export_formats else "export.formats"
            raise ParamsError(f"params.yaml: {where} = {list(formats)}: a format is listed "
                              "twice; list each once")
        for fmt in formats:
            if fmt not in params.export.parity and fmt not in model.export_parity:
                where = (f"models.{name}.export_formats" if model.export_formats
                         else "export.formats")
                raise ParamsError(f"params.yaml: export.parity.{fmt}: missing; {where} "
                                  f"lists {fmt}, so give its max_abs_diff and min_agreement")
        if model.task not in params.prepare:
            raise ParamsError(f"params.yaml: models.{name}.task = {model.task!r}: no "
                              f"prepare.{model.task} section says where its data comes from")


def parse_params(data: Any) -> Params:
    """Validate a loaded params mapping (architecture sections are checked by the registry)."""
    params = parse_dataclass(Params, data)
    _check_consistency(params)
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; every problem is a ParamsError naming the key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found; run visionpipe from the project root "
                          "or pass --params") from None
    except UnicodeDecodeError as exc:
        raise ParamsError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at "
                          f"position {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise ParamsError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ParamsError(f"{path}: YAML syntax error{where}: {problem}") from None
    try:
        return parse_params(data)
    except ParamsError as exc:
        raise ParamsError(str(exc).replace("params.yaml:", f"{path}:", 1)) from None
