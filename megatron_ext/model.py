"""Build the Llama-3 GPTModel (Megatron-Core) from a recipe.

Transformer Engine's layer spec is used when TE imports; otherwise Megatron's local spec with its
unfused attention swapped for :class:`SDPAttention` (torch's scaled_dot_product_attention, which
dispatches to flash / cuDNN / memory-efficient kernels on GPUs, or to the flash_attn package).
The local spec's norms are :class:`RMSNorm` (fp32 compute, sequence-parallel aware, and the
pure-bf16 gain scaling); TE keeps its fused norm+linear except under bf16-pure.
``model.block: olmo2`` builds OLMo-2 layers instead (:func:`olmo2_layer_spec`): no pre-norms,
RMSNorm on the attention and MLP outputs, QK-norm over the whole q and k projections.

Initialisation is layout-invariant: after construction every parameter is re-drawn from a
generator seeded by (seed, canonical name), at full size, and this rank keeps its TP shard. The
model at tp=2, pp=2 is therefore exactly the model at tp=1, pp=1, and no two shards of one tensor
can ever receive the same random numbers.
"""
from __future__ import annotations

import contextlib
import math
import zlib

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_layer import TransformerLayer

from .attention import varlen_attention
from .config import Recipe, RecipeError
from .sharding import local_name, shard, split_dim

try:  # Transformer Engine is optional: present on NVIDIA containers, absent on CPU boxes.
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
    import transformer_engine  # noqa: F401

    HAVE_TE = True
except Exception:  # pragma: no cover - depends on the machine
    HAVE_TE = False

DTYPES = {"fp32": torch.float32, "bf16-mixed": torch.bfloat16, "bf16-pure": torch.bfloat16}


class RMSNorm(torch.nn.Module):
    """Llama RMSNorm, normalised in fp32 whatever the parameter dtype.

    Pure-bf16 stabiliser from Gaperon (arXiv 2510.25771, the pure-bf16 training setup; the
    released code's LlamaRMSNorm ``scaling_factor=20``): the gain is *stored* divided by
    ``gain_scale`` and multiplied back in forward. A gain of 1.0 stored as 1/20 sits where bf16's
    spacing is 20x finer, so Adam's small updates are not rounded away (bf16 spacing at 1.0 is
    2^-7); it also makes the effective learning rate of the gains ``gain_scale`` times larger.
    Checkpoints record the scale (meta ``norm_gain_scale``); export to HF multiplies it back.

    Under sequence parallelism each rank normalises its own sequence slice, and a QK norm
    (``per_head``) sees only this rank's heads: the gain's gradient is then partial, so the weight
    carries ``sequence_parallel`` for the engine to all-reduce it over the TP group.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, gain_scale: float = 1.0,
                 per_head: bool = False, **unused):
        super().__init__()
        self.eps, self.gain_scale = eps, gain_scale
        self.weight = torch.nn.Parameter(torch.full((hidden_size,), 1.0 / gain_scale, dtype=config.params_dtype))
        partial = config.sequence_parallel or (per_head and config.tensor_model_parallel_size > 1)
        self.weight.sequence_parallel = partial

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        gain = self.weight.float() * self.gain_scale if self.gain_scale != 1.0 else self.weight.float()
        return (h * gain).to(x.dtype)


class _TPSum(torch.autograd.Function):
    """Sum over the tensor-parallel group, forward and backward: every rank's output depends on
    every rank's input, so each input's gradient is the sum of the gradients of all outputs."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        torch.distributed.all_reduce(x, group=ps.get_tensor_model_parallel_group())
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=ps.get_tensor_model_parallel_group())
        return grad


