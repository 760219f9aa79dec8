"""Reading params.yaml, and pydantic's validation errors as one line naming the key.

Every error reads ``params.yaml: <dotted key> = <value found>: expected <what is allowed>``,
or ``<dotted key>: unknown key; did you mean ...? known: ...``. What is allowed is described
from the field's JSON Schema, so the message and the schema editors see never disagree.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from visionpipe.config import families
from visionpipe.config.rules import check_params, short_repr
from visionpipe.config.schema import PARAMS, Params
from visionpipe.errors import ParamsError


def parse_params(data: Any) -> Params:
    """Validate a loaded params mapping (architecture sections are checked by the registry)."""
    if data is None:  # an empty file: every default
        data = {}
    try:
        params = PARAMS.validate_python(data)
    except ValidationError as exc:
        raise ParamsError(error_line(exc, data, PARAMS.json_schema())) from None
    check_params(params)
    return params


def parse_dataclass(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` (pydantic, or stdlib with spec fields) from a mapping.

    Unknown and missing keys, wrong types and out-of-range values are a ParamsError naming
    ``path`` + the key.
    """
    if data is None:
        data = {}
    adapter = families.validator(cls)
    try:
        validated = adapter.validate_python(data)
    except ValidationError as exc:
        raise ParamsError(error_line(exc, data, _schema(cls), path)) from None
    return families.rebuild(cls, validated)


@functools.cache
def _schema(cls: type) -> dict:
    return families.validator(cls).json_schema()


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; every problem is a ParamsError naming the key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found; run visionpipe from the project root "
                          "or pass --params") from None
    except UnicodeDecodeError as exc:
        raise ParamsError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at "
                          f"position {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise ParamsError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: builds plain data only
    except _DuplicateKey as exc:
        raise ParamsError(f"{path}: line {exc.line}: key {short_repr(exc.key)} appears twice in "
                          f"one mapping (first at line {exc.first}); YAML would keep only the "
                          "last one, so delete or rename one of them") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ParamsError(f"{path}: YAML syntax error{where}: {problem}") from None
    if _size(data, MAX_VALUES) > MAX_VALUES:
        raise ParamsError(f"{path}: holds more than {MAX_VALUES} values once its anchors and "
                          "aliases (&name, *name) are expanded; params.yaml needs a few "
                          "hundred, so write the values out or remove the repeated aliases")
    try:
        return parse_params(data)
    except ParamsError as exc:
        raise ParamsError(str(exc).replace("params.yaml:", f"{path}:", 1)) from None


# The most values (keys, values and list items) params.yaml may expand to: the default file
# holds 726, and a few lines of nested aliases can expand to billions.
MAX_VALUES = 100_000


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.line, self.first = key, line, first


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (YAML
    1.2 forbids it; PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(key, line, seen[key])
                seen[key] = line
            except TypeError:  # an unhashable key: the base class reports it
                break
        return super().construct_mapping(node, deep)


def _size(data: Any, limit: int) -> int:
    """How many values ``data`` holds, counting each alias's values again, but stopping once
    past ``limit`` (so a billion-value alias bomb costs ``limit`` steps)."""
    count, stack = 0, [data]
    while stack and count <= limit:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return count


# --------------------------------------------------------------------------- error lines


def error_line(exc: ValidationError, data: Any, schema: dict, prefix: str = "") -> str:
    """pydantic's first error as one line: the dotted key, the value and what is allowed."""
    err = exc.errors()[0]
    steps, value, kind = _locate(err, data)
    path = _dotted(prefix, steps)
    shown = path or "(top level)"
    if kind == "missing":
        node = _schema_at(schema, steps)
        return f"params.yaml: {shown}: missing; expected {_describe(schema, node)}"
    if kind in ("unknown", "key"):
        parent = _schema_at(schema, steps[:-1])
        known = _known_keys(schema, parent)
        key = steps[-1][0]
        if known is None:  # a free mapping (model names, mask values): only the key's type
            allowed = (_describe(schema, _resolve(schema, parent).get("propertyNames"))
                       or _pydantic_wants(err))
            return f"params.yaml: {shown}: key {key!r} is not allowed: expected {allowed}"
        close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
        hint = f" did you mean {close[0]}?" if close else ""
        return f"params.yaml: {shown}: unknown key;{hint} known: {', '.join(known)}"
    bound = _violated_bound(err)
    if bound and steps and steps[-1][1]:
        # An item of a list out of range: the message shows the whole list, as it is one key.
        steps, bound = steps[:-1], f"every value {bound}"
        value = _value_at(data, steps)
        shown = _dotted(prefix, steps) or "(top level)"
    node = _schema_at(schema, steps)
    if bound:
        allowed = bound if bound.startswith("every") else f"a value {bound}"
    elif err["type"] in ("too_short", "too_long"):
        ctx = err.get("ctx", {})
        allowed = (f"at least {ctx['min_length']} item(s)" if err["type"] == "too_short"
                   else f"at most {ctx['max_length']} item(s)")
    else:
        allowed = _describe(schema, node) or _pydantic_wants(err)
        if err["type"] == "finite_number":
            allowed = allowed.replace("a number", "a finite number", 1)
    shown_value = short_repr(_as_parsed(schema, node, value))
    return f"params.yaml: {shown} = {shown_value}: expected {allowed}"


_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="),
           "less_than": ("lt", "<"), "less_than_equal": ("le", "<=")}


