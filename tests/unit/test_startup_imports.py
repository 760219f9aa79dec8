"""Process start-up: a stage imports the slow optional libraries only where it uses them.

`dvc repro` starts a new Python process for every stage, and each pays for what it imports.
TensorFlow is paid by every model stage (``import tensorflow`` imports all of Keras, with
keras.applications, matplotlib, scikit-learn and pandas; nothing here can avoid that). What
the package keeps out of a process until it is used: keras-cv (and tensorflow_datasets,
which keras-cv imports) until a YOLO model is built or loaded; tf2onnx, onnx and onnxruntime
until export writes or runs an ONNX file; MLflow and codecarbon until a stage tracks.

Checked in fresh interpreters (this test process may have imported everything already): the
CLI alone imports no TensorFlow, and importing the model stages, loading every model family
(as the CLI's params check does) and building, saving and loading an MLP imports none of the
optional libraries, while building a YOLO model imports keras-cv (which also shows that the
check sees an import when there is one).
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import child_env

# Imported only where used. Measured on top of TensorFlow on the 2-core dev machine: keras-cv
# (with tensorflow_datasets) about 0.7 s of CPU, MLflow with its SQL store about 3 s.
LAZY = ("keras_cv", "tensorflow_datasets", "tf2onnx", "onnx", "onnxruntime", "mlflow",
        "codecarbon")

PROBE = f"""
import json, sys
from pathlib import Path

LAZY = {LAZY!r}


def report(step, **extra):
    loaded = sorted(m for m in LAZY if m in sys.modules)
    print("RESULT " + json.dumps({{"step": step, "loaded": loaded, **extra}}), flush=True)
"""

# What the model stages and the families import; then an MLP built, saved and loaded (no
# optional library), then a YOLO built (keras-cv).
STAGES = PROBE + """
import numpy as np

import visionpipe.cli
import visionpipe.stages.evaluate
import visionpipe.stages.export
import visionpipe.stages.train
from visionpipe.models.registry import create_model, get_family, known_families
from visionpipe.models.saving import load_model

report("stages", families=known_families())
family = get_family("mlp")
model = create_model("mlp", (*family.tiny_input, 3), 3, family.tiny)
model.save(sys.argv[1])
loaded = load_model(Path(sys.argv[1]))
x = np.random.default_rng(0).uniform(0, 255, (2, *family.tiny_input, 3)).astype("float32")
same = bool(np.array_equal(np.asarray(model(x, training=False)),
                            np.asarray(loaded(x, training=False))))
report("mlp saved and loaded", same=same)
family = get_family("yolo")
create_model("yolo", (*family.tiny_input, 3), 2, family.tiny)
report("yolo built")
"""


def test_the_cli_alone_imports_no_tensorflow():
    code = ("import sys, visionpipe.cli; "
            "print(sorted(m for m in ('tensorflow', 'keras', *sys.argv[1:]) if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, *LAZY], capture_output=True, text=True,
                         check=True, env=child_env())
    assert out.stdout.split() == ["[]"]


def test_optional_libraries_load_only_for_what_uses_them(tmp_path):
    out = subprocess.run([sys.executable, "-c", STAGES, str(tmp_path / "mlp.keras")],
                         capture_output=True, text=True, timeout=600,
                         env=child_env(PYTHONWARNINGS="ignore"))
    assert out.returncode == 0, out.stderr[-3000:]
    results = [json.loads(line[len("RESULT "):]) for line in out.stdout.splitlines()
               if line.startswith("RESULT ")]
    assert [r["step"] for r in results] == ["stages", "mlp saved and loaded", "yolo built"]
    stages, mlp, yolo = results
    # Every family registered (so every family module was imported), none of them paid for.
    assert {"applications", "mlp", "unet", "yolo"} <= set(stages["families"])
    assert stages["loaded"] == []
    assert mlp == {"step": "mlp saved and loaded", "loaded": [], "same": True}
    # The check sees an import when there is one: the YOLO family is keras-cv's.
    assert "keras_cv" in yolo["loaded"]
