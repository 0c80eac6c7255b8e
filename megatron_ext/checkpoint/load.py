"""Loading a checkpoint written at any layout into an engine: each rank reads only what it
holds (see :class:`_ShardSource`), and its RNG streams when the layout is unchanged."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import Recipe
from ..sharding import is_norm_gain, te_name
from .format import CheckpointError, norm_gain_scale
from .reader import IO_BYTES, CheckpointReader
from .states import (_ABSENT, _rescale_gain, _set_adam_step, _set_rng_state, _set_states, _set_zero3_partition,
                     ensure_optimizer_states, even_range, relink_optimizer_states)


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
    from ..model import canonical_names

    reader = CheckpointReader(path, verified=True)
    gain_ratio = norm_gain_scale(reader.meta) / engine.recipe.train.stored_gain_scale
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
