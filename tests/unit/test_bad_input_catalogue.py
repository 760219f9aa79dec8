"""docs/bad-inputs.md, the catalogue of bad inputs, stays true to the suite: every row names a
test that exists (file and function, read with `ast`), no two rows are the same case, and the
catalogue covers each area the project reads from (sources, params, exports, predict,
checkpoints and training data, tracking)."""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
CATALOGUE = TESTS.parent / "docs" / "bad-inputs.md"
ROW = re.compile(r"^\|\s*(\d+)\s*\|(.+)\|(.+)\|(.+)\|(.+)\|\s*$")
TEST_REF = re.compile(r"`((?:unit|pipeline)/test_\w+\.py)::(\w+)(\[[^`]*\])?`")


def rows(text: str) -> list[tuple[int, str, str, str, str]]:
    """(number, area, input, what it gets, tests) for each numbered table row."""
    found = []
    for line in text.splitlines():
        match = ROW.match(line)
        if match:
            number, *cells = match.groups()
            found.append((int(number), *(c.strip() for c in cells)))
    return found


def functions_of(path: Path) -> set[str]:
    return {node.name for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test")}


def missing_tests(cell: str, cache: dict[Path, set[str]]) -> list[str]:
    """Test references in ``cell`` whose file or function does not exist; [cell] if none."""
    refs = TEST_REF.findall(cell)
    if not refs:
        return [f"no test named in {cell!r}"]
    missing = []
    for file, name, _ in refs:
        path = TESTS / file
        if path not in cache:
            cache[path] = functions_of(path) if path.is_file() else set()
        if name not in cache[path]:
            missing.append(f"{file}::{name}")
    return missing


def test_the_catalogue_has_numbered_cases_naming_real_tests():
    table = rows(CATALOGUE.read_text())
    assert len(table) >= 120, f"{len(table)} cases"
    assert [r[0] for r in table] == list(range(1, len(table) + 1)), "numbers run 1..n"
    cache: dict[Path, set[str]] = {}
    broken = {r[0]: m for r in table if (m := missing_tests(r[4], cache))}
    assert broken == {}, f"rows naming tests that do not exist: {broken}"
    repeated = [k for k, n in Counter((r[1], r[2].lower()) for r in table).items() if n > 1]
    assert repeated == [], f"the same case twice: {repeated}"
    areas = Counter(r[1].split("/")[0] for r in table)
    for area in ("sources", "params", "exports", "predict", "checkpoints", "training",
                 "tracking"):
        assert areas[area] >= 3, f"area {area}: {areas[area]} case(s); {dict(areas)}"


@pytest.mark.parametrize("cell, expected", [
    ("`unit/test_bad_input_catalogue.py::test_the_reference_check_can_fail[a]`", []),
    ("`unit/test_bad_input_catalogue.py::test_gone[x]`",
     ["unit/test_bad_input_catalogue.py::test_gone"]),
    ("`unit/test_nowhere.py::test_a`", ["unit/test_nowhere.py::test_a"]),
    ("a test somewhere", ["no test named in 'a test somewhere'"]),
])
def test_the_reference_check_can_fail(cell, expected):
    assert missing_tests(cell, {}) == expected
