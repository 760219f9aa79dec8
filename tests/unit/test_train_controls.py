"""Optimizers and learning-rate schedules built from params, checked against hand values."""

from __future__ import annotations

import keras
import pytest

from visionpipe.config import TrainConfig
from visionpipe.training import learning_rate, make_optimizer

STEPS = 10  # steps per epoch


def _rates(**cfg) -> list[float]:
    schedule = learning_rate(TrainConfig(**cfg), STEPS)
    steps = (0, 5, 10, 20, 29, 30, 55, 99, 100)
    return [float(schedule(s)) if callable(schedule) else schedule for s in steps]


def test_constant_rate():
    assert _rates(learning_rate=0.1) == [0.1] * 9


def test_step_decay_multiplies_every_step_epochs():
    rates = _rates(learning_rate=0.1, lr_schedule="step", step_epochs=3, step_factor=0.5)
    # steps 0..29: epochs 1-3 at 0.1; 30..59: 0.05; 90..119: 0.0125
    assert rates == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.0125, 0.0125])


def test_cosine_from_rate_to_minimum():
    rates = _rates(epochs=10, learning_rate=0.1, lr_schedule="cosine", min_learning_rate=0.01)
    import math

    expected = [0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * min(s, 100) / 100))
                for s in (0, 5, 10, 20, 29, 30, 55, 99, 100)]
    assert rates == pytest.approx(expected, rel=1e-5)


def test_warmup_then_cosine():
    rates = _rates(epochs=10, learning_rate=0.1, lr_schedule="warmup_cosine", warmup_epochs=2,
                   min_learning_rate=0.0)
    # linear 0 -> 0.1 over steps 0..20, then cosine over the remaining 80 steps
    assert rates[:4] == pytest.approx([0.0, 0.025, 0.05, 0.1])
    import math

    assert rates[6] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 35 / 80)), rel=1e-5)
    assert rates[-1] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("name,cls,extra", [
    ("sgd", keras.optimizers.SGD, {"momentum": 0.8}),
    ("adam", keras.optimizers.Adam, {}),
    ("adamw", keras.optimizers.AdamW, {}),
])
def test_optimizer_with_weight_decay(name, cls, extra):
    opt = make_optimizer(TrainConfig(optimizer=name, weight_decay=0.01, lr_schedule="cosine",
                                     **extra), STEPS)
    assert type(opt) is cls and opt.weight_decay == pytest.approx(0.01)
    assert isinstance(opt._learning_rate, keras.optimizers.schedules.CosineDecay)
    if name == "sgd":
        assert opt.momentum == pytest.approx(0.8)
