"""The schema of params.yaml: one frozen pydantic dataclass per section.

pydantic dataclasses rather than BaseModel: they are still stdlib dataclasses, so the stages'
``dataclasses.asdict`` (checkpoint fingerprints, MLflow params), ``dataclasses.replace`` and
``dataclasses.fields`` keep working and give the same values as before.

Types are strict where YAML could otherwise be coerced silently (``1`` for ``true``, ``2.0``
for an integer, ``"3"`` for a number); a list in YAML becomes a tuple. A field that applies to
some tasks only says so with :func:`tasks` (read by the visibility test and shown in the JSON
Schema as ``x-tasks``); :mod:`visionpipe.config.rules` checks values across fields.
"""

from __future__ import annotations

import json
import typing
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, Strict, TypeAdapter
from pydantic.dataclasses import dataclass

from visionpipe.errors import ParamsError
from visionpipe.tasks.catalog import task_names

# extra="forbid": an unknown key is an error, never silently ignored.
CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False)

Int = Annotated[int, Strict()]  # rejects true/false and 2.0
Float = Annotated[float, Strict()]  # accepts integers (returned as floats), rejects true/false
Bool = Annotated[bool, Strict()]  # rejects 1, "yes"
Str = Annotated[str, Strict(), Field(min_length=1)]

# Literal of the registered task names: visionpipe.tasks.catalog lists them without importing
# TensorFlow, so a new task needs no edit here.
TaskName = Literal[task_names()]  # type: ignore[valid-type]
TASKS: tuple[str, ...] = task_names()

ExportFormat = Literal["keras", "saved_model", "tflite", "tflite_dynamic", "tflite_int8", "onnx"]
EXPORT_FORMATS: tuple[str, ...] = typing.get_args(ExportFormat)
# What `visionpipe predict` can run: every format but the .keras file (that needs Keras).
PredictFormat = Literal["saved_model", "tflite", "tflite_dynamic", "tflite_int8", "onnx"]
PREDICT_FORMATS: tuple[str, ...] = typing.get_args(PredictFormat)

Side = Annotated[int, Strict(), Field(ge=8, le=4096)]  # an image side in pixels
# A thread count (0: TensorFlow's choice) or auto (visionpipe.training.resolve_threads).
Threads = Annotated[int, Strict(), Field(ge=0, le=1024)] | Literal["auto"]


def tasks(*names: str) -> dict[str, Any]:
    """``json_schema_extra`` of a field that applies to these tasks only."""
    return {"x-tasks": list(names)}


def field_tasks(cls: type, name: str) -> tuple[str, ...] | None:
    """The tasks field ``name`` of config class ``cls`` applies to; None: every task."""
    extra = cls.__pydantic_fields__[name].json_schema_extra
    return tuple(extra["x-tasks"]) if isinstance(extra, dict) and "x-tasks" in extra else None


# An override of another section's value: leaving it out means "use that section".
OVERRIDE = {"x-override": True}


def is_override(cls: type, name: str) -> bool:
    """Whether field ``name`` of ``cls`` only overrides a value given elsewhere."""
    extra = cls.__pydantic_fields__[name].json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("x-override"))


@dataclass(frozen=True, config=CONFIG)
class SplitSizes:
    """How many examples go to each split (generated sources) or which share (real data)."""

    train: Float = Field(ge=0)
    val: Float = Field(ge=0)
    test: Float = Field(ge=0)


