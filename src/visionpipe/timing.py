"""Each pipeline stage's own time: `visionpipe <stage>` writes
reports/timings/<stage>@<key>.json when the stage succeeds, and `visionpipe summary` shows them.

Times count from the start of the process (Linux: /proc/self/stat), so Python's own start-up
and the imports of TensorFlow, Keras and the stage's modules show: on a small dataset they are
much of a stage's time. Start-up ends where the stage's ``run()`` begins. Libraries ``run()``
imports only when it needs them (MLflow, codecarbon, tf2onnx) are counted apart, as
``run_import_s`` inside ``run_s``. What the interpreter does after the file is written (its
exit) is not counted. A failed stage writes nothing.
"""

from __future__ import annotations

import builtins
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from visionpipe.atomic import write_json


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# Set by visionpipe.warm in a stage it forked: when the `visionpipe` command started.
STARTED_ENV = "VISIONPIPE_STARTED"
# The timings' folder under the project root (dvc.yaml lists each file as a stage's output).
TIMINGS = Path("reports") / "timings"


def timing_file(root: Path, stage: str) -> Path:
    """Where stage ``stage`` (as DVC names it: ``train@mlp``) records its time."""
    return Path(root) / TIMINGS / f"{stage}.json"


def process_age() -> float | None:
    """Seconds since this process started, or None where the system does not say.

    /proc/self/stat gives the start in clock ticks since boot (10 ms), the same clock as
    CLOCK_BOOTTIME; psutil's create_time() adds the boot time in whole seconds, so it is only
    the fallback."""
    started = os.environ.pop(STARTED_ENV, None)  # a stage forked by visionpipe.warm
    if started is not None:
        try:
            return max(0.0, time.time() - float(started))
        except ValueError:
            pass
    try:
        with open("/proc/self/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError, AttributeError):
        try:
            import psutil

            age = time.time() - psutil.Process().create_time()
        except Exception:  # noqa: BLE001 - no psutil, or it cannot read this system
            return None
    return age if 0.0 <= age < 7 * 24 * 3600 else None


@contextmanager
def counting_imports(seconds: list[float]) -> Iterator[None]:
    """Add to ``seconds[0]`` the time this thread spends importing modules not loaded yet.

    Wraps ``builtins.__import__`` for the duration (the only hook that sees an import end);
    nested imports count once, in the outermost one. Other threads' imports and
    ``importlib.import_module`` calls are not counted."""
    original = builtins.__import__
    thread = threading.get_ident()
    depth = 0

    def timed_import(name, globals=None, locals=None, fromlist=(), level=0):
        nonlocal depth
        if depth or level or name in sys.modules or threading.get_ident() != thread:
            return original(name, globals, locals, fromlist, level)
        depth += 1
        start = time.perf_counter()
        try:
            return original(name, globals, locals, fromlist, level)
        finally:
            depth -= 1
            seconds[0] += time.perf_counter() - start

    builtins.__import__ = timed_import
    try:
        yield
    finally:
        builtins.__import__ = original


def _cpu_seconds() -> float:
    """CPU time of this process (all its threads) and of the children it waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass
class StageClock:
    """Marks of one `visionpipe` process, on ``time.perf_counter``'s clock."""

    origin: float  # the process's start (or, where unknown, the clock's creation)
    python_import_s: float | None  # process start until the CLI's main() began

    @classmethod
    def start(cls) -> StageClock:
        """A clock for this process; create it first thing in ``main()``."""
        now = time.perf_counter()
        age = process_age()
        return cls(origin=now - (age or 0.0), python_import_s=age)

    @contextmanager
    def running(self, root: Path, stage: str) -> Iterator[None]:
        """Time the stage's ``run()`` (the body); on success write ``timing_file(root, stage)``.
        On an exception nothing is written and an earlier file is left as it was."""
        imports = [0.0]
        begin = time.perf_counter()
        with counting_imports(imports):
            yield
        end = time.perf_counter()
        record = {
            "stage": stage,
            "total_s": round(end - self.origin, 3),
            "startup_s": round(begin - self.origin, 3),
            "run_s": round(end - begin, 3),
            "run_import_s": round(imports[0], 3),
            "python_import_s": (None if self.python_import_s is None
                                else round(self.python_import_s, 3)),
            "cpu_s": round(_cpu_seconds(), 3),
            "cpu_count": os.cpu_count(),
            "cpus_usable": cores(),
            "warm_worker": bool(getattr(sys.modules.get("visionpipe.warm"), "IN_WORKER", False)),
            "counted_from": ("process start" if self.python_import_s is not None
                             else "visionpipe's main() (process start unknown)"),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_json(timing_file(root, stage), record)
