"""Config <-> YAML and mappings: a strict loader (unknown keys, wrong types and values outside a Literal are errors),
`--set KEY=VALUE` overrides and the dump; no cross-field checks (those are validation.py's)."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from raygossip.config import Config
from raygossip.errors import UserError

class _YamlLoader(yaml.SafeLoader):
    """yaml.SafeLoader that also reads exponent floats without a dot (1e-3), as YAML 1.2 does."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str):
    """yaml.safe_load semantics (no arbitrary objects), with 1e-3 read as a number."""
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against annotation `tp`; ints are accepted where floats are, nothing else converts."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        candidates = [arg for arg in args if arg is not type(None)]
        for arg in candidates:
            try:
                return _coerce(value, arg, path)
            except UserError as error:
                if len(candidates) == 1:
                    raise error from None
                continue
        raise _type_error(value, tp, path)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if not isinstance(value, str) or value not in allowed:
            raise UserError(path, f"must be one of {', '.join(allowed)}; got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _type_error(value, tp, path)
        return from_dict(tp, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise _type_error(value, tp, path)
        (item_type,) = typing.get_args(tp)
        return [_coerce(item, item_type, f"{path}[{k}]") for k, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(value, tp, path)
        return dict(value)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(value, tp, path)
        if not math.isfinite(value):
            raise UserError(path, f"must be a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(value, tp, path)
        return value
    if tp is bool or tp is str:
        if not isinstance(value, tp):
            raise _type_error(value, tp, path)
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {path}")


def _type_error(value: Any, tp: Any, path: str) -> UserError:
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return UserError(path, f"expected {_type_name(tp)}, got {type(value).__name__} {shown}")


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types are UserErrors."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            shown = str(key).encode("unicode_escape").decode()
            where = f"{path}.{shown}" if path else shown
            raise UserError(where, f"unknown key (allowed in {path or 'the top level'}: {', '.join(names)})")
    kwargs = {key: _coerce(value, hints[key], f"{path}.{key}" if path else key) for key, value in data.items()}
    for f in dataclasses.fields(cls):
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise UserError(f"{path}.{f.name}" if path else f.name, "is required")
    return cls(**kwargs)


def to_dict(config: Any) -> dict:
    """The plain mapping (YAML-ready) of a config dataclass."""
    return dataclasses.asdict(config)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `--set a.b.c=VALUE` overrides (VALUE parsed as YAML) to a raw config mapping."""
    for item in overrides:
        if "=" not in item:
            raise UserError("--set", f"expected KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = parse_yaml(raw) if raw != "" else ""
        except yaml.YAMLError as error:
            raise UserError(f"--set {key}", f"value is not valid YAML: {str(error).splitlines()[0]}") from None
        parts = key.strip().split(".")
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(".".join(parts[: depth + 1]), "is not a section; cannot set a key inside it")
            node = child
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    """Read a YAML config file into a mapping, with one-line errors for missing files and bad YAML."""
    file = Path(path)
    if not file.is_file():
        raise UserError("config", f"no such file: {str(file)!r}")
    try:
        data = parse_yaml(file.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UserError("config", f"{file} is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError("config", f"{file} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def dump_yaml(config: Config) -> str:
    """The config as YAML text that from_dict reads back to an equal config."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def choices(cls: type = Config, path: str = "") -> dict[str, tuple[str, ...]]:
    """{dotted key: allowed values} of every Literal field in the tree under `cls` (lists of sections not entered)."""
    found: dict[str, tuple[str, ...]] = {}
    for name, tp in typing.get_type_hints(cls).items():
        dotted = f"{path}.{name}" if path else name
        if typing.get_origin(tp) is Literal:
            found[dotted] = typing.get_args(tp)
        elif dataclasses.is_dataclass(tp):
            found.update(choices(tp, dotted))
    return found
