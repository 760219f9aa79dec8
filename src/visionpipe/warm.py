"""A warm worker for `dvc repro`: each stage starts in about a second instead of paying
Python's start-up and the imports of TensorFlow, Keras, keras-cv, MLflow and matplotlib again
(about 10 s each on a 2-core CPU, for every one of the pipeline's 24 stages).

Under DVC (which sets ``DVC_STAGE`` for every stage command), ``visionpipe <stage>`` first
looks for a worker of this exact code and environment: a process that has imported everything
once and forks a fresh child for each stage. The child takes the stage's standard input,
output and error (passed over a Unix socket), its working directory, environment and
arguments, runs the same ``cli.main`` a cold process runs, and hands back the exit status.
Nothing else is shared: each stage still gets its own process, TensorFlow runtime, MLflow
run and codecarbon tracker, and the worker itself never runs TensorFlow. When no worker
answers, the stage runs cold in its own process, as without this module, and starts a worker
in the background for the stages after it. A worker leaves after ``IDLE_S`` seconds without a
stage, and a change to visionpipe's code or to an environment variable that libraries read
when imported makes the next stage start another one (the socket's name is their
fingerprint).

``VISIONPIPE_WARM=0`` turns it off; commands run by hand (outside DVC) never use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from visionpipe.timing import STARTED_ENV

ENV = "VISIONPIPE_WARM"
IDLE_S = 120.0  # a worker with no stage for this long exits
MAX_STAGES = 4  # stages running at once in one worker (DVC runs one at a time)
# Read by libraries when they are imported (the worker imported them with its own values).
IMPORT_TIME_ENV = ("TF_", "CUDA_", "KERAS_", "XLA_", "OMP_", "MKL_", "KMP_", "OPENBLAS_",
                   "NVIDIA_", "LD_", "PYTHON", "MPLBACKEND", "MPLCONFIGDIR", "HOME")
# What a stage imports; the worker imports it once (a missing optional package is skipped).
PRELOAD = ("visionpipe.cli", "visionpipe.stages.prepare", "visionpipe.stages.augment",
           "visionpipe.stages.train", "visionpipe.stages.evaluate", "visionpipe.stages.export",
           "visionpipe.tracking.stage_logs", "visionpipe.formats", "visionpipe.serving",
           "mlflow", "mlflow.keras", "mlflow.store.tracking.sqlalchemy_store",
           "mlflow.store.model_registry.sqlalchemy_store", "codecarbon", "matplotlib.pyplot",
           "keras_cv", "tf2onnx", "onnxruntime")
_HEADER = 1 << 20  # the largest request (argv, cwd, environment) taken
IN_WORKER = False  # True in a stage's child, which runs the stage itself


def enabled() -> bool:
    """Run by DVC (which sets DVC_STAGE for a stage's command), on Linux, with the worker not
    turned off, and not already in a worker's child. cli.main asks only for pipeline stages."""
    if IN_WORKER or os.environ.get(ENV, "1").strip().lower() in ("0", "off", "false", "no"):
        return False
    return bool(os.environ.get("DVC_STAGE")) and sys.platform.startswith("linux")


def fingerprint(environ: dict[str, str] | None = None) -> str:
    """This interpreter, visionpipe's source files (path, size, modification time) and the
    environment variables libraries read at import (of ``environ``; default: this process's)."""
    environ = os.environ if environ is None else environ
    package = Path(__file__).resolve().parent
    h = hashlib.sha256()
    # The interpreter's file, not the name it was started by (python, python3.11, a script).
    h.update(f"{os.path.realpath(sys.executable)}\0{sys.version}\0{os.getuid()}\0".encode())
    for path in sorted(package.rglob("*.py")):
        st = path.stat()
        h.update(f"{path.relative_to(package)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    for key in sorted(environ):
        if key.startswith(IMPORT_TIME_ENV):
            h.update(f"{key}={environ[key]}\0".encode())
    return h.hexdigest()[:20]


def socket_path(fp: str) -> Path:
    return Path(tempfile.gettempdir()) / f"visionpipe-warm-{os.getuid()}" / f"{fp}.sock"


# ------------------------------------------------------------------------------- the client


def run(argv: list[str]) -> int | None:
    """Run ``argv`` in a warm worker and return its exit status; None: no worker answered
    (one is started for the next stage) and the caller runs the stage itself."""
    fp = fingerprint()
    path = socket_path(fp)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except OSError:
        conn.close()
        _start_worker(fp, path)
        return None
    from visionpipe.timing import process_age

    request = {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ),
               "started": time.time() - (process_age() or 0.0)}
    try:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], [0, 1, 2])
        reader = conn.makefile("rb")
        pid = int(json.loads(reader.readline())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        conn.close()
        return None  # the worker is going away: run cold

    def forward(signum, _frame):  # Ctrl-C, or DVC stopping the stage, reaches the child
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    try:
        line = reader.readline()
        return int(json.loads(line)["exit"])
    except (OSError, ValueError, KeyError, TypeError):
        print(f"visionpipe: error: the stage's warm worker process ({pid}) ended without an "
              f"exit status; run the stage again (set {ENV}=0 to run it in its own process)",
              file=sys.stderr)
        return 1
    finally:
        conn.close()


def _start_worker(fp: str, path: Path) -> None:
    """A detached worker process (its own session, no inherited files, so DVC does not wait
    for it)."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        subprocess.Popen([sys.executable, "-m", "visionpipe.warm", fp], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
                         start_new_session=True, cwd=path.parent)
    except OSError:
        pass  # no worker: every stage runs cold, as without this module


# ------------------------------------------------------------------------------- the worker


def serve(fp: str) -> None:
    """Import what stages use, then fork one child per request until idle for IDLE_S."""
    path = socket_path(fp)
    lock = path.with_suffix(".lock")
    environ = dict(os.environ)  # as the client had it (the worker sets a few below)
    try:  # one worker per fingerprint: the lock file is created once
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        if time.time() - lock.stat().st_mtime < 60:
            return  # another worker is starting
        lock.unlink(missing_ok=True)
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    try:
        os.environ.setdefault("MPLBACKEND", "Agg")
        from visionpipe.console import quiet_native_logs

        quiet_native_logs(filter_stderr=False)
        for name in PRELOAD:
            # A missing optional package: the stage imports (or reports) it itself.
            with contextlib.suppress(Exception):
                __import__(name)
        from visionpipe.models.registry import known_families

        known_families()  # imports every family's module
        with contextlib.suppress(Exception):  # codecarbon caches it (a 1 s subprocess)
            from codecarbon.core.util import detect_cpu_model

            detect_cpu_model()
        if fingerprint(environ) != fp:  # the code changed while importing: nothing stale
            return
        path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(8)
        _loop(listener, fp, environ)
    finally:
        path.unlink(missing_ok=True)
        lock.unlink(missing_ok=True)


def _loop(listener: socket.socket, fp: str, environ: dict[str, str]) -> None:
    children: set[int] = set()
    last = time.monotonic()
    listener.settimeout(5.0)
    while True:
        for pid in list(children):
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                children.discard(pid)
                last = time.monotonic()
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            if not children and time.monotonic() - last > IDLE_S:
                return
            continue
        if fingerprint(environ) != fp:  # code edited since: the client asked another worker
            conn.close()
            return
        if len(children) >= MAX_STAGES:
            conn.close()  # the client runs its stage in its own process
            continue
        pid = os.fork()
        if pid == 0:
            listener.close()
            _child(conn)  # never returns
        conn.close()
        children.add(pid)
        last = time.monotonic()


def _child(conn: socket.socket) -> None:
    """One stage: take the client's files, place and environment, run cli.main, report."""
    global IN_WORKER
    IN_WORKER = True
    code = 1
    try:
        msg, fds, _flags, _addr = socket.recv_fds(conn, _HEADER, 3)
        while not msg.endswith(b"\n"):
            more = conn.recv(_HEADER)
            if not more:
                raise ConnectionError("the request ended early")
            msg += more
        request = json.loads(msg.decode())
        for target, fd in zip((0, 1, 2), fds, strict=True):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ[ENV] = "0"  # the stage (and anything it starts) runs here, never re-asks
        # The stage's recorded time counts from the command's start (visionpipe.timing).
        os.environ[STARTED_ENV] = repr(float(request["started"]))
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own descriptors
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        conn.sendall(json.dumps({"pid": os.getpid()}).encode() + b"\n")
        threading.Thread(target=_watch, args=(conn,), daemon=True).start()
        sys.argv = ["visionpipe", *request["argv"]]
        from visionpipe import cli

        code = cli.main(request["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - a cold process would print it and exit 1
        import traceback

        traceback.print_exc()
    try:
        import atexit

        atexit._run_exitfuncs()  # what a cold process does on exit (MLflow, the log filter)
        sys.stdout.flush()
        sys.stderr.flush()
        conn.sendall(json.dumps({"exit": int(code)}).encode() + b"\n")
    finally:
        os._exit(int(code) & 0xFF)


def _watch(conn: socket.socket) -> None:
    """The client went away (killed): stop the stage as its own process would have been."""
    try:
        while conn.recv(1):
            pass
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":  # the worker: run as visionpipe.warm, not as a second __main__ copy
    from visionpipe import warm

    warm.serve(sys.argv[1])
