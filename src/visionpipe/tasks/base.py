"""The task interface: what every task must decide, and what it may change.

A task (classification, segmentation, detection) owns what differs between them: the model's
inputs and targets, loss and metrics, test metrics, plots, the agreement that export parity is
judged on and what the SavedModel serves. Stages call these methods unconditionally, so a
misspelt override fails loudly instead of quietly taking a default (keras-hub's ``Task``,
ultralytics' ``BaseTrainer``). A task knows no model family: a family whose models need more
than Keras' ``compile``/``predict`` (a detector's own losses and box decoding) hands the task an
object of the task's ``Hooks`` class when it registers (:mod:`visionpipe.models.registry`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from visionpipe.errors import ModelError


class Task(abc.ABC):
    """Base class of every task; subclasses are listed in :mod:`visionpipe.tasks.registry`."""

    name: ClassVar[str]
    # Test metrics of reports/metrics/<model>.json that make the model's headline; the first
    # ranks models (higher is better) and is what the task's baseline is compared on.
    headline_metrics: ClassVar[tuple[str, ...]]
    # The key of agreement() that export parity thresholds (min_agreement) apply to.
    agreement_key: ClassVar[str]
    # What the SavedModel's serving_default returns, for export.json and the model card.
    served_outputs: ClassVar[dict[str, str]]
    # Whether `visionpipe predict` runs this task's exports on a folder of images.
    predicts_folders: ClassVar[bool] = False
    # Whether the targets stay valid when images are resized (a class label does; masks and
    # boxes move): the benchmark's image-size scaling needs it.
    size_independent_targets: ClassVar[bool] = False
    # The SavedModel signature export parity is measured on: serving_default when it returns
    # the model's scores, else the fixed-size signature of raw outputs (formats.FIXED_SIGNATURE).
    parity_on_fixed_signature: ClassVar[bool] = False
    # The class a family of this task must hand over (None: the task needs nothing from it).
    Hooks: ClassVar[type | None] = None

    def __init__(self, hooks: Any = None):
        hooks_class = type(self).Hooks
        if hooks_class is not None and not isinstance(hooks, hooks_class):
            raise ModelError(f"a {self.name} model family must register with hooks=<a "
                             f"{hooks_class.__name__}> (got {type(hooks).__name__}); see "
                             "docs/extending.md")
        if hooks_class is None and hooks is not None:
            raise ModelError(f"the {self.name} task takes no family hooks (got "
                             f"{type(hooks).__name__})")
        self.hooks = hooks

    # ------------------------------------------------------------ what a task must decide

    @abc.abstractmethod
    def to_model_io(self, num_classes: int) -> Callable[[dict], tuple]:
        """A function mapping one parsed record (tensors) to the model's (inputs, targets)."""

    @abc.abstractmethod
    def targets(self, rec: dict) -> Any:
        """The ground truth of one parsed numpy record, as evaluate() takes it."""

    @abc.abstractmethod
    def predict(self, model, images: np.ndarray, batch_size: int, overlap: float) -> Any:
        """The model's outputs on test images (float32 pixels), as evaluate() takes them."""

    @abc.abstractmethod
    def evaluate(self, truths, outputs, class_names: list[str], cfg) -> dict:
        """Test metrics; ``per_class`` (a mapping of class -> scores) and ``baseline`` (what a
        trivial model scores) where the task has them."""

    @abc.abstractmethod
    def plots(self, images: np.ndarray, ids: list[str], truths, outputs,
              class_names: list[str], out_dir: Path, cfg) -> list[Path]:
        """Write the task's plots into ``out_dir``; returns their paths."""

    @abc.abstractmethod
    def agreement(self, reference: np.ndarray, other: np.ndarray) -> dict:
        """How closely another runtime's forward() outputs follow the Keras model's; holds
        ``agreement_key``."""

    @abc.abstractmethod
    def serving_function(self, model, size: tuple[int, int], policy: str,
                         class_names: list[str], scale: tuple[int, int] | None = None,
                         overlap: float = 0.25) -> Callable:
        """The SavedModel's ``serving_default``: uint8 images of any size -> the outputs
        ``served_outputs`` describes. ``scale``: the size prepare gave whole images (its
        image_size; larger than the model's ``size`` only for a model trained on crops, which
        then sees tiles of ``overlap``, as evaluate does); None: ``size``."""

    # -------------------------------------------------------------- what a task may change

    def padding_values(self) -> Any:
        """Padding of to_model_io()'s outputs when batching (None: they never need it)."""
        return None

    def loss(self, cfg, num_classes: int):
        """The training loss; a task whose models bring their own overrides compile()."""
        raise NotImplementedError(f"the {self.name} task defines neither loss() nor compile()")

    def metrics(self, num_classes: int) -> list:
        """Metrics fit reports every epoch."""
        return []

    def compile(self, model, optimizer, cfg, architecture, num_classes: int) -> None:
        """Compile for training with the task's loss and metrics and ``cfg.jit_compile``."""
        model.compile(optimizer=optimizer, loss=self.loss(cfg, num_classes),
                      metrics=self.metrics(num_classes), jit_compile=cfg.jit_compile)

    def evaluation_model(self, model, cfg):
        """The model as evaluate runs it (``cfg``: the evaluate params)."""
        return model

    def explain(self, model, images: np.ndarray, ids: list[str], truths, outputs,
                class_names: list[str], out_dir: Path, cfg) -> dict:
        """Figures of where the model looked on test images, written into ``out_dir`` beside
        plots()'s (``cfg``: the evaluate params). Returns ``summary`` (a few words for
        evaluate's console line: what was drawn, or why nothing was) and ``path`` (the figure,
        or None); {} when the task explains nothing (the default)."""
        return {}

    def export_model(self, model, cfg):
        """The model as export writes it (``cfg``: the export params)."""
        return model

    def forward(self, model, images: np.ndarray) -> np.ndarray:
        """The outputs every exported format is compared on (one array per image batch)."""
        from visionpipe import batches

        return batches.predict(model, images, 64)

    def fixed_outputs(self, outputs):
        """The model's call outputs as one tensor: the fixed-size signature's ``scores``."""
        return outputs

    def quantization_parts(self, model) -> Callable | None:
        """For full-int8 files: float32 images -> the raw outputs as a dict of parts, each
        quantised on its own scale, whose concatenation on the last axis in name order is
        fixed_outputs(); None when fixed_outputs is one quantity (one scale fits it)."""
        return None

    def parity_images(self, truths: list, samples: int, cfg) -> int | None:
        """How many of the images of ``truths`` export parity is judged on (``cfg``: the
        export params); None when they are too few to judge on (export then adds the val
        and train images)."""
        return min(samples, len(truths))

    def parity_measures(self, reference: np.ndarray, other: np.ndarray, truths: list) -> dict:
        """Everything parity reports of another runtime's forward() outputs against the Keras
        model's on the images of ``truths``; holds each measure of parity_checks()."""
        return self.agreement(reference, other)

    def parity_checks(self) -> list[tuple[str, str, str]]:
        """(measure, ParityThreshold field that bounds it, "max" or "min") per parity check."""
        return [("max_abs_diff", "max_abs_diff", "max"),
                (self.agreement_key, "min_agreement", "min")]

    def export_meta(self, cfg) -> dict:
        """Keys export.json holds for this task beyond the common ones (``cfg``: the export
        params), e.g. how a detector's raw outputs are decoded."""
        return {}

    def resized_input_check(self, model, saved: Path, enlarged: np.ndarray,
                            as_prepared: np.ndarray, size, policy: str, ex,
                            overlap: float = 0.25) -> dict:
        """SavedModel fed ``enlarged`` images (resizing in the graph) against the Keras model
        fed ``as_prepared``, the same images resized the way prepare resizes them (PIL), and
        predicted as evaluate predicts them (tiles of ``overlap`` where they are larger than
        the model's input)."""
        from visionpipe.serving import SavedModelRunner

        served = SavedModelRunner(saved).predict(enlarged)
        keras_out = self.predict(model, as_prepared, 64, overlap)
        agreement = self.agreement(keras_out, served)
        diff = float(np.max(np.abs(keras_out.astype(np.float64) - served)))
        return {"input_size": list(enlarged.shape[1:3]), "resize": policy,
                "images": len(enlarged), "max_abs_diff": diff, **agreement,
                **judged(agreement, {self.agreement_key: ("export.resize_min_agreement", "min",
                                                          ex.resize_min_agreement)})}


def judged(values: dict, limits: dict[str, tuple[str, str, float]]) -> dict:
    """Checks of ``values`` against ``limits`` (measure -> (params key, "max" or "min",
    limit)): ``thresholds`` (measure -> limit), ``limits`` (measure -> {"key", "max"/"min"}),
    ``failed`` (the measures outside their limit) and ``passed``."""
    failed = [m for m, (_, bound, limit) in limits.items()  # NaN fails either bound
              if not (values[m] <= limit if bound == "max" else values[m] >= limit)]
    return {"thresholds": {m: limit for m, (_, _, limit) in limits.items()},
            "limits": {m: {"key": key, bound: limit} for m, (key, bound, limit) in limits.items()},
            "failed": failed, "passed": not failed}


def scores_serving(model, size: tuple[int, int], policy: str,
                   outputs: Callable[[Any, Any], dict]) -> Callable:
    """A ``serving_default`` for models whose call returns scores: images resized inside as
    prepare resizes them, then ``outputs(scores, images)``."""
    from visionpipe.geometry import fit_images

    def serve(images):
        return outputs(model(fit_images(images, size, policy), training=False), images)

    return serve
