"""The floor plan, checked mechanically: every import of every module (function-level ones included, parsed with
`ast`) follows `flywheel -> retrain -> shadow -> {ingest, sim}` (and `sim -> ingest`, `retrain -> sim`), no private
name crosses a package, no module takes part in an import circle, and no module grows past 500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ingest", "sim", "shadow", "retrain", "flywheel")
# a package may import the packages of a lower rank; `sim` and `ingest` are the ground floor, `sim` uses the contract
RANK = {"ingest": 0, "sim": 1, "shadow": 2, "retrain": 3, "flywheel": 4}
ALLOWED = {"ingest": set(), "sim": {"ingest"}, "shadow": {"ingest", "sim"}, "retrain": {"shadow", "ingest", "sim"},
           "flywheel": {"retrain", "shadow", "ingest", "sim"}}
MAX_LINES = 500


def _modules(tops: tuple[str, ...]) -> dict[str, Path]:
    out = {}
    for top in tops:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules(PACKAGES)
EVERYTHING = {**MODULES, **_modules(("tests", "bench"))}


def _package(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def imports(module: str) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) of every import statement of a module, nested ones too."""
    path = EVERYTHING[module]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = _package(module, path).split(".")
                base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub, None, node.lineno) if sub in EVERYTHING else (base, a.name, node.lineno))
    return out


def test_imports_follow_the_data():
    bad = []
    for module in MODULES:
        top = module.split(".")[0]
        for target, _, line in imports(module):
            other = target.split(".")[0]
            if other in RANK and other != top and other not in ALLOWED[top]:
                bad.append(f"{module}:{line} imports {target} ({top} may use {sorted(ALLOWED[top]) or 'nothing'})")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("scope", ["project", "tests and benchmarks"])
def test_no_private_name_crosses_a_package(scope):
    modules = MODULES if scope == "project" else {m: p for m, p in EVERYTHING.items() if m not in MODULES}
    bad = []
    for module, path in modules.items():
        own = _package(module, path)
        for target, name, line in imports(module):
            if name is None or not name.startswith("_") or name.startswith("__"):
                continue
            if target.split(".")[0] in RANK and _package(target, EVERYTHING.get(target, Path("x.py"))) != own:
                bad.append(f"{module}:{line} imports private {target}.{name}")
    assert not bad, "\n".join(bad)


def test_no_import_circles():
    graph = {m: sorted({t for t, _, _ in imports(m) if t in MODULES and t != m}) for m in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for m in graph:
        if m not in index:
            visit(m)
    assert not circles, "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


def test_modules_stay_small():
    big = {m: n for m, p in MODULES.items() if "wire" not in m.split(".")
           and (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_the_checker_sees_function_level_imports():
    found = {(t, n) for t, n, _ in imports("flywheel.cli.sql")}
    assert ("shadow.catalog", "Catalog") in found  # imported inside the command function
