"""Small helpers the stages share."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def fresh_dir(target: Path):
    """Yield an empty temporary folder beside ``target``; on success it replaces ``target``.

    A stage killed halfway leaves the previous output (or none), never a half-written one.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def measure_co2(params, layout, model_name: str, stage: str):
    """codecarbon around one model stage, as params.tracking says; see tracking/carbon.py."""
    from visionpipe.tracking.carbon import track_emissions

    tracking = params.tracking
    return track_emissions(stage, layout.emissions(model_name),
                           country_iso_code=tracking.country_iso_code,
                           enabled=tracking.codecarbon)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow/Keras together."""
    import keras

    keras.utils.set_random_seed(seed)
