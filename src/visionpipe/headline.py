"""The few numbers that say how a model did: one definition for the console, `visionpipe
summary`, `dvc metrics show` (reports/headline/<model>.json) and MLflow's runs table."""

from __future__ import annotations

from typing import Any

from visionpipe.data.records import read_json
from visionpipe.tasks.registry import task_class, task_names


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
