"""MLflow: one run per model per pipeline run, opened by train, completed by evaluate and export.

Everything here is best effort. The pipeline's own files (model, history, metrics, plots,
emissions) are the record; MLflow gets a copy. When the backend cannot be reached, the stage
still finishes, prints one warning naming what was not logged, and marks the run file
``models/<model>/mlflow_run.json`` as pending; ``visionpipe log --model NAME`` replays the run
from the local files with the same functions the stages use.
"""

from __future__ import annotations

import json
import os
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

    # -- connection and run lifecycle ------------------------------------------------------

    def _connect(self) -> None:
        from mlflow import MlflowClient

        # An unreachable server must cost seconds, not MLflow's default minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
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
            self.state = {"run_id": self.run_id, "experiment": self.experiment,
                          "experiment_id": exp_id, "tracking_uri": self.shown_uri}
        except Exception as exc:  # noqa: BLE001
            self._fail("the run itself", exc)
        return self

    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(
                self.experiment, artifact_location=artifact_location(self.layout,
                                                                     self.experiment))
        except Exception:  # noqa: BLE001 - a parallel run may have just created it
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    def resume(self) -> RunLogger:
        """Continue the run train opened (evaluate, export); pending runs stay pending."""
        if not self.enabled:
            return self
        try:
            self.state = json.loads(self.run_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            self.state = {}
        if (self.state.get("status") != "logged"
                or self.state.get("tracking_uri") != self.shown_uri):
            self.not_logged.append("this stage (the run is not in MLflow)")
            self.error = (f"train's run is {self.state.get('status', 'missing')} at "
                          f"{self.state.get('tracking_uri', self.shown_uri)}")
            return self
        try:
            self._connect()
            self.run_id = self.state["run_id"]
        except Exception as exc:  # noqa: BLE001
            self._fail("the run itself", exc)
        return self

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
        self.not_logged.append(what)
        self.error = self.error or redact(_short(exc), self.uri)
        self.client = None

    def finish(self, stage: str) -> dict:
        """Close the run, write the run file, and warn once about anything not logged."""
        if not self.enabled:
            return {}
        if self.client is not None and self.run_id is not None:
            self.call("run status", "set_terminated", self.run_id, "FINISHED")
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
            print(f"visionpipe: warning: MLflow at {self.shown_uri} not reachable ({self.error}); "
                  f"not logged for {self.model_name} {stage}: {', '.join(missing)}. "
                  f"Local files are complete; replay with "
                  f"`visionpipe log --model {self.model_name}`.", file=sys.stderr)
        records.write_json(self.run_file, self.state)
        return self.state

    # -- what gets logged -------------------------------------------------------------------

    def _tags(self) -> dict[str, str]:
        manifest = records.read_manifest(self.layout.prepared(self.cfg.task))
        tags = {
            "visionpipe.version": __version__,
            "visionpipe.model": self.model_name,
            "visionpipe.family": self.cfg.family,
            "visionpipe.task": self.cfg.task,
            "dataset.name": str(manifest["source"].get("name")),
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

    def log_metrics(self, values: dict[str, float], step: int = 0, what: str = "metrics") -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in values.items()]
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

    def log_keras_model(self, model, example: np.ndarray) -> None:
        """The model in the mlflow.keras flavour, with signature and input example.

        Saved locally and uploaded as the run's ``model`` artifact: MLflow 3.17's
        ``mlflow.keras.log_model`` writes the input example before it creates the model
        folder, and fails whenever an example is given.
        """

        def log():
            import tempfile

            import mlflow.keras
            from mlflow.models import infer_signature

            signature = infer_signature(example, np.asarray(model(example, training=False)))
            with tempfile.TemporaryDirectory(prefix="visionpipe-mlflow-") as tmp:
                path = Path(tmp) / "model"
                path.mkdir()
                # Given, not inferred: inference reloads the model in a subprocess (~10 s).
                mlflow.keras.save_model(model, str(path), signature=signature,
                                        input_example=example,
                                        pip_requirements=_model_requirements())
                self.client.log_artifacts(self.run_id, str(path), "model")
            self.state["model_uri"] = f"runs:/{self.run_id}/model"

        self.attempt("model", log)

    def register(self, metrics: dict, parity: dict) -> None:
        """Register a new version of visionpipe-<model>, tagged with its test metrics."""

        def register():
            import mlflow

            mlflow.set_tracking_uri(self.uri)
            name = f"visionpipe-{self.model_name}"
            version = mlflow.register_model(self.state["model_uri"], name)
            tags = {f"test.{k}": v for k, v in numeric(metrics.get("test", {})).items()}
            tags.update({f"cost.{k}": v for k, v in numeric(metrics.get("cost", {})).items()})
            tags["export.parity_passed"] = parity.get("passed")
            tags["mlflow_run_id"] = self.run_id
            for key, value in tags.items():
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                self.client.set_model_version_tag(name, version.version, key, str(value))
            self.state["registered_model"] = {"name": name, "version": version.version}

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
                logger.log_metrics({k: float(v) for k, v in (logs or {}).items()},
                                   step=epoch, what="epoch metrics")

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
