"""Where a run starts: its own checkpoint, a parent phase's or step 0; what a resume changes,
and what would make starting from a checkpoint wrong (refused before the model is built)."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from ..config import FUNCTION_KEYS, Recipe
from .format import CheckpointError, Found, checkpoints_dir, find, leftovers, read_meta, recipe_of


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0
    saved_step: int | None = None  # the step of the checkpoint ``latest`` names, once this run knows it


# Model fields that decide tensor shapes: a checkpoint loads only into a model that agrees on all.
SHAPE_KEYS = ("hidden_size", "num_layers", "num_attention_heads", "num_kv_heads", "kv_channels",
              "ffn_hidden_size", "padded_vocab_size", "qk_layernorm", "block")


@dataclass
class Start:
    """Where a run starts: its own checkpoint (``resume``), a parent phase's (``parent``), or
    step 0; ``notes`` say what was skipped or what changed, for the log."""

    resume: Path | None = None
    parent: Path | None = None
    notes: tuple[str, ...] = ()


def _saved_recipe(ckpt: Path, meta: dict) -> Recipe:
    try:
        return recipe_of(meta)
    except Exception as err:
        raise CheckpointError(f"{ckpt}/meta.json holds a recipe this code cannot read ({err})") from None


def shape_mismatch(saved: Recipe, recipe: Recipe, ckpt: Path) -> str | None:
    diffs = [f"model.{k}={getattr(saved.model, k)} (recipe: {getattr(recipe.model, k)})"
             for k in SHAPE_KEYS if getattr(saved.model, k) != getattr(recipe.model, k)]
    if not diffs:
        return None
    return (f"checkpoint {ckpt} was trained with {', '.join(diffs)}: its weights do not fit this recipe's "
            "model. Use the checkpoint's model shape, or another train.output_dir")


def function_mismatch(saved: Recipe, recipe: Recipe, ckpt: Path, resume: bool = False) -> tuple[str | None, list[str]]:
    """(refusal, notes) for starting from ``ckpt``: a model field of FUNCTION_KEYS that differs is
    refused, naming both values, unless checkpoint.init_allow_changes lists it (then a note).
    ``resume``: ``ckpt`` is the run's own (a requeued job re-reads a recipe someone may have
    edited since), not ``checkpoint.init_from``."""
    allowed = set(recipe.checkpoint.init_allow_changes)
    diffs = {k: (getattr(saved.model, k), getattr(recipe.model, k)) for k in FUNCTION_KEYS
             if getattr(saved.model, k) != getattr(recipe.model, k)}

    def show(v):
        return v.model_dump(mode="json") if hasattr(v, "model_dump") else v

    notes = [f"model.{k} changed from {show(a)} (checkpoint) to {show(b)} (checkpoint.init_allow_changes)"
             for k, (a, b) in diffs.items() if k in allowed]
    refused = {k: v for k, v in diffs.items() if k not in allowed}
    if not refused:
        return None, notes
    was = ", ".join(f"model.{k}={show(a)}" for k, (a, _) in refused.items())
    now = ", ".join(f"model.{k}={show(b)}" for k, (_, b) in refused.items())
    source = f"the run's checkpoint {ckpt}" if resume else f"checkpoint.init_from={ckpt}"
    return (f"{source} was trained with {was}, but this recipe has {now}: the weights would load "
            f"and compute something else. Set {was} (the checkpoint's), or for a deliberate change (e.g. a context "
            f"extension) list it in checkpoint.init_allow_changes: [{', '.join(refused)}]"), notes


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_changes(saved: Recipe, recipe: Recipe, meta: dict) -> list[str]:
    """What a resume does differently from the run that wrote the checkpoint, one line each.
    Raises CheckpointError where resuming would be wrong."""
    from ..schedule import lr_at

    step = meta["step"]
    if recipe.train.steps < step:
        raise CheckpointError(f"the checkpoint is at step {step} but train.steps={recipe.train.steps}: a resume "
                              f"cannot go back. Set train.steps >= {step}, or start a new phase from this "
                              "checkpoint with checkpoint.init_from in another train.output_dir")
    old, new = _flat(saved.model_dump(mode="json")), _flat(recipe.model_dump(mode="json"))
    changed = [k for k in new if old.get(k) != new[k] and k != "train.output_dir"]
    notes = []
    if "train.steps" in changed and step < recipe.train.steps:
        a, b = lr_at(step, saved), lr_at(step, recipe)
        notes.append(f"train.steps {saved.train.steps} -> {recipe.train.steps}: the {recipe.schedule.kind} schedule "
                     f"now spans {recipe.train.steps} steps (lr at step {step + 1}: {a:.4g} -> {b:.4g})")
    if "layout.global_batch" in changed:
        notes.append(f"layout.global_batch {saved.layout.global_batch} -> {recipe.layout.global_batch}: training "
                     f"continues at sample {meta['consumed_samples']} with {recipe.layout.global_batch} samples "
                     "per step; the schedule counts steps, so the run now sees a different number of tokens")
    rest = [k for k in changed if k not in ("train.steps", "layout.global_batch")]
    if rest:
        notes.append("changed since the checkpoint: " + ", ".join(f"{k} {old.get(k)!r} -> {new[k]!r}" for k in rest))
    return notes


def plan_start(recipe: Recipe) -> Start:
    """Decide, before the model is built, where this run starts (rank 0; see train.py).

    Its own newest complete checkpoint (falling back past a damaged or dangling ``latest``);
    else ``checkpoint.init_from``; else step 0, which is refused when the run directory already
    holds checkpoints (starting over would replace them). Shape mismatches and a ``train.steps``
    below the checkpoint's step are refused here, not after the model is built."""
    out = recipe.train.output_dir
    root = checkpoints_dir(out)
    found = find(root) if root.is_dir() else Found(None, [])
    if found.path is not None:
        meta = read_meta(found.path)
        saved = _saved_recipe(found.path, meta)
        why = shape_mismatch(saved, recipe, found.path) or function_mismatch(saved, recipe, found.path, resume=True)[0]
        if why:
            raise CheckpointError(why)
        return Start(resume=found.path, notes=tuple(found.notes + resume_changes(saved, recipe, meta)))
    old = leftovers(out)
    if old:
        raise CheckpointError(
            f"{root} holds {', '.join(p.name for p in old[:4])}{' ...' if len(old) > 4 else ''} but no complete "
            f"checkpoint ({'; '.join(found.notes) or 'latest names nothing usable'}); starting again from step 0 "
            "would overwrite them. Restore a complete checkpoint, or move that directory away to start afresh")
    parent = recipe.checkpoint.init_from
    if not parent:
        return Start()
    pfound = find(parent)
    if pfound.path is None:
        raise CheckpointError(f"checkpoint.init_from={parent} holds no complete checkpoint"
                              + (f" ({'; '.join(pfound.notes)})" if pfound.notes else "")
                              + ": point it at a checkpoint directory or a finished run")
    saved = _saved_recipe(pfound.path, read_meta(pfound.path))
    why = shape_mismatch(saved, recipe, pfound.path)
    if why:
        raise CheckpointError(why.replace("another train.output_dir", "another checkpoint.init_from"))
    why, changes = function_mismatch(saved, recipe, pfound.path)
    if why:
        raise CheckpointError(why)
    return Start(parent=pfound.path, notes=tuple(pfound.notes + changes))


def preflight(recipe: Recipe) -> None:
    """Fail before training if the output dir is unwritable or the disk cannot hold a checkpoint."""
    out = Path(recipe.train.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise CheckpointError(f"output directory {out} is not writable ({err}): choose "
                              "train.output_dir= on a writable filesystem") from None
    need = recipe.model.num_params() * 12  # fp32 master + two Adam moments
    free = shutil.disk_usage(out).free
    if free < need:
        raise CheckpointError(f"{out} has {free / 2**30:.1f} GiB free but one checkpoint needs about "
                              f"{need / 2**30:.1f} GiB: free space or move train.output_dir")