class ProjectionRMSNorm(torch.nn.Module):
    """OLMo-2's QK-norm: one RMSNorm over a whole q (or k) projection, all heads at once (width
    heads x head_dim, as transformers' Olmo2Attention), applied before RoPE.

    Each TP rank holds a contiguous slice of the heads and the same slice of the gain (sharded
    like the q/k columns); the mean square needs every head, so the sum of squares is summed over
    the TP group. The input is the full sequence under sequence parallelism too (linear_qkv
    gathers it), so the gain's gradient is complete on each rank."""

    def __init__(self, config, heads: int, eps: float, gain_scale: float = 1.0):
        super().__init__()
        tp = config.tensor_model_parallel_size
        self.width, self.tp, self.eps, self.gain_scale = heads * config.kv_channels, tp, eps, gain_scale
        self.weight = torch.nn.Parameter(torch.full((self.width // tp,), 1.0 / gain_scale, dtype=config.params_dtype))
        self.weight.sequence_parallel = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [s, b, heads on this rank, head_dim]
        h = x.float().flatten(-2)
        sq = h.pow(2).sum(-1, keepdim=True)
        if self.tp > 1:
            sq = _TPSum.apply(sq)
        h = h * torch.rsqrt(sq / self.width + self.eps)
        return (h * (self.weight.float() * self.gain_scale)).to(x.dtype).view(x.shape)


class Olmo2SelfAttention(SelfAttention):
    """Megatron's self-attention with OLMo-2's QK-norm on the whole q and k (before RoPE, which
    SelfAttention.forward applies after this method)."""

    def __init__(self, *args, gain_scale: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.config
        self.q_proj_layernorm = ProjectionRMSNorm(cfg, cfg.num_attention_heads, cfg.layernorm_epsilon, gain_scale)
        self.k_proj_layernorm = ProjectionRMSNorm(cfg, cfg.num_query_groups, cfg.layernorm_epsilon, gain_scale)

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, output_gate=False, split_qkv=True):
        if not split_qkv:  # pragma: no cover - only with fused_single_qkv_rope, which we never set
            raise RuntimeError("OLMo-2 QK-norm needs q and k split from the fused projection")
        query, key, *rest = super().get_query_key_value_tensors(hidden_states, key_value_states,
                                                                output_gate=output_gate, split_qkv=True)
        return (self.q_proj_layernorm(query), self.k_proj_layernorm(key), *rest)


def _norm_then_add(norm: torch.nn.Module):
    """A bias-dropout-add replacement that normalises the sublayer output before the residual
    add (our layers have no biases and no hidden dropout)."""
    def build(training, fused):
        def add(out_with_bias, residual, prob):
            out, bias = out_with_bias
            assert bias is None, "OLMo-2 blocks have no biases"
            return residual + norm(out)
        return add
    return build


class Olmo2Layer(TransformerLayer):
    """OLMo-2 ordering: no pre-norms; h = x + norm(attn(x)), out = h + norm(mlp(h)). The two
    norms replace Megatron's bias-dropout-add after each sublayer; the rest is TransformerLayer."""

    def __init__(self, config, submodules, *args, gain_scale: float = 1.0, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        h, eps = config.hidden_size, config.layernorm_epsilon
        self.post_self_attn_layernorm = RMSNorm(config, h, eps=eps, gain_scale=gain_scale)
        self.post_mlp_layernorm = RMSNorm(config, h, eps=eps, gain_scale=gain_scale)
        self.self_attn_bda = _norm_then_add(self.post_self_attn_layernorm)
        self.mlp_bda = _norm_then_add(self.post_mlp_layernorm)


def _sdpa_backends(choice: str):
    from torch.nn.attention import SDPBackend

    return {"sdpa-flash": [SDPBackend.FLASH_ATTENTION], "sdpa-cudnn": [SDPBackend.CUDNN_ATTENTION],
            "sdpa-efficient": [SDPBackend.EFFICIENT_ATTENTION], "sdpa-math": [SDPBackend.MATH]}.get(choice)


def _flash_attn_func():
    """flash_attn_func from FA3 (flash_attn_interface, Hopper) if installed, else FA2, else None."""
    for module in ("flash_attn_interface", "flash_attn"):
        try:
            return getattr(__import__(module), "flash_attn_func"), module
        except (ImportError, AttributeError):
            continue
    return None, None


class SDPAttention(MegatronModule):
    """Core attention on torch SDPA, a drop-in for Megatron's DotProductAttention.

    In: query [sq, b, np, hn], key/value [sk, b, ng, hn] (this TP rank's heads). Out: [sq, b, np*hn].
    ``attention_mask`` (Megatron convention: True = masked) is honoured when given, else causal;
    with ``packed_seq_params`` (thd) attention stays within each document (attention.varlen_attention).
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, kernel: str = "sdpa"):
        super().__init__(config=config)
        self.softmax_scale = softmax_scale
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.kernel = kernel
        self.backends = _sdpa_backends(kernel)
        self.flash_attn = _flash_attn_func()[0] if kernel == "flash-attn" else None

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        sq, b = query.shape[0], query.shape[1]
        dropout = self.dropout if self.training else 0.0
        if packed_seq_params is not None:  # packed documents, thd: query [t, np, hn] (attention.py)
            with sdpa_kernel(self.backends) if self.backends else contextlib.nullcontext():
                return varlen_attention(query, key, value, packed_seq_params, self.softmax_scale, dropout)
        if self.flash_attn is not None:
            if attention_mask is not None:
                raise RuntimeError("train.attention=flash-attn runs plain causal attention: packed samples "
                                   "(segment_ids) need train.attention=sdpa")
            q, k, v = (t.transpose(0, 1) for t in (query, key, value))  # [b, s, heads, hn]
            out = self.flash_attn(q, k, v, softmax_scale=self.softmax_scale, causal=True)
            out = out[0] if isinstance(out, tuple) else out
            return out.transpose(0, 1).reshape(sq, b, -1)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        mask = None if attention_mask is None else ~attention_mask
        with sdpa_kernel(self.backends) if self.backends else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout,
                scale=self.softmax_scale, enable_gqa=q.shape[1] != k.shape[1],
            )
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)


def attention_backend(recipe: Recipe) -> str:
    """The attention implementation this run uses (``auto`` resolved)."""
    choice = recipe.train.attention
    if choice == "auto":
        return "te" if HAVE_TE and torch.cuda.is_available() else "sdpa"
    if choice == "te" and not HAVE_TE:
        raise RecipeError("train.attention=te but Transformer Engine is not importable; "
                           "install it or set train.attention=sdpa")
    if choice == "flash-attn" and _flash_attn_func()[0] is None:
        raise RecipeError("train.attention=flash-attn but neither flash_attn_interface (FA3) nor flash_attn "
                           "(FA2) is importable; install one or set train.attention=sdpa")
    return choice


def describe_attention(recipe: Recipe) -> str:
    """One line for the start-up log: the implementation and the kernels it may use."""
    kind = attention_backend(recipe)
    if kind == "flash-attn":
        func, module = _flash_attn_func()
        version = getattr(__import__(module), "__version__", "")
        return f"flash-attn ({module} {version})".replace(" )", ")")
    if kind == "te":
        import transformer_engine

        return f"te (Transformer Engine {transformer_engine.__version__} fused attention)"
    if kind.startswith("sdpa"):
        backends = _sdpa_backends(kind)
        allowed = ",".join(b.name.lower() for b in backends) if backends else "torch's choice"
        if not torch.cuda.is_available():
            allowed += "; on CPU: math/cpu-flash"
        return f"{kind} (torch SDPA: {allowed})"
    return "unfused (Megatron DotProductAttention)"


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
        # Unbatched p2p (Megatron-LM's choice with interleaving): the batched path posts a pp=2
        # rank's sends to prev and next (the same peer) in an order its peer does not receive
        # them in, so activations and gradients swap silently (caught by our parity test on gloo).
        batch_p2p_comm=False,
        overlap_p2p_comm=False,
        **recompute,
    )


def norm_spec(recipe: Recipe, per_head: bool = False) -> ModuleSpec:
    return ModuleSpec(module=RMSNorm, params={"gain_scale": recipe.train.stored_gain_scale, "per_head": per_head})


def te_norms(recipe: Recipe) -> bool:
    """Whether Transformer Engine's own norms are used: on the TE spec, except under bf16-pure,
    whose scaled gains need :class:`RMSNorm`, and in OLMo-2 blocks, which have no pre-norms to fuse."""
    return (attention_backend(recipe) == "te" and recipe.train.precision != "bf16-pure"
            and recipe.model.block == "llama")


def layer_spec(recipe: Recipe):
    """One transformer layer. TE: its fused norm+linear, except under bf16-pure, whose scaled gains
    need :class:`RMSNorm` in front of TE's plain linears. Local: our RMSNorm and attention."""
    kind, qk_norm = attention_backend(recipe), recipe.model.qk_layernorm
    if recipe.model.block == "olmo2":
        return olmo2_layer_spec(recipe, kind)
    if kind == "te":
        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_norm)
        if not te_norms(recipe):
            from megatron.core.extensions.transformer_engine import TEColumnParallelLinear

            sub = spec.submodules
            sub.input_layernorm = sub.pre_mlp_layernorm = norm_spec(recipe)
            sub.self_attention.submodules.linear_qkv = TEColumnParallelLinear
            sub.mlp.submodules.linear_fc1 = TEColumnParallelLinear
        return spec
    spec = get_gpt_layer_local_spec(qk_layernorm=qk_norm, normalization="RMSNorm")
    sub = spec.submodules
    sub.input_layernorm = sub.pre_mlp_layernorm = norm_spec(recipe)
    if qk_norm:
        sub.self_attention.submodules.q_layernorm = norm_spec(recipe, per_head=True)
        sub.self_attention.submodules.k_layernorm = norm_spec(recipe, per_head=True)
    if kind != "unfused":
        sub.self_attention.submodules.core_attention = ModuleSpec(module=SDPAttention, params={"kernel": kind})
    return spec


def olmo2_layer_spec(recipe: Recipe, kind: str) -> ModuleSpec:
    """The Llama spec (TE's plain linears, or the local one) with OLMo-2's norms: no pre-norms,
    :class:`Olmo2Layer` for the post-sublayer norms, :class:`Olmo2SelfAttention` for QK-norm."""
    if kind == "te":
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear

        spec = get_gpt_layer_with_transformer_engine_spec()
        spec.submodules.self_attention.submodules.linear_qkv = TEColumnParallelLinear
        spec.submodules.mlp.submodules.linear_fc1 = TEColumnParallelLinear
    else:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
        if kind != "unfused":
            spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
                module=SDPAttention, params={"kernel": kind})
    gain = {"gain_scale": recipe.train.stored_gain_scale}
    sub = spec.submodules
    sub.input_layernorm = sub.pre_mlp_layernorm = IdentityOp
    sub.self_attention.module = Olmo2SelfAttention
    sub.self_attention.params = {**sub.self_attention.params, **gain}
    return ModuleSpec(module=Olmo2Layer, params=gain, submodules=sub)


def block_spec(recipe: Recipe, config: TransformerConfig, vp_stage: int | None) -> TransformerBlockSubmodules:
    """This chunk's layers plus the final norm (ours unless TE's fused path is in use)."""
    spec = layer_spec(recipe)
    if te_norms(recipe):
        from megatron.core.extensions.transformer_engine import TENorm

        final = TENorm
    else:
        final = norm_spec(recipe)
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[spec] * n, layer_norm=final)


def llama3_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_max_position_embeddings: int) -> torch.Tensor:
    """Llama-3.1's scaling of RoPE inverse frequencies (HF ``rope_type: llama3``), for any values.

    With L = original_max_position_embeddings and wavelength w = 2 pi / f: f is kept where
    w < L / high_freq_factor, divided by ``factor`` where w > L / low_freq_factor, and in between
    blended as f * ((1 - a) / factor + a) with a = (L / w - low) / (high - low), which runs from 0
    at the long-wavelength edge to 1 at the short one."""
    wavelen = 2 * math.pi / inv_freq
    ratio = original_max_position_embeddings / wavelen  # periods of this frequency in the old context
    alpha = ((ratio - low_freq_factor) / (high_freq_factor - low_freq_factor)).clamp(0.0, 1.0)
    blended = inv_freq / factor * (1 - alpha) + inv_freq * alpha
    keep = wavelen < original_max_position_embeddings / high_freq_factor
    stretch = wavelen > original_max_position_embeddings / low_freq_factor
    return torch.where(keep, inv_freq, torch.where(stretch, inv_freq / factor, blended))


