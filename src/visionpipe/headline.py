"""The few numbers that say how a model did: one definition for the console, `visionpipe
summary`, `dvc metrics show` (reports/headline/<model>.json) and MLflow's runs table; and the
summary's table of each stage's own time (reports/timings/, written by visionpipe.timing)."""

from __future__ import annotations

import textwrap
from typing import Any

from visionpipe.data.records import read_json
from visionpipe.tasks.registry import task_class, task_names
from visionpipe.timing import TIMINGS, timing_file


def test_metrics(task: str | None) -> tuple[str, ...]:
    """The test metrics of reports/metrics/<model>.json that make ``task``'s headline
    (``Task.headline_metrics``); none for a task no longer registered."""
    return task_class(task).headline_metrics if task in task_names() else ()


def primary(task: str) -> str:
    """The short name of ``task``'s headline test metric (higher is better)."""
    return test_metrics(task)[0]


def baseline(test: dict, task: str) -> float | None:
    """What a trivial model scores on the headline metric, where evaluate measured one."""
    names = test_metrics(task)
    value = (test.get("baseline") or {}).get(names[0]) if names else None
    return float(value) if isinstance(value, (int, float)) else None


def _num(value: Any, digits: int) -> float | None:
    return round(float(value), digits) if isinstance(value, (int, float)) else None


def headline(metrics: dict) -> dict[str, float | int]:
    """About six numbers from evaluate's report: the task's test metrics, model size,
    latency, CO2 of train + evaluate in grams and training time in seconds."""
    task = metrics["task"]
    test = metrics.get("test", {})
    cost = metrics.get("cost", {})
    out: dict[str, float | int] = {}
    for key in test_metrics(task):
        value = _num(test.get(key), 4)
        if value is not None:
            out[key] = value
    if isinstance(cost.get("params"), int):
        out["params"] = cost["params"]
    latency = _num((cost.get("latency_ms_per_image") or {}).get("median"), 2)
    if latency is not None:
        out["latency_ms"] = latency
    co2 = metrics.get("co2", {})
    grams = _num(co2.get("emissions_kg") and co2["emissions_kg"] * 1000.0, 3)
    if grams is not None:
        out["co2_g"] = grams
    train_s = _num((co2.get("by_stage", {}).get("train") or {}).get("duration_s"), 1)
    if train_s is not None:
        out["train_s"] = train_s
    return out


def test_figures(metrics: dict) -> dict[str, float | int]:
    """headline() with the task's test metrics named test_<name> (test_accuracy, ...), as
    MLflow's runs table and the registry's version tags show them."""
    names = test_metrics(metrics.get("task"))
    return {f"test_{k}" if k in names else k: v for k, v in headline(metrics).items()}


def summary_rows(layout, model_names) -> list[dict]:
    """One row per model with what its reports say so far (missing reports leave gaps)."""
    rows = []
    for name in model_names:
        metrics = read_json(layout.metrics(name)) or {}
        meta = read_json(layout.model_meta(name)) or {}
        export = read_json(layout.export_report(name)) or {}
        task = metrics.get("task") or meta.get("task")
        row: dict[str, Any] = {"model": name, "task": task, "family": meta.get("family")}
        if metrics:
            row.update(headline(metrics))
            row["baseline"] = baseline(metrics.get("test", {}), task)
        if meta:
            row["epochs"] = meta.get("epochs")
            row["kept_epoch"] = meta.get("kept_epoch")
            row.setdefault("params", meta.get("params"))
        if export:
            row["export"] = "passed" if export.get("passed") else "FAILED"
            total = (export.get("co2") or {}).get("emissions_kg")
            if isinstance(total, (int, float)) and "co2_g" in row:
                row["co2_g"] = round(row["co2_g"] + total * 1000.0, 3)
        rows.append(row)
    return rows


def _fmt(value: Any, key: str) -> str:
    if value is None:
        return "-"
    if key == "params" and isinstance(value, int):
        return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:.0f}k"
    if isinstance(value, float):
        digits = {"latency_ms": 2, "train_s": 0}.get(key, 3)
        return f"{value:.{digits}f}"
    return str(value)


