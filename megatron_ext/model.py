"""Build the Llama-3 GPTModel (Megatron-Core) from a recipe.

Transformer Engine's layer spec is used when TE imports; otherwise Megatron's local spec with its
unfused attention swapped for :class:`SDPAttention` (torch's scaled_dot_product_attention, which
dispatches to flash / cuDNN / memory-efficient kernels on GPUs).

Initialisation is layout-invariant: after construction every parameter is re-drawn from a
generator seeded by (seed, canonical name), at full size, and this rank keeps its TP shard. The
model at tp=2, pp=2 is therefore exactly the model at tp=1, pp=1, and no two shards of one tensor
can ever receive the same random numbers.
"""
from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule

from .config import Recipe
from .sharding import shard, split_dim

try:  # Transformer Engine is optional: present on NVIDIA containers, absent on CPU boxes.
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
    import transformer_engine  # noqa: F401

    HAVE_TE = True
except Exception:  # pragma: no cover - depends on the machine
    HAVE_TE = False

DTYPES = {"fp32": torch.float32, "bf16-mixed": torch.bfloat16, "bf16-pure": torch.bfloat16}


class SDPAttention(MegatronModule):
    """Core attention on torch SDPA, a drop-in for Megatron's DotProductAttention.

    In: query [sq, b, np, hn], key/value [sk, b, ng, hn] (this TP rank's heads). Out: [sq, b, np*hn].
    ``attention_mask`` (Megatron convention: True = masked) is honoured when given, else causal.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)
        self.softmax_scale = softmax_scale
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        mask = None if attention_mask is None else ~attention_mask
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None,
            dropout_p=self.dropout if self.training else 0.0, scale=self.softmax_scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        sq, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)


def attention_backend(recipe: Recipe) -> str:
    choice = recipe.train.attention
    if choice == "auto":
        return "te" if HAVE_TE and torch.cuda.is_available() else "sdpa"
    if choice == "te" and not HAVE_TE:
        raise RuntimeError("train.attention=te but Transformer Engine is not importable; "
                           "install it or set train.attention=sdpa")
    return choice


def transformer_config(recipe: Recipe, on_gpu: bool) -> TransformerConfig:
    m, lay, t = recipe.model, recipe.layout, recipe.train
    dtype = DTYPES[t.precision]
    recompute = {}
    if lay.recompute == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif lay.recompute == "selective":
        recompute = dict(recompute_granularity="selective")
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_kv_heads,
        kv_channels=m.kv_channels,
        ffn_hidden_size=m.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_eps,
        qk_layernorm=m.qk_layernorm,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=lay.tp,
        pipeline_model_parallel_size=lay.pp,
        virtual_pipeline_model_parallel_size=lay.vpp if lay.vpp > 1 else None,
        sequence_parallel=lay.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not on_gpu,
        perform_initialization=False,  # init_weights() draws every tensor, layout-invariantly
        init_method_std=m.init_std,
        deallocate_pipeline_outputs=True,
        **recompute,
    )


def layer_spec(recipe: Recipe):
    if attention_backend(recipe) == "te":
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=recipe.model.qk_layernorm)
    spec = get_gpt_layer_local_spec(qk_layernorm=recipe.model.qk_layernorm, normalization="RMSNorm")
    if attention_backend(recipe) == "sdpa":
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def build_model(recipe: Recipe, on_gpu: bool) -> list[GPTModel]:
    """This rank's model chunks (one per virtual pipeline stage), initialised."""
    config = transformer_config(recipe, on_gpu)
    spec = layer_spec(recipe)
    vpp = recipe.layout.vpp
    chunks = []
    for vp_stage in range(vpp):
        kw = dict(vp_stage=vp_stage) if vpp > 1 else {}
        chunk = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=recipe.model.padded_vocab_size,
            max_sequence_length=recipe.model.max_position_embeddings,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, **kw),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, **kw),
            share_embeddings_and_output_weights=False,
            position_embedding_type="rope",
            rotary_base=int(recipe.model.rope_theta),
            **kw,
        )
        if on_gpu:
            chunk.cuda(torch.cuda.current_device())
        chunks.append(chunk)
    init_weights(chunks, recipe)
    return chunks


def canonical_names(chunk: torch.nn.Module) -> dict[str, str]:
    """Local parameter name -> canonical name (global layer index, independent of PP/VPP)."""
    out = {}
    for name, _ in chunk.named_parameters():
        parts = name.split(".")
        if parts[:2] == ["decoder", "layers"]:
            layer = chunk.decoder.layers[int(parts[2])]
            parts[2] = str(layer.layer_number - 1)
        out[name] = ".".join(parts)
    return out


def _init_std(canonical: str, recipe: Recipe) -> float | None:
    """None means 'ones' (norm gains); output projections get the depth-scaled std."""
    if "layernorm" in canonical or canonical.endswith("final_layernorm.weight"):
        return None
    std = recipe.model.init_std
    if canonical.endswith(("linear_proj.weight", "linear_fc2.weight")):
        std /= math.sqrt(2.0 * recipe.model.num_layers)
    return std


def full_shape(canonical: str, local: torch.Tensor, tp: int) -> tuple[int, ...]:
    dim = split_dim(canonical)
    shape = list(local.shape)
    if dim is not None:
        shape[dim] *= tp
    return tuple(shape)


@torch.no_grad()
def init_weights(chunks: list[torch.nn.Module], recipe: Recipe) -> None:
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    for chunk in chunks:
        names = canonical_names(chunk)
        for local_name, param in chunk.named_parameters():
            canonical = names[local_name]
            dim = split_dim(canonical)
            # Megatron sets these only when it initialises weights itself; DeepSpeed's grad norm
            # and our checkpoints rely on them.
            set_tensor_model_parallel_attributes(param, dim is not None, -1 if dim is None else dim, 1)
            std = _init_std(canonical, recipe)
            if std is None:
                param.fill_(1.0)
                continue
            gen = torch.Generator(device=param.device)
            gen.manual_seed(recipe.train.seed * 1_000_003 + zlib.crc32(canonical.encode()))
            full = torch.empty(full_shape(canonical, param, tp), device=param.device, dtype=torch.float32)
            full.normal_(0.0, std, generator=gen)
            param.copy_(shard(canonical, full, tp_rank, tp))