def apply_rope_scaling(chunk: GPTModel, recipe: Recipe) -> None:
    """Replace the chunk's rotary inverse frequencies by their ``model.rope_scaling`` version.

    The one place RoPE scaling enters the model. Megatron-Core 0.16.1's RotaryEmbedding scales
    only with Llama-3.1's fixed low/high/original values (its ``rope_scaling`` flag), so it is
    built unscaled and its ``inv_freq`` (a plain attribute, read by every forward) is swapped here,
    before any forward has filled the embedding's cache."""
    rs = recipe.model.rope_scaling
    rotary = getattr(chunk, "rotary_pos_emb", None)
    if rs is None or rotary is None:
        return
    if rs.type != "llama3":  # pragma: no cover - the schema admits only llama3
        raise RecipeError(f"model.rope_scaling.type={rs.type!r} is not supported")
    base = rotary.inv_freq
    scaled = llama3_inv_freq(base.float(), rs.factor, rs.low_freq_factor, rs.high_freq_factor,
                             rs.original_max_position_embeddings)
    rotary.inv_freq = scaled.to(device=base.device, dtype=base.dtype)
    clear = getattr(type(rotary).forward, "cache_clear", None)  # lru_cache'd per (module, length)
    if clear is not None:
        clear()  # nothing computed unscaled may survive


