"""How every name-to-factory registry says which params an entry takes: its factory's keyword-only arguments."""

from __future__ import annotations

import inspect
from typing import Any, Callable


def keyword_params(factory: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    """{name: parameter} of the factory's keyword-only arguments (those after `*`), in signature order."""
    params = inspect.signature(factory).parameters.values()
    return {p.name: p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
