"""Fuzzing the params loader: random bytes and random YAML structures give a ParamsError (or a
valid Params), never another exception."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from visionpipe.config import Params, load_params, parse_params
from visionpipe.errors import ParamsError
from visionpipe.models.registry import validate_architectures

REPO = Path(__file__).resolve().parents[2]
DEFAULT = yaml.safe_load((REPO / "params.yaml").read_text())

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(st.text(max_size=10), st.integers(-5, 300)), inner, max_size=4)),
    max_leaves=12)


def _load(data) -> None:
    """Validate like the CLI does; only ParamsError may come out."""
    try:
        params = parse_params(data)
        validate_architectures(params)
    except ParamsError:
        return
    assert isinstance(params, Params)


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=400))
@example(b"?")  # found by this test: a None key at the top level raised IndexError
def test_random_bytes_as_params_file(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_bytes(data)
        try:
            load_params(path)
        except ParamsError as exc:
            assert str(exc).startswith(str(path))


def _paths(node, prefix=()):
    """Every key path of a nested mapping."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*prefix, key)
            yield from _paths(value, (*prefix, key))


PATHS = list(_paths(DEFAULT))


def test_a_file_that_is_not_utf8_names_the_byte(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes(b"seed: 1\n# caf\xe9\n")
    try:
        load_params(path)
    except ParamsError as exc:
        assert str(exc) == f"{path}: not UTF-8 text (byte 0xe9 at position 13); save it as UTF-8"
    else:
        raise AssertionError("no error")


@pytest.mark.parametrize("text,line", [
    ("?", "params.yaml: None: unknown key; known: seed, prepare, "),
    ("~: 1\n", "params.yaml: None: unknown key; known: seed, prepare, "),
    ("models:\n  ? \n", "params.yaml: models.None: key None is not allowed: expected "),
    ("prepare:\n  classification:\n    1: 2\n",
     "params.yaml: prepare.classification.1: unknown key; known: source, "),
])
def test_a_key_that_is_not_text_is_named_where_it_is(tmp_path, text, line):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError) as caught:
        load_params(path)
    assert str(caught.value).startswith(line.replace("params.yaml", str(path), 1))


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(PATHS), values)
def test_one_random_value_anywhere_in_the_committed_params(path, value):
    data = copy.deepcopy(DEFAULT)
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    _load(data)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(values)
def test_random_structures_as_the_whole_file(value):
    _load(value)
