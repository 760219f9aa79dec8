"""CO2 estimates of a pipeline stage with codecarbon's ``OfflineEmissionsTracker``.

``track_emissions`` wraps one stage (train, evaluate or export of one model)::

    with track_emissions("train", out_dir, country_iso_code="FRA") as carbon:
        fit(...)
    carbon.report  # CarbonReport; also written to out_dir/train.json (+ codecarbon's train.csv)

It never fails the stage: when codecarbon cannot measure, one warning line goes to stderr and the
report says ``status: "failed"`` with a reason. Everything codecarbon writes lands in ``out_dir``;
it makes no network call (offline tracker, CSV output only, every setting that could come from a
``.codecarbon.config`` or ``CODECARBON_*`` variable and reach the network, a lock file or another
directory is passed explicitly).

``cpu_power_mode`` says how the CPU figure was obtained, so nobody mistakes an estimate for a
reading: without RAPL (VMs, containers) codecarbon estimates CPU power from CPU load and a TDP.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from visionpipe.atomic import temporary_name, write_json, write_text
from visionpipe.errors import DataError

MEASURED, DISABLED, FAILED, PARTIAL = "measured", "disabled", "failed", "partial"
UNKNOWN = "unknown"

# codecarbon's CPU._mode (codecarbon.external.hardware) -> what the figure is.
CPU_POWER_MODES = {
    "intel_rapl": "rapl_reading",
    "intel_power_gadget": "power_gadget_reading",
    "windows_emi": "windows_emi_reading",
    "apple_powermetrics": "powermetrics_reading",
    "cpu_load": "tdp_estimate_from_cpu_load",  # codecarbon.external.hardware.MODE_CPU_LOAD
    "constant": "constant_estimate",
}
READINGS = frozenset({"rapl_reading", "power_gadget_reading", "windows_emi_reading",
                      "powermetrics_reading"})

_ENERGY_KEYS = ("emissions_kg", "energy_kwh", "cpu_energy_kwh", "gpu_energy_kwh",
                "ram_energy_kwh", "duration_s")
_LOGGER = "codecarbon"


@dataclass(frozen=True)
class CarbonReport:
    stage: str
    status: str                 # "measured" | "disabled" | "failed"
    emissions_kg: float         # kg CO2eq
    energy_kwh: float           # total = cpu + gpu + ram
    cpu_energy_kwh: float
    gpu_energy_kwh: float
    ram_energy_kwh: float
    duration_s: float
    cpu_power_mode: str         # see CPU_POWER_MODES; "unknown" if codecarbon hid it
    cpu_model: str
    gpu_model: str              # "" when none
    country_iso_code: str
    codecarbon_version: str
    csv: str | None             # codecarbon's emissions CSV, None when it wrote none
    reason: str = ""            # why, when status is "failed" or "disabled"
    cpu_tdp_w: float | None = None  # TDP a load/constant CPU estimate is based on
    gpu_power_mode: str = ""    # "energy_counter_reading" | "power_sampling_estimate" | ""
    ram_power_mode: str = ""    # "estimate_from_ram_size" | "user_constant"

    def to_dict(self) -> dict:
        return asdict(self)


def _codecarbon_version() -> str:
    try:
        from importlib.metadata import version

        return version("codecarbon")
    except Exception:  # noqa: BLE001 - not installed or broken metadata
        return ""


def _tracker_class():
    """codecarbon's offline tracker, imported late (the CLI must not pay for it)."""
    from codecarbon import OfflineEmissionsTracker

    return OfflineEmissionsTracker


def _known_countries() -> set[str] | None:
    """ISO codes codecarbon has an energy mix for; None if that cannot be read."""
    try:
        from codecarbon.input import DataSource

        return set(DataSource().get_global_energy_mix_data())
    except Exception:  # noqa: BLE001 - private layout changed: let codecarbon decide
        return None


