"""Packed samples without a dense mask: document boundaries as cumulative sequence lengths.

A packed microbatch ``[b, s]`` with ``segment_ids`` is flattened into one ``thd`` sequence of
``b * s`` tokens whose documents (each conversation, and each row's trailing padding) are cut by
``cu_seqlens``; Megatron-Core carries them in :class:`PackedSeqParams`. Its rotary embedding then
restarts positions at every document (the same scores as absolute positions: RoPE is relative),
Transformer Engine runs its fused ``thd`` kernel, and our SDPA attention (model.SDPAttention)
calls :func:`varlen_attention`: flash-attn's varlen kernel when installed on a GPU, else one
causal SDPA call per document (flash / cuDNN kernels on GPU; no ``[s, s]`` mask anywhere).

``train.packed_attention: dense`` keeps the reference path: the ``[b, 1, s, s]`` block-diagonal
mask of engine.attention_mask, on SDPA only (its memory-efficient or math kernel).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams


def cu_seqlens(segment_ids: torch.Tensor) -> torch.Tensor:
    """int32 [docs + 1]: where each run of equal segment ids starts in the flattened
    ``[b, s]`` microbatch (a row start always starts a document), then ``b * s``."""
    b, s = segment_ids.shape
    flat = segment_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::s] = True
    first = torch.nonzero(starts).flatten()
    return torch.cat([first, first.new_tensor([b * s])]).to(torch.int32)


def thd_inputs(mb: dict, device) -> tuple[torch.Tensor, torch.Tensor, PackedSeqParams]:
    """(tokens [1, b*s], labels [1, b*s], PackedSeqParams) of a packed microbatch; the boundaries
    are computed from the host copy of ``segment_ids`` (no device sync), then moved."""
    cu = cu_seqlens(mb["segment_ids"].cpu())
    longest = int((cu[1:] - cu[:-1]).max())
    cu = cu.to(device)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=longest, max_seqlen_kv=longest)
    return mb["tokens"].reshape(1, -1), mb["labels"].reshape(1, -1), params


def _flash_varlen():
    """flash_attn_varlen_func from FA3 (flash_attn_interface) or FA2 (flash_attn), else None."""
    for module in ("flash_attn_interface", "flash_attn"):
        try:
            return getattr(__import__(module), "flash_attn_varlen_func")
        except (ImportError, AttributeError):
            continue
    return None


def varlen_kernel(device: torch.device) -> str:
    """What :func:`varlen_attention` runs on ``device``: ``flash-attn-varlen`` or ``sdpa-per-document``."""
    return "flash-attn-varlen" if device.type == "cuda" and _flash_varlen() is not None else "sdpa-per-document"


def varlen_attention(query, key, value, params: PackedSeqParams, softmax_scale=None, dropout: float = 0.0,
                     force_sdpa: bool = False) -> torch.Tensor:
    """Causal attention within each document of a ``thd`` sequence.

    In: query [t, np, hn], key/value [t, ng, hn] (this TP rank's heads, grouped-query allowed).
    Out: [t, np * hn]."""
    t = query.shape[0]
    cu = params.cu_seqlens_q
    flash = None if force_sdpa or not query.is_cuda else _flash_varlen()
    if flash is not None:
        out = flash(query, key, value, cu, cu, params.max_seqlen_q, params.max_seqlen_kv,
                    softmax_scale=softmax_scale, causal=True, **({"dropout_p": dropout} if dropout else {}))
        out = out[0] if isinstance(out, tuple) else out
        return out.reshape(t, -1)
    gqa = query.shape[1] != key.shape[1]
    bounds = cu.tolist()
    pieces = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        q, k, v = (x[a:b].transpose(0, 1).unsqueeze(0) for x in (query, key, value))  # [1, heads, L, hn]
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=softmax_scale,
                                           enable_gqa=gqa)
        pieces.append(o[0].transpose(0, 1))
    return torch.cat(pieces).reshape(t, -1)