@dataclass(frozen=True, config=CONFIG)
class PrepareConfig:
    """prepare.<task>: where a task's data comes from and how it is split and stored."""

    source: Literal["shapes", "tfds", "folder", "pairs", "voc", "yolo", "coco"] = "shapes"
    tfds_name: Str | None = None
    tfds_data_dir: Str | None = None
    # folder: one sub-folder per class; pairs: path/<images_dir>/<name>.png with
    # path/<masks_dir>/<name>.png; voc: path/<images_dir>/<name>.jpg with PASCAL VOC XML
    # path/<annotations_dir>/<name>.xml; yolo: path/<images_dir>/[<split>/]<name>.jpg with
    # path/<labels_dir>/[<split>/]<name>.txt and path/<data_yaml>; coco:
    # path/<images_dir>/<file_name> with path/<annotations_file>. Relative paths start at the
    # project root; a .zip or .tar(.gz) is extracted first. dvc.yaml lists it as prepare's
    # dependency, so it must exist even for the other sources.
    path: Str = "data/raw"
    images_dir: Str = Field("images", json_schema_extra=tasks("segmentation", "detection"))
    masks_dir: Str = Field("masks", json_schema_extra=tasks("segmentation"))
    annotations_dir: Str = Field("annotations", json_schema_extra=tasks("detection"))
    # yolo: the label files' folder beside images_dir, and the ultralytics data.yaml (names,
    # nc) inside path.
    labels_dir: Str = Field("labels", json_schema_extra=tasks("detection"))
    data_yaml: Str = Field("data.yaml", json_schema_extra=tasks("detection"))
    # coco: the instances JSON inside path (e.g. annotations/instances_default.json).
    annotations_file: Str | None = Field(None, json_schema_extra=tasks("detection"))
    # Detection from voc (or yolo without a data.yaml): the classes, in id order (an object of
    # another class is an error); null: the sorted names found (voc) or data.yaml's (yolo).
    class_names: tuple[Str, ...] | None = Field(None, min_length=1,
                                                json_schema_extra=tasks("detection"))
    # Segmentation from pairs or tfds: mask pixel value -> class name, e.g. {255: cell,
    # 0: membrane}; class ids follow this order. Other values in a mask are an error.
    mask_values: dict[Int, Str] | None = Field(None, json_schema_extra=tasks("segmentation"))
    image_size: tuple[Side, Side] = (64, 64)
    # How an image of another shape reaches image_size: stretch (ignore aspect ratio), pad
    # (keep it, letterbox with black bars) or crop (keep it, fill and cut the centre).
    resize: Literal["stretch", "pad", "crop"] = "stretch"
    splits: SplitSizes = Field(default_factory=lambda: SplitSizes(4000, 500, 500))
    shard_size: Int = Field(1000, ge=1)
    # Segmentation: cut train and val images into non-overlapping crops of this size (what
    # the model trains on); test images stay at image_size and evaluate predicts them with
    # overlapping tiles (evaluate.tile_overlap).
    crop_size: tuple[Side, Side] | None = Field(None, json_schema_extra=tasks("segmentation"))


@dataclass(frozen=True, config=CONFIG)
class AugmentConfig:
    """augment.<task>: how many augmented copies of the train split, and which transforms."""

    copies: Int = Field(1, ge=0, le=100)
    keep_original: Bool = True
    flip_horizontal: Bool = True
    flip_vertical: Bool = False
    scale: tuple[Annotated[Float, Field(gt=0, le=4)], Annotated[Float, Field(gt=0, le=4)]] = (
        1.0, 1.0)
    translate: Float = Field(0.0, ge=0, le=0.5)
    rotate: Float = Field(0.0, ge=0, le=180)
    brightness: Float = Field(0.0, ge=0, le=1)
    contrast: Float = Field(0.0, ge=0, le=1)
    noise: Float = Field(0.0, ge=0, le=100)
    # Detection: a box moved partly out of the image is clipped to it, or dropped when less
    # than this share of its area stays inside (drops are counted in the manifest).
    box_min_visible: Float = Field(0.25, ge=0, le=1, json_schema_extra=tasks("detection"))
    # Detection and segmentation: this share of the copies is a YOLO-style mosaic, the image
    # tiled 2x2 with three other train images and an image-size window of that taken (then
    # the transforms above). Partners come from the last 64 train images read.
    mosaic: Float = Field(0.0, ge=0, le=1, json_schema_extra=tasks("detection", "segmentation"))
    preview: Int = Field(16, ge=1, le=256)


