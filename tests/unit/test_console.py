"""What a person sees: native log lines filtered out, the summary table, the committed DVC
metrics table narrow enough for a terminal."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import child_env
from visionpipe.console import NOISE, epoch_line, human_bytes
from visionpipe.headline import headline, primary, summary_rows, summary_table
from visionpipe.layout import Layout

REPO = Path(__file__).resolve().parents[2]

# Lines TensorFlow 2.21, absl and the TFLite converter printed on this project's console.
NATIVE = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796211997.056865    5583 cudart_stub.cc:31] Could not find cuda drivers "
    "on your machine, GPU will not be used.",
    "E0000 00:00:1796212165.835289    7402 cuda_platform.cc:52] failed call to cuInit: "
    "INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
    "2026-12-02 11:40:00.123456: I tensorflow/core/util/port.cc:153] oneDNN custom "
    "operations are on.",
    "To enable the following instructions: AVX2 FMA, in other operations, rebuild "
    "TensorFlow with the appropriate compiler flags.",
    "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",
    "fully_quantize: 0, inference_type: 6, input_inference_type: UINT8, "
    "output_inference_type: UINT8",
]
OURS = [
    "visionpipe: error: params.yaml: models.mlp.train.epochs = 0: must be >= 1",
    "train@mlp epoch 3/20: loss 0.41 (12.3 s)",
    "Traceback (most recent call last):",
    "E_FOLDER: a user's own line",
]


@pytest.mark.parametrize("line", NATIVE)
def test_native_log_lines_are_noise(line):
    assert NOISE.match(line)


@pytest.mark.parametrize("line", OURS)
def test_project_lines_and_errors_are_not(line):
    assert not NOISE.match(line)


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, check=False,
                          env={**os.environ, "VISIONPIPE_VERBOSE": "", **env})


def test_filter_drops_native_lines_and_keeps_the_rest():
    lines = "".join(f"{n}\n" for n in NATIVE[:3])
    code = ("import os, sys\nfrom visionpipe.console import quiet_native_logs\n"
            "quiet_native_logs()\n"
            f"os.write(2, {lines!r}.encode())\n"
            "os.write(2, b'native but useful\\n')\n"
            "print('from python', file=sys.stderr)\n")
    result = _python(code)
    assert result.returncode == 0
    assert sorted(result.stderr.splitlines()) == ["from python", "native but useful"]
    verbose = _python(code, VISIONPIPE_VERBOSE="1")
    assert sorted(verbose.stderr.splitlines()) == sorted(
        [*NATIVE[:3], "from python", "native but useful"])


def test_tensorflow_start_up_prints_nothing():
    code = ("from visionpipe.console import quiet_native_logs\nquiet_native_logs()\n"
            "import tensorflow as tf\nprint(int(tf.reduce_sum(tf.ones(3))))\n")
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "3\n" and result.stderr == ""
    loud = _python(code.replace("quiet_native_logs()\n", ""))
    assert loud.stderr  # what the filter keeps away: TensorFlow does print here


def test_epoch_line_and_sizes():
    line = epoch_line("vgg", 3, 20, {"loss": 0.41234, "val_accuracy": 0.9, "learning_rate":
                                     0.001}, 12.34)
    assert line == "train@vgg epoch 3/20: loss 0.4123, val_accuracy 0.9 (12.3 s)"
    assert [human_bytes(n) for n in (512, 102_600, 6_878_478)] == ["512 B", "102.6 kB",
                                                                  "6.9 MB"]


def test_headline_takes_the_task_metrics_and_grams():
    metrics = json.loads((REPO / "reports/metrics/yolo.json").read_text())
    got = headline(metrics)
    assert set(got) == {"map_50", "map_50_95", "params", "latency_ms", "co2_g", "train_s"}
    assert got["map_50"] == round(metrics["test"]["map_50"], 4) and primary("detection") == \
        "map_50"
    assert got["co2_g"] == pytest.approx(metrics["co2"]["emissions_kg"] * 1000, abs=1e-3)
    assert isinstance(got["params"], int)


def test_summary_has_a_row_per_model_from_the_committed_reports():
    names = ["mlp", "vgg", "resnet", "unet", "yolo"]
    rows = summary_rows(Layout(REPO), names)
    table = summary_table(rows).splitlines()
    assert table[0].split() == ["model", "task", "metric", "score", "baseline", "params",
                                "latency_ms", "co2_g", "train_s", "epochs", "export"]
    assert [line.split()[0] for line in table[1:]] == names
    for name, line in zip(names, table[1:], strict=True):
        metrics = json.loads((REPO / f"reports/metrics/{name}.json").read_text())
        export = json.loads((REPO / f"reports/export/{name}.json").read_text())
        cells = line.split()
        score = headline(metrics)[primary(metrics["task"])]
        assert cells[1] == metrics["task"] and cells[3] == f"{score:.3f}"
        co2 = (metrics["co2"]["emissions_kg"] + export["co2"]["emissions_kg"]) * 1000
        assert float(cells[7]) == pytest.approx(co2, abs=2e-3)  # train + evaluate + export
        assert cells[-1] == ("passed" if export["passed"] else "FAILED")
    assert max(len(line) for line in table) < 120


def test_missing_reports_leave_gaps_not_errors(tmp_path):
    rows = summary_rows(Layout(tmp_path), ["mlp"])
    assert rows == [{"model": "mlp", "task": None, "family": None}]
    assert summary_table(rows).splitlines()[1].split() == ["mlp", *["-"] * 10]


def test_dvc_metrics_show_of_the_committed_pipeline_fits_a_terminal():
    """The default pipeline's `dvc metrics show`: one row per model, under 200 columns."""
    result = subprocess.run(["dvc", "metrics", "show"], cwd=REPO, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    models = yaml.safe_load((REPO / "params.yaml").read_text())["models"]
    assert len(models) >= 5
    assert [line.split()[0] for line in lines[1:]] == [
        f"reports/headline/{m}.json" for m in models]
    assert max(len(line) for line in lines) < 200, result.stdout
    assert "/work/" not in result.stdout and "sha256" not in result.stdout


QUIET_AFTER_EXPORT = """
import logging, sys, tempfile
from pathlib import Path
from visionpipe.console import quiet_native_logs
quiet_native_logs(filter_stderr=False)  # our stderr filter lets Python's own lines through
from visionpipe.formats import write_saved_model
from visionpipe.models.registry import create_model, get_family, parse_architecture
from visionpipe.tasks.registry import task_for
family = get_family("mlp")
model = create_model("mlp", (*family.tiny_input, 3), 4,
                     parse_architecture("mlp", family.tiny, "models.mlp.architecture"))
write_saved_model(task_for("mlp", "classification"), model, family.tiny_input,
                  ["a", "b", "c", "d"], "stretch", Path(tempfile.mkdtemp()) / "sm")
logging.getLogger("absl").warning("marker-warning")
logging.getLogger("absl").error("marker-error")
"""


def test_absl_warnings_stay_quiet_after_a_saved_model_is_written():
    """Keras' ExportArchive puts absl's logger back at WARNING after writing, and every later
    SavedModel load of the default YOLO printed "WARNING:absl:Importing a function ..." (24
    lines in its export): the console's quiet loggers drop warnings whatever their level."""
    done = subprocess.run([sys.executable, "-c", QUIET_AFTER_EXPORT], capture_output=True,
                          text=True, timeout=300, env=child_env(), check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "marker-warning" not in done.stdout + done.stderr
    assert "marker-error" in done.stderr  # errors still show
