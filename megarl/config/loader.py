"""YAML / dict / CLI text → the typed config tree, with every problem reported by field name.

Checks done here (per field, from the dataclass types): unknown keys (with close-match suggestions),
wrong types, values outside a `Literal[...]` enum. Relations between fields are checked afterwards by
`megarl.config.validate`. All problems are collected and raised together as one `ConfigError`.

Values from YAML keep their YAML type (a string is never silently turned into an int), with one
exception: PyYAML reads `1e-6` as a string (YAML 1.1 wants `1.0e-6`), so a float field accepts a
string that is a valid float literal. Values from the command line are text and are parsed by the
field's type: `true/false`, numbers, `null`, lists as `[a,b]` or `a,b`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Literal, Union

import yaml

_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^[+-]?(inf|nan)$", re.IGNORECASE)
_NULL_TEXT = {"null", "none", "~"}
_TRUE_TEXT = {"true", "yes", "on", "1"}
_FALSE_TEXT = {"false", "no", "off", "0"}


class ConfigError(ValueError):
    """One or more problems in a config; `.errors` lists them, each starting with the field name."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        lines = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(f"invalid config ({len(self.errors)} problem{'s' * (len(self.errors) != 1)}):\n{lines}")


class CliText(str):
    """A value typed on the command line: parsed according to the target field's type."""


def _type_hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if tp is bool:
        return "a boolean (true/false)"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list (items: {_describe(typing.get_args(tp)[0])})"
    if origin in (Union, types.UnionType):
        parts = [_describe(a) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in typing.get_args(tp) else "")
    if dataclasses.is_dataclass(tp):
        return "a mapping (section)"
    return str(tp)


class _Invalid(Exception):
    """Raised inside coercion; carries the message (without the field name)."""


def _coerce(value: Any, tp, where: str, errors: list[str]) -> Any:
    """Convert `value` to type `tp`; record problems in `errors` (prefixed by `where`)."""
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
            return tp()
        return _build(tp, value, where, errors)
    try:
        return _coerce_leaf(value, tp, where, errors)
    except _Invalid as exc:
        errors.append(f"{where}: {exc}")
        return None


def _coerce_leaf(value: Any, tp, where: str, errors: list[str]) -> Any:
    origin = typing.get_origin(tp)
    is_text = isinstance(value, CliText)
    got = f"got {str(value)!r}" if is_text else f"got {value!r} ({type(value).__name__})"

    if origin in (Union, types.UnionType):
        members = typing.get_args(tp)
        if type(None) in members and (value is None or (is_text and value.strip().lower() in _NULL_TEXT)):
            return None
        members = [m for m in members if m is not type(None)]
        if is_text and value.strip().startswith("["):  # `[a,b]` on the command line means the list member
            members.sort(key=lambda m: typing.get_origin(m) is not list)
        for member in members:
            trial: list[str] = []
            try:
                result = _coerce(value, member, where, trial)
            except _Invalid:
                continue
            if not trial:
                return result
        raise _Invalid(f"expected {_describe(tp)}, {got}")

    if value is None:
        raise _Invalid(f"expected {_describe(tp)}, got null")

    if origin is Literal:
        options = typing.get_args(tp)
        if value in options:
            return str(value) if is_text else value
        hint = difflib.get_close_matches(str(value), [str(o) for o in options], n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise _Invalid(f"{str(value)!r} is not {_describe(tp)}{suggestion}")

    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if is_text:
            inner = value.strip()
            if inner.startswith("[") and inner.endswith("]"):
                inner = inner[1:-1]
            items = [CliText(p.strip().strip("'\"")) for p in inner.split(",") if p.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            items = [value]  # a single value where a list is expected: a list of one
        out = []
        for i, item in enumerate(items):
            out.append(_coerce(item, item_tp, f"{where}[{i}]", errors))
        return out

    if tp is bool:
        if is_text:
            low = value.strip().lower()
            if low in _TRUE_TEXT:
                return True
            if low in _FALSE_TEXT:
                return False
        elif isinstance(value, bool):
            return value
        raise _Invalid(f"expected {_describe(tp)}, {got}")

    if tp is int:
        if is_text:
            try:
                return int(value.strip())
            except ValueError:
                raise _Invalid(f"expected {_describe(tp)}, {got}") from None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Invalid(f"expected {_describe(tp)}, {got}")

    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Invalid(f"expected {_describe(tp)}, {got}")

    if tp is str:
        if isinstance(value, str):
            return str(value)
        raise _Invalid(f"expected {_describe(tp)}, {got}")

    raise TypeError(f"{where}: unsupported config field type {tp!r}")  # a bug in the schema, not the input


def _build(cls, data: dict, where: str, errors: list[str]):
    hints = _type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in hints or key not in names:
            close = difflib.get_close_matches(str(key), names, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            section = f"'{where}'" if where else "the top level"
            errors.append(f"{path}: unknown key{hint} (keys of {section}: {', '.join(names)})")
            continue
        kwargs[key] = _coerce(value, hints[key], path, errors)
    return cls(**kwargs)


def from_dict(cls, data: dict | None):
    """Build `cls` (a config dataclass) from nested plain data; raises ConfigError naming each field."""
    errors: list[str] = []
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"<root>: expected a mapping of sections, got {type(data).__name__}"])
    result = _build(cls, data, "", errors)
    if errors:
        raise ConfigError(errors)
    return result


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


class _RecipeDumper(yaml.SafeDumper):
    """Sections as block mappings, lists inline (`logger: [console, tensorboard]`), like the recipes."""


_RecipeDumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True))


def to_yaml(cfg) -> str:
    return yaml.dump(to_dict(cfg), Dumper=_RecipeDumper, sort_keys=False, default_flow_style=False, width=120)


def read_yaml(path: str) -> dict:
    with open(path) as f:
        data = yaml.safe_load(f)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}"])
    return data


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """data["a"]["b"]["c"] = value for dotted = "a.b.c" (creating the intermediate mappings)."""
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[keys[-1]] = value


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out
