"""Checks across fields and sections of params.yaml, and the per-task rules.

The schema checks each value on its own (type, range, known keys); these run on the parsed
:class:`~visionpipe.config.schema.Params` and need more than one value to decide.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any

from visionpipe.config.schema import Params, PrepareConfig, field_tasks
from visionpipe.errors import ParamsError

# Segmentation catalog datasets whose mask values are known: value -> class name.
KNOWN_MASK_VALUES = {"oxford_iiit_pet": {1: "pet", 2: "background", 3: "border"}}


# Control characters, line separators and lone surrogates (undecodable bytes of a file name):
# not in a class name; data/sources/files.py escapes them in file names.
UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")

# The most characters of one value an error line shows.
MAX_SHOWN = 200


def short_repr(value: Any) -> str:
    """``repr(value)``, cut to MAX_SHOWN characters: an error line stays one short line."""
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else f"{text[:MAX_SHOWN]}... ({len(text)} characters)"


def _fail(path: str, value: Any, allowed: str) -> typing.NoReturn:
    raise ParamsError(f"params.yaml: {path} = {short_repr(value)}: expected {allowed}")


def check_params(params: Params) -> None:
    """Every rule below; raises ParamsError naming the key on the first broken one."""
    _check_tracking(params)
    for task, cfg in params.prepare.items():
        _check_prepare(task, cfg)
    if "classification" in params.augment and params.augment["classification"].mosaic:
        _fail("augment.classification.mosaic", params.augment["classification"].mosaic,
              "0; a mosaic shows four images, and a classification image has one label")
    _check_models(params)
    _check_task_fields(params)


def _check_tracking(params: Params) -> None:
    uri = params.tracking.uri or ""
    if "@" in uri.partition("://")[2].partition("/")[0]:
        raise ParamsError("params.yaml: tracking.uri: holds credentials (user@ or "
                          "user:password@); params are committed and logged, so put them in "
                          "the environment instead: MLFLOW_TRACKING_USERNAME and "
                          "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN), and give the "
                          "URI without them")


def _check_prepare(task: str, cfg: PrepareConfig) -> None:
    """Which sources, resize modes and task-specific fields a task's data section allows."""
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
    if cfg.source in ("yolo", "coco") and task != "detection":
        raise ParamsError(f"params.yaml: {key}.source = {cfg.source!r}: "
                          f"{'YOLO txt' if cfg.source == 'yolo' else 'COCO JSON'} boxes are "
                          f"detection data, not {task}")
    if cfg.source == "coco" and not cfg.annotations_file:
        raise ParamsError(f"params.yaml: {key}.annotations_file = None: expected the COCO "
                          "instances JSON inside path (e.g. annotations/instances_default.json) "
                          "when source is 'coco'")
    names = list(cfg.class_names or ()) + list((cfg.mask_values or {}).values())
    bad = [n for n in names if not n.strip() or UNPRINTABLE.search(n)]
    if bad:
        which = "class_names" if cfg.class_names and bad[0] in cfg.class_names else "mask_values"
        _fail(f"{key}.{which}", bad[0], "a class name of visible characters on one line (it "
              "is written in reports, plots and messages)")
    if cfg.class_names is not None and cfg.source not in ("voc", "yolo"):
        _fail(f"{key}.class_names", list(cfg.class_names), "null: a class list is read "
              "from the data for sources other than voc and yolo")
    if task == "detection" and cfg.resize == "crop":
        _fail(f"{key}.resize", cfg.resize, "'pad' (letterbox, keeps the aspect ratio) or "
              "'stretch' for detection: a crop would cut boxes")
    if task == "segmentation":
        _check_segmentation_data(key, cfg)
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


def _check_segmentation_data(key: str, cfg: PrepareConfig) -> None:
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


def _check_models(params: Params) -> None:
    """Training values that depend on each other or on the task, and export coverage."""
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
            if t.monitor == "val_mean_iou":
                _fail(f"{key}.monitor", t.monitor, f"val_loss or val_accuracy for a "
                      f"{model.task} model (val_mean_iou is segmentation's)")
        formats = params.export_formats(name)
        where = params.export_formats_key(name)
        if len(set(formats)) != len(formats):
            raise ParamsError(f"params.yaml: {where} = {list(formats)}: a format is listed "
                              "twice; list each once")
        for fmt in formats:
            if fmt not in params.export.parity and fmt not in model.export_parity:
                raise ParamsError(f"params.yaml: export.parity.{fmt}: missing; {where} "
                                  f"lists {fmt}, so give its max_abs_diff and min_agreement")
        if model.task not in params.prepare:
            raise ParamsError(f"params.yaml: models.{name}.task = {model.task!r}: no "
                              f"prepare.{model.task} section says where its data comes from")


def _check_task_fields(params: Params) -> None:
    """A field that applies to other tasks only (``x-tasks`` in the schema), given a value
    other than its default in a section of this task, is an error: the task would ignore it,
    and the user would believe it set something."""
    sections = [(f"prepare.{t}", cfg, t) for t, cfg in params.prepare.items()]
    sections += [(f"augment.{t}", cfg, t) for t, cfg in params.augment.items()]
    for name, model in params.models.items():
        sections.append((f"models.{name}.train", model.train, model.task))
        sections += [(f"models.{name}.export_parity.{fmt}", threshold, model.task)
                     for fmt, threshold in model.export_parity.items()]
    for key, cfg, task in sections:
        for f in dataclasses.fields(cfg):
            applies = field_tasks(type(cfg), f.name)
            if applies is None or task in applies:
                continue
            value = getattr(cfg, f.name)
            default = type(cfg).__pydantic_fields__[f.name].get_default(
                call_default_factory=True)
            if value != default:
                _fail(f"{key}.{f.name}", value, f"{short_repr(default)} or no value: it applies "
                      f"to {' and '.join(applies)} only, and {task} would ignore it")
