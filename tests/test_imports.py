"""The package's imports point one way (schema -> model/data -> engine -> train -> tools): no
cycle among megatron_ext's modules, counting imports inside functions too (a lazy import only
hides a cycle), and the schema sits at the bottom (it reaches no model, data or engine module, and no torch)."""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path
import sys

from conftest import ROOT

PACKAGE = ROOT / "megatron_ext"


def module_name(path) -> str:
    """megatron_ext/checkpoint/save.py -> 'checkpoint.save'; a package is its __init__: 'checkpoint'."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if module_name(p)}


def project_imports(path, modules) -> set[str]:
    """The megatron_ext modules a file imports, anywhere in it (a name imported from a package that
    is one of its submodules counts as that submodule)."""
    here = module_name(path).split(".") if module_name(path) else []
    package = here if path.name == "__init__.py" else here[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
            elif node.module and node.module.split(".")[0] == "megatron_ext":
                base = []
            else:
                continue
            target = base + (node.module.split(".")[1:] if not node.level and node.module else
                             (node.module.split(".") if node.module else []))
            for alias in node.names:
                sub = ".".join(target + [alias.name])
                out.add(sub if sub in modules else ".".join(target))
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("megatron_ext.")}
    me = module_name(path)
    return {m for m in out if m in modules and m != me}


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: project_imports(path, modules) for name, path in modules.items()}


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
    graph = import_graph()
    assert {"config", "errors", "cli", "cli.plan", "engine"} <= set(graph), sorted(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    assert not {"model", "data", "engine", "train", "sft", "checkpoint"} & closure(graph, "config")
    # The schema loads without torch: a bad recipe is refused in half a second (megatron_ext/launch.py).
    code = "import sys, megatron_ext.config\nprint(sorted(m for m in ('torch', 'megatron', 'deepspeed') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def layers() -> dict[str, int]:
    """docs/ARCHITECTURE.md's `layer N: a, b  comment` lines: top-level module -> its layer."""
    out = {}
    for line in (ROOT / "docs" / "ARCHITECTURE.md").read_text().splitlines():
        m = re.match(r"layer (\d+):\s+(.*)", line)
        if m:
            names = re.split(r"\s{2,}", m.group(2).strip())[0]  # the names, then two spaces and a comment
            out.update({n.strip(): int(m.group(1)) for n in names.split(",")})
    return out


def test_imports_point_down_the_documented_layers():
    """Every module is in docs/ARCHITECTURE.md's layers and imports only modules of lower layers."""
    layer, graph = layers(), import_graph()
    top = {name.split(".")[0] for name in graph}
    assert top <= set(layer), f"not in docs/ARCHITECTURE.md's layers: {sorted(top - set(layer))}"
    assert set(layer) <= top, f"in the layers but not in megatron_ext: {sorted(set(layer) - top)}"
    upward = sorted(f"{a} (layer {layer[a.split('.')[0]]}) imports {b} (layer {layer[b.split('.')[0]]})"
                    for a, deps in graph.items() for b in deps
                    if a.split(".")[0] != b.split(".")[0] and layer[b.split(".")[0]] >= layer[a.split(".")[0]])
    assert not upward, "\n".join(upward)


def closure(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


# Third-party libraries are imported once, then every project module is imported in a process
# forked from that one, with no other megatron_ext module loaded: what "imports alone" means, at
# the cost of one fork per module instead of one torch + megatron + DeepSpeed start-up each.
ALONE = """
import os, sys, importlib
import torch, megatron.core, deepspeed, transformers  # noqa: F401  (shared, not project code)
assert not [m for m in sys.modules if m.startswith("megatron_ext")]
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module("megatron_ext." + name)
        except BaseException as err:
            print(f"{name}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(name)
print("failed:", failed)
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_alone_in_a_fresh_interpreter():
    """Each module in a process where no other project module was imported before it."""
    modules = sorted(import_graph())
    proc = subprocess.run([sys.executable, "-c", ALONE, *modules], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "failed: []" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    # the check can fail: a module that needs another imported first is caught
    bad = PACKAGE / "_needs_first.py"
    bad.write_text("import sys\nassert 'megatron_ext.config' in sys.modules, 'imported alone'\n")
    try:
        proc = subprocess.run([sys.executable, "-c", ALONE, "config", "_needs_first"], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
    finally:
        bad.unlink()
    assert proc.returncode == 1 and "failed: ['_needs_first']" in proc.stdout, proc.stdout + proc.stderr
