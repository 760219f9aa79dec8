"""reports/model_cards/<model>.md: what a model is, what it was trained on, how well it does,
what it cost, how faithful its exports are, and how to rebuild it. Written by export from the
files the earlier stages left, so every number in it is one the pipeline measured."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml

from visionpipe import atomic
from visionpipe.config import Params
from visionpipe.data import records
from visionpipe.layout import Layout
from visionpipe.tasks.registry import task_class


def _plain(value):
    """Dataclasses and tuples as plain YAML-able mappings and lists."""
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _json(path: Path) -> dict | list | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _num(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value else f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def render(params: Params, model_name: str, layout: Layout) -> str:
    """The card as Markdown."""
    cfg = params.model(model_name)
    data_dir = layout.prepared(cfg.task)
    manifest = records.read_manifest(data_dir)
    meta = _json(layout.model_meta(model_name)) or {}
    metrics = _json(layout.metrics(model_name)) or {}
    export = _json(layout.export_report(model_name)) or {}
    per_class = _json(layout.plots(model_name) / "per_class.json") or []
    test = metrics.get("test", {})
    source = manifest["source"]
    lines = [f"# Model card: {model_name}", "",
             f"A **{cfg.family}** {cfg.task} model over {len(manifest['class_names'])} classes "
             f"({', '.join(manifest['class_names'])}), input {manifest['image_size'][0]}x"
             f"{manifest['image_size'][1]} RGB. Written by `visionpipe export` from the "
             "pipeline's own outputs; every number below was measured by the pipeline.", "",
             "## Data", "",
             f"- Source: `{source.get('kind')}`, name `{source.get('name')}`"
             + (f", path `{source['path']}`" if source.get("path") else ""),
             f"- Checksum of the prepared records: `{manifest['checksum']}`",
             "- Images per split: " + ", ".join(f"{k} {v}" for k, v in manifest["counts"].items()),
             f"- Resize policy: `{manifest.get('resize')}`; files skipped by prepare: "
             f"{manifest.get('skipped', {}).get('count', 0)} (listed in "
             f"`reports/prepare/{cfg.task}.json`)", ""]
    counts = manifest.get("class_counts", {})
    if counts:
        splits = list(counts)
        lines += _table(["class", *splits], [[name, *(counts[s].get(name, 0) for s in splits)]
                                             for name in manifest["class_names"]])
        lines.append("")

    lines += ["## Training", ""]
    if meta:
        lines += [f"- Epochs run: {meta.get('epochs')} (stopped early: "
                  f"{meta.get('stopped_early')}); model kept: epoch {meta.get('kept_epoch')} "
                  f"by `{meta.get('monitor')}`",
                  f"- Parameters: {meta.get('params')}",
                  f"- Train images (with augmented copies): "
                  f"{meta.get('train_dataset', {}).get('count')}", ""]
    lines += [f"Params (`models.{model_name}` in params.yaml, defaults filled in):", "",
              "```yaml", yaml.safe_dump({"seed": params.seed, f"models.{model_name}": _plain(cfg)},
                                        sort_keys=False).rstrip(), "```", ""]

    lines += ["## Test metrics", ""]
    if test:
        baseline = test.get("baseline", {})
        shown = [(k, v) for k, v in test.items() if isinstance(v, (int, float))]
        lines += _table(["metric", "value"], [[k, _num(v)] for k, v in shown])
        if baseline:
            lines += ["", f"Baseline ({baseline.get('name')}, always `{baseline.get('class')}`): "
                          f"accuracy {_num(baseline.get('accuracy'))}."]
        lines.append("")
    else:
        lines += ["No metrics: run `dvc repro evaluate@" + model_name + "`.", ""]
    if per_class:
        keys = [k for k in per_class[0] if k != "class"]
        lines += _table(["class", *keys], [[row["class"], *(_num(row[k]) for k in keys)]
                                           for row in per_class])
        lines.append("")

    cost = metrics.get("cost", {})
    if cost:
        latency = cost.get("latency_ms_per_image", {})
        lines += ["## Cost", "",
                  f"- Parameters {cost.get('params')}, {cost.get('flops_per_image')} FLOPs per "
                  f"image, `.keras` file {cost.get('model_file_bytes')} bytes",
                  f"- Latency {_num(latency.get('median'), 3)} ms per image (median of "
                  f"{latency.get('samples')}, batch 1) on {cost.get('machine', {}).get('cores')} "
                  f"CPU cores, GPU: {cost.get('machine', {}).get('gpu')}", ""]

    lines += ["## CO2 (codecarbon estimate)", ""]
    stages = {**metrics.get("co2", {}).get("by_stage", {})}
    if export.get("co2"):
        stages["export"] = export["co2"]
    rows = [[name, s.get("status"), _num(s.get("emissions_kg")), _num(s.get("energy_kwh")),
             _num(s.get("duration_s"), 1), s.get("cpu_power_mode", "")]
            for name, s in stages.items()]
    if any(r[1] == "measured" for r in rows):
        lines += _table(["stage", "status", "kg CO2eq", "kWh", "seconds", "CPU power"], rows)
        lines += ["", f"Details per stage: `reports/emissions/{model_name}/`.", ""]
    else:
        lines += ["Not measured (`tracking.codecarbon: false` or codecarbon failed; see "
                  f"`reports/emissions/{model_name}/`).", ""]

    lines += ["## Exported formats and parity", ""]
    key = export.get("agreement_key", "agreement")
    formats = export.get("formats", {})
    # Each check with its limit (a detector's: also the mAP@.5 it loses); older reports: the
    # max abs diff and the task's agreement.
    measures = list(next(iter(formats.values()), {}).get("limits") or ["max_abs_diff", key])

    def checked(r, m):
        limit = r.get("thresholds", {}).get(m)
        return f"{_num(r.get(m), 3)}" + ("" if limit is None else f" (limit {limit})")

    rows = [[fmt, f"`{r['path']}`", r.get("bytes"), r["input"],
             *[checked(r, m) for m in measures], "yes" if r["passed"] else "**no**"]
            for fmt, r in formats.items()]
    lines += _table(["format", "file", "bytes", "input", *measures, "passed"], rows)
    resized = export.get("resized_input")
    if resized:
        # the task's agreement, or the check's own (a detector's compares boxes)
        rkey = next((k for k in resized.get("thresholds", {}) if k != "max_abs_diff"), key)
        lines += ["", f"SavedModel on {resized['input_size'][0]}x{resized['input_size'][1]} "
                      f"inputs (resized inside the graph) against the Keras model on the same "
                      f"images resized as prepare does: {rkey} {_num(resized.get(rkey))}, "
                      f"max abs diff {_num(resized['max_abs_diff'], 3)}."]
    boxes = next(iter(formats.values()), {}).get("truth_boxes")
    held = f" holding {boxes} boxes" if boxes is not None else ""
    splits = " + ".join(export.get("splits", ["test"]))
    lines += ["", f"Compared on {export.get('samples')} images ({splits}){held}; limits per format "
                  f"are `models.{model_name}.export_parity` where set, else `export.parity`, "
                  "in params.yaml.", "",
              "## Rebuild and use", "",
              "At the git commit holding this card (its `dvc.lock` pins data, code and params):",
              "", "```bash",
              f"dvc pull models/{model_name}/export   # the exported files, from the DVC remote",
              f"dvc repro export@{model_name}         # or rebuild them (and anything stale)",
              (f"visionpipe predict --model {model_name} --input my_images/ --output "
               "predictions/" if task_class(cfg.task).predicts_folders else
               f"# visionpipe predict does not run {cfg.task} exports yet; load "
               f"models/{model_name}/export/saved_model with tf.saved_model.load"),
              "```", "",
              "## Limits", "",
              f"Measured on the {manifest['counts'].get('test')} test images of the data above "
              "only; images unlike them (another camera, domain or class) are out of scope "
              "until measured.", ""]
    return "\n".join(lines)


def write_model_card(params: Params, model_name: str, layout: Layout) -> Path:
    return atomic.write_text(layout.model_card(model_name), render(params, model_name, layout))