class _Capture(logging.Filter):
    """Swallow every record of the codecarbon logger, keeping warnings and errors for reasons.

    A logger filter (not a handler) so it survives codecarbon replacing its handlers in
    ``__init__`` and also silences what it logs before applying ``log_level``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            self.records.append(record)
        return False

    def reason(self) -> str:
        """The first exception codecarbon swallowed, else its last error message."""
        for rec in list(self.records):
            if rec.exc_info and rec.exc_info[1] is not None:
                exc = rec.exc_info[1]
                return f"{type(exc).__name__}: {exc}"
        errors = [r for r in list(self.records) if r.levelno >= logging.ERROR]
        if errors:
            return errors[-1].getMessage()
        return ""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _cpu_info(tracker) -> tuple[str, float | None]:
    """(cpu_power_mode, TDP in W or None) from the tracker's CPU object."""
    try:
        from codecarbon.external.hardware import CPU

        cpus = [h for h in getattr(tracker, "_hardware", []) if isinstance(h, CPU)]
    except Exception:  # noqa: BLE001
        return UNKNOWN, None
    if not cpus:  # e.g. Raspberry Pi PMIC or Apple chip objects: not the CPU class
        return UNKNOWN, None
    modes = []
    tdp = None
    for cpu in cpus:
        raw = getattr(cpu, "_mode", None)
        mode = CPU_POWER_MODES.get(raw, str(raw) if raw else UNKNOWN)
        modes.append(mode)
        if mode not in READINGS:
            value = getattr(cpu, "_tdp", None)
            tdp = float(value) if isinstance(value, (int, float)) else None
    return "+".join(dict.fromkeys(modes)), tdp


def _gpu_mode(tracker) -> str:
    try:
        from codecarbon.external.hardware import GPU

        gpus = [h for h in getattr(tracker, "_hardware", []) if isinstance(h, GPU)]
        if not gpus:
            return ""
        devices = [d for g in gpus for d in getattr(g.devices, "devices", [])]
        if not devices:
            return ""
        fallback = [getattr(d, "_use_power_fallback", None) for d in devices]
        if any(f is None for f in fallback):
            return UNKNOWN
        return "power_sampling_estimate" if any(fallback) else "energy_counter_reading"
    except Exception:  # noqa: BLE001
        return UNKNOWN


def _ram_mode(tracker) -> str:
    try:
        from codecarbon.external.ram import RAM

        rams = [h for h in getattr(tracker, "_hardware", []) if isinstance(h, RAM)]
        if not rams:
            return UNKNOWN
        forced = getattr(rams[0], "_force_ram_power", None)
        return "user_constant" if forced is not None else "estimate_from_ram_size"
    except Exception:  # noqa: BLE001
        return UNKNOWN