def summary_table(rows: list[dict]) -> str:
    """A plain-text table: task, headline metric (and baseline), params, latency, CO2, time."""
    header = ["model", "task", "metric", "score", "baseline", "params", "latency_ms",
              "co2_g", "train_s", "epochs", "export"]
    lines = []
    for row in rows:
        task = row.get("task")
        metric = primary(task) if test_metrics(task) else None
        epochs = (f"{row['kept_epoch']}/{row['epochs']}"
                  if row.get("epochs") is not None else None)
        values = {"model": row["model"], "task": task, "metric": metric,
                  "score": row.get(metric) if metric else None, "baseline": row.get("baseline"),
                  "params": row.get("params"), "latency_ms": row.get("latency_ms"),
                  "co2_g": row.get("co2_g"), "train_s": row.get("train_s"),
                  "epochs": epochs, "export": row.get("export")}
        lines.append([_fmt(values[k], k) for k in header])
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
              for i, h in enumerate(header)]
    text = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    text += ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
             for line in lines]
    return "\n".join(text)


# --------------------------------------------------------------- each stage's own time

TASK_STAGES = ("prepare", "augment")
MODEL_STAGES = ("train", "evaluate", "export")


def read_timing(layout, stage: str) -> dict | None:
    """reports/timings/<stage>.json (visionpipe.timing) with its seconds as numbers; None when
    the stage has not run (or the file is not one a stage wrote)."""
    record = read_json(timing_file(layout.root, stage))
    if record is None:
        return None
    seconds = {}
    for key in ("total_s", "startup_s", "run_import_s"):
        value = record.get(key, 0.0 if key == "run_import_s" else None)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            return None
        seconds[key] = float(value)
    return seconds


def stage_time_rows(layout, prepare, augment, models) -> list[dict]:
    """One row per task (its prepare and augment) then per model (train, evaluate, export), in
    params order: {"name", "stages": {stage: timing or None}} holding only the stages that
    apply (a task in prepare but not augment has no augment)."""
    tasks = {"prepare": list(prepare), "augment": list(augment)}
    rows = [{"name": name, "stages": {s: read_timing(layout, f"{s}@{name}")
                                      for s in TASK_STAGES if name in tasks[s]}}
            for name in dict.fromkeys([*tasks["prepare"], *tasks["augment"]])]
    rows += [{"name": name, "stages": {s: read_timing(layout, f"{s}@{name}")
                                       for s in MODEL_STAGES}}
             for name in models]
    return rows


def _seconds(value: float) -> str:
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def startup_seconds(timing: dict) -> float:
    """A stage's start-up: before its run() (Python, imports, params) plus the libraries its
    run() imported on first use."""
    return timing["startup_s"] + timing["run_import_s"]


def stage_time_table(rows: list[dict]) -> str:
    """Seconds per stage: a row per task and model, each row's total and start-up, then a
    line with the sum over every stage and how much of it was start-up."""
    header = ["seconds", *TASK_STAGES, *MODEL_STAGES, "total", "start-up"]
    lines, timed, missing = [], [], []
    for row in rows:
        cells = [row["name"]]
        done = []
        for stage in (*TASK_STAGES, *MODEL_STAGES):
            if stage not in row["stages"]:
                cells.append("")
                continue
            timing = row["stages"][stage]
            if timing is None:
                missing.append(f"{stage}@{row['name']}")
                cells.append("-")
            else:
                done.append(timing)
                cells.append(_seconds(timing["total_s"]))
        cells.append(_seconds(sum(t["total_s"] for t in done)) if done else "-")
        cells.append(_seconds(sum(startup_seconds(t) for t in done)) if done else "-")
        timed += done
        lines.append(cells)
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
              for i, h in enumerate(header)]

    def join(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    text = [join(header), *(join(line) for line in lines)]
    count = len(timed) + len(missing)
    if not timed:
        text.append(f"no stage timed yet ({TIMINGS}/): `dvc repro` records each stage's time")
        return "\n".join(text)
    total = sum(t["total_s"] for t in timed)
    startup = sum(startup_seconds(t) for t in timed)
    who = f"all {count} stages" if not missing else f"{len(timed)} of {count} stages timed"
    text.append(f"{who}: {_seconds(total)} s, of which {_seconds(startup)} s start-up (Python "
                f"start and library imports)")
    if missing:
        text.append(textwrap.fill(f"not timed yet: {', '.join(missing)}", width=100,
                                  subsequent_indent="  ", break_on_hyphens=False))
    return "\n".join(text)
