"""params.yaml validation: every error names the key, the value and what is allowed."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import yaml

from visionpipe.config import load_params, parse_params
from visionpipe.errors import ParamsError
from visionpipe.models.registry import validate_architectures


def _with(base: dict, dotted: str, value) -> dict:
    data = copy.deepcopy(base)
    *parents, last = dotted.split(".")
    node = data
    for key in parents:
        node = node[key]
    node[last] = value
    return data


def _error(data: dict) -> str:
    with pytest.raises(ParamsError) as info:
        validate_architectures(parse_params(data))
    return str(info.value)


def test_committed_params_are_valid(repo_root):
    params = load_params(repo_root / "params.yaml")
    validate_architectures(params)
    assert params.models["mlp"].task == "classification"
    assert params.prepare["classification"].image_size == (64, 64)
    assert params.models["mlp"].train.learning_rate == pytest.approx(1e-3)


@pytest.mark.parametrize("dotted, value, expected", [
    ("models.mlp.train.lr", 0.1,
     "models.mlp.train.lr: unknown key; known: epochs, batch_size, optimizer, learning_rate"),
    ("models.mlp.train.lerning_rate", 0.1, "models.mlp.train.lerning_rate: unknown key; "
     "did you mean learning_rate? known: epochs"),
    ("prepare.classification.sizes", 3, "prepare.classification.sizes: unknown key"),
    ("bogus", 1, "bogus: unknown key; known: seed, prepare"),
    ("models.mlp.architecture.hidden", [3], "models.mlp.architecture.hidden: unknown key; "
     "did you mean hidden_units? known: hidden_units, activation"),
    ("prepare.clasification", {"source": "shapes"}, "prepare.clasification: unknown key; "
     "did you mean classification? known: classification, segmentation, detection"),
])
def test_unknown_key_names_key_and_allowed(default_params_dict, dotted, value, expected):
    assert expected in _error(_with(default_params_dict, dotted, value))


@pytest.mark.parametrize("dotted, value, expected", [
    ("models.mlp.train.epochs", "ten", "models.mlp.train.epochs = 'ten': expected an integer"),
    ("models.mlp.train.epochs", 2.5, "models.mlp.train.epochs = 2.5: expected an integer"),
    ("models.mlp.train.learning_rate", "fast", "learning_rate = 'fast': expected a number"),
    ("models.mlp.architecture.batch_norm", 1, "batch_norm = 1: expected true or false"),
    ("models.mlp.train.optimizer", "rmsprop",
     "optimizer = 'rmsprop': expected one of 'sgd', 'adam', 'adamw'"),
    ("prepare.classification.image_size", [64], "image_size = [64]: expected a list of 2"),
    ("models.mlp.train", 5, "models.mlp.train = 5: expected a mapping"),
    ("seed", True, "seed = True: expected an integer"),
    ("models.mlp.train.epochs", "3", "epochs = '3': expected an integer >= 1 and <= 10000"),
    ("models.mlp.train.jit_compile", "yes",
     "jit_compile = 'yes': expected true or false or one of 'auto'"),
    ("models.mlp.train.cache_limit_mb", 1.0, "cache_limit_mb = 1.0: expected an integer"),
    ("tracking.uri", "", "tracking.uri = '': expected a non-empty string or null"),
    ("models.mlp.family", None, "models.mlp.family = None: expected a non-empty string"),
    ("prepare.segmentation.mask_values", {"cell": 255},
     "prepare.segmentation.mask_values.cell: key 'cell' is not allowed: expected a valid "
     "integer"),
])
def test_wrong_type_names_key_value_and_type(default_params_dict, dotted, value, expected):
    assert expected in _error(_with(default_params_dict, dotted, value))


@pytest.mark.parametrize("dotted, value, expected", [
    ("models.mlp.train.learning_rate", -0.1, "learning_rate = -0.1: expected a value > 0"),
    ("models.mlp.train.epochs", 0, "epochs = 0: expected a value >= 1"),
    ("models.mlp.architecture.dropout", 1.0, "dropout = 1.0: expected a value < 1"),
    ("models.mlp.architecture.hidden_units", [64, 0],
     "hidden_units = [64, 0]: expected every value >= 1"),
    ("models.mlp.architecture.hidden_units", [], "hidden_units = []: expected at least 1"),
    ("prepare.classification.image_size", [4, 64], "expected every value >= 8"),
    ("models.mlp.train.learning_rate", float("nan"), "expected a finite number"),
    ("models.mlp.train.learning_rate", -1, "learning_rate = -1.0: expected a value > 0"),
    ("augment.detection.scale", [0, 1], "scale = [0.0, 1.0]: expected every value > 0"),
])
def test_out_of_range_names_key_value_and_range(default_params_dict, dotted, value, expected):
    assert expected in _error(_with(default_params_dict, dotted, value))


def test_unknown_family_lists_known(default_params_dict):
    msg = _error(_with(default_params_dict, "models.mlp.family", "transformer"))
    assert "models.mlp.family = 'transformer'" in msg and "known families: applications, mlp" in msg


def test_family_and_task_must_agree(default_params_dict):
    data = _with(default_params_dict, "prepare.segmentation", {"source": "shapes"})
    msg = _error(_with(data, "models.mlp.task", "segmentation"))
    assert "models.mlp.task = 'segmentation'" in msg and "set task: classification" in msg


def test_model_task_needs_a_prepare_section(default_params_dict):
    data = copy.deepcopy(default_params_dict)
    del data["prepare"]["detection"]
    msg = _error(data)
    assert "no prepare.detection section" in msg


@pytest.mark.parametrize("edits, expected", [
    ({"models.mlp.train.min_learning_rate": 0.01},
     "models.mlp.train.min_learning_rate = 0.01: expected at most learning_rate (0.001)"),
    ({"models.mlp.train.lr_schedule": "warmup_cosine", "models.mlp.train.epochs": 12,
      "models.mlp.train.warmup_epochs": 12},
     "models.mlp.train.warmup_epochs = 12.0: expected fewer than epochs (12)"),
    ({"models.mlp.train.lr_schedule": "exponential"},
     "lr_schedule = 'exponential': expected one of 'constant', 'step', 'cosine', "
     "'warmup_cosine'"),
    ({"prepare.classification.resize": "squash"},
     "resize = 'squash': expected one of 'stretch', 'pad', 'crop'"),
    ({"prepare.segmentation": {"source": "folder"}},
     "prepare.segmentation.source = 'folder': class folders give labels only, task "
     "'segmentation' needs masks"),
    ({"export.parity": {"tflite": {"max_abs_diff": 1e-4, "min_agreement": 0.99}}},
     "export.parity.keras: missing; export.formats lists keras, so give its max_abs_diff"),
    ({"models.vgg.export_formats": ["tflite", "onnx"],
      "export.parity": {"tflite": {"max_abs_diff": 1e-4, "min_agreement": 0.99}},
      "export.formats": ["tflite"]},
     "export.parity.onnx: missing; models.vgg.export_formats lists onnx"),
    ({"export.parity.coreml": {"max_abs_diff": 1e-4, "min_agreement": 0.99}},
     "export.parity.coreml: unknown key; known: keras, saved_model, tflite, "
     "tflite_dynamic, tflite_int8, onnx"),
    ({"export.formats": ["tflite", "onnx", "tflite"]},
     "export.formats = ['tflite', 'onnx', 'tflite']: a format is listed twice"),
    ({"export.formats": ["tflite", "pytorch"]},
     "export.formats[1] = 'pytorch': expected one of 'keras', 'saved_model', 'tflite', "
     "'tflite_dynamic', 'tflite_int8', 'onnx'"),
    ({"export.parity.tflite.min_agreement": 1.5},
     "export.parity.tflite.min_agreement = 1.5: expected a value <= 1"),
    ({"predict.format": "keras"}, "predict.format = 'keras': expected one of 'saved_model'"),
    ({"prepare.segmentation.source": "pairs"},
     "prepare.segmentation.mask_values = None: expected a mapping of mask pixel value"),
    ({"prepare.segmentation.source": "pairs", "prepare.segmentation.mask_values": {300: "x"}},
     "prepare.segmentation.mask_values = {300: 'x'}: expected 8-bit mask values 0..255"),
    ({"prepare.segmentation.mask_values": {0: "x", 255: "x"}},
     "expected a different class name for each value"),
    ({"prepare.classification.source": "pairs"},
     "prepare.classification.source = 'pairs': image/mask pairs are segmentation data"),
    ({"prepare.segmentation.resize": "pad"},
     "prepare.segmentation.resize = 'pad': expected 'stretch' for segmentation"),
    ({"prepare.segmentation.crop_size": [128, 32]},
     "prepare.segmentation.crop_size = [128, 32]: expected at most image_size ([64, 64])"),
    ({"prepare.classification.crop_size": [32, 32]},
     "prepare.classification.crop_size = [32, 32]: expected null: crops are for segmentation"),
    ({"models.mlp.train.loss": "dice"},
     "models.mlp.train.loss = 'dice': expected 'cross_entropy' for a classification model"),
    ({"models.mlp.train.class_weights": "balance"},
     "models.mlp.train.class_weights = 'balance': expected a list of at least 1 values, each a "
     "number >= 0 and <= 1000 or one of 'balanced' or null"),
    ({"models.vgg.train.monitor": "val_mean_iou"},
     "models.vgg.train.monitor = 'val_mean_iou': expected val_loss or val_accuracy"),
    ({"models.unet.export_parity.coreml": {"max_abs_diff": 1e-4, "min_agreement": 0.99}},
     "models.unet.export_parity.coreml: unknown key; known: keras"),
    ({"models.unet.architecture.upsampling": "nearest"},
     "models.unet.architecture.upsampling = 'nearest': expected one of 'transpose', "
     "'bilinear'"),
])
def test_cross_field_checks_name_the_key(default_params_dict, edits, expected):
    data = default_params_dict
    for dotted, value in edits.items():
        data = _with(data, dotted, value)
    assert expected in _error(data)


@pytest.mark.parametrize("model", ["mlp", "yolo", "unet"])
@pytest.mark.parametrize("value, parsed", [([1, 2.5, 0, 1], (1.0, 2.5, 0.0, 1.0)),
                                           ("balanced", "balanced"), (None, None)])
def test_class_weights_apply_to_every_task(default_params_dict, model, value, parsed):
    """A list (checked against the classes when training starts) or balanced, for a
    classifier, a detector and a segmentation model alike."""
    params = parse_params(_with(default_params_dict, f"models.{model}.train.class_weights",
                                value))
    assert params.model(model).train.class_weights == parsed


def test_shapes_split_sizes_are_counts(default_params_dict):
    msg = _error(_with(default_params_dict, "prepare.classification.splits.val", 0.5))
    assert "prepare.classification.splits.val = 0.5" in msg


def test_unknown_model_name_lists_known(repo_root):
    with pytest.raises(ParamsError, match=r"models\.nope: no such model; known: mlp"):
        load_params(repo_root / "params.yaml").model("nope")


def test_yaml_syntax_error_gives_line(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("seed: 1\nmodels:\n  mlp: {family: mlp,\n")
    with pytest.raises(ParamsError, match=r"params.yaml: YAML syntax error at line \d+"):
        load_params(bad)


@pytest.mark.parametrize("dotted, value, fragment", [
    ("augment.classification.box_min_visible", 0.5,
     "augment.classification.box_min_visible = 0.5: expected 0.25 or no value: it applies to "
     "detection only, and classification would ignore it"),
    ("models.unet.train.label_smoothing", 0.1,
     "models.unet.train.label_smoothing = 0.1: expected 0.0 or no value: it applies to "
     "classification only"),
    ("prepare.classification.annotations_dir", "ann",
     "prepare.classification.annotations_dir = 'ann': expected 'annotations' or no value"),
    ("models.unet.export_parity.tflite_dynamic.max_map_drop", 0.5,
     "models.unet.export_parity.tflite_dynamic.max_map_drop = 0.5: expected 0.01 or no "
     "value: it applies to detection only"),
])
def test_a_field_of_another_task_is_an_error_not_ignored(default_params_dict, dotted, value,
                                                         fragment):
    """Fields marked for some tasks only (``x-tasks``) were ignored elsewhere without a word."""
    assert fragment in _error(_with(default_params_dict, dotted, value))


@pytest.mark.parametrize("dotted, value, fragment", [
    ("prepare.segmentation.mask_values", {0: "back\nground", 255: "cell"},
     "prepare.segmentation.mask_values = 'back\\nground': expected a class name of visible"),
    ("prepare.detection.class_names", ["cat", " "],
     "prepare.detection.class_names = ' ': expected a class name"),
])
def test_class_names_must_be_visible_on_one_line(default_params_dict, dotted, value, fragment):
    data = _with(default_params_dict, dotted, value)
    if dotted.startswith("prepare.detection"):
        data["prepare"]["detection"].update(source="voc", path="x")
    else:
        data["prepare"]["segmentation"].update(source="pairs", path="x")
    assert fragment in _error(data)


def test_a_field_of_another_task_at_its_default_is_allowed(default_params_dict):
    params = parse_params(_with(default_params_dict, "augment.classification.box_min_visible",
                                0.25))
    assert params.augment["classification"].box_min_visible == 0.25


def _cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "visionpipe.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("dotted, value, fragment", [
    ("models.mlp.train.learning_rate", -1, "models.mlp.train.learning_rate = -1"),
    ("models.mlp.train.momentun", 0.9, "models.mlp.train.momentun: unknown key"),
    ("models.mlp.architecture.activation", 3, "models.mlp.architecture.activation = 3"),
    ("models.yolo.train.class_weights", [1, -2], "models.yolo.train.class_weights = [1.0, "
     "-2.0]: expected every value >= 0"),
])
def test_cli_bad_params_exit_nonzero_with_one_line(tmp_path, default_params_dict, dotted,
                                                   value, fragment):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_with(default_params_dict, dotted,
                                                                value)))
    result = _cli(["train", "--model", "mlp"], tmp_path)
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("visionpipe:")]
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr


ALIAS_BOMB = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
    f"{n}: &{n} [{', '.join(['*' + p] * 10)}]\n" for p, n in zip("abcdefgh", "bcdefghi",
                                                                   strict=True))


@pytest.mark.parametrize("edit, fragment", [
    # A key given twice: PyYAML would keep the last silently.
    (lambda text: text + "\nseed: 7\n", "key 'seed' appears twice in one mapping"),
    (lambda text: text.replace("    copies: 1\n", "    copies: 1\n    copies: 2\n", 1),
     "key 'copies' appears twice in one mapping"),
    # 1 KB of nested aliases expanding to 10^9 values: refused at once, printed nowhere.
    (lambda text: ALIAS_BOMB + "seed: *i\n",
     "holds more than 100000 values once its anchors and aliases"),
    # A long value is cut to 200 characters in the message, its length given.
    (lambda text: text.replace("seed: 42", "seed: " + "x" * 5000, 1),
     "seed = '" + "x" * 199 + "... (5002 characters): expected an integer"),
])
def test_cli_duplicate_keys_alias_bombs_and_long_values(tmp_path, repo_root, edit, fragment):
    text = (repo_root / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(edit(text))
    result = _cli(["train", "--model", "mlp"], tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("visionpipe:")]
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert len(lines[0]) < 400 and "Traceback" not in result.stderr


def test_a_duplicate_key_names_both_lines(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("seed: 1\nmodels:\n  mlp:\n    family: mlp\n    task: classification\n"
                   "    family: vgg\n")
    with pytest.raises(ParamsError, match=r"params.yaml: line 6: key 'family' appears twice "
                                          r"in one mapping \(first at line 4\); YAML would "
                                          r"keep only the last one"):
        load_params(bad)


def test_merge_keys_stay_allowed_and_explicit_keys_win(tmp_path, repo_root):
    text = (repo_root / "params.yaml").read_text()
    text = text.replace("  segmentation:             #", "  segmentation: &seg #", 1)
    head = "  detection:                # boxes move with the pixels (data/augment.py)\n"
    text = text.replace(head + "    copies: 1\n", "  detection:\n    <<: *seg\n    copies: 3\n", 1)
    (tmp_path / "params.yaml").write_text(text)
    params = load_params(tmp_path / "params.yaml")
    assert params.augment["detection"].copies == 3
    assert params.augment["segmentation"].copies == 1


def test_cli_unknown_model_lists_known(tmp_path, repo_root):
    (tmp_path / "params.yaml").write_text((repo_root / "params.yaml").read_text())
    result = _cli(["evaluate", "--model", "resnet9000"], tmp_path)
    assert result.returncode == 2
    assert "models.resnet9000: no such model; known: mlp" in result.stderr
    assert "Traceback" not in result.stderr


def test_example_params_files_are_valid(repo_root):
    examples = sorted(repo_root.glob("examples/*/params.yaml"))
    assert examples, "no example params found"
    for path in examples:
        params = load_params(path)
        validate_architectures(params)
        for task, cfg in params.prepare.items():
            if cfg.source in ("folder", "pairs"):  # the folder the README's command reads
                if cfg.path.startswith("../shared/") and not (repo_root.parent / "shared"
                                                              ).is_dir():
                    pytest.skip("../shared not beside the repository")
                assert (repo_root / cfg.path).is_dir(), (path, task, cfg.path)


def test_a_model_may_override_parity_thresholds(default_params_dict):
    params = parse_params(default_params_dict)
    own = default_params_dict["models"]["unet"]["export_parity"]["tflite_int8"]
    assert params.parity("unet", "tflite_int8").max_abs_diff == own["max_abs_diff"]
    assert params.parity("unet", "tflite") == params.export.parity["tflite"]
    assert params.parity("mlp", "tflite_int8") == params.export.parity["tflite_int8"]
