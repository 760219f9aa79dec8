"""MLflow: one run per model per pipeline run, opened by train, completed by evaluate and export.

The run is shaped for MLflow's runs table, where models are compared: its duration is the sum
of its stages' own durations (not the hours it stays open while other models train), its trained
model is an MLflow *logged model* (the Models column) registered as ``visionpipe-<model>`` with
the ``champion`` alias on the best version that passed export parity, the prepared dataset is
its input (the Dataset column), and the headline figures have short names (``test_accuracy``,
``best_val_loss``, ``co2_g``, ...; see visionpipe.headline) beside the detailed dotted ones.

Everything here is best effort. The pipeline's own files (model, history, metrics, plots,
emissions) are the record; MLflow gets a copy. When the backend cannot be reached, the stage
still finishes, prints one warning naming what was not logged, and marks the run file
``models/<model>/mlflow_run.json`` as pending; ``visionpipe log --model NAME`` replays the run
from the local files with the same functions the stages use.

Each request to an HTTP tracking server is one attempt bounded by ``tracking.timeout_s``
(default :data:`REQUEST_TIMEOUT_S`; MLflow's MLFLOW_HTTP_REQUEST_TIMEOUT overrides it): a
server that accepts connections and never answers costs a stage one timeout, after which the
stage sends it nothing more.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from visionpipe import __version__
from visionpipe.config import Params
from visionpipe.data import records
from visionpipe.layout import Layout

RUN_FILE = "mlflow_run.json"
CHAMPION = "champion"
PIPELINE_STAGES = ("train", "evaluate", "export")
# Where `mlflow ui` listens by default, and its runs table in the model-training view (MLflow
# 3.17's UI otherwise opens in its GenAI view).
UI_ADDRESS = "http://127.0.0.1:5000"
RUNS_VIEW = "#/experiments/{experiment_id}/runs?workflowType=machine_learning"
# Seconds an HTTP tracking server has to answer each request, and MLflow's retries of one that
# failed: none, so a server that never answers costs one timeout (MLflow's own defaults, 120 s
# and 7 retries with backoff, add up to minutes per request). The environment variables are
# MLflow's; a value set there wins.
REQUEST_TIMEOUT_S = 15
TIMEOUT_ENV = "MLFLOW_HTTP_REQUEST_TIMEOUT"
RETRIES_ENV = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"


def project_root(layout: Layout) -> Path:
    """The repository that owns mlflow.db: DVC_ROOT inside `dvc exp run --temp`/queues."""
    return Path(os.environ.get("DVC_ROOT") or layout.root).resolve()


def redact(text: str, uri: str) -> str:
    """``text`` with the ``user:password`` part of ``uri`` (from MLFLOW_TRACKING_URI) shown as
    ``***``: credentials never reach logs, run files or MLflow."""
    userinfo = urlsplit(uri).netloc.rpartition("@")[0]
    return text.replace(f"{userinfo}@", "***@") if userinfo else text


def tracking_uri(params: Params, layout: Layout) -> str:
    """MLFLOW_TRACKING_URI, else params' tracking.uri, else sqlite:///<repo>/mlflow.db."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = project_root(layout)
    uri = params.tracking.uri
    if not uri:
        return f"sqlite:///{root / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # A relative sqlite path would land in DVC's temporary experiment copy.
        return f"sqlite:///{(root / uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def artifact_location(layout: Layout, experiment: str) -> str:
    """<repo>/mlartifacts/<experiment>, absolute for the same reason as the database."""
    return str(project_root(layout) / "mlartifacts" / experiment)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def numeric(data: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a nested mapping, flattened (what MLflow takes as metrics)."""
    out = {}
    for key, value in flatten(data, prefix).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) \
                and np.isfinite(value):
            out[key] = float(value)
    return out


def report_duration(layout: Layout, model_name: str, stage: str) -> float | None:
    """Seconds of the stage's work as its CO2 report measured them (codecarbon's start to
    stop around the work); None when codecarbon did not measure (disabled, failed)."""
    report = records.read_json(layout.emissions(model_name) / f"{stage}.json") or {}
    value = report.get("duration_s")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    return None


def process_seconds() -> float | None:
    """How long this process has run: a stage's duration when codecarbon did not time it
    (DVC runs each stage as its own `visionpipe` process)."""
    try:
        import psutil

        return max(0.0, time.time() - psutil.Process().create_time())
    except Exception:  # noqa: BLE001 - psutil missing or /proc unreadable
        return None


def dataset_digest(checksum: str) -> str:
    """The short form of a manifest checksum MLflow shows as the dataset's digest:
    ``sha256:0123456789ab...`` -> ``0123456789ab``."""
    return checksum.rpartition(":")[2][:12]


def ui_url(uri: str, experiment_id: str) -> str:
    """The experiment's runs in MLflow's model-training view: on the tracking server itself for
    an http(s) URI, else where `mlflow ui` listens by default."""
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):
        host = parts.netloc.rpartition("@")[2]  # never credentials in a printed link
        base = f"{parts.scheme}://{host}{parts.path}".rstrip("/")
    else:
        base = UI_ADDRESS
    return f"{base}/{RUNS_VIEW.format(experiment_id=experiment_id)}"


def ui_command(uri: str, root: Path) -> str | None:
    """The command that serves ``uri``'s runs at :func:`ui_url`, run from the repository root;
    None for an http(s) URI (that server is the UI)."""
    if urlsplit(uri).scheme in ("http", "https"):
        return None
    if uri == f"sqlite:///{Path(root).resolve() / 'mlflow.db'}":
        uri = "sqlite:///mlflow.db"
    return f"mlflow ui --backend-store-uri {shlex.quote(redact(uri, uri))}"


def git_commit(root: Path) -> str | None:
    """HEAD of the repository the stage runs in, if it is a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _model_requirements() -> list[str]:
    """What serving the logged Keras model needs: this TensorFlow and Keras."""
    from importlib.metadata import version

    return [f"tensorflow=={version('tensorflow')}", f"keras=={version('keras')}"]


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:160]}"