def _violated_bound(err: dict) -> str:
    """'>= 1' for a value below its minimum of 1, '' for errors other than a range's."""
    if err["type"] not in _BOUNDS:
        return ""
    key, sign = _BOUNDS[err["type"]]
    bound = err.get("ctx", {}).get(key)
    if isinstance(bound, float) and bound.is_integer():
        bound = int(bound)  # pydantic makes a float field's bound 1.0; the schema says 1
    return f"{sign} {bound}"


def _value_at(data: Any, steps: list[tuple[Any, bool]]) -> Any:
    for key, _ in steps:
        data = data[key]
    return data


def _as_parsed(root: dict, node: dict, value: Any) -> Any:
    """``value`` as the config holds it (an integer given for a number is a float), so the
    message shows what the checks saw."""
    kinds = {m.get("type") for m in _members(root, node)}
    if "number" in kinds and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if "array" in kinds and isinstance(value, (list, tuple)):
        array = next(m for m in _members(root, node) if m.get("type") == "array")
        items = array.get("prefixItems") or []
        return [_as_parsed(root, items[i] if i < len(items) else array.get("items") or {}, v)
                for i, v in enumerate(value)]
    return value


def _pydantic_wants(err: dict) -> str:
    """pydantic's own words for what is allowed ("Input should be a valid integer")."""
    msg = err["msg"]
    return msg.removeprefix("Input should be ").removeprefix("Value error, ")


def _locate(err: dict, data: Any) -> tuple[list[tuple[Any, bool]], Any, str]:
    """Follow pydantic's error location through the data.

    Returns the steps (key, is_list_index) to the value at fault, that value, and the kind
    of error: "missing", "unknown" (an extra key), "key" (a key of the wrong type or name)
    or "value". Parts of the location that are not in the data are union members' names
    (``bool``, ``literal['auto']``) or a missing tuple item: the value found so far is at fault.
    """
    loc = err["loc"]
    node, steps = data, []
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if part == "[key]":
            return steps, node, "key"
        if isinstance(node, Mapping) and not _has(node, part):
            # A key that is not text (YAML reads `? ` and `~:` as None, `1:` as an int):
            # pydantic's location names it as str(key).
            part = next((k for k in node if not isinstance(k, str) and str(k) == part), part)
        if isinstance(node, Mapping) and _has(node, part):
            steps.append((part, False))
            node = node[part]
        elif (isinstance(node, (list, tuple)) and isinstance(part, int)
              and not isinstance(part, bool) and 0 <= part < len(node)):
            steps.append((part, True))
            node = node[part]
        elif err["type"] == "missing" and last and isinstance(node, Mapping):
            steps.append((part, False))
            return steps, None, "missing"
    if err["type"] in ("unexpected_keyword_argument", "invalid_key"):  # invalid: not a string
        return steps, node, "unknown"
    return steps, node, "value"


