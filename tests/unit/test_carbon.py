"""CO2 tracking with the real codecarbon (offline); mocks only where codecarbon must fail."""

from __future__ import annotations

import csv
import json
import time

import numpy as np
import pytest

from visionpipe.errors import DataError
from visionpipe.tracking import carbon
from visionpipe.tracking.carbon import combine, read_report, track_emissions

READABLE_MODES = set(carbon.CPU_POWER_MODES.values())


def busy(seconds: float) -> None:
    a = np.random.default_rng(0).random((256, 256))
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a = a @ a
        a /= a.max()


def test_measures_a_short_block(tmp_path, capsys):
    with track_emissions("train", tmp_path, country_iso_code="FRA") as tracked:
        busy(2.0)
    r = tracked.report
    assert r.status == "measured", r.reason
    assert r.emissions_kg > 0 and r.energy_kwh > 0 and r.cpu_energy_kwh > 0
    assert r.energy_kwh == pytest.approx(
        r.cpu_energy_kwh + r.gpu_energy_kwh + r.ram_energy_kwh, rel=1e-6)
    assert r.duration_s >= 1.5
    assert r.cpu_power_mode in READABLE_MODES
    assert r.country_iso_code == "FRA"
    assert r.codecarbon_version and r.cpu_model
    assert r.reason == ""
    # codecarbon stays silent: the stage's output is its own
    assert capsys.readouterr().err == ""

    saved = json.loads((tmp_path / "train.json").read_text())
    assert saved == r.to_dict()
    assert read_report(tmp_path / "train.json") == saved
    assert r.csv is not None and (tmp_path / "train.csv").is_file()
    with open(tmp_path / "train.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1
    assert float(rows[0]["emissions"]) == pytest.approx(r.emissions_kg, rel=1e-12)
    assert float(rows[0]["energy_consumed"]) == pytest.approx(r.energy_kwh, rel=1e-12)
    # nothing else lands in out_dir (no lock file, no .codecarbon.config, no logs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.csv", "train.json"]


def test_rerun_replaces_the_csv_instead_of_appending(tmp_path):
    for _ in range(2):
        with track_emissions("export", tmp_path, country_iso_code="USA"):
            busy(0.2)
    with open(tmp_path / "export.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 1


def test_block_exception_propagates_and_report_is_written(tmp_path):
    tracked = track_emissions("evaluate", tmp_path, country_iso_code="FRA")
    with pytest.raises(RuntimeError, match="boom"), tracked:
        busy(0.3)
        raise RuntimeError("boom")
    assert tracked.report.status == "measured"
    saved = read_report(tmp_path / "evaluate.json")
    assert saved["stage"] == "evaluate" and saved["status"] == "measured"
    assert saved["duration_s"] > 0


def test_disabled_writes_zero_report(tmp_path, capsys):
    ran = []
    with track_emissions("train", tmp_path, country_iso_code="FRA", enabled=False) as tracked:
        ran.append(True)
    assert ran == [True]
    r = tracked.report
    assert r.status == "disabled" and r.reason
    assert all(getattr(r, k) == 0.0 for k in carbon._ENERGY_KEYS)
    assert r.csv is None
    assert read_report(tmp_path / "train.json")["status"] == "disabled"
    # dvc.yaml caches train.csv, so it exists with one row saying why there are no figures
    with open(tmp_path / "train.csv", newline="") as fh:
        assert list(csv.DictReader(fh)) == [
            {"stage": "train", "status": "disabled", "reason": r.reason}]
    assert capsys.readouterr().err == ""


def _assert_failed(tracked, tmp_path, capsys, stage, *needles):
    r = tracked.report
    assert r.status == "failed"
    assert all(getattr(r, k) == 0.0 for k in carbon._ENERGY_KEYS)
    for needle in needles:
        assert needle in r.reason
    err = capsys.readouterr().err.splitlines()
    assert err == [f"visionpipe: warning: CO2 not measured for {stage}: {r.reason}"]
    assert read_report(tmp_path / f"{stage}.json")["status"] == "failed"
    with open(tmp_path / f"{stage}.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows == [{"stage": stage, "status": "failed", "reason": r.reason}] or (
        rows and "emissions" in rows[0])  # codecarbon may have written its own rows


def test_unknown_country_fails_softly(tmp_path, capsys):
    # codecarbon 3.3.2 does not raise for "XXX": it silently uses the world average
    ran = []
    with track_emissions("train", tmp_path, country_iso_code="XXX") as tracked:
        ran.append(True)
    assert ran == [True]
    _assert_failed(tracked, tmp_path, capsys, "train", "XXX")


def test_tracker_start_raising_fails_softly(tmp_path, capsys, monkeypatch):
    class Broken:
        def __init__(self, **kwargs):
            pass

        def start(self):
            raise RuntimeError("no sensors here")

        def stop(self):
            pass

    monkeypatch.setattr(carbon, "_tracker_class", lambda: Broken)
    ran = []
    with track_emissions("export", tmp_path, country_iso_code="FRA") as tracked:
        ran.append(True)
    assert ran == [True]
    _assert_failed(tracked, tmp_path, capsys, "export", "RuntimeError", "no sensors here")


def test_exception_swallowed_inside_codecarbon_is_reported(tmp_path, capsys, monkeypatch):
    # codecarbon's stop() swallows its own exceptions (@suppress): the totals never appear
    from codecarbon.output_methods.file import FileOutput

    def out(self, total, delta):
        raise OSError("disk full")

    monkeypatch.setattr(FileOutput, "out", out)
    with track_emissions("evaluate", tmp_path, country_iso_code="FRA") as tracked:
        busy(0.1)
    _assert_failed(tracked, tmp_path, capsys, "evaluate", "disk full")


def test_combine_sums_and_joins_modes():
    def rep(stage, status, mode, e, kwh, cpu, gpu, ram, s):
        return {"stage": stage, "status": status, "cpu_power_mode": mode, "emissions_kg": e,
                "energy_kwh": kwh, "cpu_energy_kwh": cpu, "gpu_energy_kwh": gpu,
                "ram_energy_kwh": ram, "duration_s": s}

    a = rep("train", "measured", "tdp_estimate_from_cpu_load", 0.5, 2.0, 1.0, 0.75, 0.25, 10.0)
    b = rep("evaluate", "measured", "rapl_reading", 0.25, 1.0, 0.5, 0.25, 0.25, 5.0)
    c = rep("export", "measured", "tdp_estimate_from_cpu_load", 0.125, 0.5, 0.25, 0.0, 0.25, 2.5)
    assert combine([a, b, c]) == {
        "emissions_kg": 0.875, "energy_kwh": 3.5, "cpu_energy_kwh": 1.75,
        "gpu_energy_kwh": 1.0, "ram_energy_kwh": 0.75, "duration_s": 17.5,
        "stages": ["train", "evaluate", "export"],
        "cpu_power_mode": "rapl_reading+tdp_estimate_from_cpu_load",
        "status": "measured"}

    off = rep("export", "disabled", "", 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    failed = rep("evaluate", "failed", "", 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    partial = combine([a, failed])
    assert partial["status"] == "partial"
    assert partial["cpu_power_mode"] == "tdp_estimate_from_cpu_load"
    assert partial["emissions_kg"] == 0.5 and partial["stages"] == ["train", "evaluate"]
    assert combine([a, off])["status"] == "partial"
    assert combine([off, off])["status"] == "disabled"
    assert combine([off, off])["cpu_power_mode"] == ""


def test_read_report_missing_or_corrupt(tmp_path):
    missing = tmp_path / "nope" / "train.json"
    with pytest.raises(DataError, match=r"nope/train\.json"):
        read_report(missing)
    corrupt = tmp_path / "train.json"
    corrupt.write_text('{"stage": "train", "status": ')
    with pytest.raises(DataError, match=r"train\.json"):
        read_report(corrupt)
    incomplete = tmp_path / "evaluate.json"
    incomplete.write_text('{"stage": "evaluate"}')
    with pytest.raises(DataError, match=r"evaluate\.json.*status"):
        read_report(incomplete)
