"""export: the formats params ask for, each checked for parity with the Keras model.

Every format takes raw uint8 RGB pixels. The SavedModel's ``serving_default`` takes any size
and does the resizing inside; TFLite and ONNX take the model's input size. ``export.json``
beside the files says what predict needs (task, classes, size, resize policy, formats), and
``reports/model_cards/<model>.md`` describes the model for people.
"""

from __future__ import annotations

import tempfile
from functools import partial
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from visionpipe import __version__
from visionpipe.config import Params
from visionpipe.console import human_bytes
from visionpipe.data import records
from visionpipe.data.sources.image_folder import fit_to_size
from visionpipe.errors import ExportParityError, ModelError
from visionpipe.layout import Layout
from visionpipe.models.saving import load_model
from visionpipe.serving import (
    FILES,
    META_FILE,
    OnnxRunner,
    SavedModelRunner,
    TFLiteRunner,
    fit_images,
)
from visionpipe.stages.common import fresh_dir, measure_co2
from visionpipe.stages.evaluate import test_arrays
from visionpipe.tasks import get_task
from visionpipe.tracking.stage_logs import log_export, log_stage

FIXED_SIGNATURE = "serving_fixed_size"
# The inputs each format takes, as written in export.json and the model card.
INPUTS = {"keras": "float32 [batch, H, W, 3], values 0..255",
          "saved_model": "uint8 [batch, any height, any width, 3] (resized inside); "
                         "serving_fixed_size: uint8 [batch, H, W, 3]",
          "tflite": "uint8 [1, H, W, 3]", "tflite_dynamic": "uint8 [1, H, W, 3]",
          "tflite_int8": "uint8 [1, H, W, 3]", "onnx": "uint8 [batch, H, W, 3]"}

# What the SavedModel's serving_default returns, per task (export.json "outputs").
OUTPUTS = {
    "classification": {"scores": "float32 [batch, classes], softmax probabilities",
                       "class_id": "int32 [batch]", "class_name": "string [batch]"},
    "segmentation": {"scores": "float32 [batch, H, W, classes] at the model's size, softmax "
                               "per pixel",
                     "mask": "int32 [batch, height, width], class id per pixel at the input "
                             "image's own size"},
    "detection": {"boxes": "float32 [batch, max_detections, 4]: x_min, y_min, x_max, y_max in "
                           "the input image's own pixels, best first; -1 after "
                           "num_detections",
                  "scores": "float32 [batch, max_detections], confidence of each box",
                  "class_id": "int32 [batch, max_detections] (-1: no box)",
                  "class_name": "string [batch, max_detections] ('' : no box)",
                  "num_detections": "int32 [batch], boxes kept by export.nms",
                  "serving_fixed_size": "scores: float32 [batch, anchors, 64 + classes], the "
                                        "raw head outputs (box-distance logits, class scores)"},
}


def parity(task, reference: np.ndarray, other: np.ndarray, threshold) -> dict:
    """Max abs difference and the task's agreement measure, against the format's thresholds."""
    diff = float(np.max(np.abs(reference.astype(np.float64) - other.astype(np.float64))))
    agreement = task.agreement(reference, other)
    key = task.primary_agreement()
    return {"max_abs_diff": diff, **agreement,
            "thresholds": {"max_abs_diff": threshold.max_abs_diff, key: threshold.min_agreement},
            "passed": bool(diff <= threshold.max_abs_diff
                           and agreement[key] >= threshold.min_agreement)}


def run(params: Params, model_name: str, layout: Layout) -> dict:
    """Write models/<model>/export/, reports/export/<model>.json and the model card; fail if
    any format's parity fails (the previous export then stays in place)."""
    from visionpipe.model_card import write_model_card

    failure: ExportParityError | None = None
    with measure_co2(params, layout, model_name, "export") as carbon:
        try:
            with fresh_dir(layout.export_dir(model_name)) as out:
                report = _export(params, model_name, layout, out)
                if not report["passed"]:
                    # Raised inside fresh_dir: the previous export stays in place.
                    raise ExportParityError(_parity_message(report, layout, model_name))
        except ExportParityError as exc:
            failure = exc
    report["co2"] = carbon.report.to_dict()
    records.write_json(layout.export_report(model_name), report)
    if failure is not None:
        raise failure
    write_model_card(params, model_name, layout)
    print(export_lines(model_name, report, layout), flush=True)
    log_stage(params, model_name, layout, "export", log_export)
    print(f"next: `visionpipe summary` (every model), `dvc metrics show`, `dvc plots show`; "
          f"model card: {layout.model_card(model_name).relative_to(layout.root)}", flush=True)
    return report