class track_emissions:
    """Measure the CO2 of the ``with`` block; ``.report`` holds the CarbonReport afterwards.

    Writes ``out_dir/<stage>.json`` in every case (measured, disabled, failed, block raised)
    and, when measured, codecarbon's ``out_dir/<stage>.csv``. An exception of the block is
    re-raised after the report is written.
    """

    def __init__(self, stage: str, out_dir: Path, *, country_iso_code: str, enabled: bool = True,
                 project_name: str = "visionpipe", measure_power_secs: float = 15.0):
        self.stage = stage
        self.out_dir = Path(out_dir)
        self.country_iso_code = str(country_iso_code).strip().upper()
        self.enabled = enabled
        self.project_name = project_name
        self.measure_power_secs = float(measure_power_secs)
        self.report: CarbonReport | None = None
        self._tracker = None
        self._capture: _Capture | None = None
        self._failure: str | None = None

    @property
    def json_path(self) -> Path:
        return self.out_dir / f"{self.stage}.json"

    @property
    def csv_path(self) -> Path:
        return self.out_dir / f"{self.stage}.csv"

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> track_emissions:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # codecarbon appends to an existing CSV: start clean so it holds this run only. It
        # writes under a temporary name, renamed when it has finished (atomic.py).
        self.csv_path.unlink(missing_ok=True)
        temporary_name(self.csv_path).unlink(missing_ok=True)
        if self.enabled:
            self._start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.enabled:
            self.report = self._empty(DISABLED, "CO2 tracking disabled")
        elif self._failure is not None:
            self._cleanup()
            self.report = self._empty(FAILED, self._failure)
        else:
            self.report = self._stop()
        write_json(self.json_path, self.report.to_dict())
        temporary_name(self.csv_path).unlink(missing_ok=True)  # a failed run's partial rows
        if not self.csv_path.is_file():
            # dvc.yaml caches <stage>.csv: without codecarbon's rows, one saying why not.
            write_text(self.csv_path, "stage,status,reason\n" + ",".join(
                _csv_cell(v) for v in (self.stage, self.report.status, self.report.reason))
                + "\n")
        return False  # never swallow the block's exception

    # -- codecarbon ------------------------------------------------------------------------
    def _fail(self, reason: str) -> None:
        self._failure = _one_line(reason) or "codecarbon gave no reason"
        print(f"visionpipe: warning: CO2 not measured for {self.stage}: {self._failure}",
              file=sys.stderr, flush=True)

    def _attach(self) -> None:
        self._capture = _Capture()
        logging.getLogger(_LOGGER).addFilter(self._capture)

    def _detach(self) -> None:
        if self._capture is not None:
            logging.getLogger(_LOGGER).removeFilter(self._capture)

    def _start(self) -> None:
        known = _known_countries()
        if known is not None and self.country_iso_code not in known:
            self._fail(f"unknown country_iso_code '{self.country_iso_code}' (codecarbon would "
                       "silently use the world average); use a 3-letter ISO 3166-1 code such "
                       "as FRA or USA")
            return
        self._attach()
        try:
            from codecarbon.output_methods.base_output import OutputMethod

            self._tracker = _tracker_class()(
                country_iso_code=self.country_iso_code,
                project_name=self.project_name,
                experiment_name=self.stage,
                measure_power_secs=self.measure_power_secs,
                output_dir=str(self.out_dir),
                output_file=temporary_name(self.csv_path).name,
                output_methods=[OutputMethod.CSV],  # save_to_file=True, minus its deprecation
                on_csv_write="append",
                emissions_endpoint=False,            # no HTTP output even if configured
                electricitymaps_api_token="",         # grid intensity from bundled data only
                region=None, cloud_provider=None, cloud_region=None,
                allow_multiple_runs=True,  # no lock file in /tmp, no SIGINT/SIGTERM handlers
                tracking_mode="machine",
                force_cpu_power=None, force_ram_power=None, pue=1.0, wue=0.0,
                force_carbon_intensity_g_co2e_kwh=None,
                log_level="warning",                 # kept by _Capture, never printed
            )
            self._tracker.start()
        except Exception as exc:  # noqa: BLE001 - codecarbon must not fail the stage
            self._fail(f"{type(exc).__name__}: {exc}")
            return
        # codecarbon's start() swallows its exceptions; it then leaves _start_time unset
        if getattr(self._tracker, "_start_time", 0.0) is None:
            self._fail(self._capture.reason() or "codecarbon's tracker did not start")

    def _cleanup(self) -> None:
        """After a failure: stop whatever codecarbon may have started, silently."""
        try:
            if self._tracker is not None:
                with contextlib.suppress(Exception):
                    self._tracker.stop()
        finally:
            self._detach()

    def _stop(self) -> CarbonReport:
        try:
            self._tracker.stop()
            if temporary_name(self.csv_path).is_file():
                os.replace(temporary_name(self.csv_path), self.csv_path)
            data = getattr(self._tracker, "final_emissions_data", None)
            if data is None:  # stop() swallowed an exception before computing totals
                self._fail(self._capture.reason() or "codecarbon produced no emissions data")
                return self._empty(FAILED, self._failure)
            cpu_mode, tdp = _cpu_info(self._tracker)
            values = {
                "emissions_kg": float(data.emissions),          # kg CO2eq
                "energy_kwh": float(data.energy_consumed),      # kWh, cpu + gpu + ram
                "cpu_energy_kwh": float(data.cpu_energy),       # kWh
                "gpu_energy_kwh": float(data.gpu_energy),       # kWh
                "ram_energy_kwh": float(data.ram_energy),       # kWh
                "duration_s": float(data.duration),             # s, start() to stop()
            }
            bad = [k for k, v in values.items() if not math.isfinite(v) or v < 0]
            if bad:
                self._fail(f"codecarbon returned invalid {', '.join(bad)}")
                return self._empty(FAILED, self._failure)
            return CarbonReport(
                stage=self.stage, status=MEASURED, **values,
                cpu_power_mode=cpu_mode,
                cpu_model=str(getattr(data, "cpu_model", "") or ""),
                gpu_model=str(getattr(data, "gpu_model", "") or ""),
                country_iso_code=str(getattr(data, "country_iso_code", "")
                                     or self.country_iso_code),
                codecarbon_version=str(getattr(data, "codecarbon_version", "")
                                       or _codecarbon_version()),
                # The name only: the CSV sits beside this report, and committed reports
                # hold no absolute paths of the machine that made them.
                csv=self.csv_path.name if self.csv_path.is_file() else None,
                cpu_tdp_w=tdp,
                gpu_power_mode=_gpu_mode(self._tracker),
                ram_power_mode=_ram_mode(self._tracker),
            )
        except Exception as exc:  # noqa: BLE001 - codecarbon must not fail the stage
            self._fail(f"{type(exc).__name__}: {exc}")
            return self._empty(FAILED, self._failure)
        finally:
            self._detach()

    def _empty(self, status: str, reason: str) -> CarbonReport:
        return CarbonReport(
            stage=self.stage, status=status, **{k: 0.0 for k in _ENERGY_KEYS},
            cpu_power_mode="", cpu_model="", gpu_model="",
            country_iso_code=self.country_iso_code, codecarbon_version=_codecarbon_version(),
            csv=None, reason=reason)


