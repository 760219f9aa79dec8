"""Training checkpoints that survive a kill: ``models/<model>/checkpoints/``.

The folder is a persisted DVC output (``persist: true`` in dvc.yaml), so ``dvc repro`` does not
delete it before rerunning train; a run killed halfway resumes from its last complete epoch.

Layout, all written through a temporary name and renamed (atomic.py)::

    epoch-0003.keras   the model after epoch 3, optimizer state included ("last")
    epoch-0002.keras   the best epoch so far by the monitor, when it is not the last one
    state.json         written after the model file: which files are last and best, the
                       history of every completed epoch, early stopping's counters, whether
                       training finished, and a fingerprint of what it was trained on

``state.json`` only ever names files that are complete, because it is renamed into place after
them; files it does not name (from a kill in between) are removed by the next save. A run
resumes only when the fingerprint (seed, the model's family, task, architecture and train
params, and the checksums of the train and val data) is the same and training had not
finished; otherwise it starts at epoch 1 and says why.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import keras

from visionpipe.atomic import atomic_path, write_json

STATE_FILE = "state.json"
FORMAT = 1


def fingerprint(**parts) -> str:
    """sha256 over the JSON of everything a training run's result depends on."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


@dataclass
class State:
    """What ``state.json`` holds."""

    fingerprint: str
    monitor: str
    epochs_done: int = 0
    last: str | None = None          # file of the last complete epoch
    best: str | None = None          # file of the best epoch by `monitor`
    best_epoch: int | None = None    # 1-based
    best_value: float | None = None
    early_stopping: dict | None = None   # Keras EarlyStopping's wait/best/best_epoch
    history: dict[str, list[float]] = field(default_factory=dict)  # key -> one value per epoch
    finished: bool = False
    format: int = FORMAT


class Checkpoints:
    """The checkpoint folder of one model."""

    def __init__(self, folder: Path, fingerprint: str, monitor: str):
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.monitor = monitor

    @property
    def state_file(self) -> Path:
        return self.folder / STATE_FILE

    def read_state(self) -> State | None:
        """The saved state, or None when there is none or it cannot be read."""
        try:
            raw = json.loads(self.state_file.read_text(encoding="utf-8"))
            state = State(**raw)
        except (OSError, ValueError, TypeError):
            return None
        return state if state.format == FORMAT else None

    def resumable(self) -> tuple[State | None, str]:
        """The state to resume from (None: start at epoch 1) and a line saying which and why."""
        state = self.read_state()
        if state is None:
            if self.state_file.exists():
                return None, f"{self.state_file} cannot be read; training starts at epoch 1"
            return None, "no checkpoint; training starts at epoch 1"
        if state.fingerprint != self.fingerprint or state.monitor != self.monitor:
            return None, (f"the checkpoints in {self.folder} were made with other params or "
                          "data; training starts at epoch 1")
        if state.finished:
            return None, (f"the checkpoints in {self.folder} are from a finished run; "
                          "training again from epoch 1")
        if not state.last or not (self.folder / state.last).is_file():
            return None, (f"{self.state_file} names no complete epoch; "
                          "training starts at epoch 1")
        return state, (f"resuming from {self.folder / state.last}: {state.epochs_done} "
                       "epoch(s) already done")

    def reset(self) -> State:
        """Remove every checkpoint; a fresh state."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for path in self.folder.iterdir():
            if path.is_file():
                path.unlink()
        return State(fingerprint=self.fingerprint, monitor=self.monitor)

    def save(self, state: State, model: keras.Model, epoch: int, logs: dict,
             improved: bool) -> None:
        """Record epoch ``epoch`` (1-based): model file, then state, then drop stale files."""
        name = f"epoch-{epoch:04d}.keras"
        with atomic_path(self.folder / name) as tmp:
            model.save(tmp)
        state.epochs_done, state.last = epoch, name
        if improved:
            state.best, state.best_epoch = name, epoch
            state.best_value = float(logs[self.monitor])
        self.write(state)

    def write(self, state: State) -> None:
        write_json(self.state_file, asdict(state))
        self._prune(state)

    def _prune(self, state: State) -> None:
        keep = {STATE_FILE, state.last, state.best}
        for path in self.folder.iterdir():
            if path.is_file() and path.name not in keep:
                path.unlink()


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves every completed epoch (see the module docstring) and keeps the history.

    Put it after the callbacks that write into ``logs`` (the learning rate) and after
    EarlyStopping, whose counters it records.
    """

    def __init__(self, checkpoints: Checkpoints, state: State, mode: str,
                 early_stopping: keras.callbacks.EarlyStopping | None = None):
        super().__init__()
        self.checkpoints, self.state = checkpoints, state
        self.higher_is_better = mode == "max"
        self.early_stopping = early_stopping

    def _improved(self, value: float) -> bool:
        best = self.state.best_value
        if best is None:
            return True
        return value > best if self.higher_is_better else value < best

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(v) for k, v in (logs or {}).items()}
        for key, value in logs.items():
            self.state.history.setdefault(key, []).append(value)
        if self.early_stopping is not None:
            es = self.early_stopping
            self.state.early_stopping = {
                "wait": int(es.wait), "best_epoch": int(es.best_epoch),
                "best": None if es.best is None else float(es.best)}
        self.checkpoints.save(self.state, self.model, epoch + 1, logs,
                              self._improved(logs[self.checkpoints.monitor]))


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping that starts from the counters a checkpoint recorded."""

    def __init__(self, *args, restored: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.restored = restored

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.restored:
            self.wait = self.restored["wait"]
            self.best = self.restored["best"]
            self.best_epoch = self.restored["best_epoch"]


def restore_weights(model: keras.Model, path: Path) -> None:
    """Load weights and optimizer state (its step count too) from a checkpoint into a
    compiled ``model`` of the same architecture."""
    model.optimizer.build(model.trainable_variables)
    model.load_weights(path)
