"""The test suite's own layout, read from its source with `ast`: shared helpers come from
tests/helpers.py only (no test file imports another test file or a conftest.py), and no test
under tests/unit runs a whole stage (those live under tests/pipeline)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
HELPERS = "tests.helpers"
SOURCES = sorted(p for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts)
UNIT = sorted((TESTS / "unit").glob("test_*.py"))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _module_of(path: Path) -> str:
    return ".".join(path.relative_to(TESTS.parent).with_suffix("").parts)


def test_tests_exist_to_check():
    assert TESTS / "helpers.py" in SOURCES and len(UNIT) > 10


def _test_imports(path: Path) -> list[str]:
    """Imports in ``path`` of a test module, a conftest or any module of the tests package
    other than tests.helpers, as ``line: module``."""
    found = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: only test modules and conftests are reachable
                found.append(f"{node.lineno}: {'.' * node.level}{node.module or ''}")
                continue
            names = [node.module or ""]
            names += [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if ((parts[0] == "tests" and name not in ("tests", HELPERS)
                 and not name.startswith(HELPERS + "."))
                    or any(p == "conftest" or p.startswith("test_") for p in parts)):
                found.append(f"{node.lineno}: {name}")
                break
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(TESTS)))
def test_imports_only_shared_helpers_from_the_tests(path):
    assert _test_imports(path) == [], (
        f"{path.relative_to(TESTS.parent)} imports another test module or a conftest; move "
        "what is shared into tests/helpers.py (fixtures into a conftest.py)")


def test_the_import_check_can_fail(tmp_path):
    bad = tmp_path / "test_bad.py"
    bad.write_text("from .conftest import x\nfrom tests.unit.test_models import TINY\n"
                   "import tests.pipeline.conftest\nfrom tests.helpers import run\n"
                   "from tests import helpers\n")
    assert _test_imports(bad) == ["1: .conftest", "2: tests.unit.test_models",
                                  "3: tests.pipeline.conftest"]


def _stage_runs(tree: ast.Module, run_helpers: frozenset[str] = frozenset()) -> list[str]:
    """Calls of a stage's ``run`` (``prepare.run(...)`` after ``from visionpipe.stages import
    prepare``, ``visionpipe.stages.train.run(...)``, a ``run`` imported from a stage module)
    and of ``run_helpers`` (helpers that run stages), as ``line: call``."""
    stages: set[str] = set()  # local names bound to a visionpipe.stages.<x> module
    runs: set[str] = set(run_helpers)  # local names bound to a stage's run or such a helper
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                local = alias.asname or alias.name
                if node.module == "visionpipe.stages":
                    stages.add(local)
                elif ((node.module.startswith("visionpipe.stages.") and alias.name == "run")
                      or (node.module == HELPERS and alias.name in run_helpers)):
                    runs.add(local)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("visionpipe.stages.") and alias.asname:
                    stages.add(alias.asname)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in runs:
            found.append(f"{node.lineno}: {func.id}()")
        elif isinstance(func, ast.Attribute) and func.attr == "run":
            owner = func.value
            if isinstance(owner, ast.Name) and owner.id in stages:
                found.append(f"{node.lineno}: {owner.id}.run()")
            elif ast.unparse(owner).startswith("visionpipe.stages."):
                found.append(f"{node.lineno}: {ast.unparse(func)}()")
        elif (isinstance(func, ast.Attribute) and func.attr in run_helpers
              and ast.unparse(func.value) in ("helpers", HELPERS)):
            found.append(f"{node.lineno}: {ast.unparse(func)}()")
    return sorted(found, key=lambda call: int(call.split(":")[0]))


def _helpers_that_run_stages() -> frozenset[str]:
    """Functions of tests/helpers.py whose body runs a stage in-process."""
    tree = _tree(TESTS / "helpers.py")
    imports = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    return frozenset(node.name for node in tree.body if isinstance(node, ast.FunctionDef)
                     and _stage_runs(ast.Module(body=[*imports, node], type_ignores=[])))


@pytest.mark.parametrize("path", UNIT, ids=lambda p: p.name)
def test_unit_tests_run_no_whole_stage(path):
    calls = _stage_runs(_tree(path), _helpers_that_run_stages())
    assert calls == [], (
        f"{path.relative_to(TESTS.parent)} runs whole stages ({', '.join(calls)}); such tests "
        "live under tests/pipeline (slow)")


def test_the_stage_check_can_fail():
    assert "prepare_project" in _helpers_that_run_stages()
    tree = ast.parse("from visionpipe.stages import prepare, train as t\n"
                     "import visionpipe.stages.export as ex\n"
                     "from visionpipe.stages.evaluate import run as evaluate\n"
                     "from visionpipe.stages.train import compile_model\n"
                     "from tests.helpers import prepare_project\n"
                     "prepare.run(1)\nt.run(2)\nex.run(3)\nevaluate(4)\n"
                     "visionpipe.stages.augment.run(5)\nprepare_project(6)\n"
                     "compile_model(7)\nsubprocess.run(8)\n")
    assert _stage_runs(tree, frozenset({"prepare_project"})) == [
        "6: prepare.run()", "7: t.run()", "8: ex.run()", "9: evaluate()",
        "10: visionpipe.stages.augment.run()", "11: prepare_project()"]
