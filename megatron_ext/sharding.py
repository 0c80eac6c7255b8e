"""Canonical full tensors <-> tensor-parallel shards, by parameter name.

"Canonical" means the tensor a TP=1 Megatron model holds, under a name whose layer index is global
(``decoder.layers.<global>.``). Model initialisation (every rank draws the full tensor from a seed
derived from its canonical name, then keeps its shard) and checkpoint conversion both go through
these two functions, so a model is the same model at every layout.
"""
from __future__ import annotations

import re

import torch

# name suffix -> dim split across TP ranks (absent: replicated on every TP rank). The one place
# this is known: model init, checkpoints and the converter's rules (convert/mapping.py) all ask split_dim.
_SPLIT_DIM = {
    "embedding.word_embeddings.weight": 0,
    "self_attention.linear_qkv.weight": 0,
    "self_attention.linear_proj.weight": 1,
    # OLMo-2's QK-norm gains span the whole q / k projection: split like their heads (model.py)
    "self_attention.q_proj_layernorm.weight": 0,
    "self_attention.k_proj_layernorm.weight": 0,
    "mlp.linear_fc1.weight": 0,
    "mlp.linear_fc2.weight": 1,
    "output_layer.weight": 0,
}
_GATED = "mlp.linear_fc1.weight"  # [gate; up]: each TP shard holds [gate_r; up_r]


def split_dim(name: str) -> int | None:
    for suffix, dim in _SPLIT_DIM.items():
        if name.endswith(suffix):
            return dim
    return None


def shard(name: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The part of canonical tensor ``full`` that TP rank ``tp_rank`` holds."""
    dim = split_dim(name)
    if dim is None or tp_size == 1:
        return full
    if name.endswith(_GATED):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]], dim=0)
    return full.chunk(tp_size, dim=dim)[tp_rank]


def shard_blocks(name: str, size: int, tp_size: int, tp_rank: int) -> list[tuple[int, int]] | None:
    """Where :func:`shard` takes TP rank ``tp_rank``'s part from, as [start, end) intervals of the
    split dimension (of length ``size``) in the order the shard holds them: one block, or the gate
    block then the up block of a gated MLP. None when the split is uneven (torch.chunk would give
    unequal parts): callers then take the whole tensor."""
    if name.endswith(_GATED):
        half = size // 2
        if size % 2 or half % tp_size:
            return None
        w = half // tp_size
        return [(tp_rank * w, (tp_rank + 1) * w), (half + tp_rank * w, half + (tp_rank + 1) * w)]
    if size % tp_size:
        return None
    w = size // tp_size
    return [(tp_rank * w, (tp_rank + 1) * w)]


def merge(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`shard`: the canonical tensor from every TP rank's shard, in rank order."""
    dim = split_dim(name)
    if dim is None or len(shards) == 1:
        return shards[0]
    if name.endswith(_GATED):
        gates, ups = zip(*(s.chunk(2, dim=0) for s in shards))
        return torch.cat([*gates, *ups], dim=0)
    return torch.cat(shards, dim=dim)


def merge_into(name: str, out: torch.Tensor, part: torch.Tensor, tp_rank: int, tp_size: int) -> None:
    """Copy TP shard ``part`` into its place in the canonical tensor ``out`` (any dtype): after
    every rank's call, ``out`` equals :func:`merge` of the shards, cast to ``out.dtype``, made
    in one pass (no merged fp32 copy first)."""
    dim = split_dim(name)
    if dim is None or tp_size == 1:
        if tp_rank == 0:
            out.copy_(part)
        return
    if name.endswith(_GATED):  # [gate; up]: each shard is [gate_r; up_r]
        for half, piece in zip(out.chunk(2, dim=0), part.chunk(2, dim=0)):
            half.chunk(tp_size, dim=0)[tp_rank].copy_(piece)
        return
    out.chunk(tp_size, dim=dim)[tp_rank].copy_(part)


def is_norm_gain(name: str) -> bool:
    """RMSNorm gains, under the local-spec and Transformer Engine names."""
    return "layernorm" in name or name.endswith("layer_norm_weight")


# Transformer Engine fuses each layer's two norms into the linear that follows them. Checkpoints
# and conversion always use the local spec's names, so a run may change spec (TE <-> local, or
# bf16-pure, whose TE layers keep the norms apart) and still load.
LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_TE_TO_LOCAL = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
                "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}
_LOCAL_TO_TE = {v: k for k, v in _TE_TO_LOCAL.items()}


def _rename(name: str, table: dict[str, str]) -> str:
    mt = LAYER_RE.match(name)
    if mt and mt.group(2) in table:
        return f"decoder.layers.{mt.group(1)}.{table[mt.group(2)]}"
    return name


def local_name(name: str) -> str:
    """A TE-spec canonical name in local-spec terms (local names pass through)."""
    return _rename(name, _TE_TO_LOCAL)


def te_name(name: str) -> str:
    """A local-spec canonical name in TE-spec terms (names TE does not fuse pass through)."""
    return _rename(name, _LOCAL_TO_TE)
