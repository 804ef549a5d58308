"""Plain YAML mapped onto dataclasses, with `key=value` overrides.

Every error names the file and the dotted field, so a typo in a job file is found
without reading a traceback.
"""

from __future__ import annotations

import dataclasses
import datetime
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from distkd import storage

T = TypeVar("T")


class ConfigError(ValueError):
    """A config or schema file is wrong; the message names the file and field."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        tagged = _by_kind([a for a in args if a is not type(None)])
        if tagged:  # a section whose `kind:` says which dataclass it is (e.g. objective:)
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: expected a mapping, got {value!r}")
            kind = value.get("kind", next(iter(tagged)))
            if kind not in tagged:
                raise ConfigError(f"{where}.kind: must be one of {list(tagged)}, got {kind!r}")
            return _coerce(value, tagged[kind], where)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be null")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, where): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: must be one of {list(args)}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        # YAML reads an unquoted ISO date (`start: 2026-11-02`) as a date: take it as the text
        # it was written as, so partition bounds need no quotes. A datetime stays an error.
        if type(value) is datetime.date:
            return value.isoformat()
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}")


def coerce(value: Any, tp: Any, where: str) -> Any:
    """`value` as type `tp` (a dataclass, a union of them tagged by `kind:`, a list, ...)."""
    return _coerce(value, tp, where)


def _by_kind(options: list) -> dict[str, type]:
    """{kind: dataclass} when every option is a dataclass with a `kind: Literal[...]` field
    (the first option's kind is the default), else {}."""
    out: dict[str, type] = {}
    for tp in options:
        if not dataclasses.is_dataclass(tp):
            return {}
        hint = typing.get_type_hints(tp).get("kind")
        if typing.get_origin(hint) is not typing.Literal:
            return {}
        out.update({k: tp for k in typing.get_args(hint)})
    return out


def from_dict(cls: type[T], data: dict, where: str) -> T:
    """Build dataclass `cls` from `data`; unknown or missing keys are errors naming `where`."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{where}.{name}" if where else name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required field '{name}'")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if callable(check):
        try:
            check()
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    return obj


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from a local path or a storage URI (s3://…, see distkd.storage)."""

    path = path if storage.is_remote(path) else Path(path)
    try:
        text = storage.read_text(path)
    except storage.StorageError as e:
        raise ConfigError(f"cannot read: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def apply_overrides(data: dict, overrides: list[str], where: str = "override") -> dict:
    """Apply `a.b.c=value` strings; the value is parsed as YAML (numbers, bools, lists)."""
    data = _deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{where}: '{item}' is not key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = _child(node, p, key, where)
        last = parts[-1]
        if isinstance(node, list):
            node[_index(node, last, key, where)] = value
        else:
            node[last] = value
    return data


def _index(node: list, part: str, key: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"{where}: '{key}': '{part}' is not an index of a {len(node)}-item list")
    return int(part)


def _child(node: Any, part: str, key: str, where: str) -> Any:
    """Step into `part` of a mapping (created if missing) or a list (by index)."""
    if isinstance(node, list):
        return node[_index(node, part, key, where)]
    if not isinstance(node, dict):
        raise ConfigError(f"{where}: '{key}': '{part}' is not a mapping")
    child = node.setdefault(part, {})
    if not isinstance(child, (dict, list)):
        raise ConfigError(f"{where}: '{key}': '{part}' is not a mapping")
    return child


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def load(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Load `cls` from a YAML file (or defaults when `path` is None) plus overrides."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return from_dict(cls, data, str(path) if path is not None else "config")


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
