"""Name -> object registries (models, datasets, losses, metrics) that also resolve `package.module:attr` paths, and the one way every registry says which params an entry takes."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

from raygossip.errors import UserError


def keyword_params(factory: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    """{name: parameter} of the factory's keyword-only arguments (those after `*`), in signature order."""
    params = inspect.signature(factory).parameters.values()
    return {p.name: p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def one_line(err: BaseException) -> str:
    """An exception as `Type: text` on one line."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def is_import_path(ref: object) -> bool:
    """Whether `ref` reads as `package.module:attribute` (a reference to user code, not a registered name)."""
    return isinstance(ref, str) and ref.count(":") == 1 and all(part.strip() for part in ref.split(":"))


def add_search_paths(paths: Iterable[str]) -> None:
    """Put the folders user code lives in (the working directory, runtime.working_dir, the parents of local
    runtime.py_modules) on this process's import path, so that the driver resolves what the actors will import."""
    for path in [os.getcwd(), *paths]:
        folder = os.path.abspath(os.path.expanduser(path))
        if folder not in sys.path:
            sys.path.append(folder)


def import_object(ref: str, field: str) -> Any:
    """The object `package.module:attr.sub` names; UserError(field) naming what failed when it does not resolve."""
    module_name, _, attr = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name.strip())
    except Exception as err:  # any error the user's module raises while importing
        raise UserError(field, f"could not import module {module_name!r} of {ref!r}: {one_line(err)}") from None
    for part in attr.strip().split("."):
        if not hasattr(obj, part):
            raise UserError(field, f"module {module_name!r} has no attribute {attr!r} (from {ref!r})")
        obj = getattr(obj, part)
    return obj


def reference_of(obj: Any) -> str:
    """The `module:qualname` under which a Python object would be found again (written into config.yaml)."""
    module = getattr(obj, "__module__", None) or "__main__"
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or type(obj).__name__
    return f"{module}:{name}"


class Registry(dict):
    """An explicit name -> object table for one config field; `resolve` also accepts an import path."""

    def __init__(self, field: str, kind: str) -> None:
        super().__init__()
        self.field = field
        self.kind = kind

    def register(self, name: str) -> Callable[[Any], Any]:
        """Decorator: make `obj` known under `name` (the zoo's own entries go through here too)."""
        if not isinstance(name, str) or not name or ":" in name:
            raise UserError(self.field, f"a registered {self.kind} name must be a non-empty text without ':', got {name!r}")

        def add(obj: Any) -> Any:
            self[name] = obj
            return obj

        return add

    def resolve(self, ref: str) -> Any:
        """The registered object called `ref`, or the one its import path names; UserError(self.field) otherwise."""
        if isinstance(ref, str) and ref in self:
            return self[ref]
        if is_import_path(ref):
            return import_object(ref, self.field)
        raise UserError(self.field, f"unknown {self.kind} {ref!r}; choose from {', '.join(sorted(self))} "
                                    "or give an import path package.module:name")

    def knows(self, ref: object) -> bool:
        """Whether `ref` is a registered name or reads as an import path (checked without importing)."""
        return (isinstance(ref, str) and ref in self) or is_import_path(ref)
