"""Helpers shared by test files: a temporary copy of the repository where the real `dvc repro`
runs, a real MLflow server, tiny params and projects, local TFDS catalog copies.

Test files import helpers from here only, never from one another or from a conftest.py
(tests/unit/test_layout_of_tests.py checks); fixtures live in conftest.py files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from visionpipe.layout import Layout

# --------------------------------------------------------------- a repository copy under DVC

# git and `dvc exp run` commit: give them an identity on machines that have none.
IDENTITY = {f"GIT_{who}_{what}": value for who in ("AUTHOR", "COMMITTER")
            for what, value in (("NAME", "visionpipe-tests"),
                                ("EMAIL", "tests@visionpipe.invalid"))}


SPLITS = {"train": 96, "val": 32, "test": 40}
EPOCHS = 2


def shrink(params: dict) -> None:
    """32x32 images, a few dozen samples, 2 epochs, the MLP only: the same stages, in about
    a minute."""
    params["models"] = {"mlp": params["models"]["mlp"]}
    # Only the MLP's task: no prepare/augment stages for data no model reads.
    params["prepare"] = {"classification": params["prepare"]["classification"]}
    params["augment"] = {"classification": params["augment"]["classification"]}
    prep = params["prepare"]["classification"]
    prep.update(image_size=[32, 32], splits=dict(SPLITS), shard_size=50)
    params["augment"]["classification"]["preview"] = 4
    mlp = params["models"]["mlp"]
    mlp["architecture"]["hidden_units"] = [32]
    mlp["architecture"]["input_pool"] = 1
    mlp["train"].update(epochs=EPOCHS, batch_size=16, deterministic=True)
    params["evaluate"].update(latency_samples=5, latency_warmup=1, gradcam_images=4)
    params["export"]["parity_samples"] = 16
    params["tracking"]["system_metrics_interval"] = 0.5


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a command a person would run: no pytest markers, a git identity."""
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    return {**env, **IDENTITY, **extra}


def run(cmd: list[str], cwd: Path, timeout: int = 900, **env: str) -> subprocess.CompletedProcess:
    """Run a command, returning its result with stdout and stderr merged."""
    return subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout, env=child_env(**env), check=False)


def params_error(match: str, call: Callable, *args, **kwargs) -> str:
    """The ParamsError ``call(*args, **kwargs)`` raises: one line holding ``match``."""
    import pytest

    from visionpipe.errors import ParamsError

    with pytest.raises(ParamsError) as caught:
        call(*args, **kwargs)
    text = str(caught.value)
    assert "\n" not in text and match in text, text
    return text


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def mlflow_server(repo: Path, db: Path | None = None,
                  store_args: list[str] | None = None) -> Iterator[str]:
    """A real `mlflow server` on a free loopback port, started in ``repo``, over the repo's
    sqlite database (or the backend-store arguments ``store_args``)."""
    port = free_port()
    db = db or repo / "mlflow.db"
    store_args = store_args or ["--backend-store-uri", f"sqlite:///{db}",
                                "--default-artifact-root", str(repo / "mlartifacts")]
    log_path = repo / f"mlflow-server-{port}.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed below
    # Its own process group: the server starts uvicorn, a job runner and huey consumers,
    # which outlive a terminated parent.
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", *store_args],
        cwd=repo, stdout=log, stderr=subprocess.STDOUT, env=child_env(),
        start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log.flush()
                raise RuntimeError("mlflow server did not start: "
                                   + log_path.read_text()[-2000:])
            time.sleep(0.5)
        yield base
    finally:
        _stop_group(proc)
        log.close()


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, then SIGKILL to whatever is left of it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
        time.sleep(1)  # the group's other processes, after the parent


def rest(base: str, endpoint: str, payload: dict | None = None, **query) -> dict:
    """Call the MLflow REST API: POST with a JSON body, or GET with query parameters."""
    url = f"{base}/api/2.0/mlflow/{endpoint}"
    if payload is None:
        url += "?" + urllib.parse.urlencode(query)
        request = urllib.request.Request(url)
    else:
        request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.loads(resp.read())


