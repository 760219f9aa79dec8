"""evaluate: test-split metrics, what the model costs, and plots, for one trained model."""

from __future__ import annotations

import numpy as np

from visionpipe import plots
from visionpipe.config import Params
from visionpipe.cost import flops_per_image, latency_ms, machine
from visionpipe.data import records
from visionpipe.data.pipeline import damaged_records, test_arrays
from visionpipe.headline import baseline, headline, test_metrics
from visionpipe.layout import Layout
from visionpipe.models.saving import load_model
from visionpipe.stages.common import measure_co2
from visionpipe.tasks.registry import task_for
from visionpipe.tracking.carbon import combine, read_report
from visionpipe.tracking.stage_logs import log_evaluate, log_stage


def co2_summary(stages: list[dict]) -> dict:
    """Totals over the stages measured so far, with each stage's own figures beside them."""
    keys = ("emissions_kg", "energy_kwh", "cpu_energy_kwh", "gpu_energy_kwh", "ram_energy_kwh",
            "duration_s", "cpu_power_mode", "status")
    return {**{k: v for k, v in combine(stages).items() if k in keys},
            "by_stage": {r["stage"]: {k: r[k] for k in keys if k in r} for r in stages}}


def run(params: Params, model_name: str, layout: Layout) -> dict:
    """Write reports/metrics/<model>.json and reports/plots/<model>/."""
    with measure_co2(params, layout, model_name, "evaluate") as carbon:
        metrics, explained = _evaluate(params, model_name, layout)
    train_co2 = read_report(layout.emissions(model_name) / "train.json")
    metrics["co2"] = co2_summary([train_co2, carbon.report.to_dict()])
    records.write_json(layout.metrics(model_name), metrics)
    records.write_json(layout.headline(model_name), headline(metrics))
    log_stage(params, model_name, layout, "evaluate", log_evaluate)
    print(evaluate_lines(model_name, metrics, layout, explained), flush=True)
    return metrics


def evaluate_lines(model_name: str, metrics: dict, layout: Layout,
                   explained: dict | None = None) -> str:
    """The task's headline test metrics beside the baseline, where the plots are, and what
    the task's explain() drew (or why nothing), where it says anything."""
    test = metrics["test"]
    figures = headline(metrics)
    names = test_metrics(metrics["task"])
    shown = ", ".join(f"{n} {figures[n]:.4f}" for n in names if n in figures)
    base = baseline(test, metrics["task"])
    if base is not None:
        shown += f" (baseline {test['baseline'].get('name', 'trivial')}: {base:.4f})"
    latency = figures.get("latency_ms")
    cost = f"; {latency:.2f} ms/image" if latency is not None else ""
    plots_dir = layout.plots(model_name).relative_to(layout.root)
    lines = (f"evaluate@{model_name}: test {shown}{cost} "
             f"on {test.get('num_test_images', '?')} images\n"
             f"evaluate@{model_name}: plots in {plots_dir}/, all figures in "
             f"{layout.metrics(model_name).relative_to(layout.root)}")
    if explained:
        where = explained.get("path")
        lines += (f"\nevaluate@{model_name}: {explained['summary']}"
                  + (f" in {where.relative_to(layout.root)}" if where is not None else ""))
    return lines


def _evaluate(params: Params, model_name: str, layout: Layout) -> tuple[dict, dict]:
    """Test metrics, plots and cost of one model (everything but CO2), and what the task's
    explain() returned."""
    cfg = params.model(model_name)
    task = task_for(cfg.family, cfg.task)
    model_path = layout.model_file(model_name)
    data_dir = layout.prepared(cfg.task)
    # The test shards are the bytes the manifest describes (see train).
    restore = records.restore_hint(data_dir, layout.root)
    manifest = records.verify_shards(data_dir, restore)
    model = task.evaluation_model(load_model(model_path), params.evaluate)
    names = manifest["class_names"]
    with damaged_records({data_dir: restore}):
        images, truths, ids = test_arrays(data_dir, task.targets)
    outputs = task.predict(model, images, params.evaluate.batch_size,
                           params.evaluate.tile_overlap)
    test = task.evaluate(np.asarray(truths), outputs, names, params.evaluate)

    out_dir = layout.plots(model_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_class = test.pop("per_class", None)
    if per_class is not None:  # rows, as `dvc plots` templates read them
        records.write_json(out_dir / "per_class.json",
                           [{"class": name, **scores} for name, scores in per_class.items()])
    task.plots(images, ids, np.asarray(truths), outputs, names, out_dir, params.evaluate)
    explained = task.explain(model, images, ids, np.asarray(truths), outputs, names, out_dir,
                             params.evaluate)
    history_path = layout.history(model_name)
    if history_path.exists():
        plots.learning_curves_png(plots.read_history(history_path),
                                  out_dir / "learning_curves.png")

    ev = params.evaluate
    h, w = (int(d) for d in model.inputs[0].shape[1:3])
    inputs = images[:, :h, :w]  # the model's own size (larger test images go through tiles)
    cost = {
        "params": int(model.count_params()),
        "input_size": [h, w],
        "flops_per_image": flops_per_image(model, inputs.shape[1:]),
        "model_file_bytes": model_path.stat().st_size,
        "latency_ms_per_image": latency_ms(model, inputs, ev.latency_samples, ev.latency_warmup),
        "machine": machine(),
    }
    metrics = {
        "model": model_name,
        "family": cfg.family,
        "task": cfg.task,
        "dataset": {"path": str(data_dir.relative_to(layout.root)),
                    "name": manifest["source"].get("name"), "checksum": manifest["checksum"],
                    "test_count": manifest["counts"]["test"]},
        "test": test,
        "cost": cost,
    }
    return metrics, explained
