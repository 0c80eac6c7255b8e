"""The on-disk format: the checkpoints directory, meta.json (the one place that writes its
schema, :func:`build_meta`, and reads it), whether a checkpoint is complete, and which one to use."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..config import Recipe, dump_recipe, recipe_from_tree
from ..errors import GaperonError


FORMAT_VERSION = 3  # 2: meta.json lists every file with its size; 3: flat fragments, written by their owners
STATE_KINDS = ("model", "exp_avg", "exp_avg_sq")
NORM_GAIN_META_KEY = "norm_gain_scale"  # meta.json: stored norm gains x this = the true gains


class CheckpointError(GaperonError, RuntimeError):
    """A checkpoint could not be written or read. The message names the path and the fix."""


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_of(path: Path) -> int:
    return int(path.name.split("_")[1])


def read_meta(ckpt: Path) -> dict:
    """meta.json of a checkpoint directory, or a CheckpointError that names it."""
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt} has no meta.json: it is not a complete checkpoint") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{ckpt}/meta.json is unreadable ({err}): the checkpoint is damaged; "
                              "resume from an earlier step_* (delete this one)") from None
    if not isinstance(meta, dict) or "index" not in meta or "step" not in meta:
        raise CheckpointError(f"{ckpt}/meta.json is not a checkpoint's meta.json (no index/step): "
                              "the checkpoint is damaged; delete it to resume from an earlier one")
    if meta.get("format", 1) > FORMAT_VERSION:
        raise CheckpointError(f"{ckpt} was written in checkpoint format {meta['format']}, newer than this "
                              f"code's {FORMAT_VERSION}: update gaperon-recipes to read it")
    return meta


def build_meta(recipe: Recipe, step: int, consumed_samples: int, skipped_steps: int, adam_step: int, dp: int,
               world_size: int, norm_gain_scale: float, files: dict[str, int], index: dict) -> dict:
    """A checkpoint's meta.json, the one place its schema is written: the step and counters, the
    layout it was written at, the recipe, every file with its size, and the index of fragments."""
    lay = recipe.layout
    return {"format": FORMAT_VERSION, "step": step, "consumed_samples": consumed_samples,
            "skipped_steps": skipped_steps, "adam_step": adam_step,
            "layout": {"tp": lay.tp, "pp": lay.pp, "vpp": lay.vpp, "dp": dp,
                       "zero_stage": lay.zero_stage, "world_size": world_size},
            "precision": recipe.train.precision, NORM_GAIN_META_KEY: norm_gain_scale,
            "recipe": dump_recipe(recipe), "files": dict(sorted(files.items())), "index": index}


def norm_gain_scale(meta: dict) -> float:
    """The factor meta.json says the stored norm gains were divided by (1.0: older checkpoints)."""
    return float(meta.get(NORM_GAIN_META_KEY, 1.0))


def recipe_of(meta: dict) -> Recipe:
    """The recipe a checkpoint was written with (meta.json keeps its YAML)."""
    import yaml

    return recipe_from_tree(yaml.safe_load(meta["recipe"]))


def index_files(meta: dict) -> set[str]:
    """The tensor files a meta.json's index names (format 3: in each shard's parts)."""
    if meta.get("format", 1) >= 3:
        return {p[0] for shards in meta["index"].values() for s in shards for p in s["parts"]}
    return {f for fs in meta["index"].values() for f in fs}


def problem(ckpt: Path) -> str | None:
    """Why ``ckpt`` is not a complete checkpoint, or None. Costs one stat per file (rank 0 only)."""
    try:
        meta = read_meta(ckpt)
    except CheckpointError as err:
        return str(err)
    files = meta.get("files") or {f: None for f in index_files(meta)}
    for fname, size in files.items():
        try:
            actual = os.path.getsize(ckpt / fname)
        except OSError:
            mt = re.match(r"tp(\d+)_pp(\d+)_w(\d+)", fname)
            who = f" (tensor-parallel rank {int(mt[1])}, pipeline stage {int(mt[2])})" if mt else ""
            return (f"{ckpt} is missing {fname}{who}, a file its meta.json lists: the save did not finish or "
                    "the file was lost")
        if size is not None and actual != size:
            return f"{ckpt}/{fname} has {actual} bytes, its meta.json says {size}: the file is truncated or damaged"
    return None


@dataclass
class Found:
    """The checkpoint to use (None: there is none), and what was skipped on the way."""

    path: Path | None
    notes: list[str]


def find(path: str | Path) -> Found:
    """The checkpoint to load from ``path``: a checkpoint dir itself, or a run / checkpoints dir.

    In a run, ``latest`` names it; if ``latest`` is missing, dangling or names a damaged
    checkpoint, the newest complete ``step_*`` is used instead and a note says why. A checkpoint
    dir given directly must be complete (a CheckpointError names what is wrong)."""
    path = Path(path)
    if (path / "meta.json").exists():
        why = problem(path)
        if why:
            raise CheckpointError(why + "; use an earlier checkpoint")
        return Found(path, [])
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    notes, latest_dir = [], None
    latest = root / "latest"
    if latest.is_file():
        latest_dir = root / latest.read_text().strip()
        why = problem(latest_dir)
        if why is None:
            return Found(latest_dir, notes)
        notes.append(f"{latest} names {latest_dir.name}, which is not usable ({why})")
    for cand in sorted(root.glob("step_*"), key=step_of, reverse=True):
        if cand == latest_dir:
            continue
        why = problem(cand)
        if why is None:
            if notes or latest_dir is None:
                notes.append(f"using {cand.name}, the newest complete checkpoint in {root}")
            return Found(cand, notes)
        notes.append(f"skipped {cand.name}: {why}")
    return Found(None, notes)


def resolve(path: str | Path) -> Path | None:
    """The checkpoint :func:`find` picks, or None (an incomplete checkpoint dir counts as none)."""
    try:
        return find(path).path
    except CheckpointError:
        return None


def leftovers(output_dir: str | Path) -> list[Path]:
    """What in a run's checkpoints dir says it has trained before (used to refuse a silent fresh start)."""
    root = checkpoints_dir(output_dir)
    return sorted(root.glob("step_*")) + ([root / "latest"] if (root / "latest").exists() else [])
