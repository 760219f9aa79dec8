"""Loading trained models: always with safe_mode, never running code from the file."""

from __future__ import annotations

from pathlib import Path

import keras

from visionpipe.errors import ModelError


def load_model(path: Path) -> keras.Model:
    """Load a .keras file with safe_mode on (no arbitrary code from the file)."""
    if not path.exists():
        raise ModelError(f"{path}: not found; run the train stage first (`dvc repro`)")
    try:
        return keras.models.load_model(path, safe_mode=True, compile=False)
    except Exception as exc:  # keras raises ValueError, TypeError, ... for unsafe files
        msg = " ".join(str(exc).split())[:300]
        raise ModelError(f"{path}: cannot be loaded safely ({type(exc).__name__}: {msg}); "
                         "retrain it with `dvc repro`") from None
