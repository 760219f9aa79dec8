"""Exported models, run without the training code: SavedModel, TFLite and ONNX.

This module imports TensorFlow, NumPy and (for ONNX) onnxruntime, never Keras or the model
code, so `visionpipe predict` works where only ``models/<model>/export/`` was pulled.

Every exported format takes raw RGB pixels as uint8. The SavedModel's ``serving_default``
takes any size and resizes inside the graph with :func:`fit_images`; its ``serving_fixed_size``
(what :func:`open_runner` runs), the TFLite and ONNX files take the model's own size and
return the model's outputs there, and callers resize with the same function first.

A file a loader cannot read is one ModelError naming the file and the format. What predict
checks before it loads anything (checksums, a SavedModel's ops) is in
:mod:`visionpipe.integrity`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tensorflow as tf

from visionpipe.config import PREDICT_FORMATS
from visionpipe.errors import ModelError

META_FILE = "export.json"
# The SavedModel signature taking uint8 at the model's size and returning its raw outputs
# as "scores" (the TFLite files are converted from it).
FIXED_SIGNATURE = "serving_fixed_size"
# Format -> file or folder inside the export directory.
FILES = {"keras": "model.keras", "saved_model": "saved_model", "tflite": "model.tflite",
         "tflite_dynamic": "model_dynamic_int8.tflite", "tflite_int8": "model_int8.tflite",
         "onnx": "model.onnx"}
RUNNABLE = PREDICT_FORMATS  # every format but .keras, which needs Keras
# Format -> what messages call it.
KINDS = {"saved_model": "SavedModel", "tflite": "TFLite model", "tflite_dynamic": "TFLite model",
         "tflite_int8": "TFLite model", "onnx": "ONNX model", "keras": "Keras model"}
MAX_META_BYTES = 16 << 20  # export.json is a few KiB; a bigger one is not ours
DEFAULT_REMEDY = "rebuild the export with `dvc repro export@<model>`"


def first_line(exc: BaseException, limit: int = 160, path: Path | None = None) -> str:
    """An exception's message on one line (its first), cut to ``limit`` characters; ``path``
    (which the message around it names already) shortened to its name where it appears."""
    text = " ".join(str(exc).strip().splitlines()[:1]) or type(exc).__name__
    if path is not None:
        text = text.replace(f"b'{path}", f"'{Path(path).name}").replace(str(path),
                                                                          Path(path).name)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def read_meta(export_dir: Path) -> dict:
    """The export's ``export.json``: task, class names, input size, resize policy, formats."""
    path = Path(export_dir) / META_FILE
    if not path.is_file():
        raise ModelError(f"{path}: not found; {export_dir} is not a visionpipe export. Build it "
                         "with `dvc repro export@<model>` or fetch it with `dvc pull "
                         "models/<model>/export`")
    try:
        if path.stat().st_size > MAX_META_BYTES:
            raise ModelError(f"{path}: {path.stat().st_size} bytes, too large for an "
                             "export.json (a few KiB); rebuild the export")
        meta = json.loads(path.read_bytes())
    except OSError as exc:
        raise ModelError(f"{path}: cannot be read ({exc.strerror or exc}); check its "
                         "permissions") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ModelError(f"{path}: not valid JSON ({first_line(exc, 100)}); rebuild the "
                         "export with `dvc repro export@<model>`") from None
    if not isinstance(meta, dict):
        kind = {list: "array", str: "string", int: "number", float: "number", bool: "boolean",
                type(None): "null"}.get(type(meta), type(meta).__name__)
        raise ModelError(f"{path}: holds a JSON {kind}, not an object of export settings; "
                         "rebuild the export with `dvc repro export@<model>`")
    return meta


def _loaded(path: Path, fmt: str, load: Callable, fix: str):
    """``load()``, its failures one ModelError naming the file and the format, ending in
    ``fix``: a damaged file fails inside the loaders in many ways (OSError, ValueError,
    protobuf and flatbuffer errors, onnxruntime's own)."""
    try:
        return load()
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - only the loader call is wrapped
        raise ModelError(f"{path}: not a loadable {KINDS[fmt]} ({first_line(exc, path=path)}); "
                         f"the file is damaged or was replaced: {fix}") from None


class SavedModelRunner:
    """A SavedModel signature's ``scores`` for uint8 images (``serving_default``: any size;
    ``serving_fixed_size``: the model's size)."""

    def __init__(self, path: Path, signature: str = "serving_default",
                 fix: str = DEFAULT_REMEDY):
        self.loaded = _loaded(path, "saved_model", lambda: tf.saved_model.load(str(path)), fix)
        signatures = getattr(self.loaded, "signatures", {})
        if signature not in signatures:
            raise ModelError(f"{path}: the SavedModel has no signature {signature!r} (it has: "
                             f"{', '.join(sorted(signatures)) or 'none'}); not a visionpipe "
                             f"export: {fix}")
        self.fn = signatures[signature]
        spec = self.fn.structured_input_signature[1].get("images")
        if (spec is None or spec.shape.rank != 4
                or "scores" not in (self.fn.structured_outputs or {})):
            raise ModelError(f"{path}: signature {signature!r} does not take `images` and "
                             f"return `scores`; not a visionpipe export: {fix}")
        self.input_hw = tuple(spec.shape[1:3])
        self.run_errors = (tf.errors.OpError, ValueError)  # what a damaged model raises

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.fn(images=tf.constant(images, tf.uint8))["scores"].numpy()