class GaperonGPTModel(GPTModel):
    """Megatron-Core's GPTModel; with ``train.loss_chunk_tokens`` the training loss skips the
    full logits (megatron_ext/lm_loss.py). ``plain_loss`` forces Megatron's path (the LM-head
    probe hooks the output layer's forward)."""

    loss_chunk_tokens: int = 0
    plain_loss: bool = False
    headless: bool = False  # model.head=none: no output layer; the loss is CWT (megatron_ext/cwt_loss.py)
    cwt_temperature: float = 1.0
    cwt_embedding: torch.Tensor | None = None  # pp > 1: the last stage's copy (cwt_loss.EmbeddingCopy)

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, **kwargs):
        if self.headless and self.post_process:
            if labels is None:
                raise RuntimeError("a headless model (model.head=none) has no logits: it only computes its "
                                   "training loss; add an LM head with a hooldown (checkpoint.init_head)")
            from .cwt_loss import cwt_token_losses

            weight = self.cwt_embedding if self.cwt_embedding is not None else self.embedding.word_embeddings.weight
            return cwt_token_losses(hidden_states, labels, kwargs.get("loss_mask"), weight, self.cwt_temperature,
                                    self.config.sequence_parallel)
        if (labels is None or not self.post_process or not self.loss_chunk_tokens or self.plain_loss
                or self.config.mtp_num_layers):
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, **kwargs)
        from .lm_loss import chunked_lm_loss

        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        return chunked_lm_loss(self.output_layer, hidden_states, labels, self.loss_chunk_tokens, weight)


