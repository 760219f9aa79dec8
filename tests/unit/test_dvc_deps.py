"""dvc.yaml's source deps are each stage's import closure inside the package: no more, no less.

A missing module lets DVC's run-cache hand back stale outputs after that module changed; an
extra one reruns a stage for nothing (editing augment's code must not rerun prepare). So the
closure is computed here from the code, with ``ast`` only (nothing is imported: fast, and no
TensorFlow), and compared with the ``src/`` entries of each stage's ``deps``.

What a stage's command reaches. dvc.yaml runs ``visionpipe <stage> ...`` (the stage's ``cmd``),
i.e. ``visionpipe.cli:main``. It reaches:

* ``cli.py`` itself and everything it imports at module level;
* the imports inside the cli functions that run for *that* stage. They are found by following
  name-calls from ``main`` (``run_stage(args)``, ``build_parser()``, ...) to the functions
  defined in cli.py, with a small evaluator that knows ``args.stage`` is the stage and reads
  cli.py's literal constants (``STAGES``, ``COMMANDS``): an ``if`` it can decide takes one
  branch (``if args.stage == "predict"`` is false for ``train``; ``kind`` is
  ``STAGES[stage][0]``), one it cannot decide takes both (more deps, never fewer), and a branch
  that returns ends the function. So ``predict``, ``benchmark``, ``summary`` and ``replay_run``,
  and what they import, belong to no stage; ``models.registry`` (imported under
  ``if kind == "model"``) belongs to train, evaluate and export only;
* the stage module, from cli's ``import_module(f"visionpipe.stages.{args.stage}")``, which the
  evaluator resolves (the test fails if it cannot).

Every other module reached counts whole: all of its imports, at module level and inside
functions (a lazily imported module still runs, and a stage may well take that path), except
under ``if TYPE_CHECKING:``. Handled: ``import visionpipe.x [as y]``, ``from visionpipe.x import
y`` where ``y`` is a submodule (else an attribute of ``x``), relative imports, and
``import_module`` / ``importlib.import_module`` / ``__import__`` with a literal string. A module
that imports with a computed name (a registry of ``"visionpipe.pkg.module:Class"`` strings) reaches
every module named by a whole string constant in it or in a package module it imports (the
registry's table, e.g. ``tasks/catalog.py``, which itself reaches nothing: the params check and
the CLI read task names from it without pulling in the tasks); if it names none, the test fails.

Packages: importing ``visionpipe.data.records`` runs ``visionpipe/__init__.py`` and
``visionpipe/data/__init__.py``, so those count too (and their imports are followed), but an
``__init__.py`` is listed only if it holds code: one with nothing but a docstring (and
``from __future__`` imports) runs nothing, so editing it must not rerun anything. Once someone
puts code in it, this test asks for it to be listed.

Package data: a non-Python file under ``src/visionpipe/`` counts for a stage when a module of
its closure names it in a string constant (its file name, or its path relative to that
module's folder), as a ``Path(__file__).parent / "templates" / "card.md"`` read would.

The comparison is per stage on files: a folder entry in dvc.yaml stands for every ``.py`` under
it. The target is one explicit, sorted line per file (a folder brings in what the stage never
imports), so a folder entry is always reported for removal. Data deps (``data/``, ``models/``,
``reports/``) are not checked here. On a difference the message lists, per stage, the lines to
add and to remove and the whole sorted ``src/`` list, ready to paste.

Also checked: the top-level ``plots:`` of dvc.yaml compare every model of params.yaml's
``models:`` with the other models of its task (those lines are kept by hand).
"""

from __future__ import annotations

import ast
import contextlib
import re
from functools import cache
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
PACKAGE = "visionpipe"
# What `visionpipe` runs: "visionpipe.cli:main".
CLI, ENTRY = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"][
    PACKAGE].split(":")
DYNAMIC_IMPORTERS = {"import_module", "__import__"}
MODULE_STRING = re.compile(rf"^({PACKAGE}(?:\.\w+)*)(?::[\w.]+)?$")
# Modules whose functions only preload: visionpipe.warm's worker imports what stages use before
# any stage exists, and each stage still imports (and runs) its own modules, which this test
# follows from the stage. Only their module-level imports are part of a stage's closure.
PRELOADERS = {f"{PACKAGE}.warm"}


