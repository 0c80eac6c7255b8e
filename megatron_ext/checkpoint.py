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

A checkpoint is written under ``.tmp-step_...`` and renamed only after every rank has written
and synced its files; ``latest`` is then replaced atomically. A crash at any point leaves the
previous checkpoint and ``latest`` intact; leftovers of an unfinished save are removed at start.
"""
from __future__ import annotations

import json
import os
import random
import shutil
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
FORMAT_VERSION = 1
STATE_KINDS = ("model", "exp_avg", "exp_avg_sq")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read. The message names the path and the fix."""


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0


# ---- reading ---------------------------------------------------------------------------------
def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def resolve(path: str | Path) -> Path | None:
    """A checkpoint directory from itself, a checkpoints dir or a run dir (via ``latest``)."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    for base in (path, path / "checkpoints"):
        latest = base / "latest"
        if latest.is_file():
            ckpt = base / latest.read_text().strip()
            if (ckpt / "meta.json").is_file():
                return ckpt
    return None


class CheckpointReader:
    """Canonical (full, TP-merged) tensors of a checkpoint, read lazily one at a time."""

    def __init__(self, path: str | Path):
        found = resolve(path)
        if found is None:
            raise CheckpointError(f"no complete checkpoint at {path} (no meta.json, no 'latest')")
        self.path = found
        self.meta = json.loads((found / "meta.json").read_text())
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
            self._handles[fname] = safe_open(str(fpath), framework="pt")
        return self._handles[fname]

    def get(self, name: str, kind: str = "model") -> torch.Tensor:
        key = f"{kind}/{name}"
        if key not in self.meta["index"]:
            raise CheckpointError(f"checkpoint {self.path} has no tensor {key}")
        files = self.meta["index"][key]
        return merge(name, [self._file(f).get_tensor(key) for f in files])


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
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": get_cuda_rng_tracker().get_states()}


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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


def save(engine, recipe: Recipe, state: TrainState, output_dir: str | Path) -> Path:
    """Write a checkpoint of the current step on every rank (a collective). Returns its path."""
    from .model import canonical_names

    root = checkpoints_dir(output_dir)
    name = f"step_{state.step:08d}"
    tmp, final = root / f".tmp-{name}", root / name
    from megatron.core import parallel_state as ps  # here, not at import: the converter never needs it

    rank = dist.get_rank()
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    fname = f"tp{tp_rank:02d}_pp{pp_rank:02d}_w{dp_rank:03d}.safetensors"

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
    tensors, order = {}, 0
    for chunk in engine.chunks:
        names = canonical_names(chunk)
        for module_name, param in chunk.named_parameters():
            states = _get_states(engine, param)  # collective under ZeRO: every DP rank calls
            if order % dp_size == dp_rank:  # spread the writing over the DP ranks
                for kind, t in states.items():
                    if t is not None:
                        tensors[f"{kind}/{names[module_name]}"] = t.detach().to("cpu", store_dtype).contiguous()
            order += 1
    try:
        maybe_kill("kill_during_save", state.step)
        if tensors:
            save_file(tensors, str(tmp / fname))
        torch.save(_rng_state(), tmp / "rng" / f"rank{rank:05d}.pt")
        with open(tmp / fname if tensors else tmp / "rng" / f"rank{rank:05d}.pt", "rb") as f:
            os.fsync(f.fileno())
    except OSError as err:
        error = err
    keys = {k: (tp_rank, fname) for k in tensors}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (error is None, keys))
    if not all(ok for ok, _ in gathered):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(_write_failure(root, error or "another rank failed to write"))

    if rank == 0:
        try:
            index: dict[str, list] = {}
            for _, k in gathered:
                for key, (t, f) in k.items():
                    index.setdefault(key, {})[t] = f
            lay = recipe.layout
            meta = {"format": FORMAT_VERSION, "step": state.step, "consumed_samples": state.consumed_samples,
                    "skipped_steps": state.skipped_steps, "adam_step": _adam_step(engine),
                    "layout": {"tp": lay.tp, "pp": lay.pp, "vpp": lay.vpp, "dp": lay.dp,
                               "zero_stage": lay.zero_stage, "world_size": dist.get_world_size()},
                    "precision": recipe.train.precision, "norm_gain_scale": recipe.train.stored_gain_scale,
                    "recipe": dump_recipe(recipe),
                    "index": {k: [v[t] for t in sorted(v)] for k, v in sorted(index.items())}}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            (root / "latest.tmp").write_text(name + "\n")
            os.replace(root / "latest.tmp", root / "latest")
            _fsync_dir(root)
            rotate(root, recipe)
        except OSError as err:
            error = err
    if not _all_ok(error is None):
        raise CheckpointError(_write_failure(root, error))
    return final


def _write_failure(root: Path, error) -> str:
    prev = resolve(root)
    kept = f"the previous checkpoint {prev} is intact" if prev else "no earlier checkpoint exists"
    return (f"could not write a checkpoint under {root}: {error}. Free disk space or fix the "
            f"permissions of the output directory; {kept}.")


def rotate(root: Path, recipe: Recipe) -> list[Path]:
    """Keep the newest ``keep_last`` checkpoints plus every ``keep_every``-th step; delete the rest."""
    ck = recipe.checkpoint
    steps = sorted(p for p in root.glob("step_*") if (p / "meta.json").is_file())
    keep = set(steps[-ck.keep_last:]) if ck.keep_last > 0 else set()
    if ck.keep_every:
        keep |= {p for p in steps if int(p.name.split("_")[1]) % ck.keep_every == 0}
    removed = [p for p in steps if p not in keep]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def clean_partial(output_dir: str | Path) -> None:
    """Remove what an interrupted save left behind (rank 0 only)."""
    root = checkpoints_dir(output_dir)
    for p in root.glob(".tmp-step_*"):
        shutil.rmtree(p, ignore_errors=True)


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
    """Load weights (and Adam states) from a checkpoint written at any layout."""
    from .model import canonical_names

    reader = CheckpointReader(path)
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
    _set_rng_state(torch.load(path, weights_only=False))
    return True
