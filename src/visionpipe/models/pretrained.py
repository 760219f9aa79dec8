"""Where a model's starting weights come from: a download (ImageNet, COCO), a local file, or none.

A family's ``weights`` field (``models.<name>.architecture.weights``) is ``null`` (random
initialisation), a name the family downloads (``imagenet``; keras-cv preset names for YOLO), or
a local file under ``weights/``: a visionpipe ``.keras`` model whose nested ``backbone`` is
copied, or a Keras weights file (``.weights.h5``, or the legacy ``.h5`` files keras.applications
downloads). ``weights/`` is a dependency of every train stage in dvc.yaml, so a changed file
there retrains; a file elsewhere is refused, as train would not depend on it.

Builders run without knowing the model's name or the project root (a family's builder only gets
the input shape, the classes and its params); :func:`context` tells them, so every error names
the params key as the user wrote it and a relative path resolves against the project.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visionpipe.errors import ParamsError

WEIGHTS_DIR = "weights"  # local weight files live here (a dependency of train in dvc.yaml)
FILE_SUFFIXES = (".keras", ".weights.h5", ".h5")


@dataclass(frozen=True)
class _Where:
    key: str  # the params key of the architecture, e.g. models.mobilenet.architecture
    root: Path


_WHERE: contextvars.ContextVar[_Where | None] = contextvars.ContextVar(
    "visionpipe_weights_where", default=None)
_NOWHERE = _Where("architecture", Path("."))  # outside context(): a bare build


def _where() -> _Where:
    return _WHERE.get() or _NOWHERE


@contextlib.contextmanager
def context(key: str, root: Path) -> Iterator[None]:
    """Models built inside name ``key`` (``models.<name>.architecture``) in their errors and
    read local weight files relative to ``root``."""
    token = _WHERE.set(_Where(key, Path(root)))
    try:
        yield
    finally:
        _WHERE.reset(token)


def key(field: str = "weights") -> str:
    """The full params key of architecture field ``field``."""
    return f"{_where().key}.{field}"


def fail(field: str, value, why: str) -> ParamsError:
    """The one-line error about ``architecture.<field> = value``."""
    return ParamsError(f"params.yaml: {key(field)} = {value!r}: {why}")


def is_local(value: str | None) -> bool:
    """Whether ``value`` names a local file or folder (not null, not a download name)."""
    return value is not None and ("/" in value or value.endswith(FILE_SUFFIXES))


def local_path(value: str, field: str = "weights", *, folder: bool = False) -> Path:
    """The file (or preset folder) ``value`` names, checked: under weights/, present, of a
    known kind. Relative paths are read from the project root."""
    where = _where()
    path = Path(value)
    full = path if path.is_absolute() else where.root / path
    try:
        inside = full.resolve().relative_to((where.root / WEIGHTS_DIR).resolve())
    except ValueError:
        inside = None
    if inside is None or not inside.parts:
        raise fail(field, value, f"local weights must lie in {WEIGHTS_DIR}/ (every train stage "
                   f"depends on that folder in dvc.yaml, so a changed file retrains); copy it "
                   f"there, e.g. cp {value} {WEIGHTS_DIR}/, and set {field}: "
                   f"{WEIGHTS_DIR}/{path.name}")
    if not full.exists():
        raise fail(field, value, f"no such {'folder' if folder else 'file'}; put it in "
                   f"{WEIGHTS_DIR}/ or set {field}: null to start from random weights")
    if folder:
        if not full.is_dir():
            raise fail(field, value, "expected a folder (a keras-cv preset: config.json and "
                       "model.weights.h5)")
    elif not full.is_file() or not full.name.endswith(FILE_SUFFIXES):
        raise fail(field, value, "expected a file ending in " + ", ".join(FILE_SUFFIXES)
                   + " (a visionpipe model.keras, or a Keras weights file of the same backbone)")
    return full


def download(field: str, value: str, what: str, fetch: Callable, *, then: str):
    """``fetch()`` (a call that downloads ``what`` into Keras' cache); a failure (no network,
    a proxy, a partial file) is one line naming the key, the URL tried and how to supply the
    file locally (``then``: where to put it and what to set)."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):  # Keras prints "Downloading data from ..."
            return fetch()
    except Exception as exc:  # noqa: BLE001 - keras' get_file raises a bare Exception
        text = " ".join(str(exc).split())
        url = re.search(r"https?://\S+?(?=[:\s]|$)", text + " " + out.getvalue())
        tried = f" from {url.group(0)}" if url else ""
        reason = text.rsplit(" -- ", 1)[-1][:160] if text else type(exc).__name__
        raise fail(field, value, f"the {what} could not be downloaded{tried} ({reason}); "
                   f"{then}") from None


