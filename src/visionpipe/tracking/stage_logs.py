"""What each stage hands to MLflow, read from the stage's own files so a replay is identical.

Besides the detailed dotted metrics (test.*, cost.*, co2.<stage>.*, export.*), each stage logs
the headline figures under short names for MLflow's runs table (visionpipe.headline): train
``kept_epoch``, ``best_val_loss`` and ``best_val_<metric>`` (the kept epoch's, not the last
one's), ``params``, ``train_s``; evaluate ``test_<metric>`` and ``latency_ms``; every stage
``co2_g``, the grams of CO2 of the stages so far (train + evaluate + export once exported).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from visionpipe.data import records
from visionpipe.errors import DataError, VisionpipeError
from visionpipe.headline import test_figures, test_metrics
from visionpipe.models.saving import load_model
from visionpipe.tracking.mlflow_runs import (
    PIPELINE_STAGES,
    RunLogger,
    numeric,
    report_duration,
)

MAX_PARAM_LENGTH = 6000  # MLflow's longest param value


def co2_grams(run: RunLogger, stages: tuple[str, ...]) -> float | None:
    """Grams of CO2 of ``stages`` from their reports (kg), None when none has a figure."""
    folder = run.layout.emissions(run.model_name)
    reports = (records.read_json(folder / f"{s}.json") for s in stages)
    values = [r.get("emissions_kg") for r in reports if r]
    values = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return 1000.0 * sum(values) if values else None


def train_headline(run: RunLogger) -> dict[str, float]:
    """The kept epoch and its validation metrics (best_val_loss, best_val_<metric>), the
    model's size, training time and CO2, from model.json and train's CO2 report."""
    meta = records.read_json(run.layout.model_meta(run.model_name)) or {}
    values: dict[str, float] = {}
    if isinstance(meta.get("kept_epoch"), int):
        values["kept_epoch"] = meta["kept_epoch"]
    for key, value in (meta.get("kept_epoch_metrics") or {}).items():
        if key.startswith("val_"):
            values[f"best_{key}"] = value
    if isinstance(meta.get("params"), int):
        values["params"] = meta["params"]
    train_s = report_duration(run.layout, run.model_name, "train")
    if train_s is not None:
        values["train_s"] = round(train_s, 1)  # as headline() rounds it
    return numeric(values)


def class_weight_params(meta: dict) -> dict[str, str]:
    """``class_weights_resolved``: the class weights training used, from model.json's
    ``class_weights`` (class name -> weight; a list from params or ``balanced`` resolved), as
    ``name=weight`` in class order; none when unweighted. Too long for an MLflow param, it
    says where the weights are instead."""
    weights = meta.get("class_weights")
    if not isinstance(weights, dict) or not weights:
        return {}
    text = ", ".join(f"{name}={value:.6g}" if isinstance(value, (int, float)) else f"{name}=?"
                     for name, value in weights.items())
    if len(text) > MAX_PARAM_LENGTH:
        text = f"{len(weights)} classes: see the class_weights of train/model.json"
    return {"class_weights_resolved": text}


def resolved_params(meta: dict) -> dict[str, str]:
    """What params' ``auto`` settings became on the machine that trained (model.json):
    ``precision_resolved`` (the Keras dtype policy) and ``threads_resolved``."""
    found = {}
    if isinstance(meta.get("precision"), str):
        found["precision_resolved"] = meta["precision"]
    if isinstance(meta.get("threads"), dict):
        found["threads_resolved"] = ", ".join(f"{k}={v}" for k, v in meta["threads"].items()
                                              if k in ("intra_op", "inter_op"))
    return found


def evaluate_headline(metrics: dict) -> dict[str, float]:
    """headline() with the test metrics named test_<name> (test_accuracy, test_macro_f1,
    ...); its rounded co2_g is left to co2_grams."""
    if not test_metrics(metrics.get("task")):
        return {}
    return {k: v for k, v in test_figures(metrics).items() if k != "co2_g"}


def _co2(run: RunLogger, stage: str) -> None:
    grams = co2_grams(run, PIPELINE_STAGES[:PIPELINE_STAGES.index(stage) + 1])
    if grams is not None:
        run.log_metrics({"co2_g": grams}, what="CO2")


def _emissions(run: RunLogger, stage: str) -> None:
    folder = run.layout.emissions(run.model_name)
    report = records.read_json(folder / f"{stage}.json")
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


def log_data_stats(run: RunLogger) -> None:
    """What prepare drew of the task's dataset (reports/prepare/<task>/: stats.json,
    class_balance.json, plots/*.png) as the run's ``data/`` artifacts. Read from reports/:
    prepare writes them with data/prepared/<task>, which train already depends on."""
    run.log_files([run.layout.data_stats(run.cfg.task)], "data", "dataset stats")


def log_train(run: RunLogger, model=None, *, live_epochs: bool = False,
              example: np.ndarray | None = None) -> None:
    """Params, dataset and its stats, per-epoch metrics (unless logged live), history, CO2 of
    training, the model, and the kept epoch's figures (linked to the model). ``example``: the
    model's input for its signature (default: read from the validation split)."""
    layout, name = run.layout, run.model_name
    meta = records.read_json(layout.model_meta(name)) or {}
    run.log_params({**run.run_params(), **class_weight_params(meta), **resolved_params(meta)})
    run.log_dataset()
    log_data_stats(run)
    if not live_epochs:
        run.log_history(layout.history(name))
    run.log_files([layout.history(name), layout.model_meta(name)], "train", "history")
    _emissions(run, "train")
    _co2(run, "train")
    figures = train_headline(run)
    if run.client is not None:
        if model is None:
            model = load_model(layout.model_file(name))
        if example is None:
            example = example_input(run)
        run.log_keras_model(model, example, step=int(figures.get("kept_epoch", 0)))
    elif run.enabled:
        run.not_logged.append("model")
    run.log_metrics(figures, what="headline metrics", model_id=run.state.get("model_id"),
                    dataset=run.state.get("dataset"))


def log_evaluate(run: RunLogger) -> None:
    """Test metrics, cost, CO2 totals, the metrics JSON and the plots."""
    layout, name = run.layout, run.model_name
    metrics = records.read_json(layout.metrics(name))
    if metrics is None:
        return
    values = numeric(metrics.get("test", {}), "test.")
    values.update(numeric(metrics.get("cost", {}), "cost."))
    values.update(numeric({k: v for k, v in metrics.get("co2", {}).items() if k != "by_stage"},
                          "co2.total."))
    run.log_metrics(values, what="test metrics")
    # Linked to the logged model and the dataset: the model's page in MLflow shows them.
    run.log_metrics(evaluate_headline(metrics), what="headline metrics",
                    model_id=run.state.get("model_id"), dataset=run.state.get("dataset"))
    _emissions(run, "evaluate")
    _co2(run, "evaluate")
    run.log_files([layout.metrics(name)], "evaluate", "plots")
    run.log_files([layout.plots(name)], "evaluate/plots", "plots")


def log_export(run: RunLogger) -> None:
    """Parity, the exported files, and a new registered model version."""
    layout, name = run.layout, run.model_name
    report = records.read_json(layout.export_report(name))
    if report is None:
        return
    checks = {**report.get("formats", {}), "resized_input": report.get("resized_input", {})}
    parity = {fmt: {k: v for k, v in r.items() if k not in ("path", "thresholds", "limits")}
              for fmt, r in checks.items()}
    run.log_metrics(numeric(parity, "export."), what="export parity")
    _emissions(run, "export")
    _co2(run, "export")
    run.log_files([layout.export_report(name), layout.export_dir(name),
                   layout.model_card(name)], "export", "export files")
    run.register(records.read_json(layout.metrics(name)) or {}, report)


def log_stage(params, model_name: str, layout, stage: str, log) -> None:
    """Add a stage (evaluate, export) to the run train opened, then close it for now."""
    run = RunLogger(params, model_name, layout).resume()
    log(run)
    run.finish(stage)


def _shown(run: RunLogger, path: Path) -> str:
    """``path`` as dvc.yaml names it: relative to the project root."""
    try:
        return Path(path).relative_to(run.layout.root).as_posix()
    except ValueError:
        return str(path)


def _restore(run: RunLogger, out: Path, stage: str, *, cached: bool = True) -> str:
    """What brings back ``out``, an output of DVC stage ``stage`` (``train@mlp``): DVC's
    cache for a cached output, git for one committed with ``cache: false``; else the stage."""
    shown = _shown(run, out)
    how = f"dvc checkout {shown}" if cached else f"git checkout -- {shown}"
    return f"restore it with `{how}` (or `dvc repro {stage}`)"


def _reason(exc: Exception, path: Path) -> str:
    """A visionpipe error's message about ``path`` without the path and its advice."""
    text = str(exc).removeprefix(f"{path}: ")
    return text.rsplit("; ", 1)[0] if text != str(exc) else text


def _json_report(run: RunLogger, path: Path, stage: str, *, cached: bool = True,
                 required: bool = False) -> None:
    """A JSON object file replay reads: a missing one is skipped unless ``required`` (that
    stage has not run); one that is there must hold a JSON object."""
    shown, restore = _shown(run, path), _restore(run, path, stage, cached=cached)
    if not path.exists():
        if required:
            raise DataError(f"{shown}: not found; {restore}")
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{shown}: not valid JSON ({exc}); {restore}") from None
    except OSError as exc:
        raise DataError(f"{shown}: cannot be read ({exc.strerror or exc}); {restore}") from None
    if not isinstance(data, dict):
        raise DataError(f"{shown}: holds a JSON {type(data).__name__}, not an object; {restore}")


def _check_history(run: RunLogger, train: str) -> None:
    """history.csv: an ``epoch`` column and a number in every cell of at least one row."""
    path = run.layout.history(run.model_name)
    shown, restore = _shown(run, path), _restore(run, path, train)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = next(reader, [])
            rows = list(reader)
    except FileNotFoundError:
        raise DataError(f"{shown}: not found; {restore}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise DataError(f"{shown}: cannot be read ({why}); {restore}") from None
    if "epoch" not in header:
        raise DataError(f"{shown}: no 'epoch' column in its header line; {restore}")
    if not rows:
        raise DataError(f"{shown}: holds no epochs; {restore}")
    for line, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise DataError(f"{shown}: line {line} has {len(row)} values for "
                            f"{len(header)} columns; {restore}")
        for name, cell in zip(header, row, strict=True):
            try:
                float(cell)
            except ValueError:
                raise DataError(f"{shown}: line {line}, column {name}: {cell[:40]!r} is not a "
                                f"number; {restore}") from None


def replay_inputs(run: RunLogger) -> tuple:
    """Check and read the local files a replay logs, before anything is sent to MLflow: a
    missing or malformed one is a DataError naming it and what brings it back. Returns the
    model and its example input (one validation image)."""
    name, task = run.model_name, run.cfg.task
    train = f"train@{name}"
    layout = run.layout
    model_file = layout.model_file(name)
    if not model_file.exists():
        raise DataError(f"{_shown(run, model_file)}: not found; "
                        f"{_restore(run, model_file, train)}")
    _json_report(run, layout.model_meta(name), train, required=True)
    _check_history(run, train)
    for stage in PIPELINE_STAGES:
        _json_report(run, layout.emissions(name) / f"{stage}.json", f"{stage}@{name}")
    _json_report(run, layout.metrics(name), f"evaluate@{name}", cached=False)
    _json_report(run, layout.export_report(name), f"export@{name}", cached=False)
    state = run.run_file
    if state.exists():
        try:
            json.loads(state.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{_shown(run, state)}: unreadable ({exc}); delete it (the replay "
                            "writes a new one; durations come from reports/emissions/)") from None
    folder = layout.prepared(task)
    manifest = folder / records.MANIFEST
    restore = _restore(run, folder, f"prepare@{task}")
    if not manifest.exists():
        raise DataError(f"{_shown(run, manifest)}: not found; {restore}")
    try:
        records.read_manifest(folder)
    except DataError as exc:
        raise DataError(f"{_shown(run, manifest)}: {_reason(exc, manifest)}; {restore}") from None
    try:
        model = load_model(model_file)
    except VisionpipeError as exc:
        raise DataError(f"{_shown(run, model_file)}: {_reason(exc, model_file)}; "
                        f"{_restore(run, model_file, train)}") from None
    try:
        example = example_input(run)
    except StopIteration:
        raise DataError(f"{_shown(run, folder)}: its val split holds no images; "
                        f"{restore}") from None
    except Exception as exc:  # noqa: BLE001 - a missing or damaged shard: TensorFlow's errors
        why = " ".join(str(getattr(exc, "message", exc)).split())[:200]
        raise DataError(f"{_shown(run, folder)}: its first validation image cannot be read "
                        f"({type(exc).__name__}: {why}); {restore}") from None
    return model, example


def replay(run: RunLogger) -> dict:
    """Log a whole model run from its local files into a new MLflow run, as long as the
    stages' own work took (their CO2 reports' durations, else what the run file recorded).
    The files are checked first (replay_inputs); what was not logged is the caller's to say."""
    model, example = replay_inputs(run)
    recorded = run.read_state().get("durations_s")
    recorded = recorded if isinstance(recorded, dict) else {}
    run.start()
    durations = {}
    for stage in PIPELINE_STAGES:
        seconds = report_duration(run.layout, run.model_name, stage)
        if seconds is None:
            seconds = recorded.get(stage)
        if isinstance(seconds, (int, float)):
            durations[stage] = round(float(seconds), 3)
    run.state["durations_s"] = durations
    log_train(run, model, example=example)
    log_evaluate(run)
    log_export(run)
    return run.finish("replay", timed=False, warn=False)
