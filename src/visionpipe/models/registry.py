"""Model registry: family name -> builder, so stages never branch on a model's name."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from visionpipe.config import parse_dataclass
from visionpipe.errors import ModelError, ParamsError


@dataclass(frozen=True)
class Family:
    """A registered model family: its builder, its task, the dataclass of its params, and a
    tiny preset: the smallest architecture (and an input size it accepts) that builds and trains
    in seconds, so tests cover every family without naming any."""

    name: str
    task: str
    params: type
    builder: Callable[..., Any]
    tiny: Mapping[str, Any]
    tiny_input: tuple[int, int] = (32, 32)
    # What the family hands its task (the task's Hooks class, e.g. a detector's losses and
    # decoding); None for models that Keras' compile and predict serve as they are.
    hooks: Any = None
    # Why the family trains in float32 only (precision: auto gives it float32, a mixed policy
    # is refused: visionpipe.training.resolve_precision); None: any precision.
    float32_only: str | None = None
    # Why precision auto keeps float32 for the family on a CPU with native bfloat16 maths
    # (measured no faster there in bfloat16, or faster at lower quality: `visionpipe
    # benchmark`'s precision section);
    # None: auto picks mixed_bfloat16 on such a CPU.
    cpu_float32: str | None = None
    # Why params' threads auto runs the family with one thread per op and as many ops at once
    # as there are cores on a small CPU-only machine (measured faster there: visionpipe.
    # training.resolve_threads); None: auto leaves the counts to TensorFlow.
    one_thread_per_op: str | None = None


_FAMILIES: dict[str, Family] = {}


def register(name: str, *, task: str, params: type, tiny: Mapping[str, Any],
             tiny_input: tuple[int, int] = (32, 32), hooks: Any = None,
             float32_only: str | None = None, cpu_float32: str | None = None,
             one_thread_per_op: str | None = None) -> Callable:
    """Register ``builder(input_shape, num_classes, p)`` as family ``name``; ``tiny`` is the
    architecture tests build (on ``tiny_input`` images), required so no family goes untested."""
    if not dataclasses.is_dataclass(params):
        raise TypeError(f"params of family {name} must be a dataclass")

    def wrap(builder: Callable) -> Callable:
        _FAMILIES[name] = Family(name=name, task=task, params=params, builder=builder,
                                 tiny=dict(tiny), tiny_input=tuple(tiny_input), hooks=hooks,
                                 float32_only=float32_only, cpu_float32=cpu_float32,
                                 one_thread_per_op=one_thread_per_op)
        return builder

    return wrap


def _load_families() -> None:
    """Import every module of visionpipe.models: the families' @register decorators run, so a
    new family is one new file there (docs/extending.md)."""
    import importlib
    import pkgutil

    import visionpipe.models as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")


def known_families() -> list[str]:
    """Names of every registered family."""
    _load_families()
    return sorted(_FAMILIES)


def get_family(name: str) -> Family:
    """The family ``name``; an unknown name lists the known ones."""
    _load_families()
    if name not in _FAMILIES:
        raise ModelError(f"unknown model family '{name}'; known families: "
                         + ", ".join(known_families()))
    return _FAMILIES[name]


def parse_architecture(family: str, data: Mapping, path: str) -> Any:
    """Validate ``models.<name>.architecture`` against the family's params dataclass."""
    fam = parse_family(family, f"{path.rsplit('.', 1)[0]}.family")
    params = parse_dataclass(fam.params, data, path)
    # Checks across fields (e.g. resnet depth vs variant) a per-field spec cannot express.
    if callable(getattr(params, "validate", None)):
        params.validate(path)
    return params


def validate_architectures(params) -> None:
    """Check every ``models.<name>`` family and architecture; raises ParamsError on the first."""
    for name, cfg in params.models.items():
        fam = parse_family(cfg.family, f"models.{name}.family")
        if fam.task != cfg.task:
            raise ParamsError(f"params.yaml: models.{name}.task = {cfg.task!r}: family "
                              f"'{fam.name}' is a {fam.task} model; set task: {fam.task}")
        parse_architecture(cfg.family, cfg.architecture, f"models.{name}.architecture")


def parse_family(family: str, path: str) -> Family:
    """The family named at params key ``path``; unknown names are a ParamsError."""
    try:
        return get_family(family)
    except ModelError as exc:
        raise ParamsError(f"params.yaml: {path} = {family!r}: {exc}") from None


def create_model(family: str, input_shape: tuple[int, int, int], num_classes: int,
                 architecture: Mapping | Any = None, *, name: str | None = None):
    """Build a model of ``family`` for images of ``input_shape`` and ``num_classes`` classes."""
    fam = get_family(family)
    params = architecture
    if params is None or isinstance(params, Mapping):
        params = parse_architecture(family, params or {}, f"models.{name or family}.architecture")
    return fam.builder(tuple(input_shape), int(num_classes), params)