def export_lines(model_name: str, report: dict, layout: Layout) -> str:
    """One line per format: file, size and parity verdict against its limits."""
    folder = layout.export_dir(model_name).relative_to(layout.root)
    checks = dict(report["formats"])
    if "resized_input" in report:
        checks["saved_model (any size)"] = report["resized_input"]
    width = max(len(n) for n in checks)
    lines = []
    for name, check in checks.items():
        key = next(k for k in check["thresholds"] if k != "max_abs_diff")
        limit = check["thresholds"][key]
        verdict = "passed" if check["passed"] else "FAILED"
        size = (f"{human_bytes(check['bytes']):>8}" if "bytes" in check
                else f"{'':>8}")
        where = f"{folder}/{check['path']}" if "path" in check else "resized in the graph"
        lines.append(f"export@{model_name}: {name:<{width}} {size}  parity {verdict}: "
                     f"{key} {check[key]:.4f} (limit {limit}), "
                     f"max_abs_diff {check['max_abs_diff']:.2g}  {where}")
    return "\n".join(lines)


def _parity_message(report: dict, layout: Layout, model_name: str) -> str:
    checks = {**report["formats"]}
    if "resized_input" in report:
        checks["saved_model on resized images"] = report["resized_input"]
    failed = {n: f for n, f in checks.items() if not f["passed"]}

    def agreement_key(check):  # the task's agreement, or the resized check's own
        return next(k for k in check["thresholds"] if k != "max_abs_diff")

    details = "; ".join(
        f"{n}: max_abs_diff {f['max_abs_diff']:.3g} (limit {f['thresholds']['max_abs_diff']}), "
        f"{agreement_key(f)} {f[agreement_key(f)]:.4f} "
        f"(limit {f['thresholds'][agreement_key(f)]})" for n, f in failed.items())
    return (f"export of {model_name}: parity failed ({details}); see "
            f"{layout.export_report(model_name)}; loosen export.parity.<format> or "
            f"models.{model_name}.export_parity.<format> in params.yaml only if that drift is "
            "acceptable")


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _export(params: Params, model_name: str, layout: Layout, out: Path) -> dict:
    """Write the formats into ``out`` and measure each one's parity with the Keras model."""
    cfg = params.model(model_name)
    ex = params.export
    formats = params.export_formats(model_name)
    task = get_task(cfg.task)
    model = load_model(layout.model_file(model_name))
    if hasattr(task, "configure_export"):  # a detector keeps what export.nms says
        task.configure_export(model, ex.nms)
    forward = getattr(task, "forward", None) or (
        lambda m, x: m.predict(x, batch_size=64, verbose=0))
    data_dir = layout.prepared(cfg.task)
    manifest = records.read_manifest(data_dir)
    policy = manifest.get("resize") or params.prepare_for(cfg.task).resize  # as prepared
    images, _, _ = test_arrays(data_dir, task)
    size = tuple(int(d) for d in model.inputs[0].shape[1:3])
    # Test images larger than the model's input (segmentation trained on crops): their
    # top-left crop at the model's size.
    pixels = images[:ex.parity_samples, :size[0], :size[1]].astype(np.uint8)
    reference = forward(model, pixels.astype(np.float32))
    # Where serving_default returns more than scores (a detector's boxes), the SavedModel's
    # parity is measured on the fixed-size signature; resized_input checks serving_default.
    parity_signature = (FIXED_SIGNATURE if hasattr(task, "serving_function")
                        else "serving_default")

    report_formats: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="visionpipe-export-") as tmp:
        # One SavedModel serves both as the shipped format and as the TFLite converter's
        # input (its fixed-size signature); without saved_model it is written to tmp only.
        archive = out / FILES["saved_model"] if "saved_model" in formats else Path(tmp) / "sm"
        if "saved_model" in formats or any(f.startswith("tflite") for f in formats):
            _archive(task, model, size, manifest["class_names"], policy, archive)
        for fmt in formats:
            path = out / FILES[fmt]
            runner = WRITERS[fmt](model=model, path=path, size=size, archive=archive,
                                  forward=forward, signature=parity_signature,
                                  representative=lambda: _representative(
                                      data_dir, ex.representative_samples))
            outputs = runner(pixels)
            report_formats[fmt] = {"path": FILES[fmt], "bytes": _size(path),
                                   "input": INPUTS[fmt],
                                   **parity(task, reference, outputs,
                                            params.parity(model_name, fmt))}
    report = {
        "model": model_name,
        "task": cfg.task,
        "samples": int(len(pixels)),
        "agreement_key": task.primary_agreement(),
        "formats": report_formats,
    }
    if "saved_model" in formats:
        h, w = size
        big = (h * 2 + 6, w * 3 // 2 + 5)  # another size and another aspect ratio
        enlarged = np.stack([fit_to_size(p, big, "stretch") for p in pixels])
        as_prepared = np.stack([fit_to_size(p, size, policy)
                                for p in enlarged]).astype(np.float32)
        check = getattr(task, "resized_input_check", None) or partial(_resized_input_check,
                                                                      task)
        report["resized_input"] = check(model, out / FILES["saved_model"], enlarged,
                                        as_prepared, size, policy, ex)
    checks = [*report_formats.values(), report.get("resized_input", {"passed": True})]
    report["passed"] = all(c["passed"] for c in checks)
    records.write_json(out / META_FILE, {
        "model": model_name, "family": cfg.family, "task": cfg.task,
        "class_names": manifest["class_names"], "image_size": list(size), "resize": policy,
        "input": "RGB pixels as uint8 0..255",
        "formats": {fmt: {"path": FILES[fmt], "input": INPUTS[fmt]} for fmt in formats},
        "outputs": OUTPUTS[cfg.task],
        "dataset": {"name": manifest["source"].get("name"), "checksum": manifest["checksum"]},
        "visionpipe_version": __version__,
    })
    return report


def _resized_input_check(task, model, saved: Path, enlarged: np.ndarray,
                         as_prepared: np.ndarray, size, policy, ex) -> dict:
    """SavedModel fed ``enlarged`` images (resizing in the graph) against the Keras model fed
    ``as_prepared``, the same images resized the way prepare resizes them (PIL)."""
    served = SavedModelRunner(saved).predict(enlarged)
    keras_out = model.predict(as_prepared, batch_size=64, verbose=0)
    agreement = task.agreement(keras_out, served)
    key = task.primary_agreement()
    diff = float(np.max(np.abs(keras_out.astype(np.float64) - served)))
    return {"input_size": list(enlarged.shape[1:3]), "resize": policy, "max_abs_diff": diff,
            **agreement,
            "thresholds": {"max_abs_diff": None, key: ex.resize_min_agreement},
            "passed": bool(agreement[key] >= ex.resize_min_agreement)}


def _representative(data_dir: Path, limit: int):
    """The first ``limit`` train images, one at a time, for int8 calibration."""
    for i, example in enumerate(records.read_split(data_dir, "train")):
        if i >= limit:
            return
        yield {"images": example.image[None].astype(np.uint8)}


# --------------------------------------------------------------------------- formats


def _archive(task, model, size, class_names, policy: str, path: Path) -> None:
    """A SavedModel with two signatures over uint8 pixels: ``serving_default`` takes any size
    (resized inside as prepare resizes) and returns the task's outputs (OUTPUTS);
    ``serving_fixed_size`` takes the model's size and returns scores (the TFLite source)."""

    def serve(images):
        scores = model(fit_images(images, size, policy), training=False)
        return task.serving_outputs(scores, images, class_names)

    if hasattr(task, "serving_function"):  # outputs that need more than the scores
        serve = task.serving_function(model, size, policy, class_names)

    def serve_fixed(images):
        out = model(tf.cast(images, tf.float32), training=False)
        if isinstance(out, dict):  # a detector's raw head: box logits, then class scores
            out = tf.concat([out["boxes"], out["classes"]], axis=-1)
        return {"scores": out}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", tf.function(serve), input_signature=[
        tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    archive.add_endpoint(FIXED_SIGNATURE, tf.function(serve_fixed), input_signature=[
        tf.TensorSpec([None, *size, 3], tf.uint8, name="images")])
    archive.write_out(str(path), verbose=False)


def _write_keras(*, model, path: Path, forward, **_):
    model.save(path)
    reloaded = load_model(path)
    return lambda x: forward(reloaded, x.astype(np.float32))


def _write_saved_model(*, path: Path, signature: str, **_):
    return SavedModelRunner(path, signature).predict  # written by _archive


def _tflite_writer(quantize: str):
    def write(*, path: Path, archive: Path, representative, **_):
        converter = tf.lite.TFLiteConverter.from_saved_model(str(archive),
                                                             signature_keys=[FIXED_SIGNATURE])
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


def _write_onnx(*, model, path: Path, size, **_):
    try:
        import tf2onnx
    except ImportError:
        raise ModelError("export.formats lists onnx but tf2onnx is not installed: "
                         "`pip install tf2onnx onnxruntime` (pinned in requirements.txt), "
                         "or remove onnx from export.formats") from None
    spec = (tf.TensorSpec([None, *size, 3], tf.uint8, name="images"),)

    @tf.function(input_signature=spec)
    def serve(images):
        return {"scores": model(tf.cast(images, tf.float32), training=False)}

    tf2onnx.convert.from_function(serve, input_signature=spec, opset=17, output_path=str(path))
    return OnnxRunner(path).predict


WRITERS = {"keras": _write_keras, "saved_model": _write_saved_model,
           "tflite": _tflite_writer("none"), "tflite_dynamic": _tflite_writer("dynamic"),
           "tflite_int8": _tflite_writer("full"), "onnx": _write_onnx}
