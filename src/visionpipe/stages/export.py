"""export: SavedModel and TFLite files, each checked for parity with the Keras model."""

from __future__ import annotations

import shutil

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from visionpipe.config import Params
from visionpipe.data import records
from visionpipe.errors import ExportParityError
from visionpipe.layout import Layout
from visionpipe.models.saving import load_model
from visionpipe.stages.common import fresh_dir, measure_co2
from visionpipe.stages.evaluate import test_arrays
from visionpipe.tasks import get_task
from visionpipe.tracking.stage_logs import log_export, log_stage


def tflite_predict(model_content: bytes, images: np.ndarray) -> np.ndarray:
    """Run a TFLite flatbuffer on each image (batch of 1, as on a device)."""
    interp = tf.lite.Interpreter(model_content=model_content)
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    results = []
    for image in tqdm(images, desc="parity tflite", unit="img", leave=False):
        interp.set_tensor(inp["index"], image[None].astype(inp["dtype"]))
        interp.invoke()
        results.append(interp.get_tensor(out["index"])[0])
    return np.stack(results)


def saved_model_predict(path: str, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Run the SavedModel's serving signature, loaded with TensorFlow alone."""
    loaded = tf.saved_model.load(path)
    serve = loaded.signatures["serving_default"]
    parts = []
    for start in range(0, len(images), batch_size):
        result = serve(tf.constant(images[start:start + batch_size]))
        parts.append(next(iter(result.values())).numpy())
    return np.concatenate(parts)


def parity(task, reference: np.ndarray, other: np.ndarray, max_abs_diff: float,
           min_agreement: float) -> dict:
    """Max abs difference and the task's agreement measure, against the thresholds."""
    diff = float(np.max(np.abs(reference.astype(np.float64) - other.astype(np.float64))))
    agreement = task.agreement(reference, other)
    key = task.primary_agreement()
    return {"max_abs_diff": diff, **agreement,
            "passed": bool(diff <= max_abs_diff and agreement[key] >= min_agreement)}


def run(params: Params, model_name: str, layout: Layout) -> dict:
    """Write models/<model>/export/ and reports/export/<model>.json; fail if parity fails."""
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
    log_stage(params, model_name, layout, "export", log_export)
    return report


def _parity_message(report: dict, layout: Layout, model_name: str) -> str:
    key = report["agreement_key"]
    failed = [n for n, f in report["formats"].items() if not f["passed"]]
    details = "; ".join(f"{n}: max_abs_diff {report['formats'][n]['max_abs_diff']:.3g}, "
                        f"{key} {report['formats'][n][key]:.4f}" for n in failed)
    limits = report["thresholds"]
    return (f"export of {model_name}: parity failed ({details}; thresholds max_abs_diff "
            f"{limits['max_abs_diff']}, {key} >= {limits[key]}); see "
            f"{layout.export_report(model_name)}")


def _export(params: Params, model_name: str, layout: Layout, out) -> dict:
    """Write the formats into ``out`` and measure each one's parity with the Keras model."""
    cfg = params.model(model_name)
    ex = params.export
    task = get_task(cfg.task)
    model = load_model(layout.model_file(model_name))
    images, _, _ = test_arrays(layout.prepared(cfg.task), task)
    images = images[:ex.parity_samples]
    reference = model.predict(images, batch_size=64, verbose=0)

    formats: dict[str, dict] = {}
    saved = out / "saved_model"
    model.export(str(saved), format="tf_saved_model", verbose=False)
    if "saved_model" in ex.formats:
        formats["saved_model"] = {
            "path": "saved_model",
            **parity(task, reference, saved_model_predict(str(saved), images),
                     ex.max_abs_diff, ex.min_agreement)}
    if "tflite" in ex.formats:
        content = tf.lite.TFLiteConverter.from_saved_model(str(saved)).convert()
        (out / "model.tflite").write_bytes(content)
        formats["tflite"] = {
            "path": "model.tflite", "bytes": len(content),
            **parity(task, reference, tflite_predict(content, images),
                     ex.max_abs_diff, ex.min_agreement)}
    if "saved_model" not in ex.formats:
        shutil.rmtree(saved)
    return {
        "model": model_name,
        "task": cfg.task,
        "samples": int(len(images)),
        "agreement_key": task.primary_agreement(),
        "thresholds": {"max_abs_diff": ex.max_abs_diff,
                       task.primary_agreement(): ex.min_agreement},
        "formats": formats,
        "passed": all(f["passed"] for f in formats.values()),
    }
