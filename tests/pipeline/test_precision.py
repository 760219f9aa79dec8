"""Mixed precision and XLA in the real train stage (train.run on tiny prepared data, on CPU):
what the layers compute in, what the model outputs, the optimizer, and what model.json records.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from tests.helpers import TINY_MODEL as MODEL
from tests.helpers import prepare_project, tiny_params
from visionpipe.config import parse_params
from visionpipe.layout import Layout
from visionpipe.plots import read_history


@pytest.fixture(scope="module")
def project(tmp_path_factory, default_params_dict) -> Layout:
    return prepare_project(tmp_path_factory.mktemp("precision"), tiny_params(default_params_dict))


def train(layout: Layout, defaults: dict, **settings) -> tuple[dict, keras.Model]:
    """train.run in this process with ``settings`` in models.mlp.train; model.json's contents
    and the saved model.keras, loaded back."""
    from visionpipe.models.saving import load_model
    from visionpipe.stages import train as train_stage

    meta = train_stage.run(parse_params(tiny_params(defaults, **settings)), MODEL, layout)
    assert json.loads(layout.model_meta(MODEL).read_text()) == meta
    return meta, load_model(layout.model_file(MODEL))


def _images(layout: Layout) -> np.ndarray:
    from visionpipe.data import records

    return np.stack([ex.image for ex in records.read_split(layout.prepared("classification"),
                                                           "val")]).astype(np.float32)


def _trained_in(layout: Layout) -> keras.Model:
    """The kept epoch's checkpoint: the model as it trained (model.keras computes in float32)."""
    from visionpipe.models.saving import load_model

    folder = layout.checkpoints(MODEL)
    state = json.loads((folder / "state.json").read_text())
    assert state["finished"] and state["best"]
    return load_model(folder / state["best"])


def test_mixed_bfloat16_trains_in_bfloat16_and_saves_a_float32_model(project,
                                                                      default_params_dict):
    meta, model = train(project, default_params_dict, precision="mixed_bfloat16")
    assert meta["precision"] == "mixed_bfloat16" and meta["epochs"] == 2
    assert (meta["precision_setting"], meta["precision_reason"]) == ("mixed_bfloat16",
                                                                     "set in params")
    assert all(np.isfinite(v) for v in meta["kept_epoch_metrics"].values())
    # What trained: bfloat16 compute, float32 variables, a float32 softmax.
    trained = _trained_in(project)
    dense = trained.get_layer("dense1")
    assert dense.dtype_policy.name == "mixed_bfloat16"
    assert dense.compute_dtype == "bfloat16" and dense.kernel.dtype == "float32"
    assert trained.get_layer("head_softmax").compute_dtype == "float32"
    images = _images(project)
    hidden = keras.Model(trained.input, dense.output)(images[:4])
    assert keras.backend.standardize_dtype(hidden.dtype) == "bfloat16"
    # What was saved: the same variables computing in float32 (TFLite has no bfloat16
    # kernels), outputs within bfloat16's rounding of the trained model's.
    assert {layer.dtype_policy.name for layer in model._flatten_layers()} == {"float32"}
    for kept, saved in zip(trained.get_weights(), model.get_weights(), strict=True):
        assert np.array_equal(kept, saved)
    probs = model.predict(images, verbose=0)
    assert probs.dtype == np.float32 and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert np.abs(probs - trained.predict(images, verbose=0)).max() < 0.05
    # The caller's global policy is float32 again.
    assert keras.mixed_precision.dtype_policy().name == "float32"
    assert keras.layers.Dense(2).compute_dtype == "float32"


def test_the_default_precision_records_its_choice_and_keras_jit_choice(project,
                                                                     default_params_dict):
    import tensorflow as tf

    from visionpipe.config import TrainConfig
    from visionpipe.training import resolve_precision, resolve_threads

    meta, model = train(project, default_params_dict)
    # jit_compile auto: Keras turns XLA off on a machine without GPU.
    assert meta["jit_compile"] is False
    # params' setting, and the policy it resolves to on this machine with the reason (auto:
    # float32 here unless the CPU has bfloat16 instructions)
    setting = default_params_dict["models"][MODEL]["train"]["precision"]
    assert meta["precision_setting"] == setting
    assert (meta["precision"], meta["precision_reason"]) == resolve_precision(
        setting, default_params_dict["models"][MODEL]["family"])
    # threads auto (the MLP: TensorFlow's choice) in params: what runs in this process is
    # recorded, and why
    threading = tf.config.threading
    assert default_params_dict["models"][MODEL]["train"]["intra_op_threads"] == "auto"
    assert meta["threads"] == {
        "intra_op": threading.get_intra_op_parallelism_threads(),
        "inter_op": threading.get_inter_op_parallelism_threads(),
        "reason": resolve_threads(TrainConfig(intra_op_threads="auto",
                                              inter_op_threads="auto"),
                                  default_params_dict["models"][MODEL]["family"])[1]}
    assert meta["distribute"] == {"strategy": "none", "replicas": 1, "workers": 1}
    assert model.get_layer("dense1").compute_dtype == "float32"


