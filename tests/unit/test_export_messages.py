"""A failed export parity check names the params key that controls it and its limit."""

from __future__ import annotations

import numpy as np

from visionpipe.config import ParityThreshold, parse_params
from visionpipe.layout import Layout
from visionpipe.stages.export import _parity_message, export_lines, parity
from visionpipe.tasks.base import judged
from visionpipe.tasks.registry import task_for


def _report(params, model: str) -> dict:
    """mlp's tflite_int8 drifting too far, its SavedModel's resizing disagreeing."""
    task = task_for("mlp", "classification")
    reference = np.full((20, 4), 0.2, np.float32)
    reference[np.arange(20), np.arange(20) % 4] = 0.4
    other = reference.copy()
    other[:3, 3] = 0.45  # 3 of 20 labels flip (by 0.25): agreement 0.85
    other[3] += 0.3  # the largest drift: 0.3
    tflite = parity(task, reference, other, params.parity(model, "tflite_int8"),
                    params.parity_key(model, "tflite_int8"), [None] * 20)
    keras = parity(task, reference, reference, params.parity(model, "keras"),
                   params.parity_key(model, "keras"), [None] * 20)
    resized = {"input_size": [134, 101], "resize": "stretch", "images": 20,
               "max_abs_diff": 0.5, "label_agreement": 0.9,
               **judged({"label_agreement": 0.9},
                        {"label_agreement": ("export.resize_min_agreement", "min", 0.95)})}
    return {"formats": {"keras": {"path": "model.keras", "bytes": 10, **keras},
                        "tflite_int8": {"path": "model_int8.tflite", "bytes": 10, **tflite}},
            "resized_input": resized, "passed": False}


def test_each_failed_check_names_its_key_and_limit(default_params_dict, tmp_path):
    params = parse_params(default_params_dict)
    layout = Layout(tmp_path)
    report = _report(params, "mlp")
    int8 = report["formats"]["tflite_int8"]
    assert int8["failed"] == ["max_abs_diff", "label_agreement"] and not int8["passed"]
    assert int8["limits"]["label_agreement"] == {"key": "export.parity.tflite_int8.min_agreement",
                                                 "min": 0.95}
    message = _parity_message(report, layout, "mlp")
    assert ("tflite_int8: max_abs_diff 0.3 above its limit 0.1 "
            "(export.parity.tflite_int8.max_abs_diff)") in message
    assert ("tflite_int8: label_agreement 0.85 below its limit 0.95 "
            "(export.parity.tflite_int8.min_agreement)") in message
    assert ("saved_model on resized images: label_agreement 0.9 below its limit 0.95 "
            "(export.resize_min_agreement)") in message
    assert "keras" not in message.split("failed")[1]  # passed checks are not listed
    assert "None" not in message and "<format>" not in message
    lines = export_lines("mlp", report, layout).splitlines()
    assert len(lines) == 3 and all("None" not in line for line in lines)
    assert "tflite_int8" in lines[1] and "FAILED" in lines[1]
    assert "max_abs_diff 0.3 (max 0.1), label_agreement 0.85 (min 0.95)" in lines[1]
    assert "label_agreement 0.9 (min 0.95), max_abs_diff 0.5" in lines[2]


def test_a_models_own_threshold_is_named_as_its_key(default_params_dict, tmp_path):
    data = {**default_params_dict}
    data["models"] = {**data["models"], "mlp": {**data["models"]["mlp"], "export_parity": {
        "tflite_int8": {"max_abs_diff": 0.2, "min_agreement": 0.8}}}}
    params = parse_params(data)
    assert params.parity_key("mlp", "tflite_int8") == "models.mlp.export_parity.tflite_int8"
    assert params.parity_key("mlp", "tflite") == "export.parity.tflite"
    message = _parity_message(_report(params, "mlp"), Layout(tmp_path), "mlp")
    assert ("tflite_int8: max_abs_diff 0.3 above its limit 0.2 "
            "(models.mlp.export_parity.tflite_int8.max_abs_diff)") in message
    assert "tflite_int8: label_agreement" not in message  # 0.85 is within this model's 0.8


def test_detection_checks_bound_the_map_drop():
    from visionpipe.tasks.registry import task_for as task_of

    checks = task_of("yolo", "detection").parity_checks()
    assert ("map_50_drop", "max_map_drop", "max") in checks
    assert ("box_agreement", "min_agreement", "min") in checks
    limit = ParityThreshold(max_map_drop=0.02)
    assert judged({"map_50_drop": 0.05}, {"map_50_drop": ("k.max_map_drop", "max",
                                                          limit.max_map_drop)})["failed"] == [
        "map_50_drop"]
    assert judged({"m": float("nan")}, {"m": ("k", "min", 0.5)})["passed"] is False
