"""The package's imports point one way (schema -> model/data -> engine -> train -> tools): no
cycle among megatron_ext's modules, counting imports inside functions too (a lazy import only
hides a cycle), and the schema sits at the bottom (it reaches no model, data or engine module, and no torch)."""
from __future__ import annotations

import ast
import subprocess
import sys

from conftest import ROOT

PACKAGE = ROOT / "megatron_ext"


def project_imports(path) -> set[str]:
    """The megatron_ext modules (a subpackage counts as one) a file imports, anywhere in it; a
    subpackage's file leaves out its siblings (see sibling_imports)."""
    inside = path.parent != PACKAGE  # a file of a subpackage: its relative imports go one level further up
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 + inside:
                out |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif node.module and node.module.startswith("megatron_ext"):
                rest = node.module.split(".")[1:]
                out |= {rest[0]} if rest else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("megatron_ext.")}
    modules = {p.stem for p in PACKAGE.glob("*.py")} | {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    return (out & modules) - {path.parent.name if inside else path.stem}


def sibling_imports(path) -> set[str]:
    """The modules of its own subpackage a subpackage's file imports."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
    return (out & {p.stem for p in path.parent.glob("*.py")}) - {path.stem, "__init__"}


def module_graph() -> dict[str, set[str]]:
    """megatron_ext's modules and subpackages -> the ones they import."""
    graph: dict[str, set[str]] = {}
    for p in [*PACKAGE.glob("*.py"), *PACKAGE.glob("*/*.py")]:
        node = p.stem if p.parent == PACKAGE else p.parent.name
        if node != "__init__":
            graph.setdefault(node, set()).update(project_imports(p))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_and_schema_at_the_bottom():
    graph = module_graph()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    assert not {"model", "data", "engine", "train", "sft", "checkpoint"} & closure(graph, "config")
    # The schema loads without torch: a bad recipe is refused in half a second (megatron_ext/launch.py).
    code = "import sys, megatron_ext.config\nprint(sorted(m for m in ('torch', 'megatron', 'deepspeed') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def closure(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_every_module_imports_alone_in_a_fresh_interpreter():
    """In dependency order, each in its own interpreter: no module needs another imported first."""
    graph = module_graph()
    order, done = [], set()
    while len(order) < len(graph):
        ready = sorted(m for m in graph if m not in done and graph[m] <= done)
        assert ready, f"import cycle among {sorted(set(graph) - done)}"
        order += ready
        done |= set(ready)
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module('megatron_ext.' + m)\n"
    proc = subprocess.run([sys.executable, "-c", code, *order], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_subpackage_modules_import_one_way():
    """Inside a subpackage (convert/) the modules import each other one way too, and each imports alone."""
    for pkg in sorted(p.parent for p in PACKAGE.glob("*/__init__.py")):
        graph = {p.stem: sibling_imports(p) for p in pkg.glob("*.py") if p.stem != "__init__"}
        assert find_cycle(graph) is None, f"{pkg.name}: " + " -> ".join(find_cycle(graph))
        code = ("import importlib, sys\nfor m in sys.argv[2:]:\n"
                "    importlib.import_module(f'megatron_ext.{sys.argv[1]}.' + m)\n")
        proc = subprocess.run([sys.executable, "-c", code, pkg.name, *sorted(graph)], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
