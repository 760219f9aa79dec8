"""How a model is set up to train: its precision policy, optimizer and learning-rate schedule."""

from __future__ import annotations

import contextlib

import keras

from visionpipe.config import TrainConfig


@contextlib.contextmanager
def dtype_policy(name: str):
    """Layers built inside compute in ``name`` (mixed_bfloat16: bfloat16 maths, float32
    variables); the global policy is float32 again afterwards, for the caller's models."""
    keras.mixed_precision.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


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
