"""Canonical (Megatron local-spec) tensor names and shapes of a model, the family and per-tensor rule
that map each to Hugging Face, and the errors, dtypes and sizes every part of the converter shares."""
from __future__ import annotations

import math
import sys
from typing import Callable

import torch

from ..config import ModelConfig
from ..errors import EXIT_FAILED, GaperonError, parse_size as _parse_size
from ..sharding import LAYER_RE, local_name, split_dim
from .families import FAMILIES
from .mapping import Family, Rule


class ConvertError(GaperonError, ValueError):
    """Input that cannot be converted. The message says what is wrong and what to do."""


class VerifyError(GaperonError, RuntimeError):
    """The converted model does not compute what the checkpoint computes."""

    exit_code = EXIT_FAILED


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000 (HF's convention: GB = 10^9); '500MiB', '1e9' and ints work too."""
    try:
        return _parse_size(text)
    except ValueError as err:
        raise ConvertError(f"--shard-size: {err}") from None


def _nbytes(dtype: torch.dtype, shape) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


EMBED, FINAL_NORM, OUTPUT = "embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"
VOCAB_TENSORS = (EMBED, OUTPUT)


def _layer(i: int, suffix: str) -> str:
    return f"decoder.layers.{i}.{suffix}"


def family_of(m: ModelConfig) -> Family:
    """The transformers family that holds exactly this model."""
    for fam in FAMILIES:
        if fam.holds(m):
            return fam
    raise ConvertError(f"no Hugging Face architecture holds model.block={m.block} with "
                       f"model.qk_layernorm={m.qk_layernorm}")


def layer_suffixes(m: ModelConfig) -> list[str]:
    """Local-spec parameter names of one layer, in conversion order."""
    return [r.megatron for r in family_of(m).layer]


def canonical_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical (local-spec) tensor a model of this shape has, in conversion order."""
    h, d, f, vp = m.hidden_size, m.kv_channels, m.ffn_hidden_size, m.padded_vocab_size
    nq, ng = m.num_attention_heads, m.num_kv_heads
    per_layer = {"input_layernorm.weight": (h,), "self_attention.linear_qkv.weight": ((nq + 2 * ng) * d, h),
                 "self_attention.linear_proj.weight": (h, nq * d), "self_attention.q_layernorm.weight": (d,),
                 "self_attention.k_layernorm.weight": (d,), "pre_mlp_layernorm.weight": (h,),
                 "mlp.linear_fc1.weight": (2 * f, h), "mlp.linear_fc2.weight": (h, f),
                 "self_attention.q_proj_layernorm.weight": (nq * d,),
                 "self_attention.k_proj_layernorm.weight": (ng * d,),
                 "post_self_attn_layernorm.weight": (h,), "post_mlp_layernorm.weight": (h,)}
    out = {EMBED: (vp, h)}
    for i in range(m.num_layers):
        for s in layer_suffixes(m):
            out[_layer(i, s)] = per_layer[s]
    out[FINAL_NORM] = (h,)
    if not m.tie_embeddings:  # tied: the head is the embedding (sharding/model.py: one tensor)
        out[OUTPUT] = (vp, h)
    return out


def vocab_tensors(m: ModelConfig) -> tuple[str, ...]:
    """The vocab matrices of ``m``: the embedding, and the output layer unless tied."""
    return (EMBED,) if m.tie_embeddings else VOCAB_TENSORS


def groups(m: ModelConfig) -> list[tuple[str, list[str]]]:
    """Canonical names in units of work: the embedding, each layer, then the final norm + head."""
    out = [("embedding", [EMBED])]
    out += [(f"layer {i}", [_layer(i, s) for s in layer_suffixes(m)]) for i in range(m.num_layers)]
    return out + [("head", [FINAL_NORM] if m.tie_embeddings else [FINAL_NORM, OUTPUT])]


def shard_shape(name: str, full: tuple[int, ...], tp: int) -> tuple[int, ...]:
    dim = split_dim(name)
    if dim is None or tp == 1:
        return tuple(full)
    out = list(full)
    out[dim] //= tp
    return tuple(out)


def rules(m: ModelConfig) -> dict[str, Rule]:
    """Canonical local-spec name -> its rule, for every tensor of ``m``, in conversion order."""
    return {r.megatron: r for r in family_of(m).rules(m)}


def rule_for(name: str, m: ModelConfig) -> Rule:
    rule = rules(m).get(local_name(name))
    if rule is None:
        raise ConvertError(f"no {family_of(m).architecture} equivalent for {name}")
    return rule


def hf_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor, in the order the export writes them."""
    shapes = canonical_shapes(m)
    return {n: s for r in rules(m).values() for n, s in zip(r.hf_names, r.hf_shapes(shapes[r.megatron], m))}


def hf_names(name: str, m: ModelConfig) -> list[str]:
    """The HF tensor(s) one canonical (local or TE-spec) tensor becomes."""
    return list(rule_for(name, m).hf_names)


def canonical_to_hf(name: str, tensor: torch.Tensor, m: ModelConfig,
                    norm_gain_multiplier: float = 1.0) -> list[tuple[str, torch.Tensor]]:
    """One canonical tensor -> [(HF name, HF tensor)], in the checkpoint's dtype.

    ``norm_gain_multiplier`` multiplies RMSNorm gains on the way out: pure-bf16 training stores the
    gains divided by a scale factor (see :func:`norm_gain_multiplier`); 1.0 leaves them as stored.
    """
    rule = rule_for(name, m)
    parts = rule.to_hf(tensor, m)
    if rule.gain and norm_gain_multiplier != 1.0:
        parts = [t * norm_gain_multiplier for t in parts]
    return list(zip(rule.hf_names, parts))


def hf_to_canonical(name: str, get: Callable[[str], torch.Tensor], m: ModelConfig) -> torch.Tensor:
    """The canonical tensor ``name`` from the HF tensors ``get(hf_name)`` returns (padding rows of
    the vocab matrices are zeros)."""
    rule = rule_for(name, m)
    return rule.from_hf([get(n) for n in rule.hf_names], m)


def stage_of(name: str, m: ModelConfig, pp: int) -> int:
    """Pipeline stage (vpp 1) holding canonical tensor ``name``."""
    if name == EMBED:
        return 0
    if name in (FINAL_NORM, OUTPUT):
        return pp - 1
    return int(LAYER_RE.match(name).group(1)) // (m.num_layers // pp)


def _describe(m: ModelConfig) -> str:
    return (f"hidden {m.hidden_size}, {m.num_layers} layers, {m.num_attention_heads} heads, "
            f"{m.num_kv_heads} kv heads, head dim {m.kv_channels}, ffn {m.ffn_hidden_size}, "
            f"vocab {m.vocab_size} padded to {m.padded_vocab_size}")


def _progress(it, desc: str, enabled: bool, total: int | None = None):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, unit="layer", total=total, file=sys.stderr, dynamic_ncols=True)