# --- the package's modules ------------------------------------------------------------------

@cache
def package_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py under src/visionpipe/ (packages: __init__)."""
    modules = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


@cache
def parse(module: str) -> ast.Module:
    return ast.parse(package_modules()[module].read_text(), filename=str(package_modules()[module]))


def is_package(module: str) -> bool:
    return package_modules()[module].name == "__init__.py"


def runs_nothing(module: str) -> bool:
    """An __init__.py holding only a docstring and ``from __future__`` imports."""
    for i, stmt in enumerate(parse(module).body):
        if i == 0 and isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) \
                and isinstance(stmt.value.value, str):
            continue
        if isinstance(stmt, ast.ImportFrom) and stmt.module == "__future__":
            continue
        return False
    return True


def with_parents(module: str) -> list[str]:
    """``a.b.c`` -> ``a``, ``a.b``, ``a.b.c``: importing a module runs its packages first."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


@cache
def defined_names(module: str) -> frozenset[str] | None:
    """The names ``module`` binds at module level; None when it cannot be told (``*``,
    ``__getattr__``)."""
    names = set()
    stack = list(parse(module).body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name == "*":
                    return None
                names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.For, ast.With,
                               ast.NamedExpr)):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [i.optional_vars for i in node.items if i.optional_vars] \
                if isinstance(node, ast.With) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        if isinstance(node, (ast.If, ast.Try, ast.For, ast.While, ast.With)):
            stack.extend(ast.iter_child_nodes(node))
        elif isinstance(node, ast.ExceptHandler):
            stack.extend(node.body)
    return None if "__getattr__" in names else frozenset(names)


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def walk_runtime(node: ast.AST):
    """ast.walk, skipping the bodies of ``if TYPE_CHECKING:`` (never run)."""
    stack = [node]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def called_name(call: ast.Call) -> str | None:
    func = call.func
    return func.id if isinstance(func, ast.Name) else \
        func.attr if isinstance(func, ast.Attribute) else None


class Imports:
    """The package modules named by import statements and calls, and what could not be resolved."""

    def __init__(self, where: str):
        self.where = where
        self.modules: set[str] = set()
        self.requested: set[str] = set()  # every visionpipe name imported, found or not
        self.problems: list[str] = []

    def absolute(self, module: str | None, level: int, importer: str) -> str:
        if not level:
            return module or ""
        base = importer.split(".") if is_package(importer) else importer.split(".")[:-1]
        base = base[:len(base) - (level - 1)]
        return ".".join(base + ([module] if module else []))

    def name(self, name: str, line: int) -> None:
        """A module imported by name (``import x``, ``import_module("x")``): it must exist."""
        if name.split(".")[0] != PACKAGE:
            return
        self.requested.add(name)
        if name in package_modules():
            self.modules.add(name)
        else:
            self.problems.append(f"{self.where}:{line}: imports {name}, which is no module "
                                 f"under src/{PACKAGE}/")

    def statement(self, node: ast.Import | ast.ImportFrom, importer: str) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                self.name(alias.name, node.lineno)
            return
        base = self.absolute(node.module, node.level, importer)
        if base.split(".")[0] != PACKAGE:
            return
        self.name(base, node.lineno)
        if base not in package_modules():
            return
        defined = defined_names(base)
        for alias in node.names:
            if f"{base}.{alias.name}" in package_modules():  # a submodule, else an attribute
                self.modules.add(f"{base}.{alias.name}")
                self.requested.add(f"{base}.{alias.name}")
            elif defined is not None and alias.name not in defined:
                # Mid-refactor code: what defines it now is unknown, so the closure would be short.
                self.problems.append(f"{self.where}:{node.lineno}: imports {alias.name} from "
                                     f"{base}, which neither defines nor imports it")


