"""The house rules of docs/ARCHITECTURE.md, checked: no import cycles, data flows one way, small rooms."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# "About 500 lines": a room is read in one sitting.
MAX_MODULE_LINES = 550
# Layers, lowest first: a module may import its own layer or a lower one, never a higher one.
LAYERS = {
    "fastdpo.kernels": 0,
    "fastdpo.ops": 1,
    "fastdpo.losses": 2,
    "fastdpo.train": 3,
    "fastdpo.planner": 3,
    "fastdpo.integrations": 3,
    "fastdpo.cli": 4,
    "fastdpo.demo": 4,
}
# Compiled modules (csrc/): leaves of the graph, with no source here.
EXTENSION_MODULES = {"fastdpo._C"}


def _source_files() -> dict[str, Path]:
    """Module name -> file, for fastdpo/ and kernels/ (shipped as fastdpo.kernels)."""
    files = {}
    for base, prefix in ((ROOT / "fastdpo", "fastdpo"), (ROOT / "kernels", "fastdpo.kernels")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join([prefix, *parts])] = path
    return files


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path, modules: set[str]) -> set[str]:
    """fastdpo modules that ``name`` imports anywhere in its body (lazy imports count; TYPE_CHECKING not)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                add(full if full in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return found


def _graph() -> dict[str, set[str]]:
    files = _source_files()
    modules = set(files) | EXTENSION_MODULES
    graph = {name: _imports(name, path, modules) for name, path in files.items()}
    return graph | {name: set() for name in EXTENSION_MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def _layer(name: str) -> int | None:
    for prefix, level in LAYERS.items():
        if name == prefix or name.startswith(prefix + "."):
            return level
    return None


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (each line: modules that import each other): " + "; ".join(
        " <-> ".join(c) for c in cycles
    )


def test_cycle_detector_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_data_flows_one_way():
    wrong = [
        f"{src} imports {dst}"
        for src, targets in _graph().items()
        for dst in targets
        if _layer(src) is not None and _layer(dst) is not None and _layer(dst) > _layer(src)
    ]
    assert not wrong, "a lower layer imports a higher one: " + "; ".join(sorted(wrong))


@pytest.mark.parametrize("name", sorted(_source_files()))
def test_module_reads_in_one_sitting(name):
    lines = len(_source_files()[name].read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{name} has {lines} lines; split it into rooms of one job each"
