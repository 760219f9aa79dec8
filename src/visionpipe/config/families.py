"""Params declared as stdlib dataclasses with :func:`spec` (the model families' architecture
params in visionpipe.models.*), validated by pydantic like the rest of params.yaml.

A family keeps a plain ``@dataclass`` (no pydantic import in the model files); the first time
one is validated, :func:`validator` builds a pydantic dataclass with the same fields whose
types carry the ``spec`` bounds, with the same strictness as :mod:`visionpipe.config.schema`.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Annotated, Any

import pydantic
from pydantic import Field, Strict, TypeAdapter

from visionpipe.config.schema import CONFIG, Str


def spec(default: Any = dataclasses.MISSING, *, ge=None, gt=None, le=None, lt=None,
         min_len: int | None = None, max_len: int | None = None, factory=None) -> Any:
    """A dataclass field carrying the range a params value must lie in.

    Bounds apply to a number, or to every item of a list; min_len/max_len to a list's length.
    """
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "min_len": min_len, "max_len": max_len}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _bounded(tp: Any, meta: typing.Mapping) -> Any:
    """``tp`` as a strict pydantic type carrying the bounds in ``meta``."""
    bounds = {k: meta[k] for k in ("ge", "gt", "le", "lt") if meta.get(k) is not None}
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return typing.Union[tuple(_bounded(a, meta) for a in typing.get_args(tp))]  # noqa: UP007
    if tp is bool:
        return Annotated[bool, Strict()]
    if tp in (int, float):
        return Annotated[tp, Strict(), Field(**bounds)]
    if tp is str:
        return Str
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            lengths = {"min_length": meta.get("min_len"), "max_length": meta.get("max_len")}
            lengths = {k: v for k, v in lengths.items() if v is not None}
            return Annotated[tuple[_bounded(args[0], meta), ...], Field(**lengths)]
        return tuple[tuple(_bounded(a, meta) for a in args)]
    if origin is dict:
        key, value = typing.get_args(tp)
        return dict[_bounded(key, {}), _bounded(value, {})]
    if dataclasses.is_dataclass(tp) and not hasattr(tp, "__pydantic_fields__"):
        return _mirror(tp)
    return tp  # Literal, a pydantic dataclass, Any


@functools.cache
def _mirror(cls: type) -> type:
    """A pydantic dataclass with the fields, defaults and spec bounds of stdlib dataclass cls."""
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = (dataclasses.field(default_factory=f.default_factory)
                   if f.default_factory is not dataclasses.MISSING
                   else dataclasses.field(default=f.default)
                   if f.default is not dataclasses.MISSING else dataclasses.field())
        fields.append((f.name, _bounded(hints[f.name], f.metadata), default))
    plain = dataclasses.make_dataclass(cls.__name__, fields, frozen=True)
    plain.__doc__ = cls.__doc__
    return pydantic.dataclasses.dataclass(plain, config=CONFIG, frozen=True)


@functools.cache
def validator(cls: type) -> TypeAdapter:
    """The pydantic validator of dataclass ``cls`` (pydantic or stdlib with spec fields)."""
    if hasattr(cls, "__pydantic_fields__"):
        return TypeAdapter(cls)
    return TypeAdapter(_mirror(cls))


def rebuild(cls: type, validated: Any) -> Any:
    """An instance of ``cls`` from what :func:`validator` returned (the same, for pydantic)."""
    if isinstance(validated, cls):
        return validated
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.init:
            value = getattr(validated, f.name)
            if dataclasses.is_dataclass(hints[f.name]) and value is not None:
                value = rebuild(hints[f.name], value)  # a nested stdlib dataclass's mirror
            values[f.name] = value
    return cls(**values)