@dataclass(frozen=True, config=CONFIG)
class TrainConfig:
    """models.<name>.train: how one model is fitted."""

    epochs: Int = Field(10, ge=1, le=10000)
    batch_size: Int = Field(64, ge=1, le=65536)
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    learning_rate: Float = Field(1e-3, gt=0, le=10)
    momentum: Float = Field(0.9, ge=0, lt=1)  # sgd only
    weight_decay: Float = Field(0.0, ge=0, le=1)
    # Only classification's cross-entropy smooths labels.
    label_smoothing: Float = Field(0.0, ge=0, lt=1, json_schema_extra=tasks("classification"))
    # Learning rate over training: constant; step (times step_factor every step_epochs);
    # cosine (down to min_learning_rate); warmup_cosine (linear from 0 over warmup_epochs,
    # then cosine). Schedules advance every batch.
    lr_schedule: Literal["constant", "step", "cosine", "warmup_cosine"] = "constant"
    warmup_epochs: Float = Field(1.0, ge=0, le=10000)
    step_epochs: Int = Field(10, ge=1, le=10000)
    step_factor: Float = Field(0.1, gt=0, le=1)
    min_learning_rate: Float = Field(0.0, ge=0, le=10)
    # The validation figure that picks the best epoch (lowest loss or highest accuracy) for
    # restore_best and early stopping.
    monitor: Literal["val_loss", "val_accuracy", "val_mean_iou"] = "val_loss"
    # Stop after this many epochs without a better monitored value (0: train all epochs).
    early_stopping_patience: Int = Field(0, ge=0, le=10000)
    early_stopping_min_delta: Float = Field(0.0, ge=0)  # smaller improvements don't count
    shuffle_buffer: Int = Field(10000, ge=1)
    restore_best: Bool = True  # final model = the best epoch by `monitor`
    # Segmentation: per-pixel cross_entropy, soft dice, or ce_dice (their sum). Classification
    # uses cross-entropy; detection its own losses (the family's).
    loss: Literal["cross_entropy", "dice", "ce_dice"] = Field(
        "cross_entropy", json_schema_extra=tasks("segmentation"))
    # Every task: null (unweighted), one weight per class in class order, or balanced:
    # n / (K * n_c) from the train split's counts of images (classification), boxes
    # (detection) or pixels (segmentation) per class (visionpipe.class_weights). They weight
    # each image's cross-entropy by its class, each class's column of a detector's class loss,
    # and segmentation's cross-entropy and dice. model.json and MLflow record the weights used.
    class_weights: (Annotated[tuple[Annotated[Float, Field(ge=0, le=1000)], ...],
                              Field(min_length=1)] | Literal["balanced"] | None) = None
    # TensorFlow op determinism: same params and seed give the same weights, run after run,
    # on any device. Off by default: on this 2-core CPU it made training about 2x slower, and
    # CPU runs here already repeat bit for bit without it (docs/training.md, "Determinism").
    deterministic: Bool = False
    # Speed switches (docs/performance.md); each is recorded in model.json and MLflow.
    # precision: the Keras dtype policy. mixed_float16 (GPUs) trains with a LossScaleOptimizer;
    # mixed_bfloat16 needs no loss scaling and also runs on CPUs. Softmax outputs stay float32.
    # auto picks for this machine (visionpipe.training.resolve_precision): mixed_float16 on a
    # GPU of compute capability 7.0+, mixed_bfloat16 on a CPU with avx512_bf16 or amx_bf16,
    # else float32. model.json records the policy used and why.
    precision: Literal["auto", "float32", "mixed_float16", "mixed_bfloat16"] = "float32"
    # TensorFlow's thread pools: threads inside one op (a matmul, a convolution) and ops run
    # at once; 0 leaves them to TensorFlow (its own default); auto picks for this machine and
    # family (visionpipe.training.resolve_threads). model.json records them and why.
    intra_op_threads: Threads = 0
    inter_op_threads: Threads = 0
    # XLA compilation of the train step: auto is Keras' choice (on with a GPU, off on CPUs).
    jit_compile: Bool | Literal["auto"] = "auto"
    # none: one device; mirrored: every GPU (or CPU device) of this machine, model.fit under
    # tf.distribute.MirroredStrategy; multi_worker: several machines, MultiWorkerMirroredStrategy
    # from TF_CONFIG (or SLURM), a custom training loop (docs/training.md, "Training on a cluster").
    # batch_size is the global batch, split over the replicas.
    distribute: Literal["none", "mirrored", "multi_worker"] = "none"
    # Decoded train/val images are cached after the first epoch: auto keeps them in memory
    # when they fit in cache_limit_mb and on disk (a temporary file) otherwise.
    cache: Literal["auto", "memory", "disk", "none"] = "auto"
    cache_limit_mb: Int = Field(4096, ge=0)
    # tf.data parallel decoding keeps record order (with the seeded shuffle, the same batches
    # every run); false lets finished records jump the queue: faster, batches differ per run.
    deterministic_input: Bool = True
    # Fine-tuning a pretrained backbone (families with one: applications), keras-io's recipe:
    # the first freeze_epochs train with the backbone frozen (its batch norm in inference
    # mode); then unfreeze (all, or the top N blocks of the backbone; 0: none) trains too, at
    # fine_tune_learning_rate (null: learning_rate / 10), with a fresh optimizer.
    freeze_epochs: Int = Field(0, ge=0, le=10000)
    unfreeze: Literal["all"] | Annotated[Int, Field(ge=0, le=1000)] = "all"
    fine_tune_learning_rate: Float | None = Field(None, gt=0, le=10)


