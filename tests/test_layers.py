"""The package's floors, read from the code's own imports (every `import`, at the top or inside a
function): the front ends import the conversation and the engine, the conversation imports the engine,
never the other way; convert/ imports neither runtime/ nor demo/; and no module takes part in an import
circle. The README's layout table says the same in words.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "qwen35"
# Folders that are not part of the package's floors.
NOT_MEASURED = {"tests", "bench", ".venv", ".git", "build", "dist"}


def _modules() -> dict[str, Path]:
    found = {}
    tops = [p for p in ROOT.iterdir() if p.name not in NOT_MEASURED and not p.name.startswith(".")
            and not p.name.endswith(".egg-info")]  # never walk a venv kept in the checkout
    paths = [p for top in tops for p in ([top] if top.is_file() else top.rglob("*.py")) if p.suffix == ".py"]
    for path in paths:
        parts = path.relative_to(ROOT).parts
        names = [PACKAGE, *parts[:-1]] + ([] if path.name == "__init__.py" else [path.stem])
        found[".".join(names)] = path
    return found


MODULES = _modules()


def _imports(module: str, path: Path) -> set[str]:
    """The package's modules that `module` imports (a name imported from a package counts as its
    submodule when there is one, else as the package)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            while target not in MODULES and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in MODULES and target != module:
                out.add(target)
    return out


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _floor(module: str) -> str | None:
    for floor in ("engine", "conversation", "frontends"):
        if module.startswith(f"{PACKAGE}.runtime.{floor}"):
            return floor
    return None


def test_the_package_is_measured():
    assert f"{PACKAGE}.runtime.conversation.session" in MODULES and f"{PACKAGE}.convert.pipeline" in MODULES


def test_runtime_imports_flow_down():
    order = {"engine": 0, "conversation": 1, "frontends": 2}
    upward = [f"{a} -> {b}" for a, targets in GRAPH.items() for b in targets
              if _floor(a) and (b == f"{PACKAGE}.runtime" or (_floor(b) and order[_floor(b)] > order[_floor(a)]))]
    assert not upward, "imports running up runtime/'s floors: " + "; ".join(sorted(upward))


def test_convert_imports_neither_runtime_nor_demo():
    wrong = [f"{a} -> {b}" for a, targets in GRAPH.items() if a.startswith(f"{PACKAGE}.convert")
             for b in targets if b.startswith((f"{PACKAGE}.runtime", f"{PACKAGE}.demo"))]
    assert not wrong, "; ".join(sorted(wrong))


def test_no_import_circles():
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in GRAPH:
        if module not in index:
            visit(module)
    assert not circles, "import circles: " + "; ".join(" <-> ".join(c) for c in circles)
