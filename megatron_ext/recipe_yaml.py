"""Recipe files as trees: YAML with duplicate keys refused and errors placed (file, line, column),
``base:`` chains deep-merged, dotted command-line overrides. No schema here (config.py
validates the merged tree), so anything that reads a recipe file can use it without pydantic."""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

from .errors import RecipeError


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


class _DuplicateKey(yaml.constructor.ConstructorError):
    pass


class _RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one
    silently: a second ``train:`` section would drop the first)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            lines = {}
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    key = self.construct_object(key_node)
                    if key in lines:
                        raise _DuplicateKey(None, None, f"key {key!r} is given twice (also on line "
                                            f"{lines[key]})", key_node.start_mark)
                    lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, where: str):
    """``yaml.safe_load`` whose errors are one RecipeError naming ``where`` and the line/column."""
    loader = None
    try:
        loader = _RecipeLoader(text)
        return loader.get_single_data()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(str(err.problem or err.context or "invalid YAML").split())
        if err.context and err.problem and err.context_mark:
            problem += (f" ({' '.join(err.context.split())} at line {err.context_mark.line + 1}, "
                        f"column {err.context_mark.column + 1})")
        fix = "keep one of them" if isinstance(err, _DuplicateKey) else "fix the YAML syntax"
        raise RecipeError(f"{where}: YAML error{at}: {problem}: {fix}") from None
    except yaml.reader.ReaderError as err:  # a control character: a position, no mark
        line = text.count("\n", 0, err.position) + 1
        column = err.position - (text.rfind("\n", 0, err.position) + 1) + 1
        raise RecipeError(f"{where}: YAML error at line {line}, column {column}: character #x{err.character:04x} "
                          "is not allowed in YAML: fix the YAML syntax") from None
    except yaml.YAMLError as err:
        problem = " ".join(str(err).replace('"<unicode string>"', "the text").split())
        raise RecipeError(f"{where}: YAML error: {problem}: fix the YAML syntax") from None
    finally:
        if loader is not None:
            loader.dispose()


def _read_mapping(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"{path} is not UTF-8 text: a recipe is a YAML file") from None
    except OSError as err:
        raise RecipeError(f"cannot read recipe {path}: {err.strerror}") from None
    raw = parse_yaml(text, str(path))
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping, got {type(raw).__name__}")
    return raw


def base_chain(path: str | Path) -> list[tuple[Path, dict]]:
    """``[(path, its keys), (its base, its keys), ...]`` down to the recipe with no ``base:``,
    each mapping without its ``base`` key. A missing base or a cycle is a RecipeError."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    chain: list[tuple[Path, dict]] = []
    seen: dict[Path, int] = {}
    while True:
        key = path.resolve()
        if key in seen:
            loop = " -> ".join(str(p) for p, _ in chain[seen[key]:])
            raise RecipeError(f"base: cycle {loop} -> {path}: a recipe cannot be its own base, directly or "
                              "through others; remove the base: key that closes the loop")
        seen[key] = len(chain)
        raw = _read_mapping(path)
        base = raw.pop("base", None)
        chain.append((path, raw))
        if base is None:
            return chain
        if not isinstance(base, str) or not base.strip():
            raise RecipeError(f"{path}: base={base!r} must be the path of a recipe file, relative to "
                              f"{path.parent}")
        parent, path = path, path.parent / base
        if not path.is_file():
            raise RecipeError(f"{parent}: base: {base} not found (no file {path}): fix the path, which is "
                              f"relative to {parent.parent}")


def read_yaml_tree(path: str | Path) -> dict:
    """Read a recipe file, resolving its chain of ``base:`` files."""
    tree: dict = {}
    for _, raw in reversed(base_chain(path)):
        tree = _deep_merge(tree, raw)
    return tree


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides; values are parsed as YAML (3e-4, true, [1, 2])."""
    tree = copy.deepcopy(tree)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} is not of the form section.key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(p.strip() for p in parts):
            raise RecipeError(f"override {item!r} has an empty key{' part' if key.strip() else ''}: write "
                              "section.key=value, e.g. train.steps=100")
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = parse_yaml(value, f"override {item!r} (value {value!r})")
    return tree
