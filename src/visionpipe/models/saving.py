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


def float32_model(model: keras.Model) -> keras.Model:
    """``model`` computing in float32: a model trained under a mixed policy (mixed_bfloat16,
    mixed_float16) keeps float32 variables but computes in 16 bits, which TFLite cannot
    convert (bfloat16 ops) and which CPUs without bfloat16 instructions emulate slowly. The
    same architecture is rebuilt with every mixed layer policy set to float32 and given the
    same variables; a float32 model comes back as it is."""
    config = keras.saving.serialize_keras_object(model)
    if not _to_float32(config):
        return model
    config.pop("compile_config", None)  # uncompiled, as load_model returns models
    rebuilt = keras.saving.deserialize_keras_object(config, safe_mode=True)
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def _to_float32(node) -> bool:
    """Set every mixed dtype policy in a serialized config to float32, in place; True if any
    was found."""
    found = False
    if isinstance(node, dict):
        conf = node.get("config")
        if (node.get("class_name") in ("DTypePolicy", "FloatDTypePolicy")
                and isinstance(conf, dict) and str(conf.get("name", "")).startswith("mixed_")):
            conf["name"] = "float32"
            return True
        for value in node.values():
            found = _to_float32(value) or found
    elif isinstance(node, list):
        for value in node:
            found = _to_float32(value) or found
    return found