class TFLiteRunner:
    """A .tflite file, one image per invoke as on a device; int8 outputs are dequantised.

    A file with several outputs (a detector's full-int8 file: boxes and classes, each on its
    own scale) is run through its one signature; its outputs, each dequantised, are
    concatenated on the last axis in name order, which gives the raw outputs of one tensor."""

    def __init__(self, path: Path | None = None, content: bytes | None = None,
                 fix: str = DEFAULT_REMEDY):
        import warnings

        def load():
            # From bytes, not model_path: TFLite verifies a flatbuffer handed over as bytes,
            # while a mapped file is trusted (a truncated one crashed the process).
            data = content if content is not None else Path(path).read_bytes()
            with warnings.catch_warnings():  # TF 2.20+ points at ai_edge_litert; same runtime
                warnings.simplefilter("ignore", UserWarning)
                interp = tf.lite.Interpreter(model_content=data)
            interp.allocate_tensors()
            details = interp.get_input_details(), interp.get_output_details()
            if len(details[0]) != 1 or not details[1]:
                raise ValueError(f"{len(details[0])} inputs and {len(details[1])} outputs, "
                                 "not one image input and the model's outputs")
            signature, parts = None, None
            if len(details[1]) > 1:
                [key] = interp.get_signature_list()  # converted from one signature
                signature = interp.get_signature_runner(key)
                parts = signature.get_output_details()
            return interp, details, signature, parts

        self.interp, (inputs, outputs), self.signature, self.parts = _loaded(
            path or Path("<bytes>"), "tflite", load, fix)
        self.inp, self.out = inputs[0], outputs[0]
        self.input_hw = tuple(int(d) for d in self.inp["shape"][1:3])
        self.run_errors = (RuntimeError, ValueError)  # what a damaged model raises

    def _one(self, image: np.ndarray) -> np.ndarray:
        if self.parts is None:
            self.interp.set_tensor(self.inp["index"], image[None].astype(self.inp["dtype"]))
            self.interp.invoke()
            return dequantise(self.interp.get_tensor(self.out["index"])[0], self.out)
        out = self.signature(images=image[None].astype(self.inp["dtype"]))
        return np.concatenate([dequantise(out[name][0], self.parts[name])
                               for name in sorted(out)], axis=-1)

    def predict(self, images: np.ndarray) -> np.ndarray:
        return np.stack([self._one(image) for image in images])


def dequantise(values: np.ndarray, details: dict) -> np.ndarray:
    """An output tensor as float32: integer outputs through their scale and zero point."""
    if np.issubdtype(values.dtype, np.floating):
        return values.astype(np.float32)
    scale, zero = details["quantization"]
    return ((values.astype(np.float32) - zero) * scale).astype(np.float32)


class OnnxRunner:
    """An ONNX file through onnxruntime on the CPU."""

    def __init__(self, path: Path, fix: str = DEFAULT_REMEDY):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ModelError("onnxruntime is not installed: `pip install onnxruntime` to run "
                             f"{path}, or choose another format") from None
        self.session = _loaded(path, "onnx", lambda: ort.InferenceSession(
            str(path), providers=["CPUExecutionProvider"]), fix)
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        self.input_hw = tuple(first.shape[1:3])
        state = ort.capi.onnxruntime_pybind11_state  # what a damaged model raises
        self.run_errors = (state.Fail, state.InvalidArgument, state.RuntimeException,
                           RuntimeError, ValueError)

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: images.astype(np.uint8)})[0]


def format_path(export_dir: Path, fmt: str, meta: dict) -> Path:
    """The file or folder of format ``fmt`` in the export; an error saying what to do when
    predict cannot run that format or the export lacks it."""
    if fmt not in RUNNABLE:
        raise ModelError(f"format {fmt!r} cannot be run by predict; choose one of "
                         + ", ".join(RUNNABLE))
    formats = meta.get("formats")
    exported = sorted(formats) if isinstance(formats, dict) else []
    path = Path(export_dir) / FILES[fmt]
    if fmt not in exported or not (path.exists() or path.is_symlink()):
        raise ModelError(f"{path}: format {fmt} was not exported (this export has: "
                         f"{', '.join(exported) or 'none'}); add it to export.formats in "
                         "params.yaml and run `dvc repro`, or pick one of those")
    return path


def open_runner(export_dir: Path, fmt: str, meta: dict | None = None,
                fix: str = DEFAULT_REMEDY):
    """A runner of format ``fmt`` of the export in ``export_dir``: uint8 images at the model's
    size in, the model's outputs out; errors say what to do (a damaged file: ``fix``). The
    model's input size must be export.json's ``image_size``.

    It checks nothing before loading: `visionpipe predict` loads exports through
    :func:`visionpipe.integrity.open_checked`, which verifies the files first."""
    meta = meta if meta is not None else read_meta(export_dir)
    path = format_path(export_dir, fmt, meta)
    if fmt == "saved_model":
        runner = SavedModelRunner(path, FIXED_SIGNATURE, fix)
    elif fmt == "onnx":
        runner = OnnxRunner(path, fix)
    else:
        runner = TFLiteRunner(path, fix=fix)
    size = meta.get("image_size")
    if size is not None and list(runner.input_hw) != list(size):
        raise ModelError(f"{path}: takes {'x'.join(map(str, runner.input_hw))} images but "
                         f"export.json's image_size is {size}; export.json was edited or "
                         f"belongs to another export: {fix}")
    return runner
