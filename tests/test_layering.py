"""The import contracts of the repository (ARCHITECTURE.md), checked on the source with ast.

    benchmarks   >  experiments  >  modules  >  datamodules  >  the bottom
    (measure)       (launchers)     (model)     (data)          tokens.py, paths.py, config.py

A file imports only from its own layer or the ones below it; the bottom modules import nothing
of the project; no cycle exists between files; a function-local import of a project module says
why on its line (``# lazy: ...``, for start-up cost), so none hides a cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"datamodules": 0, "modules": 1, "experiments": 2, "benchmarks": 3}
BOTTOM = ("datamodules/tokens.py", "datamodules/paths.py", "datamodules/config.py")


def _files() -> List[Path]:
    return sorted(p for pkg in LAYERS for p in (ROOT / pkg).rglob("*.py"))


def _resolve(name: str) -> str | None:
    """Dotted module name -> repository file (relative), or None outside the project."""
    if name.split(".")[0] not in LAYERS:
        return None
    base = ROOT / Path(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return str(cand.relative_to(ROOT))
    return None


def _imports(path: Path) -> List[Tuple[str, int, bool, str]]:
    """(imported file, line, function-local?, source line) for every project import of ``path``."""
    text = path.read_text()
    lines = text.splitlines()
    out = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from pkg import sub` may name a submodule
            names = [f"{node.module}.{a.name}" if _resolve(f"{node.module}.{a.name}") else node.module for a in node.names]
        else:
            continue
        for n in names:
            f = _resolve(n)
            if f is not None:
                out.append((f, node.lineno, node.col_offset > 0, lines[node.lineno - 1]))
    return out


GRAPH: Dict[str, List[Tuple[str, int, bool, str]]] = {str(p.relative_to(ROOT)): _imports(p) for p in _files()}


def layer_violations(graph: Dict[str, List[Tuple[str, int, bool, str]]]) -> List[str]:
    bad = []
    for src, imps in graph.items():
        for dst, line, _, _ in imps:
            if LAYERS[dst.split("/")[0]] > LAYERS[src.split("/")[0]]:
                bad.append(f"{src}:{line} imports {dst} (a higher layer)")
            if src in BOTTOM:
                bad.append(f"{src}:{line} imports {dst}: the bottom modules import nothing of the project")
    return bad


def cycles(graph: Dict[str, List[Tuple[str, int, bool, str]]]) -> List[List[str]]:
    """Every strongly connected group of more than one file (Tarjan)."""
    edges = {s: sorted({d for d, *_ in imps if d != s}) for s, imps in graph.items()}
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_imports_run_one_way():
    assert layer_violations(GRAPH) == []


def test_no_import_cycles_between_files():
    assert cycles(GRAPH) == []


def test_function_local_project_imports_say_why():
    bad = [f"{src}:{line}: {code.strip()}" for src, imps in GRAPH.items()
           for _, line, local, code in imps if local and "# lazy:" not in code]
    assert bad == [], "import at module level, or add `# lazy: <why>` (start-up cost) to the line"


def test_the_contracts_catch_what_they_forbid():
    """The checks above are not vacuous: a modules/ file importing experiments, and a cycle."""
    fake = dict(GRAPH)
    fake["modules/vargpt.py"] = GRAPH["modules/vargpt.py"] + [("experiments/config.py", 1, False, "")]
    assert any("modules/vargpt.py:1 imports experiments/config.py" in v for v in layer_violations(fake))
    fake["experiments/config.py"] = GRAPH["experiments/config.py"] + [("experiments/run.py", 1, False, "")]
    assert any("experiments/run.py" in c and "experiments/config.py" in c for c in cycles(fake))


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_files_stay_small(layer):
    big = [f"{p.relative_to(ROOT)}: {n}" for p in (ROOT / layer).rglob("*.py")
           if (n := len(p.read_text().splitlines())) > 600]
    assert big == [], "split files over 600 lines (a newcomer should hold a file in their head)"
