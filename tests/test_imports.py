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
    """The megatron_ext modules a file imports, anywhere in it."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                out |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif node.module and node.module.startswith("megatron_ext"):
                rest = node.module.split(".")[1:]
                out |= {rest[0]} if rest else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("megatron_ext.")}
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    return (out & modules) - {path.stem}


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
    graph = {p.stem: project_imports(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
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
    graph = {p.stem: project_imports(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    order, done = [], set()
    while len(order) < len(graph):
        ready = sorted(m for m in graph if m not in done and graph[m] <= done)
        assert ready, f"import cycle among {sorted(set(graph) - done)}"
        order += ready
        done |= set(ready)
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module('megatron_ext.' + m)\n"
    proc = subprocess.run([sys.executable, "-c", code, *order], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