def request_timeout(default: int = REQUEST_TIMEOUT_S) -> int:
    """Seconds each request to an HTTP tracking server may take: MLFLOW_HTTP_REQUEST_TIMEOUT
    when set (a whole number, as MLflow reads it), else ``default``."""
    from visionpipe.errors import VisionpipeError

    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise VisionpipeError(f"{TIMEOUT_ENV}={text[:40]!r}: not a whole number of seconds of "
                              f"at least 1; unset it (default {default}) or set e.g. "
                              f"{TIMEOUT_ENV}=30")
    return value


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps: its cause or context, and a urllib3 MaxRetryError's reason."""
    chain: list[BaseException] = []
    while exc is not None and all(exc is not seen for seen in chain):
        chain.append(exc)
        reason = getattr(exc, "reason", None)
        if isinstance(reason, BaseException) and all(reason is not s for s in chain):
            chain.append(reason)
        exc = exc.__cause__ or exc.__context__
    return chain


def failure_kind(exc: BaseException) -> str:
    """Why a request to the backend failed: ``timeout`` (no answer within the timeout),
    ``unreachable`` (no connection: refused, reset, unknown host) or ``error`` (the backend
    answered, or failed locally, with an error). MLflow wraps the HTTP client's exception in
    its own; the chain under it says which."""
    import requests
    import urllib3.exceptions

    chain = _causes(exc)
    # First: urllib3's NewConnectionError (refused, unknown host) is also a ConnectTimeoutError.
    refused = (ConnectionError, urllib3.exceptions.NewConnectionError)
    if any(isinstance(e, refused) for e in chain):
        return "unreachable"
    timeouts = (TimeoutError, requests.exceptions.Timeout, urllib3.exceptions.TimeoutError)
    if any(isinstance(e, timeouts) for e in chain):
        return "timeout"
    no_connection = (requests.exceptions.ConnectionError, urllib3.exceptions.ProtocolError)
    if any(isinstance(e, no_connection) for e in chain):
        return "unreachable"
    return "error"


