"""The Hugging Face families our models convert to and from: per family, its tensor mapping and
its config.json. The rules (mapping.py) say how each kind of tensor moves; the converter streams.

Canonical Megatron names (sharding.py) on the left, transformers' on the right; layer names are
relative to ``decoder.layers.<i>.`` and ``model.layers.<i>.``.
"""
from __future__ import annotations

from .mapping import (ColumnParallelNorm, Family, FusedQKV, GatedMLP, Norm, RowParallel, VocabParallel)

EMBEDDING = (VocabParallel("embedding.word_embeddings.weight", "model.embed_tokens.weight"),)
FINAL = (Norm("decoder.final_layernorm.weight", "model.norm.weight"),
         VocabParallel("output_layer.weight", "lm_head.weight"))

INPUT_NORM = Norm("input_layernorm.weight", "input_layernorm.weight")
PRE_MLP_NORM = Norm("pre_mlp_layernorm.weight", "post_attention_layernorm.weight")
QKV = FusedQKV("self_attention.linear_qkv.weight",
               ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"))
O_PROJ = RowParallel("self_attention.linear_proj.weight", "self_attn.o_proj.weight")
GATE_UP = GatedMLP("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"))
DOWN = RowParallel("mlp.linear_fc2.weight", "mlp.down_proj.weight")


# ---- Llama-3: pre-norm blocks ---------------------------------------------------------------
LLAMA = Family(
    architecture="LlamaForCausalLM", model_type="llama",
    model={"block": "llama", "qk_layernorm": False},
    head=EMBEDDING, tail=FINAL,
    layer=(INPUT_NORM, QKV, O_PROJ, PRE_MLP_NORM, GATE_UP, DOWN),
    config=lambda cfg, m: {**cfg, "mlp_bias": False, "pretraining_tp": 1},
    refuse=lambda cfg: ["mlp_bias is true; our MLP has no biases"] if cfg.get("mlp_bias") else [],
)


# ---- Qwen3 = Llama blocks + per-head QK-norm before RoPE (Megatron's qk_layernorm: one
# head_dim-wide gain shared by the heads) ------------------------------------------------------
QWEN3 = Family(
    architecture="Qwen3ForCausalLM", model_type="qwen3",
    model={"block": "llama", "qk_layernorm": True},
    head=EMBEDDING, tail=FINAL,
    layer=(INPUT_NORM, QKV, O_PROJ,
           Norm("self_attention.q_layernorm.weight", "self_attn.q_norm.weight"),
           Norm("self_attention.k_layernorm.weight", "self_attn.k_norm.weight"),
           PRE_MLP_NORM, GATE_UP, DOWN),
    config=lambda cfg, m: {**cfg, "use_sliding_window": False, "sliding_window": None,
                           "max_window_layers": m.num_layers, "layer_types": ["full_attention"] * m.num_layers},
    refuse=lambda cfg: ["use_sliding_window / layer_types ask for sliding-window attention; our attention is "
                        "full causal attention in every layer"]
    if cfg.get("use_sliding_window") or any(t != "full_attention" for t in cfg.get("layer_types") or []) else [],
)


# ---- OLMo-2 (Gaperon-24B's blocks): no pre-norms, RMSNorm on the attention and MLP outputs,
# QK-norm over the whole q and k projections (split across TP like their heads) ----------------
OLMO2 = Family(
    architecture="Olmo2ForCausalLM", model_type="olmo2",
    model={"block": "olmo2", "qk_layernorm": False},
    head=EMBEDDING, tail=FINAL,
    layer=(QKV, O_PROJ,
           ColumnParallelNorm("self_attention.q_proj_layernorm.weight", "self_attn.q_norm.weight"),
           ColumnParallelNorm("self_attention.k_proj_layernorm.weight", "self_attn.k_norm.weight"),
           Norm("post_self_attn_layernorm.weight", "post_attention_layernorm.weight"),
           GATE_UP, DOWN,
           Norm("post_mlp_layernorm.weight", "post_feedforward_layernorm.weight")),
    config=lambda cfg, m: cfg,
)

FAMILIES = (LLAMA, QWEN3, OLMO2)
