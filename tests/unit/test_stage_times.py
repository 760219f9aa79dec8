"""Each stage's own time: `visionpipe <stage>` writes reports/timings/<stage>@<key>.json on
success (nothing on failure), and `visionpipe summary` shows a row per task and model."""

from __future__ import annotations

import builtins
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import yaml

from tests.helpers import child_env, tiny_params
from visionpipe import cli
from visionpipe.atomic import write_json
from visionpipe.config import parse_params
from visionpipe.headline import stage_time_rows, stage_time_table
from visionpipe.layout import Layout
from visionpipe.timing import StageClock, counting_imports, process_age, timing_file

FIELDS = {"stage", "total_s", "startup_s", "run_s", "run_import_s", "python_import_s", "cpu_s",
          "cpu_count", "cpus_usable", "warm_worker", "counted_from", "finished"}


def test_a_stage_run_by_the_cli_records_its_time(tmp_path, default_params_dict):
    """The cheapest real stage (prepare on 16x16 shapes), as `dvc repro` runs it."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params(default_params_dict), sort_keys=False))
    result = subprocess.run(
        ["visionpipe", "prepare", "--task", "classification", "--root", str(tmp_path),
         "--params", str(params)], capture_output=True, text=True, timeout=300,
        env=child_env(VISIONPIPE_VERBOSE=""), check=False)
    assert result.returncode == 0, result.stderr
    path = tmp_path / "reports" / "timings" / "prepare@classification.json"
    assert path == timing_file(tmp_path, "prepare@classification")
    record = json.loads(path.read_text())
    assert set(record) == FIELDS
    assert record["stage"] == "prepare@classification"
    assert record["counted_from"] == "process start"
    assert record["warm_worker"] is False  # run by hand, not under DVC: its own process
    for key in ("total_s", "startup_s", "run_s", "python_import_s", "cpu_s"):
        assert record[key] > 0, key
    # Rounded to milliseconds: the parts add up to the whole, within that rounding.
    assert record["total_s"] >= record["startup_s"] + record["run_s"] - 0.002
    assert record["total_s"] == pytest.approx(record["startup_s"] + record["run_s"], abs=0.002)
    assert record["python_import_s"] < record["startup_s"]
    assert 0 <= record["run_import_s"] <= record["run_s"]
    assert record["cpu_count"] == os.cpu_count()
    assert 1 <= record["cpus_usable"] <= record["cpu_count"]
    finished = datetime.fromisoformat(record["finished"])
    assert finished.utcoffset() == timedelta(0)
    # The stage's own outputs are there too, and no other stage recorded anything.
    assert (tmp_path / "reports" / "prepare" / "classification.json").is_file()
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_a_failed_stage_writes_nothing_and_keeps_the_earlier_file(tmp_path):
    earlier = write_json(timing_file(tmp_path, "train@mlp"), {"total_s": 7.0})
    clock = StageClock.start()
    for stage in ("train@mlp", "evaluate@mlp"):
        with pytest.raises(RuntimeError, match="stage failed"), clock.running(tmp_path, stage):
            raise RuntimeError("stage failed")
    assert json.loads(earlier.read_text()) == {"total_s": 7.0}
    assert sorted(p.name for p in earlier.parent.iterdir()) == ["train@mlp.json"]


def test_imports_inside_run_are_counted_and_the_hook_removed(tmp_path):
    original = builtins.__import__
    # A module not loaded yet, whose import does some work: milliseconds, not microseconds.
    (tmp_path / "slow_to_import.py").write_text("TOTAL = sum(i * i for i in range(300_000))\n")
    sys.path.insert(0, str(tmp_path))
    try:
        with StageClock.start().running(tmp_path, "export@mlp"):
            import slow_to_import  # noqa: F401
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("slow_to_import", None)
    record = json.loads(timing_file(tmp_path, "export@mlp").read_text())
    assert 0 < record["run_import_s"] <= record["run_s"]
    assert builtins.__import__ is original
    seconds = [0.0]
    with pytest.raises(ZeroDivisionError), counting_imports(seconds):
        import json as again  # noqa: F401 - loaded already: not counted
        _ = 1 / 0
    assert seconds == [0.0] and builtins.__import__ is original


def test_process_age_is_from_the_process_start():
    age = process_age()
    assert age is not None and age > 0  # this process has been running pytest for a while
    clock = StageClock.start()
    assert clock.python_import_s >= age  # the same start, looked at later
    assert clock.origin <= time.perf_counter() - clock.python_import_s


def _timings(root: Path, seconds: dict[str, tuple[float, float, float]]) -> None:
    for stage, (total, startup, imports) in seconds.items():
        write_json(timing_file(root, stage), {"stage": stage, "total_s": total,
                                              "startup_s": startup, "run_import_s": imports})


def _cells(table: list[str]) -> list[dict[str, str]]:
    """The table's rows as {column: cell}: the first column's name, then for each right-aligned
    column the word that ends where its header ends ("" where none does)."""
    header = table[0]
    names = header.split()
    rows = []
    for line in table[1:]:
        line = line.ljust(len(header))
        row = {names[0]: line.split()[0]}
        for name in names[1:]:
            end = header.index(name) + len(name)
            row[name] = line[:end].split()[-1] if line[end - 1] != " " else ""
        rows.append(row)
    return rows


def test_summary_table_has_a_row_per_task_and_model(tmp_path):
    _timings(tmp_path, {
        "prepare@classification": (12.0, 8.0, 0.0), "augment@classification": (20.0, 9.0, 0.0),
        "prepare@segmentation": (4.5, 3.0, 0.0),
        "train@mlp": (100.0, 10.0, 2.0), "evaluate@mlp": (30.0, 10.0, 1.0),
        "export@mlp": (50.0, 10.0, 3.0),
        "train@unet": (200.0, 11.0, 0.0)})
    # A file no stage wrote counts as missing, not as a number.
    timing_file(tmp_path, "export@unet").write_text('{"total_s": "fast"}')
    rows = stage_time_rows(Layout(tmp_path), ["classification", "segmentation"],
                           ["classification", "segmentation"], ["mlp", "unet"])
    table = stage_time_table(rows).splitlines()
    assert table[0].split() == ["seconds", "prepare", "augment", "train", "evaluate", "export",
                                "total", "start-up"]
    got = {row["seconds"]: row for row in _cells(table[:5])}
    assert list(got) == ["classification", "segmentation", "mlp", "unet"]
    assert got["classification"] == {"seconds": "classification", "prepare": "12",
                                     "augment": "20", "train": "", "evaluate": "",
                                     "export": "", "total": "32", "start-up": "17"}
    assert got["segmentation"] == {"seconds": "segmentation", "prepare": "4.5",
                                   "augment": "-", "train": "", "evaluate": "", "export": "",
                                   "total": "4.5", "start-up": "3.0"}
    assert got["mlp"] == {"seconds": "mlp", "prepare": "", "augment": "", "train": "100",
                          "evaluate": "30", "export": "50", "total": "180", "start-up": "36"}
    assert got["unet"] == {"seconds": "unet", "prepare": "", "augment": "", "train": "200",
                           "evaluate": "-", "export": "-", "total": "200", "start-up": "11"}
    total = 12 + 20 + 4.5 + 100 + 30 + 50 + 200
    startup = 8 + 9 + 3 + 12 + 11 + 13 + 11
    assert table[5] == (f"7 of 10 stages timed: {total:.0f} s, of which {startup} s start-up "
                        "(Python start and library imports)")
    assert table[6] == "not timed yet: augment@segmentation, evaluate@unet, export@unet"
    assert len(table) == 7 and max(len(line) for line in table) <= 100


def test_every_stage_timed_and_none_timed(tmp_path):
    _timings(tmp_path, {"prepare@detection": (10.0, 5.0, 0.0),
                        "augment@detection": (10.0, 5.0, 0.0)})
    table = stage_time_table(stage_time_rows(Layout(tmp_path), ["detection"], ["detection"],
                                             []))
    assert table.splitlines()[-1] == ("all 2 stages: 20 s, of which 10 s start-up (Python "
                                      "start and library imports)")
    empty = stage_time_table(stage_time_rows(Layout(tmp_path / "none"), ["detection"],
                                             ["detection"], ["yolo"])).splitlines()
    assert [line.split() for line in empty[1:3]] == [["detection", "-", "-", "-", "-"],
                                                     ["yolo", "-", "-", "-", "-", "-"]]
    assert empty[-1] == ("no stage timed yet (reports/timings/): `dvc repro` records each "
                         "stage's time")


def test_visionpipe_summary_shows_stage_times_after_the_models(tmp_path, default_params_dict,
                                                               capsys):
    params = parse_params(tiny_params(default_params_dict))
    _timings(tmp_path, {"prepare@classification": (14.0, 9.0, 0.0),
                        "train@mlp": (40.0, 12.0, 2.0)})
    cli.summary(params, Layout(tmp_path))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["model", "task"] and lines[1].split()[0] == "mlp"
    start = lines.index("") + 1
    assert lines[start].split()[0] == "seconds"
    assert [line.split() for line in lines[start + 1:start + 3]] == [
        ["classification", "14", "-", "14", "9.0"], ["mlp", "40", "-", "-", "40", "14"]]
    assert lines[start + 3] == ("2 of 5 stages timed: 54 s, of which 23 s start-up (Python "
                                "start and library imports)")
    assert lines[-1].startswith("details: ")
