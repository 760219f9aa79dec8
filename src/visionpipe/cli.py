"""`visionpipe <stage>`: one thin command per pipeline stage, as dvc.yaml runs them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from visionpipe import __version__
from visionpipe.config import PREDICT_FORMATS
from visionpipe.console import VERBOSE_ENV, quiet_native_logs, set_verbose
from visionpipe.errors import VisionpipeError, disk_full_line
from visionpipe.tasks.catalog import task_names

STAGES = {
    "prepare": ("task", "Write train/val/test TFRecord shards and manifest.json for a task "
                        "to data/prepared/<task>/."),
    "augment": ("task", "Write an augmented copy of a task's train split to "
                        "data/augmented/<task>/ and a preview grid to reports/plots/augment/."),
    "train": ("model", "Train one model; writes models/<model>/model.keras, checkpoints/ and "
                       "reports/train/<model>/history.csv."),
    "evaluate": ("model", "Evaluate one model on the test split; writes "
                          "reports/metrics/<model>.json and reports/plots/<model>/."),
    "export": ("model", "Export one model to the formats in params (keras, SavedModel, TFLite "
                        "float/int8, ONNX) under models/<model>/export/, check each one's parity "
                        "(reports/export/<model>.json) and write its model card."),
}
# Not pipeline stages: commands a person runs by hand.
COMMANDS = {
    "log": ("model", "Replay a model's run into MLflow from its local files (after the "
                     "backend was unreachable); prints the new run id."),
    "predict": ("model", "Run an exported model on a folder of images and videos, in "
                         "batches: OUTPUT/predictions.json (one record per image or video "
                         "frame: class; masks with "
                         "class shares; boxes in the image's pixels), OUTPUT/rendered/ copies, "
                         "OUTPUT/masks/ (segmentation), OUTPUT/coco_results.json (detection). "
                         "Needs only models/<model>/export/."),
    "summary": (None, "One table of every model in params from reports/: task, headline "
                      "test metric beside its baseline, parameters, latency, CO2 in grams, "
                      "training time, kept/run epochs and the export verdict; then each "
                      "stage's own time in seconds and how much of it was start-up "
                      "(reports/timings/)."),
    "schema": (None, "Print the JSON Schema of params.yaml (what params.schema.json holds, "
                     "for editors): `visionpipe schema > params.schema.json`."),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: a sub-command per stage, each with its own --help."""
    parser = argparse.ArgumentParser(
        prog="visionpipe",
        description="Reproducible computer-vision pipeline: prepare -> augment -> train -> "
                    "evaluate -> export. Normally run through `dvc repro`.")
    parser.add_argument("--version", action="version", version=f"visionpipe {__version__}")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (target, text) in {**STAGES, **COMMANDS}.items():
        p = sub.add_parser(name, help=text, description=text)
        if target is None:
            pass
        elif target == "task":
            p.add_argument("--task", required=True, choices=task_names(),
                           help="which task's data (a key of the prepare/augment params)")
        else:
            p.add_argument("--model", required=True,
                           help="model name: a key of the `models` section of params.yaml")
        add_project_args(p, "data/, models/ and reports/")
        if name == "predict":
            p.add_argument("--input", type=Path, required=True,
                           help="folder of images and videos (searched recursively; any size)")
            p.add_argument("--output", type=Path, required=True,
                           help="folder for predictions.json and rendered/")
            p.add_argument("--format", choices=PREDICT_FORMATS, default=None,
                           help="exported format to run (default: predict.format in params, "
                                "else saved_model)")
            p.add_argument("--export-dir", type=Path, default=None,
                           help="the export folder (default: ROOT/models/MODEL/export)")
            p.add_argument("--conf", type=unit_float, default=None, metavar="C",
                           help="detection: keep boxes scoring at least C (default: "
                                "predict.confidence)")
            p.add_argument("--iou", type=unit_float, default=None, metavar="T",
                           help="detection: NMS drops boxes overlapping a kept one by T or "
                                "more (default: predict.iou)")
            p.add_argument("--max-det", type=positive_int, default=None, metavar="N",
                           help="detection: at most N boxes per image (default: "
                                "predict.max_detections)")
            p.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                           help="images in memory at once (default: predict.batch_size)")
            p.add_argument("--trust-saved-model", action="store_true",
                           help="run a SavedModel even if its graph reads or writes files, "
                                "calls Python or talks to other processes (refused by default: "
                                "a SavedModel is a program; only for exports you trust)")
    add_benchmark(sub)
    return parser


