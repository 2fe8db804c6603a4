"""The package's imports, read with ast (lazy ones inside functions too): no circle, no upward import against
DESIGN.md's layers, and no module importing another module's private name."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "raygossip"

# DESIGN.md's layers, lowest first: a module may import its own layer and the ones below, never one above.
# A module is placed by its longest listed prefix ("raygossip" is the package's __init__ only).
LAYERS: list[tuple[str, ...]] = [
    ("raygossip", "raygossip.errors", "raygossip.registry"),
    ("raygossip.algorithms", "raygossip.data", "raygossip.models", "raygossip.optim", "raygossip.task"),
    ("raygossip.config", "raygossip.config_io", "raygossip.presets", "raygossip.results", "raygossip.usercode"),
    ("raygossip.core", "raygossip.checkpoint"),
    ("raygossip.engines", "raygossip.validation"),
    ("raygossip.api", "raygossip.cli", "raygossip.sweep", "raygossip.sweep_grid", "raygossip.compare", "raygossip.plots",
     "raygossip.tracking", "raygossip.timeline_builder"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import of a raygossip module in module `name`."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names if alias.name.startswith("raygossip")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if not base.startswith("raygossip"):
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append((submodule, None, node.lineno) if submodule in MODULES else (base, alias.name, node.lineno))
    return found


def graph() -> dict[str, set[str]]:
    return {name: {target for target, _, _ in imports(name) if target in MODULES and target != name} for name in MODULES}


def layer(name: str) -> int:
    best, depth = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            inside = name == prefix or (prefix != "raygossip" and name.startswith(prefix + "."))
            if inside and len(prefix) > depth:
                best, depth = index, len(prefix)
    return best


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(edges[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_walk_sees_the_package():
    edges = graph()
    assert len(MODULES) > 50
    assert "raygossip.config" in edges["raygossip.core.timeline"]
    assert "raygossip.core.timeline" in edges["raygossip.validation"]
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle():
    assert circles(graph()) == []


def test_every_module_has_a_layer():
    assert [name for name in MODULES if layer(name) < 0] == []


def test_no_upward_import():
    upward = [f"{name}:{line} imports {target} (layer {layer(target)} above {layer(name)})"
              for name in MODULES for target, _, line in imports(name)
              if target in MODULES and layer(target) > layer(name)]
    assert upward == []


def test_no_private_name_from_another_module():
    private = [f"{name}:{line} imports {target}.{imported}"
               for name in MODULES for target, imported, line in imports(name)
               if imported and imported.startswith("_") and not imported.startswith("__") and target != name]
    assert private == []


def test_a_long_module_outside_core_and_engines_says_why_in_its_docstring():
    """~400 lines is a module's budget; past it (outside core/ and engines/), its docstring gives the reason."""
    long = [name for name, path in MODULES.items()
            if not name.startswith(("raygossip.core", "raygossip.engines"))
            and len(path.read_text().splitlines()) > 420
            and "400 lines" not in (ast.get_docstring(ast.parse(path.read_text())) or "")]
    assert long == []
