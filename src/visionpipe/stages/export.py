"""export: the formats params ask for, each checked for parity with the Keras model.

Every format takes raw uint8 RGB pixels. The SavedModel's ``serving_default`` takes any size
and does the resizing inside; TFLite and ONNX take the model's input size. ``export.json``
beside the files says what predict needs (task, classes, size, resize policy, formats) and
records the SHA-256 and size of every file written (``files``, which predict verifies), and
``reports/model_cards/<model>.md`` describes the model for people.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from visionpipe import __version__
from visionpipe.config import Params
from visionpipe.console import human_bytes
from visionpipe.data import records
from visionpipe.data.pipeline import test_arrays
from visionpipe.errors import ExportParityError, ModelError, VisionpipeError
from visionpipe.formats import (
    FIXED_SIGNATURE,
    INPUTS,
    WRITERS,
    file_size,
    format_meta,
    representative,
    write_saved_model,
)
from visionpipe.geometry import fit_to_size
from visionpipe.integrity import FILES_KEY, record_files
from visionpipe.layout import Layout
from visionpipe.models.saving import float32_model, load_model
from visionpipe.serving import FILES, META_FILE
from visionpipe.stages.common import fresh_dir, measure_co2
from visionpipe.tasks.base import judged
from visionpipe.tasks.registry import task_for
from visionpipe.tracking.stage_logs import log_export, log_stage


def parity(task, reference: np.ndarray, other: np.ndarray, threshold, key: str,
           truths: list) -> dict:
    """Max abs difference and the task's parity measures (on the images of ``truths``),
    each against its limit in ``threshold`` (read from params key ``key``)."""
    diff = float(np.max(np.abs(reference.astype(np.float64) - other.astype(np.float64))))
    values = {"max_abs_diff": diff, **task.parity_measures(reference, other, truths)}
    return {**values, **judged(values, {
        measure: (f"{key}.{field}", bound, getattr(threshold, field))
        for measure, field, bound in task.parity_checks()})}


def _writer_failed(params: Params, model_name: str, fmt: str, exc: Exception) -> str:
    """One line for a format whose writer (TFLite's converter, tf2onnx) failed: its first
    error line, and the key that lists the format."""
    where = params.export_formats_key(model_name)
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return (f"export@{model_name}: writing {fmt} failed ({type(exc).__name__}: "
            f"{first[:300]}); the previous export stays in place. Remove {fmt} from {where} "
            "in params.yaml to export the other formats")


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


def _checks(report: dict) -> dict[str, dict]:
    """Every parity check of a report by name: the formats, then the resized-input check."""
    checks = dict(report["formats"])
    if "resized_input" in report:
        checks["saved_model on resized images"] = report["resized_input"]
    return checks


def _measure(check: dict, measure: str, limit: dict) -> str:
    """``box_agreement 0.9178 (min 0.85)``."""
    bound = "max" if "max" in limit else "min"
    return f"{measure} {check[measure]:.4g} ({bound} {limit[bound]:g})"


def export_lines(model_name: str, report: dict, layout: Layout) -> str:
    """One line per format: file, size and parity verdict, each measure against its limit."""
    folder = layout.export_dir(model_name).relative_to(layout.root)
    checks = _checks(report)
    width = max(len(n) for n in checks)
    lines = []
    for name, check in checks.items():
        verdict = "passed" if check["passed"] else "FAILED"
        size = (f"{human_bytes(check['bytes']):>8}" if "bytes" in check
                else f"{'':>8}")
        where = f"{folder}/{check['path']}" if "path" in check else "resized in the graph"
        limits = check["limits"]  # measure -> {"key": params key, "max" or "min": limit}
        measures = [_measure(check, m, lim) for m, lim in limits.items()]
        if "max_abs_diff" not in limits and "max_abs_diff" in check:  # reported, unbounded
            measures.append(f"max_abs_diff {check['max_abs_diff']:.2g}")
        judged_on = (f" on {check['images']} images, {check['truth_boxes']} boxes"
                     if "truth_boxes" in check else "")
        lines.append(f"export@{model_name}: {name:<{width}} {size}  parity {verdict}: "
                     f"{', '.join(measures)}{judged_on}  {where}")
    return "\n".join(lines)


def _parity_message(report: dict, layout: Layout, model_name: str) -> str:
    """Each failed check with its value, its limit and the params key that sets it."""
    failures = []
    for name, check in _checks(report).items():
        if check["passed"]:
            continue
        for measure in check["failed"]:
            limit = check["limits"][measure]
            bound = "max" if "max" in limit else "min"
            failures.append(f"{name}: {measure} {check[measure]:.4g} "
                            f"{'above' if bound == 'max' else 'below'} its limit "
                            f"{limit[bound]:g} ({limit['key']})")
    splits = " + ".join(report.get("splits", ["test"]))
    judged_on = next((f" (judged on {c['images']} images ({splits}) holding "
                      f"{c['truth_boxes']} boxes)" for c in report["formats"].values()
                      if "truth_boxes" in c), "")
    return (f"export of {model_name}: parity failed{judged_on}: {'; '.join(failures)}. See "
            f"{layout.export_report(model_name)}; change the named key in params.yaml only if "
            "that drift is acceptable")


def _export(params: Params, model_name: str, layout: Layout, out: Path) -> dict:
    """Write the formats into ``out`` and measure each one's parity with the Keras model."""
    cfg = params.model(model_name)
    ex = params.export
    formats = params.export_formats(model_name)
    task = task_for(cfg.family, cfg.task)
    # float32: a model.keras saved by an earlier version computes in its training precision
    # (bfloat16 has no TFLite kernels).
    model = task.export_model(float32_model(load_model(layout.model_file(model_name))), ex)
    data_dir = layout.prepared(cfg.task)
    # The test images of parity and the train images of int8 calibration: a damaged shard is
    # one line naming it, as in train and evaluate.
    manifest = records.verify_shards(data_dir, records.restore_hint(data_dir, layout.root))
    policy = manifest.get("resize") or params.prepare_for(cfg.task).resize  # as prepared
    images, truths, _ = test_arrays(data_dir, task.targets)
    size = tuple(int(d) for d in model.inputs[0].shape[1:3])
    # Whole images as prepare sized them: the model's size, or larger for a segmentation
    # model trained on crops (served in tiles of evaluate.tile_overlap).
    cropped = manifest.get("test_image_size", manifest["image_size"]) != manifest["image_size"]
    scale = tuple(int(d) for d in manifest["test_image_size"]) if cropped else size
    overlap = params.evaluate.tile_overlap
    count = task.parity_images(truths, ex.parity_samples, ex)  # a detector's: enough boxes
    splits = ["test"]
    for extra in ("val", "train"):  # a small test split: parity needs no unseen images
        if count is not None:
            break
        more, more_truths, _ = test_arrays(data_dir, task.targets, extra)
        images, truths = np.concatenate([images, more]), truths + more_truths
        splits.append(extra)
        count = task.parity_images(truths, ex.parity_samples, ex)
    count = len(truths) if count is None else count
    truths = truths[:count]
    # Test images larger than the model's input (segmentation trained on crops): their
    # top-left crop at the model's size.
    pixels = images[:count, :size[0], :size[1]].astype(np.uint8)
    whole = images[:count].astype(np.uint8) if scale != size else pixels
    del images
    reference = task.forward(model, pixels.astype(np.float32))
    # Where serving_default returns more than scores (a detector's boxes) or serves another
    # scale (tiles of a model trained on crops), the SavedModel's parity is measured on the
    # fixed-size signature; resized_input checks serving_default.
    parity_signature = (FIXED_SIGNATURE if task.parity_on_fixed_signature or scale != size
                        else "serving_default")
    parts = task.quantization_parts(model) is not None  # the int8 file's outputs come apart

    report_formats: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="visionpipe-export-") as tmp:
        # One SavedModel serves both as the shipped format and as the TFLite converter's
        # input (its fixed-size signature); without saved_model it is written to tmp only.
        archive = out / FILES["saved_model"] if "saved_model" in formats else Path(tmp) / "sm"
        if "saved_model" in formats or any(f.startswith("tflite") for f in formats):
            write_saved_model(task, model, size, manifest["class_names"], policy,
                              archive, scale=scale, overlap=overlap)
        for fmt in formats:
            path = out / FILES[fmt]
            try:
                runner = WRITERS[fmt](model=model, path=path, size=size, archive=archive,
                                      forward=task.forward, signature=parity_signature,
                                      fixed_outputs=task.fixed_outputs, parts=parts,
                                      representative=lambda: representative(
                                          data_dir, ex.representative_samples))
            except VisionpipeError:
                raise
            except Exception as exc:  # noqa: BLE001 - a converter's own error, any class
                raise ModelError(_writer_failed(params, model_name, fmt, exc)) from None
            outputs = runner(pixels)
            report_formats[fmt] = {"path": FILES[fmt], "bytes": file_size(path),
                                   "input": INPUTS[fmt],
                                   **parity(task, reference, outputs,
                                            params.parity(model_name, fmt),
                                            params.parity_key(model_name, fmt), truths)}
    report = {
        "model": model_name,
        "task": cfg.task,
        "samples": len(pixels),
        "splits": splits,  # where those images come from (test first)
        "agreement_key": task.agreement_key,
        "formats": report_formats,
    }
    if "saved_model" in formats:
        h, w = scale
        big = (h * 2 + 6, w * 3 // 2 + 5)  # another size and another aspect ratio
        enlarged = np.stack([fit_to_size(p, big, "stretch") for p in whole])
        as_prepared = np.stack([fit_to_size(p, scale, policy)
                                for p in enlarged]).astype(np.float32)
        report["resized_input"] = task.resized_input_check(
            model, out / FILES["saved_model"], enlarged, as_prepared, size, policy, ex,
            overlap)
    checks = [*report_formats.values(), report.get("resized_input", {"passed": True})]
    report["passed"] = all(c["passed"] for c in checks)
    records.write_json(out / META_FILE, {
        "model": model_name, "family": cfg.family, "task": cfg.task,
        "class_names": manifest["class_names"], "image_size": list(size), "resize": policy,
        # Where whole images go before the model: tiles of image_size over an image resized
        # to scale (a segmentation model trained on crops), else scale == image_size.
        "scale": list(scale), "tile_overlap": overlap,
        "input": "RGB pixels as uint8 0..255",
        "formats": {fmt: format_meta(fmt, parts) for fmt in formats},
        "outputs": task.served_outputs,
        **task.export_meta(ex),  # a detector's decoder and NMS
        "dataset": {"name": manifest["source"].get("name"), "checksum": manifest["checksum"]},
        "visionpipe_predict": task.predicts_folders,  # read by `visionpipe predict`
        "visionpipe_version": __version__,
        # Every file above, checked by predict before it loads a format (written last).
        FILES_KEY: record_files(out),
    })
    return report


