"""Layout-free checkpoints: save at any (tp, pp, dp, ZeRO), resume at any other.

Why our own format rather than DeepSpeed's: DeepSpeed files are per (mp rank, dp rank) and tie a
checkpoint to its layout (changing it needs the offline universal-checkpoint converter), and
Megatron's dist_checkpointing cannot see inside DeepSpeed's ZeRO optimizer. We store, per
canonical parameter name (see sharding.py), each TP shard of the master weight and of the two Adam
moments as flat fragments, each written by the rank that owns it: under ZeRO DeepSpeed's own
partition (ZeRO-1/2: ``param._hp_mapping``; ZeRO-3: the parameter's partition, padding trimmed;
views of its buffers: no gather, no copy on the device), otherwise an even 1/dp of the
stage's replicated states, cut end to end (:func:`replicated_shares`). meta.json's index maps
every (tensor, TP shard) to its fragments, so a reader takes exactly the element range it needs
(safetensors slices are memory-mapped reads):
see :class:`_ShardSource` for a resume (:meth:`CheckpointReader.read_resharded` at another TP
degree; under ZeRO-3 a rank reads and sets only its own partition), :meth:`CheckpointReader.get`
for whole tensors (the HF converter). A checkpoint resumes at any other TP/PP/DP/ZeRO.

Directory ``<output_dir>/checkpoints``::

    step_00000100/
        meta.json                     step, consumed samples, Adam step, layout, recipe, files, index
        tp00_pp00_w000.safetensors    the fragments owned by DP rank 0 of (tp 0, pp 0) ...
        rng/rank00000.pt              RNG states per rank (used when the layout is unchanged)
    latest                            the name of the newest complete checkpoint

The rules that make a checkpoint impossible to lose:

* A checkpoint is written under ``.tmp-step_...`` and renamed to ``step_...`` only after every rank
  has written and synced its files; ``latest`` is then replaced atomically. meta.json records the
  size of every file, so a checkpoint is *complete* when meta.json parses and every file it lists
  has that size (:func:`problem`); anything else is never resumed from.
* The directory ``latest`` names is never deleted or overwritten: a step that is already saved is
  not saved again, rotation never removes it, and a deleted checkpoint is first renamed to
  ``.deleting-step_...`` (so a kill midway cannot leave a ``step_*`` that looks complete).
* If ``latest`` is missing, dangling or names a damaged checkpoint, :func:`find` falls back to the
  newest complete ``step_*`` and says so; a run whose directory holds checkpoints, none complete,
  refuses to start rather than start from step 0 over them.
* Weights that are not finite are never committed as a checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import EXIT_REQUEUE as REQUEUE_EXIT_CODE, GaperonError  # noqa: F401  (REQUEUE_EXIT_CODE: a public name)
from .config import FUNCTION_KEYS, Recipe, dump_recipe, recipe_from_tree
from .faults import maybe_kill
from .sharding import is_norm_gain, merge, shard, shard_blocks, split_dim, te_name

FORMAT_VERSION = 3  # 2: meta.json lists every file with its size; 3: flat fragments, written by their owners
STATE_KINDS = ("model", "exp_avg", "exp_avg_sq")


class CheckpointError(GaperonError, RuntimeError):
    """A checkpoint could not be written or read. The message names the path and the fix."""


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0
    saved_step: int | None = None  # the step of the checkpoint ``latest`` names, once this run knows it


# ---- reading ---------------------------------------------------------------------------------
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


# ---- where a run starts ----------------------------------------------------------------------
# Model fields that decide tensor shapes: a checkpoint loads only into a model that agrees on all.
SHAPE_KEYS = ("hidden_size", "num_layers", "num_attention_heads", "num_kv_heads", "kv_channels",
              "ffn_hidden_size", "padded_vocab_size", "qk_layernorm", "block",
              "tie_embeddings")


@dataclass
class Start:
    """Where a run starts: its own checkpoint (``resume``), a parent phase's (``parent``), or
    step 0; ``notes`` say what was skipped or what changed, for the log."""

    resume: Path | None = None
    parent: Path | None = None
    notes: tuple[str, ...] = ()


def _saved_recipe(ckpt: Path, meta: dict) -> Recipe:
    import yaml

    try:
        return recipe_from_tree(yaml.safe_load(meta["recipe"]))
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
    from .schedule import lr_at

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


@dataclass
class Part:
    """Elements [start, start + numel) of one TP shard's flattened tensor, stored in ``file``
    under ``key`` (format 3: a 1-D fragment; formats 1-2: the whole shard, N-D)."""

    file: str
    key: str
    start: int
    numel: int


@dataclass
class Shard:
    shape: tuple[int, ...]
    parts: list[Part]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# This process's checkpoint I/O, for benchmarks/bench_checkpoint.py: bytes read, written, and
# received from other DP ranks by the load's all-gathers (none under ZeRO-3).
IO_BYTES = {"read": 0, "written": 0, "gathered": 0}


def report_io(rank: int) -> None:
    """With GAPERON_IO_STATS=DIR, write this rank's checkpoint bytes read, written and gathered to DIR."""
    where = os.environ.get("GAPERON_IO_STATS")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        (Path(where) / f"rank{rank:05d}.json").write_text(json.dumps({"rank": rank, **IO_BYTES}))