def build_model(recipe: Recipe, on_gpu: bool, meta: bool = False) -> list[GPTModel]:
    """This rank's model chunks (one per virtual pipeline stage), initialised. ``meta``: on the
    meta device, shapes only, not initialised (the rehearsal: a 24B stage in no memory)."""
    if meta:
        with torch.device("meta"):
            return _build_chunks(recipe, on_gpu=False)
    chunks = _build_chunks(recipe, on_gpu)
    init_weights(chunks, recipe)
    if recipe.train.compile:
        for chunk in chunks:
            for layer in chunk.decoder.layers:
                layer.compile()  # in place: parameter names (and so checkpoints) are unchanged
    return chunks


def _build_chunks(recipe: Recipe, on_gpu: bool) -> list[GPTModel]:
    config = transformer_config(recipe, on_gpu)
    vpp = recipe.layout.vpp
    chunks = []
    for vp_stage in range(vpp):
        kw = dict(vp_stage=vp_stage) if vpp > 1 else {}
        chunk = GaperonGPTModel(
            config=config,
            transformer_layer_spec=block_spec(recipe, config, vp_stage if vpp > 1 else None),
            vocab_size=recipe.model.padded_vocab_size,
            max_sequence_length=recipe.model.max_position_embeddings,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, **kw),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, **kw),
            share_embeddings_and_output_weights=recipe.model.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=int(recipe.model.rope_theta),
            **kw,
        )
        apply_rope_scaling(chunk, recipe)
        copy = tied_copy_of(chunk)
        if copy is not None:
            copy.tied_copy = True  # checkpoints skip it, the engine all-reduces its gradient
            copy.ds_pipe_replicated = True  # DeepSpeed's grad norm counts the first stage's only
        chunk.loss_chunk_tokens = recipe.train.loss_chunk_tokens
        if recipe.model.head == "none":
            make_headless(chunk, recipe.train.cwt_temperature)
        if on_gpu:
            chunk.cuda(torch.cuda.current_device())
        chunks.append(chunk)
    return chunks