def copy_weights(target, source_weights: list[np.ndarray], field: str, value: str,
                 what: str) -> None:
    """Set ``target``'s weights to ``source_weights`` exactly, or say which one does not fit
    (a file of another architecture)."""
    mine = target.weights
    if len(mine) != len(source_weights):
        raise fail(field, value, f"{what} has {len(source_weights)} weight arrays where this "
                   f"backbone ({target.name}) has {len(mine)}: it was saved from another "
                   "architecture; use a file saved from the same backbone and width")
    for variable, array in zip(mine, source_weights, strict=True):
        if tuple(variable.shape) != tuple(array.shape):
            raise fail(field, value, f"{what}: weight {variable.path} has shape "
                       f"{tuple(array.shape)} where this backbone needs "
                       f"{tuple(variable.shape)}: it was saved from another architecture; "
                       "use a file saved from the same backbone and width")
    target.set_weights(source_weights)


def load_into(backbone, value: str, field: str = "weights") -> Path:
    """Load the local file ``value`` into ``backbone`` (a Keras model), exactly: a visionpipe
    ``.keras`` model gives its nested ``backbone``; a weights file is read by Keras. Returns
    the file's path."""
    path = local_path(value, field)
    if path.name.endswith(".keras"):
        from visionpipe.errors import ModelError
        from visionpipe.models.saving import load_model

        try:
            source = load_model(path)
        except ModelError as exc:
            raise fail(field, value, str(exc)) from None
        inner = nested_backbone(source)
        if inner is None:
            raise fail(field, value, f"the model in {path.name} ({source.name}) has no nested "
                       "'backbone' to start from; give a model of a family with a backbone "
                       "(e.g. applications) or a .weights.h5 file of this backbone")
        copy_weights(backbone, inner.get_weights(), field, value, f"the backbone of {path.name}")
        return path
    import warnings

    try:
        # Keras warns (and goes on) about each part of a file it could not match: a partial
        # load is a file of another architecture too.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            backbone.load_weights(str(path))
        skipped = [str(w.message) for w in caught if "Skipping" in str(w.message)]
        if skipped:
            raise ValueError(skipped[0])
    except Exception as exc:  # noqa: BLE001 - Keras raises ValueError, KeyError, OSError, ...
        text = " ".join(str(exc).split())[:200]
        raise fail(field, value, f"cannot be loaded into backbone {backbone.name} "
                   f"({type(exc).__name__}: {text}); it holds weights of another architecture "
                   "or is damaged: use a file saved from the same backbone and width") from None
    return path


def record(architecture, root: Path) -> dict | None:
    """Where a model's starting weights come from, for model.json and the checkpoints'
    fingerprint: the params value, and for a local file its path and SHA-256 (a folder: of
    each file in it); None when the architecture starts from random weights."""
    from visionpipe.integrity import record_files, sha256_of

    value = getattr(architecture, "weights", None)
    if value is None:
        return None
    out = {"weights": value}
    if is_local(value):
        full = Path(value) if Path(value).is_absolute() else Path(root) / value
        with context(_where().key, root):
            path = local_path(value, folder=full.is_dir())  # checked: inside weights/
        # A preset folder: the SHA-256 of its files' list (path, SHA-256, size), as export.json
        # records an export's files.
        out["sha256"] = (hashlib.sha256(json.dumps(record_files(path), sort_keys=True).encode())
                         .hexdigest() if path.is_dir() else sha256_of(path))
    return out


def nested_backbone(model):
    """The model's nested backbone (a layer named ``backbone``, or keras-cv's ``.backbone``);
    None when it has none."""
    try:
        return model.get_layer("backbone")
    except ValueError:
        inner = getattr(model, "backbone", None)
        return inner if inner is not None and hasattr(inner, "layers") else None