class CheckpointReader:
    """The tensors of a checkpoint. Each canonical tensor is stored as its TP shards, each shard as
    flat fragments (whoever owned them wrote them, see :func:`save`); :meth:`read_range` reads
    only the bytes of the elements asked for (safetensors slices are memory-mapped reads), and
    :meth:`get` assembles a whole canonical tensor (the converter's view)."""

    def __init__(self, path: str | Path, verified: bool = False):
        """``verified``: ``path`` is a checkpoint dir already checked by :func:`find` (on rank 0),
        so the other ranks do not stat every file again."""
        found = Found(Path(path), []) if verified else find(path)
        if found.path is None:
            raise CheckpointError(f"no complete checkpoint at {path} (no meta.json, no complete step_*)"
                                  + (f": {'; '.join(found.notes)}" if found.notes else ""))
        if found.notes:
            print("checkpoint: " + "; ".join(found.notes), file=sys.stderr, flush=True)
        self.path = found.path
        self.meta = read_meta(found.path)
        self._handles: dict[str, object] = {}
        self._shards: dict[str, list[Shard]] = {}

    @property
    def recipe(self) -> Recipe:
        import yaml

        return recipe_from_tree(yaml.safe_load(self.meta["recipe"]))

    def names(self, kind: str = "model") -> list[str]:
        prefix = kind + "/"
        return [k[len(prefix):] for k in self.meta["index"] if k.startswith(prefix)]

    def has(self, name: str, kind: str = "model") -> bool:
        return f"{kind}/{name}" in self.meta["index"]

    def _file(self, fname: str):
        if fname not in self._handles:
            fpath = self.path / fname
            if not fpath.is_file():
                raise CheckpointError(f"checkpoint {self.path} is missing {fname} (a rank's shard "
                                      "file): the save did not finish; use an earlier checkpoint")
            try:
                self._handles[fname] = safe_open(str(fpath), framework="pt")
            except Exception as err:  # safetensors raises its own SafetensorError
                raise CheckpointError(f"{fpath} is not a readable safetensors file ({err}): the checkpoint "
                                      "is damaged; delete it to resume from an earlier one") from None
        return self._handles[fname]

    def shards(self, key: str) -> list[Shard]:
        """The TP shards of tensor ``key`` (``kind/name``), in TP-rank order."""
        if key not in self._shards:
            if key not in self.meta["index"]:
                raise CheckpointError(f"checkpoint {self.path} has no tensor {key}")
            entry = self.meta["index"][key]
            if self.meta.get("format", 1) >= 3:
                self._shards[key] = [Shard(tuple(s["shape"]), [Part(*p) for p in s["parts"]]) for s in entry]
            else:  # one file per TP shard, the whole shard under the tensor's own key
                shapes = [tuple(self._file(f).get_slice(key).get_shape()) for f in entry]
                self._shards[key] = [Shard(s, [Part(f, key, 0, math.prod(s))]) for f, s in zip(entry, shapes)]
        return self._shards[key]

    def read_range(self, key: str, tp_rank: int, lo: int, hi: int) -> torch.Tensor:
        """Elements [lo, hi) of TP shard ``tp_rank`` of ``key``, flattened; only their bytes are read."""
        out = []
        try:
            for p in self.shards(key)[tp_rank].parts:
                a, b = max(lo, p.start), min(hi, p.start + p.numel)
                if a >= b:
                    continue
                sl = self._file(p.file).get_slice(p.key)
                shape = sl.get_shape()
                if len(shape) == 1:
                    piece = sl[a - p.start:b - p.start]
                else:  # a whole N-D shard (formats 1-2): read the rows that hold [a, b)
                    row = math.prod(shape[1:])
                    r0, r1 = (a - p.start) // row, -(-(b - p.start) // row)
                    piece = sl[r0:r1].reshape(-1)[a - p.start - r0 * row:b - p.start - r0 * row]
                IO_BYTES["read"] += piece.numel() * piece.element_size()
                out.append(piece)
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(f"checkpoint {self.path}: cannot read {key} ({err}): the checkpoint is "
                                  "damaged; delete it to resume from an earlier one") from None
        if sum(t.numel() for t in out) != hi - lo:
            raise CheckpointError(f"checkpoint {self.path}: {key} shard {tp_rank} does not cover elements "
                                  f"[{lo}, {hi}): the checkpoint is damaged")
        return torch.cat(out) if len(out) > 1 else out[0]

    def read_shard(self, key: str, tp_rank: int, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """TP shard ``tp_rank`` of ``key`` in its shape, or only rows [a, b) of it."""
        shape = self.shards(key)[tp_rank].shape
        a, b = rows or (0, shape[0])
        row = math.prod(shape[1:])
        return self.read_range(key, tp_rank, a * row, b * row).reshape(b - a, *shape[1:])

    def get(self, name: str, kind: str = "model") -> torch.Tensor:
        """The canonical tensor: every TP shard read whole and merged."""
        key = f"{kind}/{name}"
        return merge(name, [self.read_shard(key, t) for t in range(len(self.shards(key)))])

    def _canonical_shape(self, key: str, name: str) -> list[int]:
        stored, dim = self.shards(key), split_dim(name)
        full = list(stored[0].shape)
        if dim is not None and len(stored) > 1:
            full[dim] = sum(s.shape[dim] for s in stored)
        return full

    def shard_numel(self, key: str, name: str, tp: int) -> int:
        """Elements in the shard a ``tp``-way split of ``key`` gives each rank."""
        n = math.prod(self._canonical_shape(key, name))
        return n if split_dim(name) is None else n // tp

    def read_resharded(self, key: str, name: str, tp: int, tp_rank: int, lo: int, hi: int) -> torch.Tensor:
        """Elements [lo, hi) of the flattened shard that a ``tp``-way split gives ``tp_rank``,
        whatever TP degree the checkpoint was written at. Only the stored rows that hold them are
        read, so a TP change costs each rank its own share, not its whole pipeline stage: exactly
        its share for row-split tensors; for column-split ones (attention output, MLP down
        projection) whole stored rows, at most new TP / stored TP times the share."""
        stored = self.shards(key)
        if len(stored) == tp:
            return self.read_range(key, tp_rank, lo, hi)
        dim = split_dim(name)
        if dim is None:  # replicated: each stored shard is the whole tensor
            return self.read_range(key, 0, lo, hi)
        full = self._canonical_shape(key, name)
        new = shard_blocks(name, full[dim], tp, tp_rank)
        old = [shard_blocks(name, full[dim], len(stored), k) for k in range(len(stored))]
        if new is None or None in old or (dim == 1 and len(full) != 2):  # uneven: merge, then cut
            return shard(name, self.get(name, key.split("/", 1)[0]), tp_rank, tp).reshape(-1)[lo:hi]
        if dim == 0:
            return self._rows_resharded(key, math.prod(full[1:]), new, old, lo, hi)
        return self._columns_resharded(key, new[0], [b[0] for b in old], lo, hi)

    def _rows_resharded(self, key, row: int, new, old, lo: int, hi: int) -> torch.Tensor:
        """Row-split tensor: elements [lo, hi) of a shard made of canonical row blocks ``new``,
        read from the stored shards whose blocks are ``old`` (k: that shard's blocks)."""
        stored = []  # (first row, end row, stored shard, its row offset inside that shard)
        for k, blocks in enumerate(old):
            offset = 0
            for a, b in blocks:
                stored.append((a, b, k, offset))
                offset += b - a
        stored.sort()
        out, pos = [], 0
        for a, b in new:
            x, y = max(lo, pos) - pos + a * row, min(hi, pos + (b - a) * row) - pos + a * row  # canonical
            for sa, sb, k, offset in stored:
                u, v = max(x, sa * row), min(y, sb * row)
                if u < v:
                    out.append(self.read_range(key, k, u - (sa - offset) * row, v - (sa - offset) * row))
            pos += (b - a) * row
        return torch.cat(out) if len(out) > 1 else out[0]

    def _columns_resharded(self, key, new: tuple[int, int], old: list[tuple[int, int]], lo: int,
                           hi: int) -> torch.Tensor:
        """Column-split 2-D tensor: elements [lo, hi) of the shard holding canonical columns
        ``new``; the stored shard k holds columns ``old[k]``. Reads the rows [lo, hi) spans."""
        c0, c1 = new
        width = c1 - c0
        r0, r1 = lo // width, -(-hi // width)
        cols = []
        for k, (a, b) in enumerate(old):
            u, v = max(c0, a), min(c1, b)
            if u < v:
                rows = self.read_range(key, k, r0 * (b - a), r1 * (b - a)).view(r1 - r0, b - a)
                cols.append(rows[:, u - a:v - a])
        return torch.cat(cols, dim=1).reshape(-1)[lo - r0 * width:hi - r0 * width]


# ---- the optimizer's view of a parameter ------------------------------------------------------
def _base_optimizer(engine) -> torch.optim.Optimizer:
    opt = engine.ds.optimizer
    while hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def _plain(engine) -> bool:
    """No ZeRO / bf16 wrapper: parameters are their own master copies."""
    return engine.ds.optimizer is _base_optimizer(engine)


def _optimized_tensors(engine) -> list[torch.Tensor]:
    """The tensors the base optimizer keeps states for: ZeRO's flat fp32 partitions, or the
    parameters themselves without a DeepSpeed wrapper."""
    wrapper = engine.ds.optimizer
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        flats = getattr(wrapper, attr, None)
        if flats:
            return list(flats)
    return [p for g in _base_optimizer(engine).param_groups for p in g["params"]]


def ensure_optimizer_states(engine) -> None:
    """Create zero Adam states where none exist yet (a fresh optimizer), so that loading has
    somewhere to write. Mirrors what torch's AdamW creates on its first step."""
    opt = _base_optimizer(engine)
    on_device = any(g.get("fused") or g.get("capturable") for g in opt.param_groups)
    for p in _optimized_tensors(engine):
        if not opt.state.get(p):
            opt.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu"),
                            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}