@cache
def module_imports(module: str) -> Imports:
    """Every import anywhere in ``module`` (module level and inside functions)."""
    found = Imports(str(package_modules()[module].relative_to(ROOT)))
    dynamic = False
    tree = parse(module)
    nodes = (walk_runtime(ast.Module(body=[n for n in tree.body if not isinstance(
        n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))], type_ignores=[]))
        if module in PRELOADERS else walk_runtime(tree))
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.statement(node, module)
        elif isinstance(node, ast.Call) and called_name(node) in DYNAMIC_IMPORTERS and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.name(arg.value, node.lineno)
            else:
                dynamic = True
    if dynamic:  # the registry's strings: in the module, or in a table it imports
        trees = [tree, *(parse(m) for m in sorted(found.modules) if m in package_modules())]
        named = {m.group(1) for t in trees for n in ast.walk(t) if isinstance(n, ast.Constant)
                 and isinstance(n.value, str) and (m := MODULE_STRING.match(n.value))}
        # pkgutil.iter_modules in a module (the model registry's discovery of family files)
        # reaches every module of that module's own package.
        if any(isinstance(n, ast.Call) and called_name(n) == "iter_modules"
               for n in ast.walk(tree)):
            own = module.rsplit(".", 1)[0]
            named |= {m for m in package_modules() if m.rsplit(".", 1)[0] == own}
        named = {n for n in named if n in package_modules()}
        if not named:
            found.problems.append(f"{found.where}: imports a computed module name and names no "
                                  f"{PACKAGE} module in a string: this test cannot follow it")
        found.modules |= named
    return found


# --- cli.py: what runs for one stage ------------------------------------------------------------

UNKNOWN = object()