@dataclass(frozen=True, config=CONFIG)
class ParityThreshold:
    """export.parity.<format>: how far an exported format may drift from the Keras model."""

    max_abs_diff: Float = Field(1e-4, ge=0)  # largest |output difference| over the samples
    min_agreement: Float = Field(0.99, ge=0, le=1)  # the task's agreement (label agreement)
    # Detection: how much lower the format's test mAP@.5 may be than the Keras model's, both
    # decoded with export.nms (box_decoding) on the same images.
    max_map_drop: Float = Field(0.01, ge=0, le=1, json_schema_extra=tasks("detection"))


@dataclass(frozen=True, config=CONFIG)
class ModelConfig:
    """models.<name>: one trained model: its family, task, architecture and training."""

    family: Str
    task: TaskName
    # Checked against the family's own params dataclass (visionpipe.models.<family>) by
    # visionpipe.models.registry, which imports TensorFlow; here it stays a mapping.
    architecture: dict[str, Any] = Field(default_factory=dict)
    train: TrainConfig = Field(default_factory=TrainConfig)
    # null: export.formats.
    export_formats: tuple[ExportFormat, ...] | None = Field(None, min_length=1,
                                                            json_schema_extra=OVERRIDE)
    # Thresholds of this model that replace export.parity.<format> (e.g. a segmentation
    # model's max_abs_diff is a maximum over every pixel's scores).
    export_parity: dict[ExportFormat, ParityThreshold] = Field(default_factory=dict,
                                                               json_schema_extra=OVERRIDE)


@dataclass(frozen=True, config=CONFIG)
class NMSConfig:
    """Non-maximum suppression of a detector's boxes (evaluate.nms, export.nms)."""

    iou_threshold: Float = Field(0.7, gt=0, le=1)  # a box overlapping a kept one more is removed
    confidence_threshold: Float = Field(0.25, ge=0, le=1)  # boxes scoring lower are not kept
    max_detections: Int = Field(100, ge=1, le=10000)  # per image, best first


