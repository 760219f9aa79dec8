"""What each stage hands to MLflow, read from the stage's own files so a replay is identical."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from visionpipe.data import records
from visionpipe.models.saving import load_model
from visionpipe.tracking.mlflow_runs import RunLogger, numeric


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _emissions(run: RunLogger, stage: str) -> None:
    folder = run.layout.emissions(run.model_name)
    report = _json(folder / f"{stage}.json")
    if report is None:
        return
    run.log_metrics(numeric({k: v for k, v in report.items() if k != "stage"}, f"co2.{stage}."),
                    what="CO2")
    run.call("CO2", "set_tag", run.run_id, f"co2.{stage}.cpu_power_mode",
             report.get("cpu_power_mode", "unknown"))
    run.log_files([folder / f"{stage}.csv", folder / f"{stage}.json"], "emissions", "CO2")


def example_input(run: RunLogger) -> np.ndarray:
    """One validation image as the model takes it: float32 (1, H, W, 3) pixels."""
    first = next(records.read_split(run.layout.prepared(run.cfg.task), "val"))
    return first.image[None].astype(np.float32)


def log_train(run: RunLogger, model=None, *, live_epochs: bool = False) -> None:
    """Params, per-epoch metrics (unless logged live), history, model, CO2 of training."""
    layout, name = run.layout, run.model_name
    run.log_params(run.run_params())
    if not live_epochs:
        run.log_history(layout.history(name))
    run.log_files([layout.history(name), layout.model_meta(name)], "train", "history")
    _emissions(run, "train")
    if run.client is None:
        if run.enabled:
            run.not_logged.append("model")
        return
    if model is None:
        model = load_model(layout.model_file(name))
    run.log_keras_model(model, example_input(run))


def log_evaluate(run: RunLogger) -> None:
    """Test metrics, cost, CO2 totals, the metrics JSON and the plots."""
    layout, name = run.layout, run.model_name
    metrics = _json(layout.metrics(name))
    if metrics is None:
        return
    values = numeric(metrics.get("test", {}), "test.")
    values.update(numeric(metrics.get("cost", {}), "cost."))
    values.update(numeric({k: v for k, v in metrics.get("co2", {}).items() if k != "by_stage"},
                          "co2.total."))
    run.log_metrics(values, what="test metrics")
    _emissions(run, "evaluate")
    run.log_files([layout.metrics(name)], "evaluate", "plots")
    run.log_files([layout.plots(name)], "evaluate/plots", "plots")


def log_export(run: RunLogger) -> None:
    """Parity, the exported files, and a new registered model version."""
    layout, name = run.layout, run.model_name
    report = _json(layout.export_report(name))
    if report is None:
        return
    checks = {**report.get("formats", {}), "resized_input": report.get("resized_input", {})}
    parity = {fmt: {k: v for k, v in r.items() if k not in ("path", "thresholds")}
              for fmt, r in checks.items()}
    run.log_metrics(numeric(parity, "export."), what="export parity")
    _emissions(run, "export")
    run.log_files([layout.export_report(name), layout.export_dir(name),
                   layout.model_card(name)], "export", "export files")
    run.register(_json(layout.metrics(name)) or {}, report)


def log_stage(params, model_name: str, layout, stage: str, log) -> None:
    """Add a stage (evaluate, export) to the run train opened, then close it for now."""
    run = RunLogger(params, model_name, layout).resume()
    log(run)
    run.finish(stage)


def replay(run: RunLogger) -> dict:
    """Log a whole model run from its local files into a new MLflow run."""
    run.start()
    log_train(run)
    log_evaluate(run)
    log_export(run)
    return run.finish("replay")