class CliRun:
    """Imports in the cli functions that run for ``visionpipe <stage>`` (see the docstring)."""

    def __init__(self, stage: str, tree: ast.Module | None = None):
        self.tree = tree or parse(CLI)
        self.functions = {n.name: n for n in self.tree.body
                          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        self.constants = {}
        for n in self.tree.body:
            if isinstance(n, ast.Assign) and len(n.targets) == 1 \
                    and isinstance(n.targets[0], ast.Name):
                with contextlib.suppress(ValueError):
                    self.constants[n.targets[0].id] = ast.literal_eval(n.value)
        self.namespace = {"stage": stage}  # what parse_args returns, as far as we know it
        self.imports = Imports(f"src/{PACKAGE}/cli.py ({stage})")
        self.seen: set[str] = set()
        self.called: list[str] = []
        self.function(ENTRY, [])

    def function(self, name: str, values: list) -> None:
        node = self.functions[name]
        key = f"{name}{values!r}"
        if key in self.seen:
            return
        self.seen.add(key)
        self.called.append(name)
        params = node.args.posonlyargs + node.args.args
        env = {a.arg: v for a, v in zip(params, values, strict=False)}
        self.block(node.body, env)

    def block(self, statements: list[ast.stmt], env: dict) -> bool:
        """Run through ``statements``; True when they always return or raise."""
        for stmt in statements:
            if isinstance(stmt, ast.If):
                if is_type_checking(stmt.test):
                    taken = [stmt.orelse]
                else:
                    self.scan(stmt.test, env)
                    test = self.value(stmt.test, env)
                    taken = [stmt.body, stmt.orelse] if test is UNKNOWN else \
                        [stmt.body] if test else [stmt.orelse]
                # A list, not a generator: every branch taken must be walked.
                if all([self.block(branch, env) for branch in taken]):
                    return True
            elif isinstance(stmt, (ast.Return, ast.Raise)):
                self.scan(stmt, env)
                return True
            elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
                self.imports.statement(stmt, CLI)
            elif isinstance(stmt, ast.Assign):
                self.scan(stmt.value, env)
                for target in stmt.targets:
                    if isinstance(target, ast.Name):
                        env[target.id] = self.value(stmt.value, env)
            elif isinstance(stmt, ast.Try):
                self.block(stmt.body, env)
                for handler in stmt.handlers:
                    self.block(handler.body, env)
                self.block(stmt.orelse, env)
                if self.block(stmt.finalbody, env):
                    return True
            elif isinstance(stmt, (ast.With, ast.AsyncWith)):
                for item in stmt.items:
                    self.scan(item.context_expr, env)
                if self.block(stmt.body, env):
                    return True
            elif isinstance(stmt, (ast.For, ast.AsyncFor, ast.While)):
                self.scan(stmt.iter if not isinstance(stmt, ast.While) else stmt.test, env)
                self.block(stmt.body, env)
                self.block(stmt.orelse, env)
            else:  # expressions, nested defs, anything else: every call and import in it
                self.scan(stmt, env)
        return False

    def scan(self, node: ast.AST, env: dict) -> None:
        """Follow the cli-function calls and dynamic imports in ``node``."""
        for sub in walk_runtime(node):
            if isinstance(sub, (ast.Import, ast.ImportFrom)):
                self.imports.statement(sub, CLI)
            if not isinstance(sub, ast.Call):
                continue
            if isinstance(sub.func, ast.Name) and sub.func.id in self.functions:
                self.function(sub.func.id, [self.value(a, env) for a in sub.args])
            elif called_name(sub) in DYNAMIC_IMPORTERS and sub.args:
                name = self.value(sub.args[0], env)
                if isinstance(name, str):
                    self.imports.name(name, sub.lineno)
                else:
                    self.imports.problems.append(
                        f"src/{PACKAGE}/cli.py:{sub.lineno}: cannot tell which module "
                        f"{ast.unparse(sub)} imports")

    def value(self, node: ast.expr, env: dict):
        """The value of ``node`` where it follows from the stage and cli's constants."""
        try:
            return self._value(node, env)
        except (TypeError, KeyError, IndexError, ValueError, AttributeError):
            # a subscript or comparison that fails: not known statically
            return UNKNOWN

    def _value(self, node, env):
        v = self.value
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return env.get(node.id, self.constants.get(node.id, UNKNOWN))
        if isinstance(node, ast.Attribute):
            base = v(node.value, env)
            return base.get(node.attr, UNKNOWN) if isinstance(base, dict) and base is \
                self.namespace else UNKNOWN
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Attribute) and node.func.attr == "parse_args":
                return self.namespace
            return UNKNOWN
        if isinstance(node, ast.Dict):
            out = {}
            for key, item in zip(node.keys, node.values, strict=True):
                item = v(item, env)
                if key is None and isinstance(item, dict):
                    out.update(item)
                    continue
                key = v(key, env) if key is not None else UNKNOWN
                if key is UNKNOWN or item is UNKNOWN:
                    return UNKNOWN
                out[key] = item
            return out
        if isinstance(node, (ast.Tuple, ast.List)):
            items = [v(e, env) for e in node.elts]
            return UNKNOWN if any(i is UNKNOWN for i in items) else tuple(items)
        if isinstance(node, ast.Subscript):
            base, index = v(node.value, env), v(node.slice, env)
            return UNKNOWN if UNKNOWN in (base, index) or base is self.namespace \
                else base[index]
        if isinstance(node, ast.JoinedStr):
            parts = []
            for part in node.values:
                if isinstance(part, ast.FormattedValue):
                    if part.conversion != -1 or part.format_spec is not None:
                        return UNKNOWN
                    part = v(part.value, env)
                    if part is UNKNOWN:
                        return UNKNOWN
                    parts.append(str(part))
                else:
                    parts.append(part.value)
            return "".join(parts)
        if isinstance(node, ast.Compare) and len(node.ops) == 1:
            left, right = v(node.left, env), v(node.comparators[0], env)
            if UNKNOWN in (left, right) or self.namespace in (left, right):
                return UNKNOWN
            op = type(node.ops[0])
            return {ast.Eq: lambda: left == right, ast.NotEq: lambda: left != right,
                    ast.In: lambda: left in right, ast.NotIn: lambda: left not in right,
                    ast.Is: lambda: left is right, ast.IsNot: lambda: left is not right,
                    }.get(op, lambda: UNKNOWN)()
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            operand = v(node.operand, env)
            return UNKNOWN if operand is UNKNOWN else not operand
        if isinstance(node, ast.BoolOp):
            values = [v(e, env) for e in node.values]
            decided = [bool(x) for x in values if x is not UNKNOWN]
            if isinstance(node.op, ast.And):
                return False if False in decided else UNKNOWN if UNKNOWN in values else True
            return True if True in decided else UNKNOWN if UNKNOWN in values else False
        return UNKNOWN


