"""The package's imports point one way (schema -> model/data -> engine -> train -> tools): no
cycle among megatron_ext's modules, counting imports inside functions too (a lazy import only
hides a cycle), and the schema sits at the bottom (it reaches no model, data or engine module, and no torch)."""
from __future__ import annotations

import ast
import subprocess
import sys

from conftest import ROOT

PACKAGE = ROOT / "megatron_ext"


def module_name(path) -> str:
    """``train``, ``checkpoint`` (a package's __init__.py), ``checkpoint.save``."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, object]:
    """Every module of megatron_ext (subpackages' modules included) but the top __init__."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if p != PACKAGE / "__init__.py"}


def project_imports(path) -> set[str]:
    """The megatron_ext modules a file imports, anywhere in it (relative imports resolved)."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    package = [p for p in package if p]
    modules = set(all_modules())
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            parts = node.module.split(".") if node.module else []
            if node.level:
                base = package[:len(package) - node.level + 1]
            elif parts[:1] == ["megatron_ext"]:
                base, parts = [], parts[1:]
            else:
                continue
            target = ".".join(base + parts)
            subs = {f"{target}.{a.name}" if target else a.name for a in node.names}
            out |= ({target} | subs) & modules
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("megatron_ext.")} & modules
    return out - {name}


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
    graph = {m: project_imports(p) for m, p in all_modules().items()}
    assert "checkpoint.format" in graph, sorted(graph)  # subpackages' modules are checked too
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    assert not {"model", "data", "engine", "train", "sft", "checkpoint"} & {m.split(".")[0] for m in closure(graph, "config")}
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
    graph = {m: project_imports(p) for m, p in all_modules().items()}
    order, done = [], set()
    while len(order) < len(graph):
        ready = sorted(m for m in graph if m not in done and graph[m] <= done)
        assert ready, f"import cycle among {sorted(set(graph) - done)}"
        order += ready
        done |= set(ready)
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module('megatron_ext.' + m)\n"
    proc = subprocess.run([sys.executable, "-c", code, *order], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
