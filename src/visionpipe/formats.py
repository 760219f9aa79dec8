"""The deployable formats export writes, each returning a runner for the parity check.

Every format takes raw uint8 RGB pixels. The SavedModel's ``serving_default`` takes any size
and does the resizing inside (the task's ``serving_function``); ``serving_fixed_size`` takes the
model's size and returns the raw outputs, and is what the TFLite files are converted from.
TFLite and ONNX take the model's input size.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from visionpipe.data import records
from visionpipe.errors import ModelError
from visionpipe.models.saving import load_model
from visionpipe.serving import FILES, FIXED_SIGNATURE, OnnxRunner, SavedModelRunner, TFLiteRunner

# The raw outputs in parts (a detector's boxes and classes), where the task has them: the
# source of the full-int8 TFLite file, which then quantises each part on its own scale.
PARTS_SIGNATURE = "serving_fixed_size_parts"
# The inputs each format takes, as written in export.json and the model card.
INPUTS = {"keras": "float32 [batch, H, W, 3], values 0..255",
          "saved_model": "uint8 [batch, any height, any width, 3] (resized inside); "
                         "serving_fixed_size: uint8 [batch, H, W, 3]",
          "tflite": "uint8 [1, H, W, 3]", "tflite_dynamic": "uint8 [1, H, W, 3]",
          "tflite_int8": "uint8 [1, H, W, 3]", "onnx": "uint8 [batch, H, W, 3]"}


def format_meta(fmt: str, parts: bool) -> dict:
    """Format ``fmt``'s entry in export.json (``parts``: the task has quantization_parts)."""
    meta = {"path": FILES[fmt], "input": INPUTS[fmt]}
    if parts and fmt == "tflite_int8":
        meta["outputs"] = ("the raw outputs in parts (signature serving_fixed_size_parts), each "
                           "uint8 with its own scale and zero point: dequantised and "
                           "concatenated on the last axis in name order they are "
                           "serving_fixed_size's scores")
    return meta


def file_size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (a SavedModel)."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def representative(data_dir: Path, limit: int):
    """The first ``limit`` train images, one at a time, for int8 calibration."""
    for i, example in enumerate(records.read_split(data_dir, "train")):
        if i >= limit:
            return
        yield {"images": example.image[None].astype(np.uint8)}


def write_saved_model(task, model, size, class_names, policy: str, path: Path,
                      scale: tuple[int, int] | None = None, overlap: float = 0.25) -> None:
    """A SavedModel with two signatures over uint8 pixels: ``serving_default`` takes any size
    (resized inside as prepare resizes) and returns the task's outputs (``served_outputs``);
    ``serving_fixed_size`` takes the model's size and returns scores (the TFLite source).
    ``scale`` and ``overlap``: see Task.serving_function (a model trained on crops).
    Where the task splits its raw outputs for int8 (``quantization_parts``), a third,
    ``serving_fixed_size_parts``, returns those parts (the full-int8 file's source)."""

    serve = task.serving_function(model, size, policy, class_names, scale=scale,
                                  overlap=overlap)
    parts = task.quantization_parts(model)

    def serve_fixed(images):
        return {"scores": task.fixed_outputs(model(tf.cast(images, tf.float32),
                                                   training=False))}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", tf.function(serve), input_signature=[
        tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    archive.add_endpoint(FIXED_SIGNATURE, tf.function(serve_fixed), input_signature=[
        tf.TensorSpec([None, *size, 3], tf.uint8, name="images")])
    if parts is not None:
        archive.add_endpoint(PARTS_SIGNATURE, tf.function(
            lambda images: parts(tf.cast(images, tf.float32))), input_signature=[
            tf.TensorSpec([None, *size, 3], tf.uint8, name="images")])
    # No gradient functions: nothing trains from the export, and tracing them took about a
    # third of the default YOLO's SavedModel export on a 2-core CPU (docs/performance.md).
    archive.write_out(str(path), verbose=False,
                      options=tf.saved_model.SaveOptions(experimental_custom_gradients=False))


def _write_keras(*, model, path: Path, forward, **_):
    model.save(path)
    reloaded = load_model(path)
    return lambda x: forward(reloaded, x.astype(np.float32))


def _write_saved_model(*, path: Path, signature: str, **_):
    return SavedModelRunner(path, signature).predict  # written by write_saved_model


def _tflite_writer(quantize: str):
    def write(*, path: Path, archive: Path, representative, parts: bool = False, **_):
        # Full int8 quantises each output on one scale: a task with parts is converted from
        # them (formats.PARTS_SIGNATURE), so no part loses its resolution to another's range.
        split = parts and quantize == "full"
        signature = PARTS_SIGNATURE if split else FIXED_SIGNATURE
        converter = tf.lite.TFLiteConverter.from_saved_model(str(archive),
                                                             signature_keys=[signature])
        if quantize != "none":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]  # int8 weights
        if quantize == "full":
            converter.representative_dataset = representative
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.uint8
            converter.inference_output_type = tf.uint8
        path.write_bytes(converter.convert())
        return TFLiteRunner(path).predict
    return write


def _write_onnx(*, model, path: Path, size, fixed_outputs=lambda outputs: outputs, **_):
    try:
        import tf2onnx
    except ImportError:
        raise ModelError("export.formats lists onnx but tf2onnx is not installed: "
                         "`pip install tf2onnx onnxruntime` (pinned in requirements.txt), "
                         "or remove onnx from export.formats") from None
    spec = (tf.TensorSpec([None, *size, 3], tf.uint8, name="images"),)

    @tf.function(input_signature=spec)
    def serve(images):
        return {"scores": fixed_outputs(model(tf.cast(images, tf.float32), training=False))}

    tf2onnx.convert.from_function(serve, input_signature=spec, opset=17, output_path=str(path))
    return OnnxRunner(path).predict


WRITERS = {"keras": _write_keras, "saved_model": _write_saved_model,
           "tflite": _tflite_writer("none"), "tflite_dynamic": _tflite_writer("dynamic"),
           "tflite_int8": _tflite_writer("full"), "onnx": _write_onnx}
