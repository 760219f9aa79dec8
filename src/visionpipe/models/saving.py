"""Loading trained models: always with safe_mode, never running code from the file."""

from __future__ import annotations

import zipfile
from pathlib import Path

import keras

from visionpipe.errors import ModelError


def load_model(path: Path) -> keras.Model:
    """Load a .keras file with safe_mode on (no arbitrary code from the file)."""
    if not path.exists():
        raise ModelError(f"{path}: not found; run the train stage first (`dvc repro`)")
    _register_keras_cv(path)
    try:
        return keras.models.load_model(path, safe_mode=True, compile=False)
    except Exception as exc:  # noqa: BLE001 - keras raises ValueError, TypeError, ... for unsafe files
        msg = " ".join(str(exc).split())[:300]
        raise ModelError(f"{path}: cannot be loaded safely ({type(exc).__name__}: {msg}); "
                         "retrain it with `dvc repro`") from None


def _register_keras_cv(path: Path) -> None:
    """Import keras-cv before loading a model built from its classes (YOLO), so Keras knows
    them; other models do not pay for the import."""
    try:
        with zipfile.ZipFile(path) as archive:
            uses = b'"keras_cv' in archive.read("config.json")
    except (OSError, KeyError, zipfile.BadZipFile):
        return  # load_model reports what is wrong with the file
    if uses:
        import keras_cv  # noqa: F401