def copy_repo(src: Path, dst: Path, edit_params: Callable[[dict], None] | None = None) -> Path:
    """Copy the files git knows of (tracked or not ignored), edit params, commit."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=src, capture_output=True, check=True)
    for name in filter(None, listed.stdout.decode().split("\0")):
        path = src / name
        if path.is_file() and not name.startswith(("data/prepared/", "data/augmented/",
                                                   "models/", "reports/")):
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dst / name)
    (dst / "dvc.lock").unlink(missing_ok=True)
    if edit_params is not None:
        params = yaml.safe_load((dst / "params.yaml").read_text())
        edit_params(params)
        (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "commit.gpgsign=false", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dst, check=True, capture_output=True, env=child_env())
    return dst


# --------------------------------------------------- a tiny MLP project, stages run in-process

TINY_MODEL = "mlp"
# 16x16 shapes, 64 train / 32 val images, an MLP of 16 units: a train.run takes seconds.
TINY_SPLITS = {"train": 64, "val": 32, "test": 8}


def tiny_params(defaults: dict, **train) -> dict:
    """params.yaml for one tiny MLP on 16x16 shapes, tracking off; ``train`` overrides
    models.mlp.train. Deterministic: no dropout, no batch norm, no augmented copies, so the
    same global batches give the same weights on any number of devices."""
    data = json.loads(json.dumps(defaults))
    data["tracking"].update(mlflow=False, codecarbon=False)
    data["prepare"] = {"classification": {**defaults["prepare"]["classification"],
                                          "image_size": [16, 16], "splits": TINY_SPLITS,
                                          "shard_size": 32}}
    data["augment"] = {"classification": {"copies": 0, "preview": 2}}
    mlp = data["models"]["mlp"]
    mlp["architecture"].update(hidden_units=[16], dropout=0.0, batch_norm=False, input_pool=1)
    mlp["train"].update({"epochs": 2, "batch_size": 16, "learning_rate": 0.01, **train})
    data["models"] = {TINY_MODEL: mlp}
    return data


def prepare_project(root: Path, data: dict) -> Layout:
    """Run the real prepare and augment stages into ``root``; write its params.yaml."""
    from visionpipe.config import parse_params
    from visionpipe.layout import Layout
    from visionpipe.stages import augment, prepare

    params = parse_params(data)
    layout = Layout(root)
    prepare.run(params, "classification", layout)
    augment.run(params, "classification", layout)
    (root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return layout


# ------------------------------------------------------------- a local TFDS catalog dataset

TFDS_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"


def tfds_local_copy(data_dir: Path, name: str, splits: dict[str, list[dict]]) -> Path:
    """Write ``splits`` as catalog dataset ``name`` in ``data_dir``, as `tfds build` would."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=str(data_dir))
    out = builder.data_path
    out.mkdir(parents=True)
    features = builder.info.features
    infos = []
    dataset = name.split("/")[0]  # voc/2007: the config is a folder, not part of file names
    for split, examples in splits.items():
        path = out / f"{dataset}-{split}.tfrecord-00000-of-00001"
        with tf.io.TFRecordWriter(str(path)) as writer:
            for ex in examples:
                writer.write(features.serialize_example(ex))
        template = tfds.core.ShardedFileTemplate(data_dir=out, template=TFDS_TEMPLATE,
                                                 dataset_name=dataset, split=split,
                                                 filetype_suffix="tfrecord")
        infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[len(examples)],
                                         num_bytes=os.path.getsize(path),
                                         filename_template=template))
    tfds.folder_dataset.write_metadata(data_dir=out, features=features, split_infos=infos,
                                       filename_template=TFDS_TEMPLATE, check_data=True)
    return data_dir


# ------------------------------------------ a tracking server that never answers, or refuses

class SilentServer:
    """A TCP server on 127.0.0.1 that accepts connections and never answers (or, given
    ``reply``, reads each request whole and sends ``reply``); ``accepted`` counts them."""

    def __init__(self, reply: bytes | None = None) -> None:
        self.reply = reply
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.uri = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = 0
        self._conns = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self._conns.append(conn)
            self.accepted += 1
            if self.reply is not None:
                self._answer(conn)

    def _answer(self, conn) -> None:
        conn.settimeout(10)
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            body += conn.recv(65536)
        conn.sendall(self.reply)
        conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for conn in [*self._conns, self.sock]:
            conn.close()


class HangingProxy:
    """An HTTP proxy on 127.0.0.1 in front of a real server (``target``, a base URL) that
    forwards requests until one whose request line holds ``trigger``; from then on it reads
    each request and never answers. ``hung`` lists the request lines left hanging."""

    def __init__(self, target: str, trigger: str) -> None:
        self.target = int(target.rsplit(":", 1)[1])
        self.trigger = trigger.encode()
        self.hanging = threading.Event()
        self._closed = threading.Event()
        self.hung: list[str] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.uri = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    @staticmethod
    def _message(conn: socket.socket, data: bytes = b"") -> tuple[bytes, bytes] | None:
        """One HTTP message (head, body) read from ``conn`` (Content-Length or chunked)."""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.lower().split(b"\r\n")
        length = next((int(ln.split(b":")[1]) for ln in lines
                       if ln.startswith(b"content-length:")), None)
        chunked = any(ln.startswith(b"transfer-encoding:") and b"chunked" in ln for ln in lines)
        while (length is not None and len(body) < length) or (
                chunked and not body.endswith(b"0\r\n\r\n")):
            chunk = conn.recv(65536)
            if not chunk:
                break
            body += chunk
        return head, body

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            while True:
                request = self._message(conn)
                if request is None:
                    return
                head, body = request
                line = head.split(b"\r\n")[0]
                if self.trigger in line:
                    self.hanging.set()
                if self.hanging.is_set():
                    self.hung.append(line.decode(errors="replace"))
                    self._closed.wait(3600)  # never answers; the client gives up
                    return
                with socket.create_connection(("127.0.0.1", self.target), timeout=60) as up:
                    up.sendall(head + b"\r\n\r\n" + body)
                    answer = self._message(up)
                if answer is None:
                    return
                conn.sendall(answer[0] + b"\r\n\r\n" + answer[1])

    def close(self) -> None:
        self._closed.set()
        self.sock.close()