def make_headless(chunk: GaperonGPTModel, temperature: float) -> None:
    """Remove the output layer (no parameter, no optimizer state, nothing in checkpoints) and
    train with the CWT loss."""
    chunk.headless, chunk.cwt_temperature = True, temperature
    if getattr(chunk, "output_layer", None) is not None:
        del chunk.output_layer
        chunk.output_layer = None


def tied_copy_of(chunk: torch.nn.Module) -> torch.nn.Parameter | None:
    """The last pipeline stage's copy of a tied input embedding (Megatron-Core keeps the LM head
    weight there, equal to the first stage's embedding through the embedding group); None when
    the chunk holds no such copy (untied, pp = 1 where the head uses the embedding itself, or a
    chunk that is not last)."""
    if not getattr(chunk, "share_embeddings_and_output_weights", False):
        return None
    if not chunk.post_process or chunk.pre_process:
        return None
    return chunk.output_layer.weight


def is_tied_copy(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tied_copy", False))


def canonical_names(chunk: torch.nn.Module) -> dict[str, str]:
    """Module parameter name -> canonical name: global layer index (independent of PP/VPP) and
    the local spec's names for TE's fused norms (independent of the spec). A tied head's copy on
    the last stage is canonically the input embedding (drawn, loaded and exported as it)."""
    out = {}
    copy = tied_copy_of(chunk)
    for name, param in chunk.named_parameters():
        if copy is not None and param is copy:
            out[name] = "embedding.word_embeddings.weight"
            continue
        parts = name.split(".")
        if parts[:2] == ["decoder", "layers"]:
            layer = chunk.decoder.layers[int(parts[2])]
            parts[2] = str(layer.layer_number - 1)
        out[name] = local_name(".".join(parts))
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
                param.fill_(1.0 / recipe.train.stored_gain_scale)
                continue
            gen = torch.Generator(device=param.device)
            gen.manual_seed(recipe.train.seed * 1_000_003 + zlib.crc32(canonical.encode()))
            full = torch.empty(full_shape(canonical, param, tp), device=param.device, dtype=torch.float32)
            full.normal_(0.0, std, generator=gen)
            param.copy_(shard(canonical, full, tp_rank, tp))
