"""The task interface holds: every registered task and family fits it, stages use it without
probing, task code names no family, and no module reaches into another's private names."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from visionpipe.models.registry import get_family, known_families
from visionpipe.tasks.base import Task
from visionpipe.tasks.registry import get_task, task_class, task_for, task_names

SRC = Path(__file__).resolve().parents[2] / "src" / "visionpipe"
# Class attributes every task must set (declared, without a value, on Task).
REQUIRED = [name for name in Task.__annotations__ if not hasattr(Task, name)]


def unknown_members(cls: type) -> list[str]:
    """Public methods a Task subclass defines that Task does not declare: a misspelt
    override (``evalution_model``) would otherwise never be called."""
    return sorted(name for name, value in vars(cls).items()
                  if not name.startswith("_") and callable(value) and not isinstance(value, type)
                  and not hasattr(Task, name))


@pytest.mark.parametrize("name", task_names())
def test_every_registered_task_is_a_complete_task(name):
    cls = task_class(name)
    assert issubclass(cls, Task) and cls.name == name
    assert not inspect.isabstract(cls), f"{cls.__name__} leaves abstract methods undefined"
    missing = [attr for attr in REQUIRED if not hasattr(cls, attr)]
    assert not missing, f"{cls.__name__} must set {', '.join(missing)} (see tasks/base.py)"
    assert cls.headline_metrics and all(isinstance(m, str) for m in cls.headline_metrics)
    assert isinstance(cls.agreement_key, str) and cls.served_outputs
    assert unknown_members(cls) == [], (
        f"{cls.__name__} defines methods Task does not declare (misspelt overrides?): "
        f"{unknown_members(cls)}")
    # It can be trained: its own loss, or a compile of its own.
    assert cls.loss is not Task.loss or cls.compile is not Task.compile
    # Export parity bounds its agreement, each check by a params key that exists.
    from visionpipe.config import ParityThreshold

    checks = cls.parity_checks(cls.__new__(cls))
    assert ("max_abs_diff", "max_abs_diff", "max") in checks
    assert (cls.agreement_key, "min_agreement", "min") in checks
    assert all(field in ParityThreshold.__dataclass_fields__ and bound in ("max", "min")
               for _, field, bound in checks), checks


def test_the_misspelling_check_can_fail():
    class Sloppy(task_class("classification")):
        def evalution_model(self, model, cfg):
            return model

    assert unknown_members(Sloppy) == ["evalution_model"]


@pytest.mark.parametrize("family", known_families())
def test_every_family_hands_its_task_what_it_needs(family):
    fam = get_family(family)
    assert fam.task in task_names(), f"family {family}: task {fam.task!r} is not registered"
    task = task_for(family, fam.task)
    assert isinstance(task, task_class(fam.task))
    if task.Hooks is not None:
        assert isinstance(task.hooks, task.Hooks) and not inspect.isabstract(type(task.hooks))


def test_a_task_refuses_missing_or_unexpected_hooks():
    from visionpipe.errors import ModelError

    with pytest.raises(ModelError, match="must register with hooks=<a DetectorHooks>"):
        get_task("detection")
    with pytest.raises(ModelError, match="takes no family hooks"):
        get_task("classification", hooks=object())
    with pytest.raises(ModelError, match="unknown task 'regression'; known: classification"):
        task_class("regression")


def _modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_no_code_probes_a_task_for_optional_methods():
    probes = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("hasattr", "getattr") and node.args
                    and "task" in ast.unparse(node.args[0]).lower()):
                probes.append(f"{path.relative_to(SRC)}:{node.lineno}: {ast.unparse(node)}")
    assert probes == [], "call the Task method instead (tasks/base.py declares it): " + \
        "; ".join(probes)


def test_task_code_names_no_model_family():
    """Families hand tasks their hooks; a task module importing one would tie it to it.
    tasks/registry.py is the one link (task_for looks up a family's hooks)."""
    found = []
    for path in sorted((SRC / "tasks").glob("*.py")):
        if path.name == "registry.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name}:{node.lineno}: {n}" for n in names
                      if n.startswith("visionpipe.models")]
    assert found == []


def private_imports(tree: ast.AST, module: str) -> list[str]:
    """``from visionpipe.x import _name`` and ``x._name`` on an imported visionpipe module,
    where x is not ``module`` itself."""
    found, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("visionpipe"):
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    found.append(f"{node.lineno}: from {node.module} import {a.name}")
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("visionpipe"):
                    aliases[a.asname or a.name.split(".")[0]] = a.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                and not node.attr.startswith("__") and isinstance(node.value, ast.Name)
                and node.value.id in aliases and aliases[node.value.id] != module):
            found.append(f"{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names():
    found = []
    for path in _modules():
        module = "visionpipe." + ".".join(path.relative_to(SRC).with_suffix("").parts)
        found += [f"{path.relative_to(SRC)}:{hit}"
                  for hit in private_imports(ast.parse(path.read_text()), module)]
    assert found == [], "make the name public where it is defined, or move it: " + \
        "; ".join(found)


def test_the_private_name_check_can_fail():
    tree = ast.parse("from visionpipe.stages import export\n"
                     "from visionpipe.plots import _save\n"
                     "export._archive(1)\n")
    assert private_imports(tree, "visionpipe.benchmark") == [
        "2: from visionpipe.plots import _save", "3: export._archive"]


def test_predict_reads_from_export_json_whether_it_runs_an_export(tmp_path):
    """predict imports no task code: export.json says (visionpipe_predict, from the task)."""
    import json

    from visionpipe.errors import ModelError
    from visionpipe.predict import Options, predict_folder

    meta = {"model": "unet", "task": "segmentation", "formats": {}}
    (tmp_path / "export.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match=r"an older visionpipe\); rerun `dvc repro export@"):
        predict_folder(tmp_path, tmp_path, tmp_path / "out", "saved_model", Options())
    (tmp_path / "export.json").write_text(json.dumps({**meta, "visionpipe_predict": False}))
    with pytest.raises(ModelError, match="a segmentation export; visionpipe predict does not"):
        predict_folder(tmp_path, tmp_path, tmp_path / "out", "saved_model", Options())
    assert [n for n in task_names() if task_class(n).predicts_folders] == list(task_names())
