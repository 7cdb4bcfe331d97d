"""The package's layers import one way: no cycles, and no layer imports a layer above it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pyro_vae"
#: Lower number = lower layer; a module may import its own layer and those below.
LAYERS = {"errors": 0, "files": 1, "registry": 1, "config": 2, "runtime": 2, "progress": 2,
          "data": 3,
          "models": 4, "inference": 5, "metrics": 6, "training": 7, "lab": 8, "app": 9}


def _module_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__")


def _imports(path: Path) -> set[str]:
    """Package modules imported by ``path`` (absolute names without ``pyro_vae.``)."""
    here = _module_of(path).split(".") if _module_of(path) else []
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here if is_package else here[:-1]
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and node.module.startswith("pyro_vae"):
                target = node.module[len("pyro_vae."):] if "." in node.module else ""
            else:
                continue
            out.add(target)
            for alias in node.names:
                out.add(f"{target}.{alias.name}".strip("."))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("pyro_vae."):
                    out.add(alias.name[len("pyro_vae."):])
    return {m for m in out if m and m.split(".")[0] in LAYERS}


def test_every_layer_imports_only_itself_and_lower_layers():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        module = _module_of(path)
        if not module or module == "__main__":
            continue
        layer = LAYERS[module.split(".")[0]]
        for target in _imports(path):
            if LAYERS[target.split(".")[0]] > layer:
                wrong.append(f"{module} imports {target}")
    assert not wrong, wrong


def test_no_import_cycles_between_modules():
    modules = {_module_of(p): p for p in PACKAGE.rglob("*.py") if _module_of(p)}
    graph = {}
    for name, path in modules.items():
        graph[name] = {t if t in modules else t.rsplit(".", 1)[0] for t in _imports(path)}
        graph[name] = {t for t in graph[name] if t in modules and t != name
                       and not name.startswith(t + ".")}  # a module may use its package
    seen, stack, cycles = set(), [], []

    def visit(node: str) -> None:
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for nxt in graph.get(node, ()):
            visit(nxt)
        stack.pop()

    for name in graph:
        visit(name)
    assert not cycles, cycles
