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

A file damaged afterwards (cut short, changed, not a .keras file, or another model's) is found
when its weights are loaded: a damaged last epoch falls back to the best one when that is an
earlier epoch, with the history cut back to it; with no earlier epoch kept, training starts
over. A damaged best epoch beside a good last one makes the last the best so far. A
``state.json`` that is not what ``save`` writes is discarded like a missing one.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import keras

from visionpipe.atomic import atomic_path, write_json

STATE_FILE = "state.json"
FORMAT = 1
EPOCH_FILE = re.compile(r"epoch-(\d{4,})\.keras")


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

    def rolled_back(self, epoch: int) -> State:
        """This state as it stood after ``epoch``, its best one (1-based); early stopping's
        counters unknown (``replay_early_stopping`` recomputes them)."""
        return replace(self, epochs_done=epoch, last=self.best,
                       history={k: v[:epoch] for k, v in self.history.items()},
                       early_stopping=None)


def _is_int(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def state_problem(raw) -> str | None:
    """What makes ``raw`` (state.json's JSON) other than what ``Checkpoints.write`` writes;
    None when it is such a state. Files must be this folder's epoch files, numbered as
    the epochs they are said to hold, and the history one value per completed epoch."""
    names = {f.name for f in fields(State)}
    if not isinstance(raw, dict):
        return f"holds a JSON {type(raw).__name__}, not an object"
    unknown = sorted(set(raw) - names)[:5]
    if unknown:
        return f"unknown keys {', '.join(map(repr, unknown))}"
    if not {"fingerprint", "monitor"} <= set(raw):
        return "no fingerprint or monitor"
    state = State(**raw)
    done = state.epochs_done
    if not (isinstance(state.fingerprint, str) and isinstance(state.monitor, str)
            and _is_int(done) and isinstance(state.finished, bool) and _is_int(state.format)):
        return "fingerprint, monitor, epochs_done, finished or format has the wrong type"
    for key, epoch in (("last", done), ("best", state.best_epoch)):
        name = getattr(state, key)
        if name is None:
            continue
        match = EPOCH_FILE.fullmatch(name) if isinstance(name, str) else None
        if match is None or not _is_int(epoch, 1) or int(match[1]) != epoch or epoch > done:
            return f"{key} = {repr(name)[:80]} is not the file of epoch {epoch}"
    if done and state.last is None:
        return f"epochs_done = {done} but no last file"
    if state.best is not None and not _is_number(state.best_value):
        return "best_value is not a number"
    history = state.history
    if not (isinstance(history, dict) and all(
            isinstance(v, list) and len(v) == done and all(map(_is_number, v))
            for v in history.values())):
        return f"history is not one number per completed epoch ({done}) for each key"
    if done and state.monitor not in history:
        return f"history has no {state.monitor}"
    es = state.early_stopping
    if es is not None and not (isinstance(es, dict) and set(es) == {"wait", "best", "best_epoch"}
                               and _is_int(es["wait"]) and _is_int(es["best_epoch"])
                               and (es["best"] is None or _is_number(es["best"]))):
        return "early_stopping is not its wait, best and best_epoch"
    return None


def checkpoint_problem(exc: Exception) -> str:
    """Why a checkpoint's weights did not load, in a few words."""
    text = " ".join(str(exc).split())
    if isinstance(exc, FileNotFoundError):
        return "missing"
    if isinstance(exc, zipfile.BadZipFile):
        if "CRC" in text:
            return f"changed bytes: {text}"
        return f"not a whole .keras file: {text}"
    if isinstance(exc, _OptimizerMismatch):
        return f"its optimizer state does not fit this model's ({text[:160]})"
    if "could not be loaded" in text:  # Keras: "A total of 3 objects could not be loaded. ..."
        return f"another model's: its weights do not fit this one ({text.split('. ')[0]})"
    return f"{type(exc).__name__}: {text[:160]}"


class _OptimizerMismatch(ValueError):
    """Keras loaded a checkpoint's weights but skipped its optimizer state (it only warns)."""


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
        return self._read()[0]

    def _read(self) -> tuple[State | None, str | None]:
        """The saved state, or None and why not (None when there is no file)."""
        try:
            raw = json.loads(self.state_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None, None
        except OSError as exc:
            return None, exc.strerror or str(exc)
        except UnicodeDecodeError:
            return None, "not UTF-8 text"
        except json.JSONDecodeError as exc:
            return None, f"not valid JSON: {exc}"
        problem = state_problem(raw)
        if problem is not None:
            return None, f"not what train writes: {problem}"
        state = State(**raw)
        if state.format != FORMAT:
            return None, f"format {state.format}, this visionpipe writes {FORMAT}"
        return state, None

    def resumable(self) -> tuple[State | None, str]:
        """The state to resume from (None: start at epoch 1) and a line saying which and why.
        Its files are checked when ``restore`` loads them."""
        state, problem = self._read()
        if state is None:
            if problem is not None or self.state_file.exists():
                return None, (f"{self.state_file} cannot be read ({problem}); training "
                              "starts at epoch 1")
            return None, "no checkpoint; training starts at epoch 1"
        if state.fingerprint != self.fingerprint or state.monitor != self.monitor:
            return None, (f"the checkpoints in {self.folder} were made with other params or "
                          "data; training starts at epoch 1")
        if state.finished:
            return None, (f"the checkpoints in {self.folder} are from a finished run; "
                          "training again from epoch 1")
        if not any(name and (self.folder / name).is_file() for name in (state.last, state.best)):
            return None, (f"{self.state_file} names no complete epoch; "
                          "training starts at epoch 1")
        return state, self._resuming(state)

    def _resuming(self, state: State) -> str:
        return (f"resuming from {self.folder / state.last}: {state.epochs_done} "
                "epoch(s) already done")

    def load(self, model: keras.Model, name: str) -> str | None:
        """Load checkpoint ``name`` into ``model`` (see ``restore_weights``); None when it
        loaded, else why not. A failed load may have set some of the model's variables."""
        path = self.folder / name
        if not path.is_file():
            return "missing"
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                restore_weights(model, path)
            skipped = [str(w.message) for w in caught
                       if "Skipping variable loading for optimizer" in str(w.message)]
            if skipped:
                raise _OptimizerMismatch(skipped[0].split(", because ")[-1].rstrip(". "))
        except Exception as exc:  # noqa: BLE001 - zip, h5py and Keras each raise their own
            return checkpoint_problem(exc)
        return None

    def restore(self, state: State, model: keras.Model, build: Callable[[int], keras.Model]
                ) -> tuple[keras.Model, State | None, str]:
        """Load ``state``'s last epoch into ``model``; returns the model to train on, the
        state to resume from (None: start at epoch 1) and a line saying which and why.

        The best epoch, when it is another file, is loaded first to check it. A damaged last
        epoch falls back to an earlier best one (``build(epochs_done)`` makes a fresh compiled
        model set up as training was after that many epochs, for it and for a start at epoch 1:
        a failed load leaves weights half set)."""
        last, best = state.last, state.best
        best_problem = self.load(model, best) if best and best != last else None
        last_problem = self.load(model, last) if last else "missing"
        if last_problem is None:
            if best_problem is None:
                return model, state, self._resuming(state)
            values = state.history[self.monitor]
            line = (f"{self.folder / best} (the best epoch, {state.best_epoch}) is damaged "
                    f"({best_problem}); resuming from {last}: {state.epochs_done} epoch(s) "
                    "already done, the best of them now this last one")
            state.best, state.best_epoch = last, state.epochs_done
            state.best_value = float(values[-1])
            return model, state, line
        damaged = (f"{self.folder / last} is missing" if last_problem == "missing"
                   else f"{self.folder / last} is damaged ({last_problem})")
        if best and best != last and best_problem is None:
            model = build(state.best_epoch)
            if self.load(model, best) is None:
                k = state.best_epoch
                again = f"epoch {k + 1}" if k + 1 == state.epochs_done else (
                    f"epochs {k + 1}-{state.epochs_done}")
                return model, state.rolled_back(k), (
                    f"{damaged}; resuming from {best}, the best epoch ({k}): {again} "
                    "trained again")
        elif best and best != last:
            damaged += f", and {best} too ({best_problem})"
        return build(0), None, (f"{damaged}; no earlier epoch is kept (only the last and the "
                               "best are), so training starts over at epoch 1")

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


def replay_early_stopping(stopper: keras.callbacks.EarlyStopping, model: keras.Model,
                          values: list[float]) -> dict:
    """Early stopping's counters after the epochs whose monitored values are ``values``:
    what ``EpochCheckpoint`` would have recorded then (for a state rolled back)."""
    stopper.set_model(model)  # stopping sets model.stop_training, which fit resets
    stopper.on_train_begin()
    for epoch, value in enumerate(values):
        stopper.on_epoch_end(epoch, {stopper.monitor: value})
    return {"wait": int(stopper.wait), "best_epoch": int(stopper.best_epoch),
            "best": None if stopper.best is None else float(stopper.best)}


def restore_weights(model: keras.Model, path: Path) -> None:
    """Load weights and optimizer state (its step count too) from a checkpoint into a
    compiled ``model`` of the same architecture."""
    model.optimizer.build(model.trainable_variables)
    model.load_weights(path)
