"""What a person sees: the project's own lines, not the libraries' start-up chatter.

By default the TensorFlow/absl C++ log lines (``cuInit`` probes on machines without a GPU,
oneDNN and CPU-feature notices) are dropped from standard error, as are Python warnings
of the libraries (the project's own warnings print as lines of their own).
``--verbose`` on any command, or ``VISIONPIPE_VERBOSE=1``, keeps everything.
``TF_CPP_MIN_LOG_LEVEL`` alone no longer silences TensorFlow 2.21: much of it is printed
before TensorFlow reads that variable, through absl, straight to file descriptor 2.
"""

from __future__ import annotations

import os
import re
import sys
import threading

VERBOSE_ENV = "VISIONPIPE_VERBOSE"

# Lines native code writes to stderr that a user never needs: absl/glog-formatted log lines
# (``I0000 00:00:1796211997.056865    5583 cudart_stub.cc:31] ...``), TensorFlow's own
# (``2026-12-02 11:40:00.123456: I tensorflow/...``), absl's start-up notice and the
# continuation line of the CPU-feature notice.
NOISE = re.compile(
    r"^(?:[IWEF]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [\w.\-/]+:\d+\]"
    r"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] "
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|To enable the following instructions:.*rebuild TensorFlow"
    r"|Skipping the delay kernel, measurement accuracy will be reduced"
    r"|INFO: Created TensorFlow Lite"
    r"|fully_quantize: \d"
    r"|WARNING:absl:"
    r"|INFO:tensorflow:|WARNING:tensorflow:)")


def is_verbose() -> bool:
    """True when the user asked for everything (``--verbose`` or VISIONPIPE_VERBOSE=1)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def set_verbose(on: bool) -> None:
    """Record ``--verbose`` where child processes and later imports see it."""
    if on:
        os.environ[VERBOSE_ENV] = "1"


_filter: _StderrFilter | None = None


class _StderrFilter:
    """File descriptor 2 through a pipe; a thread passes on every line but NOISE."""

    def __init__(self) -> None:
        sys.stderr.flush()
        self.original = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        self.read_end = read_end
        # Python's own writes (tracebacks, tqdm, our warnings) keep going straight out.
        self.python_stderr = sys.stderr
        sys.stderr = os.fdopen(os.dup(self.original), "w", buffering=1,
                               encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
                               errors="backslashreplace")
        self.dropped = 0
        self.thread = threading.Thread(target=self._pump, name="visionpipe-stderr",
                                       daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        with os.fdopen(self.read_end, "rb") as pipe:
            for raw in pipe:
                line = raw.decode("utf-8", "backslashreplace")
                if NOISE.match(line):
                    self.dropped += 1
                    continue
                os.write(self.original, raw)

    def close(self) -> None:
        """Give file descriptor 2 back and let the thread pass on what is left."""
        sys.stderr.flush()
        os.dup2(self.original, 2)  # closes the pipe's last write end: the thread sees EOF
        self.thread.join(timeout=5)


def _errors_only(record) -> bool:
    """A logging filter: only errors and worse pass."""
    return record.levelno >= 40  # logging.ERROR


def quiet_native_logs(filter_stderr: bool = True) -> None:
    """Keep native library log lines (and third-party Python warnings) off the console,
    unless verbose. Call before TensorFlow is imported; idempotent. ``filter_stderr=False``:
    only the settings, not the filter on file descriptor 2 (visionpipe.warm's worker, whose
    stage children install their own)."""
    global _filter
    if is_verbose() or _filter is not None:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # what TensorFlow still reads
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")  # its INFO lines ("Creating
    # initial MLflow database tables", system-metrics monitor start/stop)
    import warnings

    # Keras, TFDS, MLflow and codecarbon warnings are for their developers; ours are lines.
    warnings.filterwarnings("ignore", module=r"(keras|tensorflow|tensorflow_datasets|"
                                             r"mlflow|codecarbon|absl|tf2onnx|onnx)(\.|$)")
    import logging

    for name in ("absl", "tensorflow", "codecarbon", "mlflow", "alembic", "tf2onnx",
                 "py.warnings"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.ERROR)
        # A filter, too: libraries reset levels (Keras' ExportArchive puts absl's back at
        # WARNING after writing, and every later SavedModel load of the default YOLO printed
        # "WARNING:absl:Importing a function ... with ops with unsaved custom gradients").
        logger.addFilter(_errors_only)
    if not filter_stderr:
        return
    try:
        _filter = _StderrFilter()
    except OSError:  # no file descriptor 2 to redirect: nothing to filter
        return
    import atexit

    atexit.register(_filter.close)


def fit_verbosity() -> int:
    """Keras ``fit`` verbosity: a progress bar with ETA on a terminal, none otherwise (one
    line per epoch then comes from :class:`EpochLine`)."""
    return 1 if sys.stdout.isatty() else 0


def epoch_line(model_name: str, epoch: int, epochs: int, logs: dict, seconds: float) -> str:
    """``train@mlp epoch 3/20: loss 0.41, accuracy 0.88, val_loss 0.38, ... (12.3 s)``."""
    shown = ", ".join(f"{k} {v:.4g}" for k, v in logs.items()
                      if isinstance(v, (int, float)) and k != "learning_rate")
    return f"train@{model_name} epoch {epoch}/{epochs}: {shown} ({seconds:.1f} s)"


def human_bytes(n: int) -> str:
    """1234567 -> '1.2 MB'."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def progress(iterable, **kwargs):
    """A tqdm bar on a terminal; nothing otherwise (logs get the stage's summary line)."""
    from tqdm import tqdm

    return tqdm(iterable, disable=None if not is_verbose() else False, **kwargs)


def quiet_mlflow() -> None:
    """MLflow's own event lines ("Successfully registered model", "Created version") go to
    its logging stream; off unless verbose. Call after importing mlflow."""
    if is_verbose():
        return
    from mlflow.utils import logging_utils

    # disable_logging() is undone by MLflow itself (its model logging re-enables the stream
    # on the way out), so the stream's writes are what is switched off.
    stream = logging_utils.MLFLOW_LOGGING_STREAM
    stream.write = lambda text: None
    stream.flush = lambda: None
