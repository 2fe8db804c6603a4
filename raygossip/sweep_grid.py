"""`raygossip sweep`'s grid: --grid items parsed (conditional ones too), expanded into points, and named."""

from __future__ import annotations

import copy
import itertools
import json
from typing import Any, Sequence

import yaml

from raygossip.config_io import apply_overrides, parse_yaml
from raygossip.errors import UserError


def parse_grid(items: Sequence[str]) -> dict[str, list]:
    """`--grid KEY=[v1,v2,...]` (YAML list) items into {KEY: values}, each a one-line error when malformed.
    `KEY@OTHER=VALUE=[...]` is a conditional grid: KEY takes these values only at the points where the grid key
    OTHER is VALUE (e.g. a gamma grid per gossip.rule); its dict key stays `KEY@OTHER=VALUE`."""
    grid: dict[str, list] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if "@" in key and sep:
            value, sep, raw = raw.partition("=")
            key = f"{key}={value.strip()}"
        if not sep or not key:
            raise UserError("--grid", f"expected KEY=[v1,v2,...] or KEY@OTHER=VALUE=[v1,v2,...], got {item!r}")
        try:
            values = parse_yaml(raw)
        except yaml.YAMLError:
            raise UserError(f"--grid {key}", f"{raw!r} is not a YAML list") from None
        if not isinstance(values, list) or not values:
            raise UserError(f"--grid {key}", f"expected a non-empty list [v1,v2,...], got {raw!r}")
        if key in grid:
            raise UserError(f"--grid {key}", "given twice")
        if key.split("@")[0] == "seed":
            raise UserError("--grid seed", "seeds are averaged over, not searched: use --seeds")
        grid[key] = values
    check_conditions(grid)
    return grid


def condition(key: str) -> tuple[str, str, Any] | None:
    """(KEY, OTHER, VALUE) of a conditional grid key `KEY@OTHER=VALUE` (VALUE read as YAML), else None."""
    if "@" not in key:
        return None
    name, _, rest = key.partition("@")
    other, _, raw = rest.partition("=")
    try:
        value = parse_yaml(raw)
    except yaml.YAMLError:
        raise UserError(f"--grid {key}", f"{raw!r} is not a YAML value") from None
    return name.strip(), other.strip(), value


def check_conditions(grid: dict[str, list]) -> None:
    """Every conditional key names a plain grid key and one of its values; a key is plain or conditional."""
    plain = {key for key in grid if "@" not in key}
    for key in grid:
        found = condition(key)
        if found is None:
            continue
        name, other, value = found
        if not name or not other:
            raise UserError(f"--grid {key}", "expected KEY@OTHER=VALUE=[v1,v2,...]")
        if other not in plain:
            raise UserError(f"--grid {key}", f"{other} is not a searched key: give --grid {other}=[...] too")
        if value not in grid[other]:
            raise UserError(f"--grid {key}", f"{value!r} is not one of {other}'s values {grid[other]}")
        if name in plain:
            raise UserError(f"--grid {key}", f"{name} is also searched at every point (--grid {name}=[...])")
        if name == other:
            raise UserError(f"--grid {key}", "a key cannot depend on itself")


def grid_points(grid: dict[str, list]) -> list[dict[str, Any]]:
    """Every combination of the plain keys' values, in the order given (the last key varies fastest); each then
    takes every value of the conditional keys whose condition it meets (right after that point, in order)."""
    plain = {key: values for key, values in grid.items() if "@" not in key}
    points = [dict(zip(plain, values)) for values in itertools.product(*plain.values())] or [{}]
    for key, values in grid.items():
        found = condition(key)
        if found is None:
            continue
        name, other, wanted = found
        points = [extended for point in points for extended in
                  ([{**point, name: value} for value in values] if point.get(other) == wanted else [point])]
    return points


def point_data(base: dict, settings: dict[str, Any], seed: int) -> dict:
    """The raw config mapping of one trial: the base, the point's settings, the seed."""
    data = copy.deepcopy(base)
    for key, value in settings.items():
        apply_overrides(data, [f"{key}={json.dumps(value)}"])  # JSON is YAML: the value goes in unchanged
    data["seed"] = seed
    return data


def label(settings: dict[str, Any]) -> str:
    return ",".join(f"{key}={show_value(value)}" for key, value in settings.items()) or "base"


def show_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value).lower() if isinstance(value, bool) else str(value)


def folder_name(index: int, settings: dict[str, Any], seed: int) -> str:
    safe = "".join(c if c.isalnum() or c in "._=,+-" else "_" for c in label(settings))
    return f"p{index:02d}-{safe[:80]}-s{seed}"
