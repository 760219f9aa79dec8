"""params.schema.json: generated from the config models, committed, and really constraining."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from visionpipe.config.schema import params_json_schema_text

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "params.schema.json"
REGENERATE = "visionpipe schema > params.schema.json"


def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads(COMMITTED.read_text(encoding="utf-8")))


def test_committed_schema_is_the_generated_one():
    assert COMMITTED.read_text(encoding="utf-8") == params_json_schema_text(), (
        f"params.schema.json is out of date with src/visionpipe/config/schema.py; run "
        f"`{REGENERATE}` and commit it")


def test_schema_is_valid_json_schema():
    jsonschema.Draft202012Validator.check_schema(json.loads(COMMITTED.read_text()))


def test_params_yaml_names_its_schema_for_editors():
    first = (REPO / "params.yaml").read_text(encoding="utf-8").splitlines()[0]
    assert first == "# yaml-language-server: $schema=./params.schema.json"


PARAMS_FILES = [REPO / "params.yaml", *sorted(REPO.glob("examples/*/params.yaml"))]


@pytest.mark.parametrize("path", PARAMS_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_params_files_validate_against_the_schema(path):
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in _validator().iter_errors(yaml.safe_load(path.read_text()))]
    assert not errors, errors


@pytest.mark.parametrize("dotted, value", [
    ("models.mlp.train.lerning_rate", 0.1),            # unknown key
    ("bogus", 1),                                      # unknown top-level key
    ("prepare.clasification", {"source": "shapes"}),   # unknown task
    ("models.mlp.train.learning_rate", -1),            # below the minimum
    ("models.mlp.train.epochs", 100000),               # above the maximum
    ("models.mlp.train.epochs", 2.5),                  # not an integer
    ("models.mlp.train.optimizer", "rmsprop"),         # not in the enum
    ("models.mlp.task", "captioning"),                 # not a registered task
    ("prepare.classification.image_size", [64]),       # a pair
    ("export.formats", ["keras", "coreml"]),           # unknown format
    ("export.formats", []),                            # at least one
    ("tracking.mlflow", "yes"),                        # a boolean
    ("models.mlp.family", None),                       # required string
])
def test_the_schema_rejects_bad_params(dotted, value):
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data = copy.deepcopy(data)
    *parents, last = dotted.split(".")
    node = data
    for key in parents:
        node = node[key]
    node[last] = value
    assert list(_validator().iter_errors(data)), f"{dotted} = {value!r} passed the schema"
