"""Every value that changes a stage's outputs is written in params.yaml, not hidden in a default.

A key missing from params.yaml would silently take the default in src/visionpipe/config/
schema.py (or the model family's params dataclass); params.yaml is the user's reference, so
each field must be listed, except one that does not apply to the entry's task (declared with
``json_schema_extra=tasks(...)`` in the schema) or an override of another section
(``json_schema_extra=OVERRIDE``: models.<name>.export_formats and export_parity).
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from visionpipe.config import Params, load_params, parse_params
from visionpipe.config.schema import field_tasks, is_override
from visionpipe.models.registry import get_family

REPO = Path(__file__).resolve().parents[2]
RAW = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))


def _default(cls: type, name: str) -> Any:
    if hasattr(cls, "__pydantic_fields__"):
        return cls.__pydantic_fields__[name].get_default(call_default_factory=True)
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _hint(value: Any) -> str:
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, tuple):
        value = list(value)
    return yaml.safe_dump(value, default_flow_style=True, width=200).strip().removesuffix(
        "\n...").removesuffix(" ...")


def _dataclass_of(tp: Any) -> type | None:
    """The dataclass that ``tp`` is, or holds as dict values (None for other types)."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) is dict:
        value = typing.get_args(tp)[1]
        return value if dataclasses.is_dataclass(value) else None
    return None


def missing_keys(cls: type, raw: Any, where: str, task: str | None) -> list[str]:
    """Fields of ``cls`` that apply to ``task`` but are not written in ``raw``, recursively."""
    if not isinstance(raw, dict):
        return []
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        key = f"{where}.{f.name}" if where else f.name
        tasks = field_tasks(cls, f.name) if hasattr(cls, "__pydantic_fields__") else None
        if task is not None and tasks is not None and task not in tasks:
            continue
        if f.name not in raw:
            if not (hasattr(cls, "__pydantic_fields__") and is_override(cls, f.name)):
                out.append(f"{key} (default: {_hint(_default(cls, f.name))})")
            continue
        inner = _dataclass_of(hints[f.name])
        if inner is None:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            out += missing_keys(inner, raw[f.name], key, task)
        elif isinstance(raw[f.name], dict):
            for entry, value in raw[f.name].items():
                entry_task = entry if f.name in ("prepare", "augment") else task
                if f.name == "models" and isinstance(value, dict):
                    entry_task = value.get("task")
                out += missing_keys(inner, value, f"{key}.{entry}", entry_task)
    return out


def test_every_config_field_is_written_in_params_yaml():
    missing = missing_keys(Params, RAW, "", None)
    assert not missing, (
        "params.yaml leaves these at a hidden default; add each key with its default value "
        "(and a short comment if its meaning is not obvious), or, if it does not apply to that "
        "task, declare json_schema_extra=tasks(...) on the field in "
        "src/visionpipe/config/schema.py:\n  " + "\n  ".join(missing))


@pytest.mark.parametrize("name", sorted(RAW["models"]))
def test_every_architecture_field_is_written_in_params_yaml(name):
    model = RAW["models"][name]
    cls = get_family(model["family"]).params
    missing = missing_keys(cls, model.get("architecture") or {},
                           f"models.{name}.architecture", None)
    assert not missing, (
        f"params.yaml: models.{name}.architecture leaves these fields of "
        f"{cls.__module__}.{cls.__name__} at a hidden default; add each with its default "
        "value:\n  " + "\n  ".join(missing))


def test_the_check_sees_a_missing_key(tmp_path):
    """A key deleted from a copy of params.yaml is reported with its place and default."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    del raw["models"]["unet"]["train"]["restore_best"]
    del raw["prepare"]["detection"]["annotations_dir"]
    del raw["models"]["mlp"]["train"]["label_smoothing"]
    missing = missing_keys(Params, raw, "", None)
    assert missing == ["prepare.detection.annotations_dir (default: annotations)",
                       "models.mlp.train.label_smoothing (default: 0.0)",
                       "models.unet.train.restore_best (default: true)"]


def test_task_only_fields_are_not_required_elsewhere():
    """loss applies to segmentation only: a classifier's train section need not list it."""
    assert "loss" not in RAW["models"]["mlp"]["train"]
    assert field_tasks(type(load_params(REPO / "params.yaml").model("mlp").train),
                       "loss") == ("segmentation",)


def test_the_documented_applications_entry_is_valid_params():
    """docs/transfer-learning.md's `mobilenet` block, put under models: of params.yaml as it
    says, loads: the family and values it shows, every other key at its default."""
    import re

    text = (REPO / "docs/transfer-learning.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
              if b.startswith("  mobilenet:\n")]
    assert len(blocks) == 1
    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    assert "mobilenet" not in raw["models"]
    raw["models"].update(yaml.safe_load(blocks[0]))
    model = parse_params(raw).model("mobilenet")
    assert (model.family, model.task) == ("applications", "classification")
    assert (model.architecture["backbone"], model.architecture["alpha"]) == ("mobilenet_v2", 0.35)
    t = model.train
    assert (t.epochs, t.learning_rate, t.lr_schedule, t.precision) == (4, 0.003, "cosine", "auto")
    assert (t.intra_op_threads, t.inter_op_threads) == ("auto", "auto")
    assert t.batch_size == raw["models"]["resnet"]["train"]["batch_size"]  # a default, as before