def relink_optimizer_states(engine) -> None:
    """Point every parameter's ZeRO/bf16 fragment map at its Adam states.

    DeepSpeed links them once, right after the first parameter group's first step, so the
    parameters of later groups (ours: the no-weight-decay group) stay unlinked. Linking again
    is cheap (views) and makes safe_get/set_full_optimizer_state work for every parameter."""
    opt = engine.ds.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def _replicated_states(engine, param) -> dict:
    """AdamW's state table, for a parameter that no ZeRO stage partitions (no DeepSpeed wrapper:
    the parameter is its own master copy); anything else here is a bug, not a checkpoint to
    write or load without its moments."""
    if not _plain(engine):
        raise CheckpointError(f"internal error: a parameter of shape {tuple(param.shape)} has neither a ZeRO "
                              "partition nor replicated states")
    return _base_optimizer(engine).state


def _get_states(engine, param) -> dict[str, torch.Tensor | None]:
    """Master weight and Adam moments of this rank's TP shard where they are not ZeRO-partitioned."""
    st = _replicated_states(engine, param).get(param, {})
    return {"model": param.detach(), "exp_avg": st.get("exp_avg"), "exp_avg_sq": st.get("exp_avg_sq")}


def _zero3_range(param) -> tuple[int, int, int]:
    """ZeRO-3: the flat range [lo, hi) of ``param`` that this rank's partition holds, and the
    partition's size p. DeepSpeed pads the tensor to dp * p elements, p = ceil(n / dp), and DP
    rank r holds elements [r * p, (r + 1) * p): the last partition ends in padding, and a rank
    with r * p >= n holds nothing but padding (n = 5 at dp = 4: p = 2, rank 3)."""
    size = param.ds_tensor.ds_numel
    lo = dist.get_rank(group=param.ds_process_group) * size
    return min(lo, param.ds_numel), min(lo + size, param.ds_numel), size