@dataclass(frozen=True, config=CONFIG)
class EvaluateConfig:
    """evaluate: test-split evaluation and cost measurement."""

    batch_size: Int = Field(256, ge=1)
    latency_samples: Int = Field(50, ge=1, le=10000)
    latency_warmup: Int = Field(5, ge=0, le=1000)
    top_k: Int = Field(2, ge=1, le=1000)  # top_<k>_accuracy, k capped at the number of classes
    gallery: Int = Field(16, ge=0, le=256)  # misclassified test images shown, most confident first
    # Classification: test images in gradcam.png with their Grad-CAM heat maps, about half the
    # most confident correct and half the most confident wrong; 0: none.
    gradcam_images: Int = Field(16, ge=0, le=64)
    # Segmentation: test images larger than the model's input are predicted in tiles that
    # overlap by this fraction, blended so seams do not show.
    tile_overlap: Float = Field(0.25, ge=0, le=0.9)
    # Detection: mAP integrates precision down to low confidences, so nearly every box is kept
    # (as ultralytics' val does with conf 0.001); export.nms is what deployment keeps.
    nms: NMSConfig = Field(default_factory=lambda: NMSConfig(confidence_threshold=0.001))


def _default_parity() -> dict[str, ParityThreshold]:
    # Float formats match to rounding; int8 ones within a few quantisation steps, and full
    # int8 (activations too) may flip a near-tie.
    return {"keras": ParityThreshold(max_abs_diff=0.0, min_agreement=1.0, max_map_drop=0.0),
            "saved_model": ParityThreshold(), "tflite": ParityThreshold(),
            "tflite_dynamic": ParityThreshold(max_abs_diff=0.05, min_agreement=0.98,
                                              max_map_drop=0.02),
            "tflite_int8": ParityThreshold(max_abs_diff=0.1, min_agreement=0.95,
                                           max_map_drop=0.03),
            "onnx": ParityThreshold()}


@dataclass(frozen=True, config=CONFIG)
class ExportConfig:
    """export: deployable formats and the parity each must keep with the Keras model."""

    formats: tuple[ExportFormat, ...] = Field(("keras", "saved_model", "tflite"), min_length=1)
    parity_samples: Int = Field(200, ge=1)
    # Detection: parity (and the resized-input check) is judged on the first test images
    # holding at least this many truth boxes (the whole split when it holds fewer), when
    # parity_samples images hold fewer.
    parity_min_boxes: Int = Field(200, ge=1, json_schema_extra=tasks("detection"))
    # Train images that calibrate tflite_int8's activation ranges.
    representative_samples: Int = Field(100, ge=1, le=100000)
    parity: dict[ExportFormat, ParityThreshold] = Field(default_factory=_default_parity)
    # SavedModel on images of another size (resized inside the graph) against the Keras model
    # on the same images resized as prepare resizes them: the task's agreement at least this.
    resize_min_agreement: Float = Field(0.95, ge=0, le=1)
    # Detection: the suppression baked into exported detectors (what `visionpipe predict` and
    # a deployment see).
    nms: NMSConfig = Field(default_factory=NMSConfig)


@dataclass(frozen=True, config=CONFIG)
class PredictConfig:
    """predict: `visionpipe predict` on a folder of new images."""

    format: PredictFormat = "saved_model"
    top_k: Int = Field(3, ge=1, le=1000)  # classes listed per image, best first
    render: Bool = True  # draw the prediction onto a copy of each image
    # Detection: boxes scoring at least this are kept (--conf); a box overlapping a kept one
    # by this IoU or more is dropped (--iou); at most this many per image (--max-det).
    confidence: Float = Field(0.25, ge=0, le=1)
    iou: Float = Field(0.7, gt=0, le=1)
    max_detections: Int = Field(100, ge=1, le=10000)
    batch_size: Int = Field(16, ge=1, le=4096)  # images in memory at once (--batch-size)