def _csv_cell(value: Any) -> str:
    text = str(value or "")
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


# -- reading and summing reports ----------------------------------------------------------------
def read_report(path: Path) -> dict:
    """The JSON written by ``track_emissions``, checked for the keys ``combine`` needs."""
    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: CO2 report not found; rerun the stage that writes it "
                        "(`dvc repro`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable JSON CO2 report ({exc}); delete it and rerun "
                        "the stage that writes it") from None
    if not isinstance(report, dict):
        raise DataError(f"{path}: CO2 report is not a JSON object; delete it and rerun the "
                        "stage that writes it")
    missing = [k for k in ("stage", "status", *_ENERGY_KEYS) if k not in report]
    if missing:
        raise DataError(f"{path}: CO2 report lacks {', '.join(missing)}; rerun the stage that "
                        "writes it")
    return report


def combine(reports: list[dict]) -> dict:
    """Totals over stages. ``status`` is "measured" when all are, "disabled" when none was
    attempted, else "partial"; ``cpu_power_mode`` joins the distinct modes of measured stages."""
    totals: dict[str, Any] = {k: float(sum(float(r.get(k, 0.0)) for r in reports))
                              for k in _ENERGY_KEYS}
    statuses = [r.get("status") for r in reports]
    modes = sorted({r.get("cpu_power_mode") for r in reports
                    if r.get("status") == MEASURED and r.get("cpu_power_mode")})
    if reports and all(s == MEASURED for s in statuses):
        status = MEASURED
    elif all(s == DISABLED for s in statuses):
        status = DISABLED
    else:
        status = PARTIAL
    return {**totals, "stages": [r.get("stage") for r in reports],
            "cpu_power_mode": "+".join(modes), "status": status}