def _adam_step(engine) -> int:
    for st in _base_optimizer(engine).state.values():
        if "step" in st:
            return int(st["step"])
    return 0


# ---- saving ----------------------------------------------------------------------------------
def _rng_state() -> dict:
    """This rank's RNG streams as tensors, ints and strings only: loadable with weights_only=True."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": get_cuda_rng_tracker().get_states()}


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _all_ok(ok: bool) -> bool:
    flag = torch.tensor([0.0 if ok else 1.0])
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0.0


def _write_file(path: Path, write) -> int:
    """Write a file with ``write(path)``, fsync it, return its size."""
    write(path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        return os.fstat(f.fileno()).st_size


def discard(path: Path) -> None:
    """Delete a checkpoint directory so that no kill can leave a ``step_*`` that looks complete:
    rename it out of the ``step_*`` namespace first (atomic), then remove the files in the
    background (what a kill leaves, clean_partial removes at the next start)."""
    doomed = path.with_name(f".deleting-{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    maybe_kill("kill_during_rotate", step_of(path))
    deleter = threading.Thread(target=shutil.rmtree, args=(doomed, True), name="checkpoint-rotate", daemon=True)
    deleter.start()
    _DELETIONS.append(deleter)


_DELETIONS: list[threading.Thread] = []


def wait_for_deletions() -> None:
    """Let rotated checkpoints finish disappearing (at exit: nothing left behind)."""
    while _DELETIONS:
        _DELETIONS.pop().join()


_ABSENT = object()


def even_range(n: int, rank: int, size: int) -> tuple[int, int]:
    """Rank ``rank``'s part of ``n`` elements split in ``size`` equal (ceil) chunks."""
    chunk = -(-n // size)
    return min(n, rank * chunk), min(n, (rank + 1) * chunk)


def replicated_shares(engine, dp_rank: int, dp_size: int) -> dict[int, tuple[int, int]]:
    """Without ZeRO every DP rank holds the same states: which flat range of each parameter
    (by ``id``) this DP rank writes. The stage's parameters, end to end, are cut into dp even
    ranges (as ZeRO-1 cuts its flat buffer), so each rank writes 1/dp of the bytes and a tensor
    is split only where a cut falls in it: meta.json's index grows by dp fragments per stage,
    not dp per tensor."""
    params = [p for chunk in engine.chunks for p in chunk.parameters()]
    lo, hi = even_range(sum(p.numel() for p in params), dp_rank, dp_size)
    shares, offset = {}, 0
    for p in params:
        shares[id(p)] = (min(max(lo - offset, 0), p.numel()), min(max(hi - offset, 0), p.numel()))
        offset += p.numel()
    return shares


def _owned(engine, param, shares: dict[int, tuple[int, int]]) -> tuple[int, dict[str, torch.Tensor]]:
    """The flat range of this rank's TP shard of ``param`` that this DP rank writes (its start),
    and the master weight and Adam moments over it. Under ZeRO-1/2 that is DeepSpeed's own
    partition (views of its flat buffers: no copy, no collective); under ZeRO-3 it is the
    parameter's own partition, trimmed of its padding (views as well, see :func:`_zero3_range`);
    without ZeRO the states are replicated and each DP rank writes its range in ``shares``
    (:func:`replicated_shares`)."""
    if hasattr(param, "ds_id"):  # ZeRO-3
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        lo, hi, _ = _zero3_range(param)
        out = {"model": safe_get_local_fp32_param(param)}
        for kind in ("exp_avg", "exp_avg_sq"):
            try:
                out[kind] = safe_get_local_optimizer_state(param, kind)
            except KeyError:  # no optimizer state yet
                pass
        return lo, {k: t[:hi - lo] for k, t in out.items() if t is not None}
    mapping = getattr(param, "_hp_mapping", _ABSENT)
    if mapping is None:  # none of this parameter lies in this rank's partition
        return 0, {}
    if mapping is not _ABSENT:
        out = {"model": mapping.get_hp_fragment()}
        for kind in ("exp_avg", "exp_avg_sq"):
            try:
                out[kind] = mapping.get_hp_fragment(kind)
            except (KeyError, ValueError, TypeError):  # no optimizer state yet
                pass
        return mapping.lp_fragment_address.start, out
    lo, hi = shares[id(param)]
    if lo == hi:
        return 0, {}
    return lo, {k: t.reshape(-1)[lo:hi] for k, t in _get_states(engine, param).items() if t is not None}


_HOST_BUFFERS: dict[str, torch.Tensor] = {}  # pinned host copies, reused from one save to the next


def _to_host(key: str, t: torch.Tensor, dtype) -> torch.Tensor:
    """A host copy of ``t`` that training can no longer change (its bytes are written later)."""
    t = t.detach().to(dtype or t.dtype)
    if t.device.type == "cpu":
        return t.clone() if t.is_contiguous() else t.contiguous()
    buf = _HOST_BUFFERS.get(key)
    if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
        buf = _HOST_BUFFERS[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return buf.copy_(t, non_blocking=True)


@dataclass
class PendingSave:
    """A checkpoint whose files are being written (by a background thread when asynchronous) and
    which :meth:`finish` commits once every rank's files are durable."""

    path: Path
    meta_state: TrainState  # step, samples and skips as of the save (training goes on meanwhile)
    adam_step: int
    recipe: Recipe
    fname: str
    entries: list
    nonfinite: list
    sizes: dict
    thread: "threading.Thread | None" = None
    error: str | None = None

    @property
    def written(self) -> bool:
        return self.thread is None or not self.thread.is_alive()

    def finish(self, state: TrainState | None = None) -> Path:
        """Wait for this rank's files, then commit (a collective: every rank calls it)."""
        if self.thread is not None:
            self.thread.join()
        root, tmp = self.path.parent, self.path.with_name(f".tmp-{self.path.name}")
        rank = dist.get_rank()
        gathered = [None] * dist.get_world_size() if rank == 0 else None
        # Only rank 0 needs every rank's fragment list (to write the index): a gather, not an all-gather.
        dist.gather_object((self.error, self.nonfinite, self.fname, self.entries, self.sizes), gathered, dst=0)
        outcome = [None]
        if rank == 0:
            outcome[0] = _commit(gathered, tmp, self.path, root, self.path.name, self.recipe, self.meta_state,
                                 self.adam_step)
        dist.broadcast_object_list(outcome, src=0)
        if outcome[0] is not None:
            raise CheckpointError(outcome[0])
        if state is not None:
            state.saved_step = self.meta_state.step
        return self.path


def _write_files(pending: PendingSave, tmp: Path, fragments: dict, rng: dict, step: int) -> None:
    """This rank's share of a checkpoint to disk, unless it is not finite (then nothing is
    written, and the commit refuses). Runs in the writer thread for a background save."""
    pending.nonfinite = [k.split("@")[0] for k, t in fragments.items() if not torch.isfinite(t).all()]
    if pending.nonfinite:
        return
    try:
        maybe_kill("kill_during_save", step)
        if fragments:
            pending.sizes[pending.fname] = _write_file(tmp / pending.fname, lambda p: save_file(fragments, str(p)))
        rng_name = f"rng/rank{dist.get_rank():05d}.pt"
        pending.sizes[rng_name] = _write_file(tmp / rng_name, lambda p: torch.save(rng, p))
        IO_BYTES["written"] += sum(pending.sizes.values())
    except OSError as err:
        pending.error = str(err)


def save(engine, recipe: Recipe, state: TrainState, output_dir: str | Path) -> Path:
    """Write a checkpoint of the current step on every rank (a collective); returns its path once
    committed. Nothing is visible until every rank's files are durable, and ``latest`` moves last.

    A step this run has already saved (``state.saved_step``: a stop signal on a checkpoint step,
    a restart stopped before its first step) is not written again: the directory ``latest``
    names is never replaced in place."""
    staged = _stage(engine, recipe, state, output_dir)
    if staged is None:
        return checkpoints_dir(output_dir) / f"step_{state.step:08d}"
    _write_files(*staged)
    return staged[0].finish(state)


def save_in_background(engine, recipe: Recipe, state: TrainState, output_dir: str | Path) -> PendingSave | None:
    """:func:`save`, but returning as soon as this rank's share is copied to host memory: a thread
    writes and fsyncs the files, and ``finish()`` commits (the trainer calls it at the first step
    boundary where every rank's files are written, and before the next save, a stop or the end).
    None when the step is already saved."""
    staged = _stage(engine, recipe, state, output_dir)
    if staged is None:
        return None
    pending = staged[0]
    pending.thread = threading.Thread(target=_write_files, args=staged, name="checkpoint-writer", daemon=True)
    pending.thread.start()
    return pending


def _stage(engine, recipe: Recipe, state: TrainState, output_dir: str | Path) -> tuple | None:
    """Prepare the ``.tmp-`` directory and copy this rank's share to host memory (collective):
    the arguments of :func:`_write_files`, or None when this step is already saved."""
    from .model import canonical_names

    root = checkpoints_dir(output_dir)
    name = f"step_{state.step:08d}"
    tmp, final = root / f".tmp-{name}", root / name
    if state.saved_step == state.step:
        return None
    from megatron.core import parallel_state as ps  # here, not at import: the converter never needs it

    rank = dist.get_rank()
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    error = None
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
    except OSError as err:
        error = err
    if not _all_ok(error is None):
        raise CheckpointError(_write_failure(root, error))

    relink_optimizer_states(engine)
    # bf16-pure holds every state in bf16 (DeepSpeed's getters hand them back as fp32): store bf16.
    store_dtype = torch.bfloat16 if recipe.train.precision == "bf16-pure" else None
    fragments, entries, shares = {}, [], replicated_shares(engine, dp_rank, dp_size)
    for chunk in engine.chunks:
        names = canonical_names(chunk)
        for module_name, param in chunk.named_parameters():
            if getattr(param, "tied_copy", False):
                continue  # the last stage's copy of a tied embedding: the first stage writes it
            pname = names[module_name]
            start, owned = _owned(engine, param, shares)  # no collective
            shape = tuple(param.ds_shape) if hasattr(param, "ds_shape") else tuple(param.shape)
            for kind, t in owned.items():
                if t.numel() == 0:
                    continue
                fkey = f"{kind}/{pname}@{start}"
                fragments[fkey] = _to_host(fkey, t, store_dtype)
                entries.append((f"{kind}/{pname}", tp_rank, shape, fkey, start, t.numel()))
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the non-blocking device-to-host copies have landed
    pending = PendingSave(final, TrainState(state.step, state.consumed_samples, state.skipped_steps),
                          _adam_step(engine), recipe, f"tp{tp_rank:02d}_pp{pp_rank:02d}_w{dp_rank:03d}.safetensors",
                          entries, [], {})
    return pending, tmp, fragments, _rng_state(), state.step


def _commit(gathered, tmp: Path, final: Path, root: Path, name: str, recipe: Recipe, state: TrainState,
            adam_step: int) -> str | None:
    """Rank 0: check what every rank wrote, write meta.json, move the checkpoint into place and
    point ``latest`` at it. Returns None, or why the checkpoint was not committed."""
    errors = [e for e, *_ in gathered if e]
    bad = sorted(k for _, nf, *_ in gathered for k in nf)
    if errors or bad:
        shutil.rmtree(tmp, ignore_errors=True)
        if bad:
            return (f"not saving step {state.step}: {len(bad)} tensors hold NaN/inf (first: {bad[0]}); the "
                    f"weights are poisoned. {_kept(root)}")
        return _write_failure(root, errors[0])
    index: dict[str, dict[int, dict]] = {}
    files: dict[str, int] = {}
    for _, _, fname, entries, sizes in gathered:
        files.update(sizes)
        for key, tp, shape, fkey, start, numel in entries:
            shard_entry = index.setdefault(key, {}).setdefault(tp, {"shape": list(shape), "parts": []})
            shard_entry["parts"].append([fname, fkey, start, numel])
    for key, by_tp in index.items():  # every shard must be tiled by its fragments, exactly
        for tp, entry in by_tp.items():
            entry["parts"].sort(key=lambda p: p[2])
            ends = [0] + [p[2] + p[3] for p in entry["parts"]]
            if [p[2] for p in entry["parts"]] != ends[:-1] or ends[-1] != math.prod(entry["shape"]):
                shutil.rmtree(tmp, ignore_errors=True)
                return f"internal error: the fragments of {key} (tp {tp}) do not tile it; nothing was saved"
    lay = recipe.layout
    meta = {"format": FORMAT_VERSION, "step": state.step, "consumed_samples": state.consumed_samples,
            "skipped_steps": state.skipped_steps, "adam_step": adam_step,
            "layout": {"tp": lay.tp, "pp": lay.pp, "vpp": lay.vpp, "dp": lay.dp,
                       "zero_stage": lay.zero_stage, "world_size": dist.get_world_size()},
            "precision": recipe.train.precision, "norm_gain_scale": recipe.train.stored_gain_scale,
            "recipe": dump_recipe(recipe), "files": dict(sorted(files.items())),
            "index": {k: [v[t] for t in sorted(v)] for k, v in sorted(index.items())}}
    try:
        _write_file(tmp / "meta.json", lambda p: p.write_text(json.dumps(meta)))
        _fsync_dir(tmp / "rng")
        _fsync_dir(tmp)
        if final.exists():
            # Not the checkpoint ``latest`` names (that one is never re-saved, see save): a step of
            # an abandoned future (the run was rolled back past it). Replace it.
            discard(final)
        maybe_kill("kill_before_commit", state.step)
        os.replace(tmp, final)
        _fsync_dir(root)
        maybe_kill("kill_before_latest", state.step)
        (root / "latest.tmp").write_text(name + "\n")
        os.replace(root / "latest.tmp", root / "latest")
        _fsync_dir(root)
        maybe_kill("kill_before_rotate", state.step)
        rotate(root, recipe, final)
    except OSError as err:
        return _write_failure(root, err)
    return None


def _kept(root: Path) -> str:
    prev = resolve(root)
    return f"The last good checkpoint is {prev}." if prev else "No earlier checkpoint exists."


def _write_failure(root: Path, error) -> str:
    prev = resolve(root)
    kept = f"the previous checkpoint {prev} is intact" if prev else "no earlier checkpoint exists"
    return (f"could not write a checkpoint under {root}: {error}. Free disk space or fix the "
            f"permissions of the output directory; {kept}.")


def rotate(root: Path, recipe: Recipe, newest: Path) -> list[Path]:
    """Keep ``newest`` (what ``latest`` names), the ``keep_last`` newest checkpoints up to it and
    every ``keep_every``-th step; delete the rest. Steps after ``newest`` (left by a rollback)
    are not this run's history yet and are left alone."""
    ck = recipe.checkpoint
    steps = sorted((p for p in root.glob("step_*") if step_of(p) <= step_of(newest)), key=step_of)
    keep = set(steps[-max(ck.keep_last, 1):]) | {newest}
    if ck.keep_every:
        keep |= {p for p in steps if step_of(p) % ck.keep_every == 0}
    removed = [p for p in steps if p not in keep]
    for p in removed:
        discard(p)
    return removed


def clean_partial(output_dir: str | Path) -> None:
    """Remove what an interrupted save or deletion left behind (rank 0 only)."""
    root = checkpoints_dir(output_dir)
    for pattern in (".tmp-step_*", ".deleting-step_*", "latest.tmp"):
        for p in root.glob(pattern):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


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


# ---- loading ---------------------------------------------------------------------------------
def _set_states(engine, param, values: dict[str, torch.Tensor]) -> None:
    """Without ZeRO: the parameter (its own master copy) and its Adam moments, whole."""
    states = _replicated_states(engine, param)
    param.data.copy_(values["model"].to(param.dtype))
    if "exp_avg" in values:
        st = states[param]
        st["exp_avg"] = values["exp_avg"].to(param.device, param.dtype).clone()
        st["exp_avg_sq"] = values["exp_avg_sq"].to(param.device, param.dtype).clone()


def _set_zero3_partition(param, source: "_ShardSource", name: str, shape: tuple[int, ...], moments: tuple,
                         gain_ratio: float) -> None:
    """ZeRO-3: this rank's partition of the master weight, of the Adam moments and of the
    model's own (low-precision) weight, from only the elements it holds (see :func:`_zero3_range`):
    no gather, no whole tensor on any rank."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    if param.ds_status == ZeroParamStatus.AVAILABLE:
        param.partition()  # drop a whole copy (a persistent parameter): the next forward gathers the new partitions
    lo, hi, size = _zero3_range(param)
    for kind in ("model", *moments):  # on every rank, even one that holds only padding
        source.check(f"{kind}/{name}", name, shape)
    if hi <= lo:
        return  # this rank's partition is all padding
    values = {k: source.part(f"{k}/{name}", name, shape, lo, hi) for k in ("model", *moments)}
    if is_norm_gain(name) and gain_ratio != 1.0:
        _rescale_gain(values, gain_ratio)
    param.ds_tensor.data[:hi - lo].copy_(values["model"])

    def padded(t: torch.Tensor) -> torch.Tensor:  # DeepSpeed sets whole partitions, padding included
        return torch.nn.functional.pad(t.float(), (0, size - (hi - lo)))

    safe_set_local_fp32_param(param, padded(values["model"]))
    for kind in moments:
        safe_set_local_optimizer_state(param, padded(values[kind]), kind)


def _rescale_gain(values: dict[str, torch.Tensor], ratio: float) -> None:
    """Re-express a norm gain stored at one scale (see model.RMSNorm) at another, exactly as the
    training would have: weight x ratio, Adam's m / ratio and v / ratio^2 (gradients of a
    parameter stored 1/ratio times larger are ratio times smaller)."""
    values["model"] = values["model"].float() * ratio
    if "exp_avg" in values:
        values["exp_avg"] = values["exp_avg"].float() / ratio
        values["exp_avg_sq"] = values["exp_avg_sq"].float() / ratio**2


def _set_adam_step(engine, step: int) -> None:
    for st in _base_optimizer(engine).state.values():
        st["step"] = torch.full_like(st["step"], step) if torch.is_tensor(st["step"]) else step


def _gather_flat(piece: torch.Tensor, n: int, group, size: int) -> torch.Tensor:
    """Every DP rank's even_range piece of an n-element tensor -> the whole tensor, on every rank."""
    chunk = -(-n // size)
    padded = torch.zeros(chunk, dtype=piece.dtype, device=piece.device)
    padded[:piece.numel()] = piece
    out = torch.empty(chunk * size, dtype=piece.dtype, device=piece.device)
    dist.all_gather_into_tensor(out, padded, group=group)
    IO_BYTES["gathered"] += out.numel() * out.element_size()
    return out[:n]


class _ShardSource:
    """This rank's TP shard of each stored tensor, read with as few bytes as the layouts allow.

    Each DP rank reads an even 1/dp of a shard that every DP rank needs whole (the weights; the
    Adam moments without ZeRO) and the DP group all-gathers it; a ZeRO partition reads just its
    own elements. At a changed TP degree the same ranges come from the stored shards that hold
    them (:meth:`CheckpointReader.read_resharded`), so no rank reads its whole stage."""

    def __init__(self, reader: CheckpointReader, device):
        from megatron.core import parallel_state as ps

        self.reader, self.device = reader, device
        self.tp, self.tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        self.group = ps.get_data_parallel_group()
        self.dp, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()

    def check(self, key: str, name: str, shape: tuple[int, ...]) -> int:
        n, stored = math.prod(shape), self.reader.shard_numel(key, name, self.tp)
        if stored != n:
            raise CheckpointError(f"{name}: the checkpoint's shard has {stored} elements at tp {self.tp}, "
                                  f"the model's {shape} has {n}: it was saved from a different model shape")
        return n

    def whole(self, key: str, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        n = self.check(key, name, shape)
        lo, hi = even_range(n, self.dp_rank, self.dp)
        piece = self.reader.read_resharded(key, name, self.tp, self.tp_rank, lo, hi).to(self.device)
        return _gather_flat(piece, n, self.group, self.dp) if self.dp > 1 else piece

    def part(self, key: str, name: str, shape: tuple[int, ...], lo: int, hi: int) -> torch.Tensor:
        self.check(key, name, shape)
        return self.reader.read_resharded(key, name, self.tp, self.tp_rank, lo, hi).to(self.device)


def load(engine, path: str | Path, with_optimizer: bool) -> CheckpointReader:
    """Load weights (and Adam states) from a checkpoint written at any layout; ``path`` is one
    :func:`plan_start` chose. See :class:`_ShardSource` for what each rank reads."""
    from .model import canonical_names

    reader = CheckpointReader(path, verified=True)
    gain_ratio = float(reader.meta.get("norm_gain_scale", 1.0)) / engine.recipe.train.stored_gain_scale
    moments = ("exp_avg", "exp_avg_sq") if with_optimizer else ()
    if with_optimizer:
        ensure_optimizer_states(engine)
    relink_optimizer_states(engine)
    source = _ShardSource(reader, engine.info.device)
    for chunk in engine.chunks:
        names = canonical_names(chunk)
        for module_name, param in chunk.named_parameters():
            name = names[module_name]
            if not reader.has(name) and reader.has(te_name(name)):
                name = te_name(name)  # written before checkpoints always used local-spec names
            if not reader.has(name):
                raise CheckpointError(f"checkpoint {reader.path} has no weights for {name}: it was "
                                      "saved from a different model shape")
            for kind in moments:
                if not reader.has(name, kind):
                    raise CheckpointError(f"checkpoint {reader.path} has no optimizer state for "
                                          f"{name}; load it with checkpoint.init_mode=model")
            want = tuple(param.ds_shape) if hasattr(param, "ds_shape") else tuple(param.shape)
            if hasattr(param, "ds_id"):  # ZeRO-3: only this rank's partition is read and set
                _set_zero3_partition(param, source, name, want, moments, gain_ratio)
                continue
            weight = source.whole(f"model/{name}", name, want)
            mapping = getattr(param, "_hp_mapping", _ABSENT)
            if mapping is _ABSENT:  # no ZeRO partition: every state whole
                values = {"model": weight.view(want)}
                values.update({k: source.whole(f"{k}/{name}", name, want).view(want) for k in moments})
                if is_norm_gain(name) and gain_ratio != 1.0:
                    _rescale_gain(values, gain_ratio)
                _set_states(engine, param, values)
                continue
            values = {"model": weight}
            if is_norm_gain(name) and gain_ratio != 1.0:
                _rescale_gain(values, gain_ratio)
            param.data.copy_(values["model"].view(want).to(param.dtype))
            if mapping is None:
                continue  # none of this parameter lies in this rank's ZeRO partition
            a = mapping.lp_fragment_address
            lo, hi = a.start, a.start + a.numel
            frag = {"model": weight[lo:hi]}
            frag.update({k: source.part(f"{k}/{name}", name, want, lo, hi) for k in moments})
            if is_norm_gain(name) and gain_ratio != 1.0:
                _rescale_gain(frag, gain_ratio)
            for kind, t in frag.items():
                target = mapping.get_hp_fragment(None if kind == "model" else kind)
                target.data.copy_(t.to(target.dtype))
    if with_optimizer:
        _set_adam_step(engine, reader.meta["adam_step"])
    return reader


def load_rng(reader: CheckpointReader, recipe: Recipe) -> bool:
    """Restore this rank's RNG streams if the layout is unchanged (else keep the fresh seeds)."""
    lay, saved = recipe.layout, reader.meta["layout"]
    if (saved["tp"], saved["pp"], saved["dp"]) != (lay.tp, lay.pp, lay.dp):
        return False
    path = reader.path / "rng" / f"rank{dist.get_rank():05d}.pt"
    if not path.is_file():
        return False
    try:
        state = torch.load(path, weights_only=True)  # never unpickle code from a checkpoint
    except Exception:
        return False  # written before RNG states were stored as plain tensors: re-seed instead
    _set_rng_state(state)
    return True
