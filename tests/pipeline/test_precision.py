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


def test_mixed_bfloat16_trains_in_bfloat16_with_float32_variables_and_outputs(project,
                                                                             default_params_dict):
    meta, model = train(project, default_params_dict, precision="mixed_bfloat16")
    assert meta["precision"] == "mixed_bfloat16" and meta["epochs"] == 2
    assert (meta["precision_setting"], meta["precision_reason"]) == ("mixed_bfloat16",
                                                                     "set in params")
    assert all(np.isfinite(v) for v in meta["kept_epoch_metrics"].values())
    dense = model.get_layer("dense1")
    assert dense.dtype_policy.name == "mixed_bfloat16"
    assert dense.compute_dtype == "bfloat16" and dense.kernel.dtype == "float32"
    head = model.get_layer("head_softmax")  # kept float32 for a stable softmax
    assert head.compute_dtype == "float32"
    images = _images(project)
    hidden = keras.Model(model.input, dense.output)(images[:4])
    assert keras.backend.standardize_dtype(hidden.dtype) == "bfloat16"
    # The saved model loads and predicts float32 probabilities, as the float32 model does.
    probs = model.predict(images, verbose=0)
    assert probs.dtype == np.float32 and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # The caller's global policy is float32 again.
    assert keras.mixed_precision.dtype_policy().name == "float32"
    assert keras.layers.Dense(2).compute_dtype == "float32"


def test_float32_default_records_its_precision_and_keras_jit_choice(project,
                                                                     default_params_dict):
    import tensorflow as tf

    from visionpipe.training import resolve_precision

    meta, model = train(project, default_params_dict)
    # jit_compile auto: Keras turns XLA off on a machine without GPU.
    assert (meta["precision"], meta["jit_compile"]) == ("float32", False)
    # params' setting, and the policy it resolves to on this machine with the reason
    setting = default_params_dict["models"][MODEL]["train"]["precision"]
    assert meta["precision_setting"] == setting
    assert (meta["precision"], meta["precision_reason"]) == resolve_precision(setting)
    # threads 0 (TensorFlow's choice) in params: what runs in this process is recorded
    threading = tf.config.threading
    assert meta["threads"] == {"intra_op": threading.get_intra_op_parallelism_threads(),
                               "inter_op": threading.get_inter_op_parallelism_threads()}
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
    assert model.get_layer("dense1").compute_dtype == "float16"
    probs = model.predict(_images(project), verbose=0)
    assert probs.dtype == np.float32 and np.isfinite(probs).all()
