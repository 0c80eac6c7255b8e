"""Layout-free checkpoints: save at any (tp, pp, dp, ZeRO), resume at any other.

Why our own format rather than DeepSpeed's: DeepSpeed files are per (mp rank, dp rank) and tie a
checkpoint to its layout (changing it needs the offline universal-checkpoint converter), and
Megatron's dist_checkpointing cannot see inside DeepSpeed's ZeRO optimizer. We store, per
canonical parameter name (see sharding.py), each TP shard of the fp32 master weight and of the two
Adam moments, gathered over the ZeRO partitions with DeepSpeed's safe_get_full_* API. Loading merges
the TP shards and re-shards for the new layout, so a checkpoint resumes at another DP size or ZeRO
stage as well as at another TP/PP, and the HF converter reads the same files.

Directory ``<output_dir>/checkpoints``::

    step_00000100/
        meta.json                     step, consumed samples, Adam step, layout, recipe, index
        tp00_pp00_w000.safetensors    tensors written by DP rank 0 of (tp 0, pp 0) ...
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
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from .config import Recipe, dump_recipe, recipe_from_tree
from .faults import maybe_kill
from .sharding import is_norm_gain, merge, shard, te_name

REQUEUE_EXIT_CODE = 85  # the SLURM script requeues a job that exits with this after saving
FORMAT_VERSION = 2  # 2: meta.json lists every file with its size
STATE_KINDS = ("model", "exp_avg", "exp_avg_sq")


class CheckpointError(RuntimeError):
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


def problem(ckpt: Path) -> str | None:
    """Why ``ckpt`` is not a complete checkpoint, or None. Costs one stat per file (rank 0 only)."""
    try:
        meta = read_meta(ckpt)
    except CheckpointError as err:
        return str(err)
    files = meta.get("files") or {f: None for fs in meta["index"].values() for f in fs}
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
              "ffn_hidden_size", "padded_vocab_size", "qk_layernorm")


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
        why = shape_mismatch(saved, recipe, found.path)
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
    why = shape_mismatch(_saved_recipe(pfound.path, read_meta(pfound.path)), recipe, pfound.path)
    if why:
        raise CheckpointError(why.replace("another train.output_dir", "another checkpoint.init_from"))
    return Start(parent=pfound.path, notes=tuple(pfound.notes))


class CheckpointReader:
    """Canonical (full, TP-merged) tensors of a checkpoint, read lazily one at a time."""

    def __init__(self, path: str | Path, quiet: bool = False, verified: bool = False):
        """``verified``: ``path`` is a checkpoint dir already checked by :func:`find` (on rank 0),
        so the other ranks do not stat every file again."""
        found = Found(Path(path), []) if verified else find(path)
        if found.path is None:
            raise CheckpointError(f"no complete checkpoint at {path} (no meta.json, no complete step_*)"
                                  + (f": {'; '.join(found.notes)}" if found.notes else ""))
        if found.notes and not quiet:
            print("checkpoint: " + "; ".join(found.notes), file=sys.stderr, flush=True)
        self.path = found.path
        self.notes = found.notes
        self.meta = read_meta(found.path)
        self._handles: dict[str, object] = {}

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

    def get(self, name: str, kind: str = "model") -> torch.Tensor:
        key = f"{kind}/{name}"
        if key not in self.meta["index"]:
            raise CheckpointError(f"checkpoint {self.path} has no tensor {key}")
        files = self.meta["index"][key]
        try:
            return merge(name, [self._file(f).get_tensor(key) for f in files])
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(f"checkpoint {self.path}: cannot read {key} ({err}): the checkpoint is "
                                  "damaged; delete it to resume from an earlier one") from None


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


def _get_states(engine, param) -> dict[str, torch.Tensor | None]:
    """Full (un-ZeRO-partitioned) master weight and Adam moments of this rank's TP shard.
    Collective over the data-parallel group under ZeRO."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if _plain(engine):
        st = _base_optimizer(engine).state.get(param, {})
        return {"model": param.detach(), "exp_avg": st.get("exp_avg"), "exp_avg_sq": st.get("exp_avg_sq")}
    return {"model": safe_get_full_fp32_param(param),
            "exp_avg": safe_get_full_optimizer_state(param, "exp_avg"),
            "exp_avg_sq": safe_get_full_optimizer_state(param, "exp_avg_sq")}


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
    rename it out of the ``step_*`` namespace first (atomic), then remove the files."""
    doomed = path.with_name(f".deleting-{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    maybe_kill("kill_during_rotate", step_of(path))
    shutil.rmtree(doomed, ignore_errors=True)


def save(engine, recipe: Recipe, state: TrainState, output_dir: str | Path) -> Path:
    """Write a checkpoint of the current step on every rank (a collective). Returns its path.

    A step this run has already saved (``state.saved_step``: a stop signal on a checkpoint step,
    a restart stopped before its first step) is not written again: the directory ``latest``
    names is never replaced in place."""
    from .model import canonical_names

    root = checkpoints_dir(output_dir)
    name = f"step_{state.step:08d}"
    tmp, final = root / f".tmp-{name}", root / name
    if state.saved_step == state.step:
        return final
    from megatron.core import parallel_state as ps  # here, not at import: the converter never needs it

    rank = dist.get_rank()
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    fname = f"tp{tp_rank:02d}_pp{pp_rank:02d}_w{dp_rank:03d}.safetensors"
    rng_name = f"rng/rank{rank:05d}.pt"

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
    tensors, order, nonfinite = {}, 0, []
    for chunk in engine.chunks:
        names = canonical_names(chunk)
        for module_name, param in chunk.named_parameters():
            states = _get_states(engine, param)  # collective under ZeRO: every DP rank calls
            if order % dp_size == dp_rank:  # spread the writing over the DP ranks
                for kind, t in states.items():
                    if t is not None:
                        key = f"{kind}/{names[module_name]}"
                        tensors[key] = t.detach().to("cpu", store_dtype).contiguous()
                        if not torch.isfinite(tensors[key]).all():
                            nonfinite.append(key)
            order += 1
    sizes = {}
    try:
        maybe_kill("kill_during_save", state.step)
        if tensors and not nonfinite:
            sizes[fname] = _write_file(tmp / fname, lambda p: save_file(tensors, str(p)))
        if not nonfinite:
            sizes[rng_name] = _write_file(tmp / rng_name, lambda p: torch.save(_rng_state(), p))
    except OSError as err:
        error = err
    keys = {k: (tp_rank, fname) for k in tensors}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (error is None, nonfinite, keys, sizes))
    bad = sorted(k for _, nf, _, _ in gathered for k in nf)
    if bad or not all(ok for ok, *_ in gathered):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if bad:
            raise CheckpointError(f"not saving step {state.step}: {len(bad)} tensors hold NaN/inf (first: "
                                  f"{bad[0]}); the weights are poisoned. {_kept(root)}")
        raise CheckpointError(_write_failure(root, error or "another rank failed to write"))

    if rank == 0:
        try:
            index: dict[str, dict] = {}
            files: dict[str, int] = {}
            for _, _, k, sz in gathered:
                files.update(sz)
                for key, (t, f) in k.items():
                    index.setdefault(key, {})[t] = f
            lay = recipe.layout
            meta = {"format": FORMAT_VERSION, "step": state.step, "consumed_samples": state.consumed_samples,
                    "skipped_steps": state.skipped_steps, "adam_step": _adam_step(engine),
                    "layout": {"tp": lay.tp, "pp": lay.pp, "vpp": lay.vpp, "dp": lay.dp,
                               "zero_stage": lay.zero_stage, "world_size": dist.get_world_size()},
                    "precision": recipe.train.precision, "norm_gain_scale": recipe.train.stored_gain_scale,
                    "recipe": dump_recipe(recipe), "files": dict(sorted(files.items())),
                    "index": {k: [v[t] for t in sorted(v)] for k, v in sorted(index.items())}}
            _write_file(tmp / "meta.json", lambda p: p.write_text(json.dumps(meta, indent=1)))
            _fsync_dir(tmp / "rng")
            _fsync_dir(tmp)
            if final.exists():
                # Not the checkpoint ``latest`` names (that one is never re-saved, see above): a
                # step of an abandoned future (the run was rolled back past it). Replace it.
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
            error = err
    if not _all_ok(error is None):
        raise CheckpointError(_write_failure(root, error))
    state.saved_step = state.step
    return final


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
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    master = values["model"]
    if hasattr(param, "ds_id"):  # ZeRO-3: the model weight itself is partitioned
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            param.data.copy_(master.to(param.dtype))
    else:
        param.data.copy_(master.to(param.dtype))
    if _plain(engine):
        if "exp_avg" in values:
            st = _base_optimizer(engine).state[param]
            st["exp_avg"] = values["exp_avg"].to(param.device, param.dtype).clone()
            st["exp_avg_sq"] = values["exp_avg_sq"].to(param.device, param.dtype).clone()
        return
    safe_set_full_fp32_param(param, master.to(torch.float32))
    for kind in ("exp_avg", "exp_avg_sq"):
        if kind in values:
            safe_set_full_optimizer_state(param, values[kind].to(torch.float32), kind)


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


def load(engine, path: str | Path, with_optimizer: bool) -> CheckpointReader:
    """Load weights (and Adam states) from a checkpoint written at any layout; ``path`` is one
    :func:`plan_start` chose."""
    from .model import canonical_names

    reader = CheckpointReader(path, verified=True)
    gain_ratio = float(reader.meta.get("norm_gain_scale", 1.0)) / engine.recipe.train.stored_gain_scale
    from megatron.core import parallel_state as ps

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    kinds = STATE_KINDS if with_optimizer else ("model",)
    if with_optimizer:
        ensure_optimizer_states(engine)
    relink_optimizer_states(engine)
    for chunk in engine.chunks:
        names = canonical_names(chunk)
        for module_name, param in chunk.named_parameters():
            name = names[module_name]
            if not reader.has(name) and reader.has(te_name(name)):
                name = te_name(name)  # written before checkpoints always used local-spec names
            if not reader.has(name):
                raise CheckpointError(f"checkpoint {reader.path} has no weights for {name}: it was "
                                      "saved from a different model shape")
            values = {}
            for kind in kinds:
                if kind != "model" and not reader.has(name, kind):
                    raise CheckpointError(f"checkpoint {reader.path} has no optimizer state for "
                                          f"{name}; load it with checkpoint.init_mode=model")
                full = reader.get(name, kind)
                values[kind] = shard(name, full, tp_rank, tp).to(param.device)
            if is_norm_gain(name) and gain_ratio != 1.0:
                _rescale_gain(values, gain_ratio)
            want = tuple(param.ds_shape) if hasattr(param, "ds_shape") else tuple(param.shape)
            if tuple(values["model"].shape) != want:
                raise CheckpointError(f"{name}: checkpoint shape {tuple(values['model'].shape)} does "
                                      f"not match the model's {want}")
            _set_states(engine, param, values)
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