def cli_module_level_imports() -> Imports:
    """cli.py's imports outside its functions (they run whatever the command)."""
    found = Imports(f"src/{PACKAGE}/cli.py")
    stack = list(parse(CLI).body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.statement(node, CLI)
        stack.extend(ast.iter_child_nodes(node))
    return found


# --- a stage's closure ------------------------------------------------------------------------

@cache
def data_files() -> list[Path]:
    return sorted(p for p in (SRC / PACKAGE).rglob("*") if p.is_file()
                  and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts)


@cache
def named_data_files(module: str) -> set[Path]:
    """Package data files that ``module`` names in a string constant."""
    strings = {n.value for n in ast.walk(parse(module))
               if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    folder = package_modules()[module].parent
    found = set()
    for path in data_files():
        names = {path.name}
        if path.is_relative_to(folder):
            names.add(path.relative_to(folder).as_posix())
            names.update(path.relative_to(folder).parts[:-1])  # a folder of data files it reads
        if names & strings:
            found.add(path)
    return found


def stage_closure(stage: str) -> tuple[list[str], list[str], list[str]]:
    """(sorted src/ paths, the cli functions that run, problems) for ``visionpipe <stage>``."""
    run = CliRun(stage)
    top = cli_module_level_imports()
    problems = run.imports.problems + top.problems
    if f"{PACKAGE}.stages.{stage}" not in run.imports.modules:
        problems.append(f"cli.py no longer imports {PACKAGE}.stages.{stage} where this test "
                        f"looks for it (functions that ran: {', '.join(run.called)})")
    todo = [CLI, *run.imports.modules, *top.modules]
    reached: set[str] = set()
    while todo:
        module = todo.pop()
        for name in with_parents(module):
            if name in reached:
                continue
            reached.add(name)
            if name != CLI:  # cli.py is walked per stage above, not whole
                found = module_imports(name)
                problems += found.problems
                todo.extend(found.modules)
    files = {package_modules()[m] for m in reached if not (is_package(m) and runs_nothing(m))}
    for module in reached:
        files |= named_data_files(module)
    return sorted(p.relative_to(ROOT).as_posix() for p in files), run.called, problems


# --- dvc.yaml ---------------------------------------------------------------------------------

@cache
def dvc_yaml() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


def pipeline_stages() -> dict[str, dict]:
    """Stage name -> its definition (the ``do`` of a foreach), in dvc.yaml's order."""
    return {name: spec.get("do", spec) for name, spec in dvc_yaml()["stages"].items()}


def listed_files(entry: str) -> set[str]:
    """What a deps entry covers: the file, or every .py under a folder."""
    path = ROOT / entry
    if path.is_dir():
        return {p.relative_to(ROOT).as_posix() for p in path.rglob("*.py")
                if "__pycache__" not in p.parts}
    return {entry} if path.is_file() else set()


def test_every_stage_runs_its_cli_command():
    stages = pipeline_stages()
    assert list(stages) == ["prepare", "augment", "train", "evaluate", "export"]
    for name, spec in stages.items():
        assert spec["cmd"].split()[:2] == [PACKAGE, name], spec["cmd"]


def test_closure_follows_the_code():
    """Spot checks of the walk itself (a failure here is this test's fault, not dvc.yaml's)."""
    assert f"{PACKAGE}.cli" == CLI and ENTRY in CliRun("prepare").functions
    prepare, _, _ = stage_closure("prepare")
    assert {f"src/{PACKAGE}/cli.py", f"src/{PACKAGE}/stages/prepare.py"} <= set(prepare)
    assert not {f"src/{PACKAGE}/stages/train.py", f"src/{PACKAGE}/data/augment.py"} & set(prepare)
    for stage in pipeline_stages():
        closure, called, _ = stage_closure(stage)
        assert f"src/{PACKAGE}/stages/{stage}.py" in closure
        # Other commands' code runs for no stage.
        assert not {"predict", "benchmark", "summary", "replay_run"} & set(called), called
        assert not {f"src/{PACKAGE}/predict.py", f"src/{PACKAGE}/benchmark.py"} & set(closure)


SAMPLE_CLI = '''
STAGES = {"prepare": ("task", "..."), "train": ("model", "...")}
COMMANDS = {"predict": ("model", "...")}

def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run_stage(args)
    except KeyError:
        return 2

def build_parser():
    import visionpipe.on_every_path

def run_stage(args):
    if args.stage == "predict":
        predict(args)
        return
    kind = {**STAGES, **COMMANDS}[args.stage][0]
    if kind == "model":
        import visionpipe.only_for_models
    if undecidable():
        import visionpipe.maybe
    else:
        import visionpipe.otherwise as o
    import_module(f"visionpipe.stages.{args.stage}")

def predict(args):
    import visionpipe.predict_only
'''


def test_cli_walk_takes_the_branches_a_stage_takes():
    """The evaluator on a small cli: decided ifs take one branch, undecidable ones both."""
    tree = ast.parse(SAMPLE_CLI)
    prepare, train = CliRun("prepare", tree), CliRun("train", tree)
    common = {f"{PACKAGE}.on_every_path", f"{PACKAGE}.maybe", f"{PACKAGE}.otherwise"}
    assert prepare.imports.requested == common | {f"{PACKAGE}.stages.prepare"}
    assert train.imports.requested == common | {f"{PACKAGE}.only_for_models",
                                                f"{PACKAGE}.stages.train"}
    assert prepare.called == ["main", "build_parser", "run_stage"]


def test_src_deps_are_each_stages_import_closure():
    report = []
    for name, spec in pipeline_stages().items():
        closure, _, problems = stage_closure(name)
        entries = [d for d in spec.get("deps", []) if isinstance(d, str) and d.startswith("src/")]
        covered = set().union(*map(listed_files, entries)) if entries else set()
        missing = sorted(set(closure) - covered)
        extra = sorted(covered - set(closure))
        add = [p for p in closure if p not in entries]
        remove = [e for e in entries if e not in closure]
        if not (problems or add or remove):
            continue
        lines = [f"{name}:"]
        lines += [f"  cannot follow: {p}" for p in problems]
        if missing:
            lines.append(f"  imported but not a dep: {', '.join(missing)}")
        if extra:
            lines.append(f"  a dep but never imported: {', '.join(extra)}")
        if add:
            lines += ["  add:"] + [f"        - {p}" for p in add]
        if remove:
            lines += ["  remove:"] + [f"        - {e}" for e in remove]
        lines += [f"  {name}'s src deps, whole (sorted):"] + [f"        - {p}" for p in closure]
        report.append("\n".join(lines))
    assert not report, ("dvc.yaml deps differ from the stages' import closures "
                        "(tests/unit/test_dvc_deps.py):\n" + "\n".join(report))


def test_src_deps_are_sorted():
    for name, spec in pipeline_stages().items():
        entries = [d for d in spec.get("deps", []) if isinstance(d, str) and d.startswith("src/")]
        assert entries == sorted(entries), f"{name}: src deps not sorted: {entries}"


HISTORY = re.compile(r"^reports/train/([^/]+)/history\.csv$")


def test_comparison_plots_list_every_model_of_their_task():
    models = yaml.safe_load((ROOT / "params.yaml").read_text())["models"]
    tasks = {name: spec["task"] for name, spec in models.items()}
    charted: dict[str, int] = {}
    problems = []
    for plot in dvc_yaml().get("plots", []):
        (title, spec), = plot.items() if isinstance(plot, dict) else ((plot, {}),)
        spec = spec or {}
        files = list(spec["y"]) if isinstance(spec.get("y"), dict) else [title]
        shown = {m.group(1) for f in files if (m := HISTORY.match(f))}
        if not shown:
            continue
        unknown = sorted(shown - set(tasks))
        if unknown:
            problems.append(f"'{title}': {', '.join(unknown)} not in params.yaml models")
        task = title.split(":")[0].strip()
        if task not in tasks.values():
            known = {tasks[m] for m in shown if m in tasks}
            if len(known) != 1:
                problems.append(f"'{title}': cannot tell its task (models of {sorted(known)})")
                continue
            task = known.pop()
        charted[task] = charted.get(task, 0) + 1
        for model in sorted(m for m, t in tasks.items() if t == task and m not in shown):
            problems.append(f"'{title}': model {model} (task {task}) missing: add "
                            f"reports/train/{model}/history.csv")
        for model in sorted(m for m in shown if m in tasks and tasks[m] != task):
            problems.append(f"'{title}': model {model} is task {tasks[model]}, not {task}")
    for task in sorted(set(tasks.values()) - set(charted)):
        names = ", ".join(m for m, t in tasks.items() if t == task)
        problems.append(f"task {task} (models {names}) has no comparison chart under plots:")
    assert not problems, "dvc.yaml plots:\n" + "\n".join(problems)
