"""The package's layers: every import goes one way (``moe_scaling/__init__.py`` states the order).

The test parses every module (``ast``; nothing is imported) and fails on an import of a later
layer from an earlier one, and on any cycle between modules, with the offending module and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import moe_scaling

PACKAGE = Path(moe_scaling.__file__).resolve().parent

# The layer order, low to high. Top-level modules are the core; each subpackage is a layer.
LAYERS = ["core", "model", "train", "sweep", "laws", "hf", "ondevice", "design", "plots", "cli"]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "core"                       # moe_scaling itself
    if (PACKAGE / parts[1]).is_dir():
        return parts[1]
    return "core"                           # moe_scaling.config, .errors, .units, ...


def _imports() -> dict[str, list[tuple[str, int]]]:
    """module -> [(imported moe_scaling module, line)], including imports inside functions."""
    out: dict[str, list[tuple[str, int]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [(a.name, node.lineno) for a in node.names if a.name.startswith("moe_scaling")]
            elif isinstance(node, ast.ImportFrom):
                if node.level:                  # relative import: resolve against this package
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.startswith("moe_scaling"):
                    # `from moe_scaling.x import y` may name a submodule y
                    for a in node.names:
                        sub = f"{target}.{a.name}"
                        found.append((sub if _exists(sub) else target, node.lineno))
        out[name] = found
    return out


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def test_layer_order_lists_every_subpackage():
    subpackages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert subpackages <= set(LAYERS), f"add {sorted(subpackages - set(LAYERS))} to LAYERS and the package docstring"
    doc = moe_scaling.__doc__
    assert all(f"\n    {layer}" in doc for layer in LAYERS), "moe_scaling/__init__.py must list every layer"


def test_no_import_from_a_higher_layer():
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    bad = []
    for module, imports in _imports().items():
        for target, line in imports:
            if rank[_layer(target)] > rank[_layer(module)]:
                bad.append(f"{module}:{line} imports {target} ({_layer(module)} < {_layer(target)})")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = {m: {t for t, _ in imps if t != m} for m, imps in _imports().items()}
    # a package's __init__ is not a dependency of its own modules' content
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t in graph and state.get(t) is None:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if state.get(m) is None:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """The checks above must be able to fail: a model module importing the sweep layer is caught."""
    assert _layer("moe_scaling.model.transformer") == "model"
    assert _layer("moe_scaling.sweep.runner") == "sweep"
    assert _layer("moe_scaling.units") == "core"
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    assert rank[_layer("moe_scaling.sweep.runner")] > rank[_layer("moe_scaling.model.routing")]
    assert ("moe_scaling.model.routing", 30) in [(t, l) for t, l in _imports()["moe_scaling.model.transformer"]] or any(
        t == "moe_scaling.model.routing" for t, _ in _imports()["moe_scaling.model.transformer"])