def _timeout_detail(exc: BaseException) -> str:
    """The HTTP client's own words for a timeout (``Read timed out. (read timeout=15)``)."""
    import requests
    import urllib3.exceptions

    for cause in reversed(_causes(exc)):
        if isinstance(cause, (urllib3.exceptions.TimeoutError, requests.exceptions.Timeout)):
            return _short(cause)
    return _short(exc)


@contextmanager
def _sqlite_creation_lock(uri: str):
    """For a sqlite backend, one process at a time opens the database (and, the first time,
    creates its tables): two runs starting together on a fresh file otherwise race through
    MLflow's schema migrations and can both fail. A no-op for other backends."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class RunLogger:
    """Logs one model's run; after the first failure it stops trying and records the rest."""

    def __init__(self, params: Params, model_name: str, layout: Layout):
        self.params, self.model_name, self.layout = params, model_name, layout
        self.cfg = params.model(model_name)
        self.enabled = params.tracking.mlflow
        self.uri = tracking_uri(params, layout)
        self.shown_uri = redact(self.uri, self.uri)  # what is printed and written
        self.experiment = f"{params.tracking.experiment_prefix}-{self.cfg.task}"
        self.run_file = layout.model_dir(model_name) / RUN_FILE
        self.client = None
        self.run_id: str | None = None
        self.state: dict = {}
        self.not_logged: list[str] = []
        self.error: str | None = None
        # Why nothing more was logged: "timeout", "unreachable", "error" (failure_kind) or
        # "pending" (train's run is not in MLflow); None while everything was.
        self.failure: str | None = None
        self.timeout_s = (request_timeout(params.tracking.timeout_s) if self.enabled
                          else params.tracking.timeout_s)
        self.opened = time.time()
        self.resumed = False
        self._last_timestamp = 0

    # -- connection and run lifecycle ------------------------------------------------------

    def _connect(self) -> None:
        from mlflow import MlflowClient

        from visionpipe.console import quiet_mlflow

        quiet_mlflow()  # "Successfully registered model" etc.: export prints its own line

        # One attempt per request, bounded: a server that never answers costs one timeout.
        os.environ.setdefault(RETRIES_ENV, "0")
        os.environ.setdefault(TIMEOUT_ENV, str(self.timeout_s))
        # Export prints the one link to the run (ui_line); not MLflow's own at each end_run.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        last: Exception | None = None
        for attempt in range(5):
            try:
                with _sqlite_creation_lock(self.uri):
                    client = MlflowClient(self.uri)
                    client.search_experiments(max_results=1)
                self.client = client
                return
            except Exception as exc:  # noqa: BLE001 - any backend failure means "offline"
                last = exc
                # A fresh sqlite file being created by a parallel run is worth a retry; an
                # HTTP server has had MLflow's own retries already.
                if not self.uri.startswith("sqlite"):
                    break
                time.sleep(1.0 + attempt)
        raise last  # type: ignore[misc]

    def start(self) -> RunLogger:
        """Open a new run in the task's experiment (train, or a replay)."""
        if not self.enabled:
            return self
        try:
            self._connect()
            exp_id = self._experiment_id()
            # Inside `dvc exp run` the experiment's name tells runs of one model apart.
            exp_name = os.environ.get("DVC_EXP_NAME")
            run_name = f"{self.model_name}-{exp_name}" if exp_name else self.model_name
            run = self.client.create_run(exp_id, run_name=run_name, tags=self._tags())
            self.run_id = run.info.run_id
            self.state = {"run_id": self.run_id, "run_name": run_name,
                          "experiment": self.experiment, "experiment_id": exp_id,
                          "tracking_uri": self.shown_uri, "start_time": run.info.start_time}
        except Exception as exc:  # noqa: BLE001
            self._fail("the run itself", exc)
        self.opened = time.time()  # the stage's work starts now (train's fit)
        return self

    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(
                self.experiment, artifact_location=artifact_location(self.layout,
                                                                     self.experiment))
        except Exception:  # a parallel run may have just created it
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    def resume(self) -> RunLogger:
        """Continue the run train opened (evaluate, export); pending runs stay pending."""
        if not self.enabled:
            return self
        self.resumed = True
        self.state = self.read_state()
        if (self.state.get("status") != "logged"
                or self.state.get("tracking_uri") != self.shown_uri):
            self.not_logged.append("this stage (the run is not in MLflow)")
            self.error = (f"train's run is {self.state.get('status', 'missing')} at "
                          f"{self.state.get('tracking_uri', self.shown_uri)}")
            self.failure = "pending"
            return self
        try:
            self._connect()
            self.run_id = self.state["run_id"]
        except Exception as exc:  # noqa: BLE001
            self._fail("the run itself", exc)
        return self

    def read_state(self) -> dict:
        """The run file as the last stage left it ({} when there is none)."""
        return records.read_json(self.run_file) or {}

    def attempt(self, what: str, fn: Callable[[], Any]) -> Any:
        """Call ``fn`` against MLflow; a failure is recorded, not raised."""
        if self.client is None or self.run_id is None:
            if self.enabled:
                self.not_logged.append(what)
            return None
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            self._fail(what, exc)
            return None

    def call(self, what: str, method: str, *args, **kwargs) -> Any:
        """Call ``MlflowClient.<method>``; looked up only once we know there is a client."""
        return self.attempt(what, lambda: getattr(self.client, method)(*args, **kwargs))

    def _fail(self, what: str, exc: BaseException) -> None:
        """``what`` was not logged; nothing more is sent to the backend in this process."""
        self.not_logged.append(what)
        if self.failure is None:
            self.failure = failure_kind(exc)
            detail = _timeout_detail(exc) if self.failure == "timeout" else _short(exc)
            self.error = redact(detail, self.uri)
        self.client = None
        _abandon_active_run()

    def failure_text(self) -> str:
        """What went wrong with the backend, for a warning or an error line."""
        where = f"MLflow at {self.shown_uri}"
        if self.failure == "timeout":
            retries = os.environ.get(RETRIES_ENV, "0").strip()
            tries = f", {int(retries) + 1} attempts" if retries.isdigit() and int(retries) else ""
            return (f"{where} did not answer within {self.timeout_s} s{tries} ({self.error}), "
                    "so nothing more was sent to it")
        if self.failure == "pending":
            return f"{where} not used: {self.error}"
        if self.failure == "unreachable":
            return f"{where} not reachable ({self.error})"
        if self.failure is None:  # nothing failed to send; something was not there to send
            return f"{where} reachable"
        return f"{where} failed ({self.error})"

    def stage_duration(self, stage: str) -> float:
        """Seconds of this stage's own work: its CO2 report's duration, else (codecarbon off)
        since the run was opened (train) or since this process started (evaluate, export)."""
        measured = report_duration(self.layout, self.model_name, stage)
        if measured is not None:
            return measured
        since_open = time.time() - self.opened
        if not self.resumed:
            return since_open
        uptime = process_seconds()
        return since_open if uptime is None else uptime

    def end_time(self) -> int | None:
        """The run's start plus the sum of its stages' durations, in ms since the epoch."""
        start = self.state.get("start_time")
        if not isinstance(start, int):  # a run file from before start_time was recorded
            start = self.client.get_run(self.run_id).info.start_time
            self.state["start_time"] = start
        total = sum(self.state.get("durations_s", {}).values())
        return start + round(1000 * total)

    def finish(self, stage: str, *, timed: bool = True, warn: bool = True) -> dict:
        """Record the stage's duration, end the run at start + the stages' durations, write
        the run file, and warn once about anything not logged (or, after export, print where
        the run is in MLflow's UI). ``timed=False``: the durations are set already (replay);
        ``warn=False``: the caller says what was not logged (replay's error line)."""
        if not self.enabled:
            return {}
        if timed:
            durations = dict(self.state.get("durations_s", {}))
            durations[stage] = round(self.stage_duration(stage), 3)
            self.state["durations_s"] = durations
        if self.client is not None and self.run_id is not None:
            # Not now: the run stays open from train to export, hours apart when DVC trains
            # other models in between; its duration in the UI is the time of its own work.
            self.attempt("run status", lambda: self.client.set_terminated(
                self.run_id, "FINISHED", end_time=self.end_time()))
        ok = not self.not_logged
        stages = dict(self.state.get("stages", {}))
        stages[stage] = "logged" if ok else "pending"
        status = "logged" if ok and self.state.get("status", "logged") == "logged" else "pending"
        self.state.update({"tracking_uri": self.shown_uri, "experiment": self.experiment,
                           "status": status, "stages": stages})
        if not ok:
            missing = list(dict.fromkeys(self.not_logged))
            self.state["not_logged"] = sorted(set(self.state.get("not_logged", []))
                                              | {f"{stage}: {w}" for w in missing})
            if self.error:  # why, per stage
                self.state["errors"] = {**self.state.get("errors", {}), stage: self.error}
            if warn:
                print(f"visionpipe: warning: {self.failure_text()}; not logged for "
                      f"{self.model_name} {stage}: {', '.join(missing)}. Local files are "
                      f"complete; replay with `visionpipe log --model {self.model_name}`.",
                      file=sys.stderr)
        elif stage == "export" and self.run_id is not None:
            print(self.ui_line(), flush=True)
        records.write_json(self.run_file, self.state)
        return self.state

    def ui_url(self) -> str:
        """Where this run's experiment is in MLflow's UI (model-training view)."""
        return ui_url(self.uri, str(self.state.get("experiment_id", "0")))

    def ui_command(self) -> str | None:
        """How to start that UI for this repository's database (None: a server already is)."""
        return ui_command(self.uri, project_root(self.layout))

    def ui_line(self) -> str:
        """``mlflow: <model> run <name> -> <url>  (start the UI: <command>)``."""
        name = self.state.get("run_name", self.model_name)
        line = f"mlflow: {self.model_name} run {name} -> {self.ui_url()}"
        command = self.ui_command()
        return f"{line}  (start the UI: {command})" if command else line

    # -- what gets logged -------------------------------------------------------------------

    def _tags(self) -> dict[str, str]:
        manifest = records.read_manifest(self.layout.prepared(self.cfg.task))
        tags = {
            "visionpipe.version": __version__,
            "visionpipe.model": self.model_name,
            "visionpipe.family": self.cfg.family,
            "visionpipe.task": self.cfg.task,
            "dataset.name": str((manifest.get("source") or {}).get("name")),
            "dataset.checksum": manifest["checksum"],
        }
        commit = git_commit(self.layout.root)
        if commit:
            tags["mlflow.source.git.commit"] = commit
        for env, tag in (("DVC_EXP_NAME", "dvc.experiment"),
                         ("DVC_EXP_BASELINE_REV", "dvc.baseline_rev")):
            if os.environ.get(env):
                tags[tag] = os.environ[env]
        return tags

    def run_params(self) -> dict[str, Any]:
        """The params that shaped this model, flattened: seed, data, augmentation, model."""
        from dataclasses import asdict

        task = self.cfg.task
        out = {"seed": self.params.seed}
        out.update(flatten(asdict(self.params.prepare_for(task)), "prepare."))
        out.update(flatten(asdict(self.params.augment_for(task)), "augment."))
        out.update(flatten(asdict(self.cfg), "model."))
        return out

    def log_params(self, values: dict[str, Any]) -> None:
        if not self.enabled:  # tracking off: not even MLflow's import (seconds)
            return
        from mlflow.entities import Param

        items = [Param(k, json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v))
                 for k, v in values.items()]
        for start in range(0, len(items), 100):  # MLflow's batch limit for params
            self.call("params", "log_batch", self.run_id, params=items[start:start + 100])

    def log_metrics(self, values: dict[str, float], step: int = 0, what: str = "metrics", *,
                    model_id: str | None = None, dataset: dict | None = None) -> None:
        """Metrics at ``step``; ``model_id``/``dataset`` link them to the logged model and the
        dataset they were measured on (the logged model's page shows them)."""
        if not self.enabled:
            return
        from mlflow.entities import Metric

        # Strictly later than this run's previous batch: a value logged again at the same step
        # (co2_g after each stage) then replaces the earlier one even within a millisecond.
        now = max(int(time.time() * 1000), self._last_timestamp + 1)
        self._last_timestamp = now
        link = {"model_id": model_id}
        if dataset:
            link.update(dataset_name=dataset["name"], dataset_digest=dataset["digest"])
        items = [Metric(k, float(v), now, step, **link) for k, v in values.items()]
        for start in range(0, len(items), 1000):
            self.call(what, "log_batch", self.run_id, metrics=items[start:start + 1000])

    def log_files(self, paths: Iterable[Path], artifact_path: str, what: str) -> None:
        """Files go into ``artifact_path``; a folder's contents too (not the folder's name)."""
        for path in paths:
            if path.is_dir():
                self.call(what, "log_artifacts", self.run_id, str(path), artifact_path)
            elif path.exists():
                self.call(what, "log_artifact", self.run_id, str(path), artifact_path)

    def log_history(self, history_csv: Path) -> None:
        """Per-epoch metrics from history.csv (replays, or when live logging was off)."""
        from visionpipe.plots import read_history

        history = read_history(history_csv)
        for i, epoch in enumerate(history.get("epoch", [])):
            self.log_metrics({k: v[i] for k, v in history.items() if k != "epoch"},
                             step=int(epoch), what="epoch metrics")

    def log_dataset(self) -> None:
        """The prepared dataset as the run's training input (the runs table's Dataset column):
        its source's name, the manifest checksum's short form as digest, its path in the repo."""

        def log():
            from mlflow.entities import Dataset, DatasetInput, InputTag
            from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

            folder = self.layout.prepared(self.cfg.task)
            manifest = records.read_manifest(folder)
            try:
                path = str(folder.resolve().relative_to(Path(self.layout.root).resolve()))
            except ValueError:
                path = str(folder)
            name = str(manifest.get("source", {}).get("name") or self.cfg.task)
            digest = dataset_digest(manifest["checksum"])
            profile = {"counts": manifest.get("counts"), "image_size": manifest["image_size"],
                       "classes": len(manifest["class_names"])}
            # The "local" source type and {"uri": ...} of mlflow.data's local file source.
            dataset = Dataset(name=name, digest=digest, source_type="local",
                              source=json.dumps({"uri": path}), profile=json.dumps(profile))
            self.client.log_inputs(self.run_id, [DatasetInput(
                dataset, [InputTag(MLFLOW_DATASET_CONTEXT, "training")])])
            self.state["dataset"] = {"name": name, "digest": digest, "path": path,
                                     "checksum": manifest["checksum"]}

        self.attempt("dataset", log)

    def log_keras_model(self, model, example: np.ndarray, step: int = 0) -> None:
        """The model as an MLflow logged model of this run (mlflow.keras flavour, signature).

        ``step``: the kept epoch; MLflow links that step's metrics to the model. No input
        example: MLflow 3.17's ``mlflow.keras.log_model`` writes it before it creates the model
        folder and fails whenever one is given (mlflow/mlflow#16183); the signature carries the
        input's shape and dtype.
        """

        def log():
            import mlflow
            import mlflow.keras
            from mlflow.models import infer_signature

            signature = infer_signature(example, np.asarray(model(example, training=False)))
            mlflow.set_tracking_uri(self.uri)
            # log_model takes the run (and its experiment) from the active run. Not `with`:
            # its exit would end the run with one more request after a failed upload
            # (_fail forgets the run instead).
            mlflow.start_run(run_id=self.run_id, log_system_metrics=False)
            # Requirements given, not inferred: inference reloads the model (~10 s).
            info = mlflow.keras.log_model(model, name=self.model_name, signature=signature,
                                          step=step, pip_requirements=_model_requirements())
            mlflow.end_run()
            self.state["model_id"] = info.model_id
            self.state["model_uri"] = info.model_uri  # models:/<model_id>

        self.attempt("model", log)

    def register(self, metrics: dict, parity: dict) -> None:
        """Register the logged model as a new version of visionpipe-<model>, tagged with its
        test metrics and parity verdict, and give the best passing version the champion alias."""
        from visionpipe.headline import test_figures, test_metrics

        def register():
            import mlflow

            mlflow.set_tracking_uri(self.uri)
            name = f"visionpipe-{self.model_name}"
            tags = {f"test.{k}": v for k, v in numeric(metrics.get("test", {})).items()}
            tags.update({f"cost.{k}": v for k, v in numeric(metrics.get("cost", {})).items()})
            if test_metrics(metrics.get("task")):
                tags.update({k: v for k, v in test_figures(metrics).items()
                             if k.startswith("test_")})
            tags["export.parity_passed"] = parity.get("passed")
            tags["mlflow_run_id"] = self.run_id
            tags = {k: str(int(v) if isinstance(v, float) and v.is_integer() else v)
                    for k, v in tags.items()}
            # Tagged as it is created: a version being ranked by another process has its tags.
            version = mlflow.register_model(self.state["model_uri"], name, tags=tags)
            self.state["registered_model"] = {"name": name, "version": version.version}
            champion = update_champion(self.client, name, self.cfg.task)
            self.state["registered_model"]["champion"] = champion

        if "model_uri" not in self.state:
            self.not_logged.append("registered model (no logged model in this run)")
            return
        self.attempt("registered model", register)

    def keras_callback(self):
        """A Keras callback logging each epoch's metrics and learning rate as they happen."""
        import keras

        logger = self

        class MLflowEpochLogger(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                # Keras counts epochs from 0; history.csv, model.json and the console from 1.
                logger.log_metrics({k: float(v) for k, v in (logs or {}).items()},
                                   step=epoch + 1, what="epoch metrics")

        return MLflowEpochLogger()

    def system_metrics(self):
        """Context logging CPU, memory (and GPU) usage into the run while it is open."""
        import contextlib

        if not (self.params.tracking.system_metrics and self.client is not None
                and self.run_id is not None):
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def monitored():
            import mlflow
            from mlflow.system_metrics import set_system_metrics_sampling_interval

            mlflow.set_tracking_uri(self.uri)
            set_system_metrics_sampling_interval(self.params.tracking.system_metrics_interval)
            try:
                mlflow.start_run(run_id=self.run_id, log_system_metrics=True)
            except Exception as exc:  # noqa: BLE001
                self._fail("system metrics", exc)
                yield
                return
            try:
                yield
            finally:
                self.attempt("system metrics", mlflow.end_run)

        return monitored()


def _abandon_active_run() -> None:
    """Forget MLflow's active run in this process without a request, as ``mlflow.end_run``
    would but for its call to the server: after a failure nothing more is sent, and a server
    that hangs would make each of those calls (the run's end, a system-metrics flush at exit)
    wait out another timeout. The system-metrics thread (a daemon) is told to stop; nothing
    joins it. Uses MLflow's fluent run stack (pinned MLflow, see requirements.txt)."""
    from mlflow.environment_variables import MLFLOW_RUN_ID
    from mlflow.tracking import fluent

    stack = fluent._active_run_stack.get()
    while stack:
        run = stack.pop()
        monitor = fluent.run_id_to_system_metrics_monitor.pop(run.info.run_id, None)
        if monitor is not None:
            monitor._shutdown_event.set()
    MLFLOW_RUN_ID.unset()


def champion_key(task: str) -> str:
    """The version tag models are ranked by: the task's headline test metric, unrounded."""
    from visionpipe.headline import primary

    return f"test.{primary(task)}"


def update_champion(client, name: str, task: str) -> str | None:
    """Point ``name``'s champion alias at its best version (highest headline test metric)
    among those whose export passed parity; the alias moves only to a version that beats the
    current champion, and never to one that failed parity. Returns the champion's version."""
    key = champion_key(task)
    scores: dict[str, float] = {}
    for version in client.search_model_versions(f"name='{name}'"):
        tags = version.tags or {}
        if tags.get("export.parity_passed") != "True":
            continue
        try:
            scores[str(version.version)] = float(tags[key])
        except (KeyError, ValueError):
            continue
    current = client.get_registered_model(name).aliases.get(CHAMPION)
    current = None if current is None else str(current)
    if not scores:
        return current
    # Highest score; among equals the oldest version, so a tie never moves the alias.
    best = max(scores, key=lambda v: (scores[v], -int(v)))
    if current in scores and scores[current] >= scores[best]:
        return current
    client.set_registered_model_alias(name, CHAMPION, best)
    return best
