"""Exported models, run without the training code: SavedModel, TFLite and ONNX.

This module imports TensorFlow, NumPy and (for ONNX) onnxruntime, never Keras or the model
code, so `visionpipe predict` works where only ``models/<model>/export/`` was pulled.

Every exported format takes raw RGB pixels as uint8. The SavedModel's ``serving_default``
takes any size and resizes inside the graph with :func:`fit_images`; its ``serving_fixed_size``
(what :func:`open_runner` runs), the TFLite and ONNX files take the model's own size and
return the model's outputs there, and callers resize with the same function first.
"""

from __future__ import annotations

import json
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


def read_meta(export_dir: Path) -> dict:
    """The export's ``export.json``: task, class names, input size, resize policy, formats."""
    path = Path(export_dir) / META_FILE
    if not path.is_file():
        raise ModelError(f"{path}: not found; {export_dir} is not a visionpipe export. Build it "
                         "with `dvc repro export@<model>` or fetch it with `dvc pull "
                         "models/<model>/export`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: not valid JSON ({exc}); rebuild the export") from None


class SavedModelRunner:
    """A SavedModel signature's ``scores`` for uint8 images (``serving_default``: any size;
    ``serving_fixed_size``: the model's size)."""

    def __init__(self, path: Path, signature: str = "serving_default"):
        self.fn = tf.saved_model.load(str(path)).signatures[signature]

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.fn(images=tf.constant(images, tf.uint8))["scores"].numpy()


class TFLiteRunner:
    """A .tflite file, one image per invoke as on a device; int8 outputs are dequantised.

    A file with several outputs (a detector's full-int8 file: boxes and classes, each on its
    own scale) is run through its one signature; its outputs, each dequantised, are
    concatenated on the last axis in name order, which gives the raw outputs of one tensor."""

    def __init__(self, path: Path | None = None, content: bytes | None = None):
        import warnings

        with warnings.catch_warnings():  # TF 2.20+ points at ai_edge_litert; same runtime
            warnings.simplefilter("ignore", UserWarning)
            self.interp = tf.lite.Interpreter(model_path=str(path) if path else None,
                                              model_content=content)
        self.interp.allocate_tensors()
        self.inp = self.interp.get_input_details()[0]
        self.out = self.interp.get_output_details()[0]
        self.parts = None
        if len(self.interp.get_output_details()) > 1:
            [key] = self.interp.get_signature_list()  # converted from one signature
            self.signature = self.interp.get_signature_runner(key)
            self.parts = self.signature.get_output_details()

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

    def __init__(self, path: Path):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ModelError("onnxruntime is not installed: `pip install onnxruntime` to run "
                             f"{path}, or choose another format") from None
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: images.astype(np.uint8)})[0]


def open_runner(export_dir: Path, fmt: str, meta: dict | None = None):
    """A runner of format ``fmt`` of the export in ``export_dir``: uint8 images at the model's
    size in, the model's outputs out; errors say what to do."""
    meta = meta if meta is not None else read_meta(export_dir)
    if fmt not in RUNNABLE:
        raise ModelError(f"format {fmt!r} cannot be run by predict; choose one of "
                         + ", ".join(RUNNABLE))
    exported = sorted(meta.get("formats", {}))
    path = Path(export_dir) / FILES[fmt]
    if fmt not in exported or not path.exists():
        raise ModelError(f"{path}: format {fmt} was not exported (this export has: "
                         f"{', '.join(exported) or 'none'}); add it to export.formats in "
                         "params.yaml and run `dvc repro`, or pick one of those")
    if fmt == "saved_model":
        return SavedModelRunner(path, FIXED_SIGNATURE)
    if fmt == "onnx":
        return OnnxRunner(path)
    return TFLiteRunner(path)