BENCHMARK = ("Measure training, input-pipeline and inference speed of the models in params "
             "against an in-memory ideal, a naive pipeline and a matmul peak; writes "
             "reports/benchmark.json and reports/benchmark.png.")


def unit_float(text: str) -> float:
    """An argparse type: a number from 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is outside 0..1")
    return value


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is less than 1")
    return value


def add_project_args(p: argparse.ArgumentParser, holds: str) -> None:
    """--params and --root, shared by every command."""
    p.add_argument("--params", type=Path, default=Path("params.yaml"),
                   help="params file (default: params.yaml)")
    p.add_argument("--root", type=Path, default=Path("."),
                   help=f"project root holding {holds} (default: .)")
    p.add_argument("--verbose", action="store_true",
                   help="also show TensorFlow's logs, library warnings and Keras model "
                        f"summaries (or set {VERBOSE_ENV}=1, e.g. for `dvc repro`)")


def add_benchmark(sub) -> None:
    """`visionpipe benchmark`: not a stage; reads the data DVC produced."""
    p = sub.add_parser("benchmark", help=BENCHMARK, description=BENCHMARK)
    p.add_argument("--models", default=None,
                   help="comma-separated model names (default: every model in params)")
    add_project_args(p, "data/ and reports/")
    p.add_argument("--output", type=Path, default=None,
                   help="folder for benchmark.json and benchmark.png (default: ROOT/reports)")
    p.add_argument("--json-name", default="benchmark.json", metavar="NAME",
                   help="file name of the JSON in --output; the PNG takes its stem (default: "
                        "benchmark.json; scripts/gpu_check.sh writes benchmark-gpu.json)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: few images, one repeat (figures not comparable)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats per figure, medians over them (default: 4; quick: 1)")
    p.add_argument("--compare", type=Path, default=None, metavar="PATH",
                   help="an earlier benchmark.json (copy reports/benchmark.json aside before "
                        "the run): each model's images/s and share of the matmul peak beside "
                        "its figures there, by model name")
    p.add_argument("--skip", default="", metavar="SECTIONS",
                   help="comma-separated sections to leave out: precision, threads, "
                        "scaling (default: none; GPU rows are added whenever TensorFlow sees "
                        "a GPU)")


def benchmark(args: argparse.Namespace) -> None:
    """Run `visionpipe benchmark`."""
    import dataclasses

    from visionpipe import benchmark as bench
    from visionpipe.config import load_params
    from visionpipe.layout import Layout

    settings = bench.QUICK if args.quick else bench.Settings()
    if args.repeats is not None:
        if args.repeats < 1:
            raise VisionpipeError(f"--repeats {args.repeats}: must be 1 or more")
        settings = dataclasses.replace(settings, repeats=args.repeats)
    skip = tuple(s.strip() for s in args.skip.split(",") if s.strip())
    unknown = [s for s in skip if s not in bench.SECTIONS]
    if unknown:
        raise VisionpipeError(f"--skip {args.skip}: unknown section(s) {', '.join(unknown)}; "
                              f"choose from {', '.join(bench.SECTIONS)}")
    settings = dataclasses.replace(settings, skip=skip)
    name = args.json_name
    if Path(name).name != name or not name.endswith(".json") or name == ".json":
        raise VisionpipeError(f"--json-name {name}: a file name ending in .json, without a "
                              "folder (the folder is --output)")
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    bench.run(load_params(args.params), Layout(args.root.resolve()), models, args.output,
              settings, compare=args.compare, json_name=name)


def run_stage(args: argparse.Namespace, clock=None) -> None:
    """Load params, then run the chosen stage; a pipeline stage that succeeds records its time
    in reports/timings/<stage>@<key>.json (``clock``: main()'s, from the process start)."""
    from importlib import import_module

    from visionpipe.config import load_params
    from visionpipe.layout import Layout
    from visionpipe.timing import StageClock

    if args.stage == "predict":
        predict(args)
        return
    if args.stage == "benchmark":
        benchmark(args)
        return
    if args.stage == "schema":
        from visionpipe.config.schema import params_json_schema_text

        sys.stdout.write(params_json_schema_text())
        return
    params = load_params(args.params)
    if args.stage == "summary":
        summary(params, Layout(args.root.resolve()))
        return
    kind = {**STAGES, **COMMANDS}[args.stage][0]
    if kind == "model":
        from visionpipe.models.registry import validate_architectures

        validate_architectures(params)
        params.model(args.model)
    layout = Layout(args.root.resolve())
    if args.stage == "log":
        replay_run(params, args.model, layout)
        return
    stage = import_module(f"visionpipe.stages.{args.stage}")
    key = args.task if kind == "task" else args.model
    with (clock or StageClock.start()).running(layout.root, f"{args.stage}@{key}"):
        stage.run(params, key, layout)


def predict(args: argparse.Namespace) -> None:
    """`visionpipe predict`: only the export folder is needed; params.yaml is optional."""
    from visionpipe import predict as predict_module
    from visionpipe.config import PredictConfig, load_params

    explicit = args.params != Path("params.yaml")
    if explicit or args.params.exists():
        settings = load_params(args.params).predict
    else:  # a machine that pulled only the export folder
        settings = PredictConfig()
    predict_module.run(args, settings)


def summary(params, layout) -> None:
    """`visionpipe summary`: every model's headline figures, from its reports."""
    from visionpipe.headline import (
        stage_time_rows,
        stage_time_table,
        summary_rows,
        summary_table,
    )

    rows = summary_rows(layout, list(params.models))
    print(summary_table(rows))
    missing = [r["model"] for r in rows if r.get("task") is None]
    if missing:
        print(f"no reports yet for {', '.join(missing)}: run `dvc repro`")
    print()
    print(stage_time_table(stage_time_rows(layout, list(params.prepare), list(params.augment),
                                           list(params.models))))
    print("details: reports/metrics/<model>.json, reports/model_cards/<model>.md; "
          "compare runs: `dvc exp show`, `dvc plots show`, `mlflow ui` (README, docs/tracking.md)")


def replay_run(params, model: str, layout) -> None:
    """`visionpipe log`: a new MLflow run holding everything the local files record. A missing
    or malformed local file is an error naming it (before anything is sent); so is a backend
    that did not take everything, saying whether it was unreachable, silent or failing."""
    from visionpipe.errors import VisionpipeError
    from visionpipe.tracking.mlflow_runs import RunLogger
    from visionpipe.tracking.stage_logs import replay

    if not params.tracking.mlflow:
        raise VisionpipeError("params.yaml: tracking.mlflow = False: set it to true to log")
    run = RunLogger(params, model, layout)
    state = replay(run)
    if state.get("status") != "logged":
        again = f"`visionpipe log --model {model}`"
        missing = ", ".join(dict.fromkeys(run.not_logged))
        if run.failure == "unreachable":
            raise VisionpipeError(f"MLflow at {run.shown_uri} still not reachable "
                                  f"({run.error}); nothing was lost: run {again} again later")
        if run.failure == "timeout":
            raise VisionpipeError(f"{run.failure_text()}; not logged: {missing}. Nothing was "
                                  f"lost: run {again} again once it answers")
        partial = f" (run {run.run_id} holds the rest)" if run.run_id else ""
        raise VisionpipeError(f"{run.failure_text()}; not logged for {model}: {missing}"
                              f"{partial}. The local files are unchanged: fix that and run "
                              f"{again} again")
    print(f"logged {model} to {state['tracking_uri']}: experiment {state['experiment']}, "
          f"run {state['run_id']}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: a user's mistake prints one line and exits 2; no traceback."""
    from visionpipe import warm
    from visionpipe.timing import StageClock

    clock = StageClock.start()  # first: what ran before is Python's start-up and imports
    words = sys.argv[1:] if argv is None else argv
    if words and words[0] in STAGES and warm.enabled():  # a pipeline stage under `dvc repro`
        code = warm.run(words)
        if code is not None:
            return code
    args = build_parser().parse_args(argv)
    set_verbose(getattr(args, "verbose", False))
    if "pytest" not in sys.modules:  # in a test's process, pytest owns file descriptor 2
        quiet_native_logs()
    try:
        run_stage(args, clock)
    except VisionpipeError as exc:
        print(f"visionpipe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("visionpipe: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a full disk is the user's to fix, not a bug: one line
        line = disk_full_line(exc)
        if line is None:
            raise
        print(f"visionpipe: error: {line}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