def _has(mapping: Mapping, key: Any) -> bool:
    try:
        return key in mapping
    except TypeError:  # an unhashable location part
        return False


def _dotted(prefix: str, steps: list[tuple[Any, bool]]) -> str:
    out = prefix
    for key, is_index in steps:
        if not is_index and not (isinstance(key, str) and key.isprintable() and key.strip()):
            key = repr(key) if isinstance(key, str) else key  # keep the message one line
        out = f"{out}[{key}]" if is_index else (f"{out}.{key}" if out else str(key))
    return out


def _resolve(root: dict, node: dict | None) -> dict:
    """``node`` with a ``$ref`` into the root's ``$defs`` followed."""
    while isinstance(node, dict) and "$ref" in node:
        node = root["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    return node if isinstance(node, dict) else {}


def _members(root: dict, node: dict | None) -> list[dict]:
    """The alternatives of a union node (the node itself when it is not one)."""
    node = _resolve(root, node)
    if "anyOf" in node:
        return [m for alt in node["anyOf"] for m in _members(root, alt)]
    return [node]


def _schema_at(root: dict, steps: list[tuple[Any, bool]]) -> dict:
    """The schema node of the value at ``steps`` ({} when it cannot be followed)."""
    node: dict = root
    for key, is_index in steps:
        found: dict | None = None
        for member in _members(root, node):
            if is_index and member.get("type") == "array":
                items = member.get("prefixItems", [])
                found = items[key] if key < len(items) else member.get("items")
            elif not is_index and member.get("type") == "object":
                found = member.get("properties", {}).get(str(key))
                if found is None and isinstance(member.get("additionalProperties"), dict):
                    found = member["additionalProperties"]
            if found is not None:
                break
        if found is None:
            return {}
        node = found
    return node


def _known_keys(root: dict, node: dict) -> list[str] | None:
    """The keys a mapping node allows, in schema order; None for a mapping of free keys."""
    for member in _members(root, node):
        if "properties" in member:
            return list(member["properties"])
        names = _resolve(root, member.get("propertyNames"))
        if "enum" in names:
            return [str(v) for v in names["enum"]]
    return None


def _bounds(node: dict) -> str:
    parts = [f"{sign} {node[key]}" for key, sign in
             (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="),
              ("exclusiveMaximum", "<")) if key in node]
    return (" " + " and ".join(parts)) if parts else ""


def _describe(root: dict, node: dict | None) -> str:
    """What a schema node allows, in words: 'an integer >= 1 and <= 10', 'one of ...'."""
    if not node:
        return ""
    alternatives = _members(root, node)
    if len(alternatives) > 1:
        return " or ".join(_describe(root, alt) for alt in alternatives)
    node = alternatives[0]
    kind = node.get("type")
    if "enum" in node:
        return "one of " + ", ".join(repr(v) for v in node["enum"])
    if "const" in node:
        return f"one of {node['const']!r}"
    if kind == "null":
        return "null"
    if kind == "boolean":
        return "true or false"
    if kind == "integer":
        return "an integer" + _bounds(node)
    if kind == "number":
        return "a number" + _bounds(node)
    if kind == "string":
        return "a non-empty string" if node.get("minLength") else "a string"
    if kind == "array":
        items = node.get("prefixItems")
        if items:
            each = {_describe(root, item) for item in items}
            what = f"a list of {len(items)} values"
            return f"{what}, each {each.pop()}" if len(each) == 1 else what
        count = ""
        if "minItems" in node:
            count = f" of at least {node['minItems']}"
        if "maxItems" in node:
            count += f"{' and' if count else ' of'} at most {node['maxItems']}"
        return f"a list{count} values, each {_describe(root, node.get('items'))}"
    if kind == "object":
        keys = _known_keys(root, node)
        return "a mapping with keys " + ", ".join(keys) if keys else "a mapping"
    return ""