@dataclass(frozen=True, config=CONFIG)
class TrackingConfig:
    """tracking: where runs are logged. No stage depends on it: changing it retrains nothing."""

    mlflow: Bool = True
    uri: Str | None = None  # default sqlite:///<repo>/mlflow.db; MLFLOW_TRACKING_URI overrides
    # Seconds an HTTP tracking server has to answer each request (one attempt; after a
    # timeout the stage sends nothing more). MLFLOW_HTTP_REQUEST_TIMEOUT overrides.
    timeout_s: Int = Field(15, ge=1, le=600)
    experiment_prefix: Str = "visionpipe"  # experiment per task: <prefix>-<task>
    system_metrics: Bool = True
    system_metrics_interval: Float = Field(2.0, gt=0, le=3600)
    codecarbon: Bool = True
    country_iso_code: Str = "USA"  # grid carbon intensity used by the offline estimate


@dataclass(frozen=True, config=CONFIG)
class Params:
    """The whole of params.yaml."""

    seed: Int = Field(42, ge=0, lt=2**31)
    prepare: dict[TaskName, PrepareConfig] = Field(default_factory=dict)
    augment: dict[TaskName, AugmentConfig] = Field(default_factory=dict)
    models: dict[Str, ModelConfig] = Field(default_factory=dict)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    predict: PredictConfig = Field(default_factory=PredictConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    def model(self, name: str) -> ModelConfig:
        """The config of model ``name``; an unknown name lists the known ones."""
        if name not in self.models:
            known = ", ".join(sorted(self.models)) or "(none)"
            raise ParamsError(f"params.yaml: models.{name}: no such model; known: {known}")
        return self.models[name]

    def export_formats(self, name: str) -> tuple[str, ...]:
        """The formats model ``name`` is exported to: its own list, else export.formats."""
        return self.model(name).export_formats or self.export.formats

    def export_formats_key(self, name: str) -> str:
        """Where :meth:`export_formats` comes from in params.yaml."""
        return (f"models.{name}.export_formats" if self.model(name).export_formats
                else "export.formats")

    def parity(self, name: str, fmt: str) -> ParityThreshold:
        """Format ``fmt``'s thresholds for model ``name``: its own, else export.parity's."""
        return self.model(name).export_parity.get(fmt) or self.export.parity[fmt]

    def parity_key(self, name: str, fmt: str) -> str:
        """Where :meth:`parity`'s thresholds come from in params.yaml, e.g.
        ``models.yolo.export_parity.tflite_int8`` or ``export.parity.tflite``."""
        if fmt in self.model(name).export_parity:
            return f"models.{name}.export_parity.{fmt}"
        return f"export.parity.{fmt}"

    def prepare_for(self, task: str) -> PrepareConfig:
        """The prepare section of ``task``."""
        if task not in self.prepare:
            raise ParamsError(f"params.yaml: prepare.{task}: missing; the models of task "
                              f"'{task}' need a data section there")
        return self.prepare[task]

    def augment_for(self, task: str) -> AugmentConfig:
        """The augment section of ``task`` (defaults: no transform, no copies)."""
        return self.augment.get(task, AugmentConfig(copies=0, flip_horizontal=False))


PARAMS = TypeAdapter(Params)

SCHEMA_HEADER = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "params.schema.json",
    "title": "visionpipe params.yaml",
    "description": "Generated from visionpipe.config.schema; regenerate with "
                   "`visionpipe schema > params.schema.json`. "
                   "models.<name>.architecture is checked per family by "
                   "visionpipe.models.registry (the fields of the family's params dataclass).",
}


def params_json_schema() -> dict[str, Any]:
    """The JSON Schema of params.yaml (draft 2020-12), generated from :class:`Params`."""
    schema = PARAMS.json_schema()
    schema.pop("title", None)
    schema.pop("description", None)
    return {**SCHEMA_HEADER, **schema}


def params_json_schema_text() -> str:
    """:func:`params_json_schema` as the text committed in params.schema.json."""
    return json.dumps(params_json_schema(), indent=2) + "\n"
