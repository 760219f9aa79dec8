"""Fine-tuning in phases (keras-io's transfer-learning recipe), from ``models.<name>.train``:

1. epochs 1..``freeze_epochs``: the backbone frozen, only the rest trains, at
   ``learning_rate``;
2. the remaining epochs: the ``unfreeze`` part of the backbone trains too (``all``, or the top
   N blocks), at ``fine_tune_learning_rate`` (null: learning_rate / 10), with a new optimizer.

A pretrained backbone's batch normalisation never trains (inference mode, its statistics kept).

A model's backbone is its nested model named ``backbone`` (keras-cv's detector: its
``.backbone``); blocks are read from the layer names keras.applications and keras-cv give
(``conv4_block2_*``, ``block_12_*``, ``block6a_*``, ``expanded_conv_3_*``, ``stack2_*``): the
layers before the first block form the stem, layers after the last join it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import keras

from visionpipe.config import TrainConfig
from visionpipe.errors import ParamsError
from visionpipe.models.pretrained import nested_backbone

BLOCK = re.compile(r"^(conv\d+_block\d+|block_?\d+[a-z]?|expanded_conv(?:_\d+)?|stack\d+|"
                   r"stage\d+_block\d+|stage\d+|enc\d+|down\d+)(?:_|$)")


@dataclass(frozen=True)
class Phase:
    """Epochs ``start`` < e <= ``end`` (1-based, as history.csv counts) trained with the
    backbone's ``unfreeze`` part trainable (``frozen``: none of it) at ``learning_rate``."""

    index: int
    start: int
    end: int
    unfreeze: str | int  # "frozen", "all" or a number of top blocks
    learning_rate: float

    def describe(self) -> str:
        if self.unfreeze == "frozen":
            return "backbone frozen"
        if self.unfreeze == "all":
            return "all layers"
        return f"top {self.unfreeze} backbone blocks"


def phases(t: TrainConfig, has_backbone: bool, key: str) -> list[Phase]:
    """The phases ``t`` asks for; ``key`` is models.<name>.train. A model without a backbone
    has one phase, and any fine-tuning setting is an error naming its key."""
    if not has_backbone:
        for field, default in (("freeze_epochs", 0), ("unfreeze", "all"),
                               ("fine_tune_learning_rate", None)):
            value = getattr(t, field)
            if value != default:
                raise ParamsError(f"params.yaml: {key}.{field} = {value!r}: this model has no "
                                  f"pretrained backbone to freeze or unfreeze; expected "
                                  f"{default if default is not None else 'null'} (families "
                                  "with one: applications, unet with an encoder, yolo)")
        return [Phase(0, 0, t.epochs, "all", t.learning_rate)]
    if t.freeze_epochs > t.epochs:
        raise ParamsError(f"params.yaml: {key}.freeze_epochs = {t.freeze_epochs}: expected at "
                          f"most epochs ({t.epochs})")
    if t.freeze_epochs == 0 and t.fine_tune_learning_rate is not None:
        raise ParamsError(f"params.yaml: {key}.fine_tune_learning_rate = "
                          f"{t.fine_tune_learning_rate!r}: applies after frozen epochs; set "
                          "freeze_epochs above 0, or null and use learning_rate")
    out = []
    if t.freeze_epochs:
        out.append(Phase(0, 0, t.freeze_epochs, "frozen", t.learning_rate))
    if t.freeze_epochs < t.epochs:
        rate = (t.fine_tune_learning_rate if t.fine_tune_learning_rate is not None
                else t.learning_rate / 10 if t.freeze_epochs else t.learning_rate)
        unfreeze = "frozen" if t.unfreeze == 0 else t.unfreeze
        out.append(Phase(len(out), t.freeze_epochs, t.epochs, unfreeze, rate))
    return out


def phase_at(plan: list[Phase], epochs_done: int) -> Phase:
    """The phase whose settings a checkpoint after ``epochs_done`` epochs was saved with (the
    first phase before any)."""
    return next((p for p in plan if p.start < epochs_done <= p.end), plan[0])


def phase_config(t: TrainConfig, phase: Phase) -> TrainConfig:
    """``t`` as the phase's optimizer sees it: its epochs and learning rate (a schedule runs
    over the phase, and its warm-up fits inside it)."""
    epochs = max(1, phase.end - phase.start)
    return dataclasses.replace(
        t, epochs=epochs, learning_rate=phase.learning_rate,
        min_learning_rate=min(t.min_learning_rate, phase.learning_rate),
        warmup_epochs=min(t.warmup_epochs, max(0.0, epochs - 1.0)))


def blocks(backbone: keras.Model) -> list[list[keras.layers.Layer]]:
    """The backbone's layers grouped: the stem, then each block in order (layers after the last
    block join it)."""
    groups: list[list] = [[]]
    names: list[str | None] = [None]
    for layer in backbone.layers:
        match = BLOCK.match(layer.name)
        if match and match.group(1) != names[-1]:
            groups.append([])
            names.append(match.group(1))
        groups[-1].append(layer)
    if len(groups) > 1 and not groups[0]:
        groups.pop(0)
    return groups


def block_count(model: keras.Model) -> int:
    """How many blocks ``unfreeze`` can count in the model's backbone (after the stem)."""
    backbone = nested_backbone(model)
    return 0 if backbone is None else max(0, len(blocks(backbone)) - 1)


def apply(model: keras.Model, phase: Phase, key: str, *, keep_statistics: bool = False) -> None:
    """Set what trains in ``phase``; ``key`` (models.<name>.train) names a bad unfreeze.

    ``keep_statistics`` (a backbone with pretrained weights): its batch normalisation layers
    never train, so they run in inference mode and keep the statistics of the weights, also
    once the rest is unfrozen (keras-io's advice). In Keras 3 a non-trainable BatchNormalization
    is what does that: ``backbone(x, training=False)`` in a functional model is overridden by
    fit's ``training=True`` (keras/src/models/functional.py, operation_fn)."""
    backbone = nested_backbone(model)
    if backbone is None:
        return
    _set_trainable(backbone, phase, key)
    if keep_statistics:
        for layer in backbone.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False


def _set_trainable(backbone: keras.Model, phase: Phase, key: str) -> None:
    if phase.unfreeze == "all":
        backbone.trainable = True
        for layer in backbone.layers:
            layer.trainable = True
        return
    backbone.trainable = phase.unfreeze != "frozen"
    if phase.unfreeze == "frozen":
        return
    groups = blocks(backbone)
    available = len(groups) - 1  # the stem never counts as a block
    if phase.unfreeze > available:
        raise ParamsError(f"params.yaml: {key}.unfreeze = {phase.unfreeze}: the backbone has "
                          f"{available} blocks; expected at most {available}, or all")
    top = {id(layer) for group in groups[len(groups) - phase.unfreeze:] for layer in group}
    for layer in backbone.layers:
        layer.trainable = id(layer) in top


def trainable_params(model: keras.Model) -> int:
    """Parameters the optimizer updates now."""
    return int(sum(math.prod(v.shape) for v in model.trainable_weights))


class TrainableLogger(keras.callbacks.Callback):
    """Adds ``trainable_params`` to each epoch's logs (history.csv, MLflow): what trained then."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["trainable_params"] = float(trainable_params(self.model))