def test_jit_compile_true_trains_with_xla_and_records_it(project, default_params_dict):
    meta, _ = train(project, default_params_dict, jit_compile=True)
    assert meta["jit_compile"] is True and meta["epochs"] == 2
    losses = read_history(project.history(MODEL))["loss"]
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[1] < losses[0]


def test_jit_compile_false_is_recorded(project, default_params_dict):
    meta, _ = train(project, default_params_dict, jit_compile=False, epochs=1)
    assert meta["jit_compile"] is False


def test_mixed_float16_compiles_a_loss_scale_optimizer(default_params_dict):
    """Keras' compile wraps the optimizer when the model's policy is mixed_float16
    (keras/src/trainers/trainer.py); the stage builds the model under that policy."""
    from visionpipe.models.registry import create_model, parse_architecture
    from visionpipe.training import dtype_policy, make_optimizer

    cfg = parse_params(tiny_params(default_params_dict, precision="mixed_float16")).model(MODEL)
    with dtype_policy(cfg.train.precision):
        model = create_model(cfg.family, (16, 16, 3), 4,
                             parse_architecture(cfg.family, cfg.architecture, "architecture"))
        model.compile(optimizer=make_optimizer(cfg.train, 4), loss="categorical_crossentropy")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert model.get_layer("dense1").compute_dtype == "float16"
    assert model.get_layer("head_softmax").compute_dtype == "float32"
    assert keras.mixed_precision.dtype_policy().name == "float32"


def test_mixed_float16_train_run_saves_a_model_that_loads_and_predicts(project,
                                                                      default_params_dict):
    meta, model = train(project, default_params_dict, precision="mixed_float16", epochs=1)
    assert meta["precision"] == "mixed_float16"
    assert np.isfinite(meta["kept_epoch_metrics"]["loss"])
    assert _trained_in(project).get_layer("dense1").compute_dtype == "float16"
    assert model.get_layer("dense1").compute_dtype == "float32"
    probs = model.predict(_images(project), verbose=0)
    assert probs.dtype == np.float32 and np.isfinite(probs).all()


def test_a_model_trained_in_mixed_bfloat16_exports_to_tflite_and_onnx(project,
                                                                     default_params_dict):
    """TFLite has no bfloat16 kernels: before model.keras was saved in float32 this failed
    with the converter's traceback on every CPU where precision auto picks mixed_bfloat16."""
    from visionpipe.stages import export

    data = tiny_params(default_params_dict, precision="mixed_bfloat16")
    data["export"]["formats"] = ["keras", "tflite", "tflite_int8", "onnx"]
    train(project, default_params_dict, precision="mixed_bfloat16")
    report = export.run(parse_params(data), MODEL, project)
    assert report["passed"] and set(report["formats"]) == {"keras", "tflite", "tflite_int8",
                                                           "onnx"}
    assert report["formats"]["tflite"]["max_abs_diff"] < 1e-4  # float32 against float32
    assert (project.export_dir(MODEL) / "model.tflite").stat().st_size > 0


def test_an_earlier_mixed_model_file_exports_and_a_failing_converter_is_one_line(
        project, default_params_dict, monkeypatch):
    """A model.keras that computes in bfloat16 (as train saved it before float32_model)
    exports; and any error a format's writer raises (here TFLite's converter refusing that
    bfloat16 graph when export skips float32_model) is one line, the earlier export kept."""
    import shutil

    from visionpipe.errors import ModelError
    from visionpipe.stages import export

    data = tiny_params(default_params_dict, precision="mixed_bfloat16")
    data["export"]["formats"] = ["keras", "tflite"]
    params = parse_params(data)
    train(project, default_params_dict, precision="mixed_bfloat16")
    folder = project.checkpoints(MODEL)
    best = folder / json.loads((folder / "state.json").read_text())["best"]
    shutil.copyfile(best, project.model_file(MODEL))  # computes in bfloat16
    assert _trained_in(project).get_layer("dense1").compute_dtype == "bfloat16"
    assert export.run(params, MODEL, project)["passed"]
    before = sorted(p.name for p in project.export_dir(MODEL).iterdir())
    monkeypatch.setattr(export, "float32_model", lambda model: model)  # the bfloat16 graph
    with pytest.raises(ModelError) as err:
        export.run(params, MODEL, project)
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"export@{MODEL}: writing tflite failed (")
    assert "ConverterError" in line and "Remove tflite from export.formats" in line
    assert sorted(p.name for p in project.export_dir(MODEL).iterdir()) == before
