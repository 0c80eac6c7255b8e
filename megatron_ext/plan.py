"""Planner: will a recipe fit on the GPUs, and how fast will it run?

Answers before any allocation is requested: parameter counts, per-GPU memory by category, FLOPs
per token, step time and tokens/s, the pipeline bubble, and (``search``) which layouts fit and
are fastest. Pure arithmetic over the recipe, no torch import, so ``tools/plan.py`` runs in a
fraction of a second on a laptop.

Memory model (the most loaded GPU, max over pipeline stages)
------------------------------------------------------------
* Model states = parameters held by this GPU x ``BYTES_PER_PARAM[precision]``, with ZeRO
  partitioning each category over the data-parallel ranks from the stage in
  ``ZERO_PARTITIONS_FROM``. Linear weights are split over TP; norm gains are replicated;
  pipeline stage 0 holds the input embedding, the last stage the output layer and final norm.
  Embedding rows are the padded vocabulary (what the built model allocates).
* Activations follow Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models" (arXiv:2205.05198, sec. 4: per layer s*b*h*(34 + 5*a*s/h) bytes, /t under
  TP + sequence parallelism, 34*s*b*h/t with selective and 2*s*b*h/t with full recompute),
  re-derived for Megatron-Core's Llama block: no dropout masks, RMSNorm, GQA (K and V are
  kv_heads x head_dim wide), SwiGLU, and flash/SDPA attention, which keeps Q, K, V, the output and
  a fp32 log-sum-exp per head instead of the s^2 score matrices. Per layer and micro batch of b
  sequences of length s, on one TP rank, in elements of e bytes (2 in bf16, 4 in fp32), with
  T = tp under sequence parallelism else 1, a heads, g KV heads, head dim d, ffn f:

      none (TE spec)  e*s*b*[4h/T + (3ad + 3gd)/t + 5f/t] + 4 bytes*s*b*a/t
      selective       the same minus the log-sum-exp: with flash attention, recomputing core
                      attention saves almost nothing (the paper's s^2 saving is made by the kernel)
      full            s*b*h/T (the layer input), plus one layer's "none" set while it is recomputed

  ``layer_activation_bytes`` spells out each term and the local (no-TE) spec's extra ones; the
  CPU tests check the local formula against the tensors autograd actually saves. The last stage
  also keeps the final norm, the output-layer input and the logits: the fp32 softmax Megatron's
  vocab-parallel cross entropy saves (4 bytes) plus a transient e-byte copy, s*b*V/t each.
  Headless (model.head=none, train.objective=cwt, cwt_loss.py): no output layer and no logits;
  instead an fp32 similarity matrix [s*b/T positions, s*b targets] saved by the log-sum-exp (+ a
  transient fp32 exp in backward), the fp32 hidden states and target rows, and with pp > 1 a copy
  of the input embedding (weights + gradient, no optimizer state) on the last stage.
  In-flight micro batches (Narayanan et al. 2021; Korthikanti sec. 4.2.3): under 1F1B pipeline
  rank r holds min(pp - r, m) micro batches of its L/pp layers; interleaved (vpp > 1) it holds
  min(2(pp - r - 1) + (vpp - 1)pp + 1, m*vpp) chunks of L/(pp*vpp) layers, i.e.
  L*(1 + (pp-1)/(pp*vpp)) layers on stage 0.
* ``OVERHEAD_BYTES`` covers what is not a tensor of the model: CUDA context, NCCL and cuBLAS/TE
  workspaces, DeepSpeed communication buckets. A layout "fits" when the total is at most
  (1 - ``HEADROOM``) of the GPU memory, the headroom being for allocator fragmentation and the
  error of this model.

Not modelled: DeepSpeed's transient fp32 copy of the gradient partition at the optimizer step
(peak is during the backward, not at the step), and fp32 gradient accumulation (DeepSpeed's
BF16_Optimizer at ZeRO-0, or ``data_types.grad_accum_dtype: fp32``) which makes gradients 4 bytes.

Time model
----------
FLOPs per token (PaLM, Chowdhery et al. 2022, appendix B): ``6*N + 12*L*a*d*s`` where N counts
the matmul weights (all linear layers and the output layer; not the input embedding or norms) and
the attention term counts QK^T and AV over the full (unmasked) sequence, the convention published
MFU figures use. ``--mfu`` is the efficiency of the kernels; a layout's step time is

    step = (compute + tp_comm) * (1 + bubble) + dp_comm
    compute          = tokens_per_step * flops_per_token / (gpus * peak * mfu)
                       x recompute_factor x stage_imbalance
    recompute_factor = 1 + extra forward FLOPs / flops_per_token  (full: a whole forward = 1/3;
                       selective: the attention forward)
    stage_imbalance  = FLOPs of the last pipeline stage (its layers + output layer) / average
    bubble           = (pp - 1) / (vpp * m)            (Narayanan et al. 2021)
    tp_comm          = m * L/pp * n * 2(t-1)/t * s*b*h*e / tp_bandwidth   (not overlapped; n = 4
                       all-reduces per layer, or the same bytes as all-gather + reduce-scatter
                       under sequence parallelism; 6 with full recompute)
    dp_comm          = bytes / dp_bandwidth, not overlapped (NVLink bandwidth when the job fits
                       in one node), with G, W the gradient and weight bytes per GPU, r=(dp-1)/dp:
                       ZeRO-0/1 2rG once per step (DeepSpeed reduces at the accumulation
                       boundary); ZeRO-2 m*rG (it reduce-scatters after every micro batch) + rW;
                       ZeRO-3 m*rG + 2m*rW (weights gathered in forward and again in backward)
Pipeline point-to-point traffic (s*b*h per micro batch per stage boundary) is ignored.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from .config import ModelConfig, Recipe, RecipeError, recipe_from_tree
from .errors import DEFAULT_GPU_TFLOPS, FAILURES_PER_GPU_HOUR, parse_size

GiB = 1024**3

# Bytes per parameter of each model-state category, before ZeRO partitioning.
#   fp32:       fp32 weights and grads, AdamW m and v in fp32; from ZeRO-1 DeepSpeed also keeps an
#               fp32 copy of the partition it updates (4 bytes, /dp), as for bf16-pure below.
#   bf16-mixed: bf16 weights and grads for forward/backward, an fp32 master copy and fp32 AdamW
#               m and v owned by the (DeepSpeed) optimizer.
#   bf16-pure:  Gaperon's "bf16-true": weights, grads and AdamW m, v all bf16, no fp32 copy. At
#               ZeRO-0 AdamW updates the weights themselves; from ZeRO-1 DeepSpeed updates its own
#               (bf16, partitioned) copy of each partition and gathers it back: 2 bytes, /dp.
BYTES_PER_PARAM = {
    "fp32":       {"weights": 4, "gradients": 4, "master_weights": 4, "optimizer_states": 8},
    "bf16-mixed": {"weights": 2, "gradients": 2, "master_weights": 4, "optimizer_states": 8},
    "bf16-pure":  {"weights": 2, "gradients": 2, "master_weights": 2, "optimizer_states": 4},
}
# ZeRO stage from which a category is partitioned over the data-parallel ranks.
ZERO_PARTITIONS_FROM = {"optimizer_states": 1, "master_weights": 1, "gradients": 2, "weights": 3}
STATE_KEYS = tuple(BYTES_PER_PARAM["fp32"])  # the model-state categories of estimate_memory()
ACTIVATION_BYTES = {"fp32": 4, "bf16-mixed": 2, "bf16-pure": 2}

OVERHEAD_BYTES = int(2.5 * GiB)  # GiB: CUDA context ~0.6, NCCL ~0.5, cuBLAS/TE workspaces, DS buckets
HEADROOM = 0.10                  # fraction of GPU memory kept free: fragmentation + model error


class PlanError(RecipeError):
    """Planner input that cannot be used (e.g. a memory size it cannot read); the message says the fix."""


class DoesNotFit(PlanError):
    """A valid recipe whose layout cannot run on the stated hardware (too much memory per GPU, or a
    GPU count it does not use); the message says why and what to try. tools/plan.py exits 1."""


@dataclass(frozen=True)
class Hardware:
    gpus: int
    gpu_memory: int = 80 * GiB        # bytes
    gpu_tflops: float = DEFAULT_GPU_TFLOPS  # dense bf16 peak (H100 SXM)
    mfu: float = 0.40                 # kernel efficiency, before bubble/communication/recompute
    tp_bandwidth: float = 250e9       # bytes/s of NCCL bus bandwidth inside a node (NVLink)
    dp_bandwidth: float = 40e9        # bytes/s per GPU across nodes (~400 Gb/s InfiniBand)
    gpus_per_node: int = 8

    @property
    def data_parallel_bandwidth(self) -> float:
        """Gradient traffic stays on NVLink when the whole job fits in one node."""
        return self.tp_bandwidth if self.gpus <= self.gpus_per_node else self.dp_bandwidth

    @property
    def usable_memory(self) -> float:
        return self.gpu_memory * (1 - HEADROOM)


def parse_bytes(text: str) -> int:
    """'80GiB', '80GB', '79.6 GiB', '81559MiB' -> bytes; a bare number means GiB."""
    try:
        return parse_size(text, default_unit="GiB")
    except ValueError as err:
        raise PlanError(str(err)) from None


# ----------------------------------------------------------------------------- parameters

def linear_params(m: ModelConfig) -> int:
    """Matmul weights of one transformer layer: linear_qkv, linear_proj, fc1 [gate; up], fc2."""
    h, f, d = m.hidden_size, m.ffn_hidden_size, m.kv_channels
    q, kv = m.num_attention_heads * d, m.num_kv_heads * d
    return h * (q + 2 * kv) + q * h + 3 * h * f


def layer_params(m: ModelConfig) -> tuple[int, int]:
    """(weights split over TP, weights replicated on every TP rank) of one transformer layer.
    Two hidden-wide RMSNorm gains (Llama: before attention and MLP; OLMo-2: after them), per-head
    q/k gains with qk_layernorm, and OLMo-2's QK-norm gains over the whole q and k projections,
    which TP splits like the heads."""
    d = m.kv_channels
    qk_full = (m.num_attention_heads + m.num_kv_heads) * d if m.block == "olmo2" else 0
    replicated = 2 * m.hidden_size + (2 * d if m.qk_layernorm else 0)
    return linear_params(m) + qk_full, replicated


def count_params(m: ModelConfig, padded: bool = False) -> int:
    """Whole model; ``padded`` counts the embedding and output rows the built model allocates."""
    vocab = m.padded_vocab_size if padded else m.vocab_size
    split, replicated = layer_params(m)
    tables = 1 if m.tie_embeddings or m.head == "none" else 2  # input embedding, and the output layer unless tied or headless
    return m.num_layers * (split + replicated) + tables * vocab * m.hidden_size + m.hidden_size


def matmul_params(m: ModelConfig) -> int:
    """Weights that take part in matmuls (the N of 6N): layers and output layer, no embedding
    (headless: no output layer; its CWT similarity matmul is counted in flops_per_token)."""
    return m.num_layers * linear_params(m) + (0 if m.head == "none" else m.vocab_size * m.hidden_size)


def cwt_flops_per_token(recipe: Recipe) -> float:
    """Headless: each position's scores against every target of its micro batch, forward and
    backward: 6 x (micro_batch x seq_len) x hidden per token (0 with an LM head)."""
    if recipe.model.head != "none":
        return 0.0
    return 6.0 * recipe.layout.micro_batch * recipe.train.seq_len * recipe.model.hidden_size


def stage_params(recipe: Recipe, pp_rank: int) -> int:
    """Parameters held by one GPU of pipeline rank ``pp_rank`` (before ZeRO-3 partitioning)."""
    m, lay = recipe.model, recipe.layout
    split, replicated = layer_params(m)
    layers = m.num_layers // lay.pp
    n = layers * (split // lay.tp + replicated)
    if pp_rank == 0:
        n += m.padded_vocab_size // lay.tp * m.hidden_size
    if pp_rank == lay.pp - 1:
        n += m.hidden_size
        # tied at pp > 1: the last stage holds a copy; headless: no head (cwt's copy is no parameter)
        if m.head != "none" and not (m.tie_embeddings and lay.pp == 1):
            n += m.padded_vocab_size // lay.tp * m.hidden_size
    return n


# Bytes per parameter a checkpoint holds (checkpoint/): the weights the optimizer updates (fp32
# master copy, or the bf16 weights themselves in bf16-pure) and AdamW's two moments.
CHECKPOINT_BYTES_PER_PARAM = {"fp32": 12, "bf16-mixed": 12, "bf16-pure": 6}
FS_BANDWIDTH_GBS = 2.0  # per rank, to a parallel file system; a stated assumption, not a measurement


@dataclass
class CheckpointIO:
    """What one checkpoint moves, under checkpoint/'s rules: every rank writes the elements it
    owns (its ZeRO partition, or an even 1/dp of replicated states) and, resuming at the same TP
    degree, reads as many: 1/dp of each weight shard (the DP group all-gathers the rest) and its
    own partition of the Adam moments. Bytes are those of the busiest rank."""

    total: int          # bytes of the whole checkpoint
    ideal: float        # total / world size
    write: float        # bytes written by the busiest rank
    read: float         # bytes read by the busiest rank at a resume (same TP degree)
    read_before: float  # what the busiest rank read before (every TP shard of its stage, whole)
    save_s: float       # write / bandwidth
    load_s: float

    @property
    def ratio(self) -> float:
        return max(self.write, self.read) / self.ideal


def checkpoint_io(recipe: Recipe, bandwidth_gbs: float = FS_BANDWIDTH_GBS) -> CheckpointIO:
    lay = recipe.layout
    per_param = CHECKPOINT_BYTES_PER_PARAM[recipe.train.precision]
    stages = [stage_params(recipe, r) for r in range(lay.pp)]  # per GPU: its TP shard of the stage
    total = sum(stages) * lay.tp * per_param
    busiest = max(stages) * per_param / lay.dp
    return CheckpointIO(total=total, ideal=total / lay.world_size, write=busiest, read=busiest,
                        read_before=max(stages) * lay.tp * per_param, save_s=busiest / (bandwidth_gbs * 1e9),
                        load_s=busiest / (bandwidth_gbs * 1e9))


def checkpoint_save_seconds(recipe: Recipe, bandwidth_gbs: float) -> float:
    """Seconds one checkpoint save takes on the busiest rank (see :class:`CheckpointIO`). A lower
    bound: no metadata, no file system contention."""
    return checkpoint_io(recipe, bandwidth_gbs).save_s


HOST_COPY_GBS = 10.0  # an async save blocks training only for the device-to-host copy (assumed)
ALLOCATION_S = 20 * 3600.0  # a typical allocation; with checkpoint.interval 0 only its end saves


@dataclass
class IntervalAdvice:
    """Young-Daly: the checkpoint interval that minimises (time saving + work lost to failures) is
    sqrt(2 x blocking save time x MTBF). A failure loses on average half an interval of all GPUs."""

    gpus: int
    step_s: float
    blocking_s: float   # training paused per save (host copy when async, else the whole write)
    is_async: bool
    mtbf_s: float       # of the whole job: 1 / (gpus x failures per GPU-hour)
    optimal_s: float
    steps: int          # the advice in steps
    interval: int       # the recipe's checkpoint.interval (0: only on signals and at the end)
    allocation_s: float

    def lost_gpu_hours(self, interval: int | None = None) -> float:
        """Expected GPU-hours of training lost per failure at ``interval`` steps (default: the
        recipe's); interval 0 loses on average half an allocation (its end is the only save)."""
        interval = self.interval if interval is None else interval
        span = interval * self.step_s if interval else self.allocation_s
        return self.gpus * span / 2 / 3600


def interval_advice(recipe: Recipe, step_s: float, gpus: int | None = None,
                    failures_per_gpu_hour: float = FAILURES_PER_GPU_HOUR,
                    bandwidth_gbs: float = FS_BANDWIDTH_GBS, allocation_s: float = ALLOCATION_S,
                    on_gpu: bool = True) -> IntervalAdvice:
    """The Young-Daly interval of ``recipe`` at ``step_s`` seconds per step on ``gpus`` GPUs."""
    gpus = gpus or recipe.layout.world_size
    io = checkpoint_io(recipe, bandwidth_gbs)
    is_async = recipe.checkpoint.async_save if recipe.checkpoint.async_save is not None else on_gpu
    blocking = io.write / (HOST_COPY_GBS * 1e9) if is_async else io.save_s
    mtbf = 3600 / (gpus * failures_per_gpu_hour)
    optimal = math.sqrt(2 * blocking * mtbf)
    return IntervalAdvice(gpus=gpus, step_s=step_s, blocking_s=blocking, is_async=is_async, mtbf_s=mtbf,
                          optimal_s=optimal, steps=max(1, round(optimal / step_s)),
                          interval=recipe.checkpoint.interval, allocation_s=allocation_s)


def format_interval(a: IntervalAdvice) -> str:
    now = (f"checkpoint.interval={a.interval} ({a.interval * a.step_s / 60:.0f} min)" if a.interval
           else f"checkpoint.interval=0 (saves only at the end of a {a.allocation_s / 3600:g} h allocation)")
    return (f"interval    Young-Daly sqrt(2 x {a.blocking_s:.2f} s blocking save ({'async' if a.is_async else 'sync'})"
            f" x MTBF {a.mtbf_s / 3600:.0f} h at {a.gpus} GPUs) = {a.optimal_s / 60:.1f} min = {a.steps} steps;"
            f" a failure loses ~{a.lost_gpu_hours(a.steps):,.1f} GPU-h at that interval, "
            f"~{a.lost_gpu_hours():,.1f} GPU-h at {now}")


# ----------------------------------------------------------------------------- memory

def model_state_bytes(recipe: Recipe, pp_rank: int) -> dict[str, int]:
    """Weights, gradients, master weights and optimizer states on one GPU of ``pp_rank``."""
    n = stage_params(recipe, pp_rank)
    lay = recipe.layout
    out = {}
    for key, nbytes in BYTES_PER_PARAM[recipe.train.precision].items():
        if key == "master_weights" and lay.zero_stage == 0:
            nbytes = 0  # no DeepSpeed wrapper: AdamW updates the weights (bf16-mixed needs ZeRO >= 1)
        partitioned = lay.zero_stage >= ZERO_PARTITIONS_FROM[key]
        out[key] = n * nbytes // (lay.dp if partitioned else 1)
    if lay.zero_stage == 3:  # two layers gathered at once (current + prefetch)
        split, replicated = layer_params(recipe.model)
        out["weights"] += 2 * (split // lay.tp + replicated) * BYTES_PER_PARAM[recipe.train.precision]["weights"]
    m = recipe.model
    if m.head == "none" and lay.pp > 1 and pp_rank == lay.pp - 1:  # cwt_loss.EmbeddingCopy: weights + grad
        rows = m.padded_vocab_size // lay.tp * m.hidden_size
        table = BYTES_PER_PARAM[recipe.train.precision]
        out["weights"] += rows * table["weights"]
        out["gradients"] += rows * table["weights"]
    return out


def attention_kind(recipe: Recipe) -> str:
    """Which saved-tensor pattern applies: "te" (Transformer Engine spec, assumed for
    attention=auto because cluster images ship TE), "sdpa" (Megatron local spec + torch SDPA, the
    CPU path) or "unfused" (local spec, s^2 scores kept)."""
    return "te" if recipe.train.attention in ("auto", "te") else recipe.train.attention


def layer_activation_bytes(recipe: Recipe, recompute: str | None = None) -> int:
    """Bytes one transformer layer keeps for backward, per micro batch, on one TP rank.

    Per token, in elements of e bytes unless stated; /T = sequence-parallel split, /t = TP split:
      norms     te: 4h/T (each norm's input + its output, which the fused linear keeps for wgrad)
                sdpa/unfused: 2 x (2h fp32 + h)/T (torch.rms_norm keeps an fp32 copy of its
                input and of the normalised x; the linear keeps its own input)
      attention (ad + 2gd)/t  fused QKV output, kept alive because V is a view of it
                + ad/t + gd/t Q and K after rotary + ad/t attention output
                + 4 bytes x a/t log-sum-exp (flash) | sdpa: + ad/t the [b,a,s,d] -> [s,b,a*d] copy
                unfused: e x a*s/t softmax probabilities instead of the log-sum-exp
      mlp       5f/t  fc1 output [gate; up] (2f), silu(gate), up + glu_linear_offset, product
      olmo2     the two norms sit after attention and MLP (same saved tensors as the pre-norms),
                + 8 bytes x (ad + gd)/t: QK-norm's fp32 q/k input and normalised output
    selective drops what core attention keeps internally (the log-sum-exp, or the s^2
    probabilities); full keeps only the layer input, h/T.
    """
    m, lay, t = recipe.model, recipe.layout, recipe.train
    recompute = recompute or lay.recompute
    kind = attention_kind(recipe)
    tokens, e = t.seq_len * lay.micro_batch, ACTIVATION_BYTES[t.precision]
    h, f, tp = m.hidden_size, m.ffn_hidden_size, lay.tp
    ad, gd, a = m.num_attention_heads * m.kv_channels, m.num_kv_heads * m.kv_channels, m.num_attention_heads
    sp = tp if lay.sequence_parallel else 1
    if recompute == "full":
        return e * tokens * h // sp
    fused = kind == "te" and m.block == "llama"  # OLMo-2's norms follow their sublayer: never TE-fused
    norms = 4 * h * e if fused else 2 * (2 * h * 4 + h * e)
    attention = (ad + 2 * gd + ad + gd + ad + (ad if kind == "sdpa" else 0)) // tp
    mlp = 5 * f // tp
    total = tokens * (norms // sp + e * (attention + mlp))
    if m.block == "olmo2":  # QK-norm over whole q and k: their fp32 input and normalised copies
        total += tokens * 8 * (ad + gd) // tp
    if recompute != "selective":  # core attention's own saved state
        total += tokens * a // tp * (e * t.seq_len if kind == "unfused" else 4)
    return total


def last_stage_bytes(recipe: Recipe, transient: bool = True) -> int:
    """Final norm, output layer input and the logits (last pipeline stage, one micro batch).

    Megatron's vocab-parallel cross entropy saves an fp32 softmax (4 bytes per logit); while it is
    computed, and again in backward, an e-byte copy of the logits is alive too (``transient``).
    With ``train.loss_chunk_tokens`` only one chunk of logits is ever alive.
    """
    m, lay, t = recipe.model, recipe.layout, recipe.train
    tokens, e = t.seq_len * lay.micro_batch, ACTIVATION_BYTES[t.precision]
    sp = lay.tp if lay.sequence_parallel else 1
    h = m.hidden_size
    fused = attention_kind(recipe) == "te" and m.block == "llama"
    norm = 2 * h * e if fused else 2 * h * 4 + h * e  # + output-layer input
    vocab = m.padded_vocab_size // lay.tp
    if m.head == "none":  # cwt_loss.py: fp32 hidden + fp32 targets + their e-byte rows, scores [tokens/T, tokens]
        scores = tokens // sp * tokens * (4 + (4 if transient else 0))
        return tokens * norm // sp + tokens * h * 4 // sp + tokens * h * (4 + e) + scores
    if t.loss_chunk_tokens:  # lm_loss.py: a log-sum-exp per token and the whole (SP-gathered) input saved;
        chunk = min(t.loss_chunk_tokens, tokens)  # one chunk's logits (e-byte, fp32, fp32 exp) alive at a time
        gathered_input = tokens * h * e - tokens * h * e // sp
        return tokens * norm // sp + gathered_input + tokens * 4 + (chunk * vocab * (e + 8) if transient else 0)
    logits = tokens * vocab * (4 + (e if transient else 0))
    return tokens * norm // sp + logits


def inflight_layers(recipe: Recipe, pp_rank: int) -> int:
    """Layer x micro-batch activation sets a pipeline rank holds at its peak (1F1B warmup + 1)."""
    lay, L = recipe.layout, recipe.model.num_layers
    p, v, mb = lay.pp, lay.vpp, lay.num_microbatches
    if v == 1:
        chunks = min(p - pp_rank, mb)
    else:
        chunks = min(2 * (p - pp_rank - 1) + (v - 1) * p + 1, mb * v)
    return chunks * (L // (p * v))


def activation_bytes(recipe: Recipe, pp_rank: int, recompute: str | None = None,
                     transient: bool = True) -> int:
    """Peak activation bytes on one GPU of ``pp_rank``, all in-flight micro batches.

    ``transient=False`` counts only tensors saved for backward at the end of the forward (what a
    saved-tensor hook can measure): no logits copy, no layer being recomputed.
    """
    recompute = recompute or recipe.layout.recompute
    total = inflight_layers(recipe, pp_rank) * layer_activation_bytes(recipe, recompute)
    if recompute == "full" and transient:  # the recomputed layer holds everything during its backward
        total += layer_activation_bytes(recipe, "none")
    if pp_rank == recipe.layout.pp - 1:
        total += last_stage_bytes(recipe, transient)
    return total


def estimate_memory(recipe: Recipe, pp_rank: int | None = None,
                    attention: str | None = None) -> dict[str, int]:
    """Estimated bytes per GPU by category: weights, gradients, master_weights, optimizer_states,
    activations, overhead, total.

    ``pp_rank=None`` gives the most loaded pipeline rank (the one that decides whether the layout
    fits). ``attention`` names the backend actually built ("te", "sdpa", "unfused") when it is not
    what ``train.attention`` says (auto is planned as "te"). Compare ``total - overhead`` with
    ``torch.cuda.max_memory_allocated()``: the overhead (CUDA context, NCCL) is outside PyTorch's
    allocator.
    """
    if attention is not None:
        recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"attention": attention})})
    if pp_rank is None:
        pp_rank = peak_pp_rank(recipe)
    out = model_state_bytes(recipe, pp_rank)
    out["activations"] = activation_bytes(recipe, pp_rank)
    out["overhead"] = OVERHEAD_BYTES
    out["total"] = sum(out.values())
    return out


def peak_pp_rank(recipe: Recipe) -> int:
    """The pipeline rank with the most memory (stage 0 holds the most activations, the last one
    the logits)."""
    return max(range(recipe.layout.pp), key=lambda r: estimate_memory(recipe, r)["total"])


# ----------------------------------------------------------------------------- time

def flops_per_token(recipe: Recipe) -> float:
    """Training FLOPs per token: 6*N_matmul + 12*L*a*d*s (forward + backward)."""
    m = recipe.model
    attention = 12 * m.num_layers * m.num_attention_heads * m.kv_channels * recipe.train.seq_len
    return 6 * matmul_params(m) + attention + cwt_flops_per_token(recipe)


def stage_imbalance(recipe: Recipe) -> float:
    """Slowest pipeline stage / average stage, in FLOPs: the last stage also runs the output
    layer (V x h, as big as several layers), and the pipeline moves at its pace."""
    m, lay = recipe.model, recipe.layout
    per_layer = 6 * linear_params(m) + 12 * m.num_attention_heads * m.kv_channels * recipe.train.seq_len
    layers = m.num_layers // lay.pp
    head = cwt_flops_per_token(recipe) if m.head == "none" else 6 * m.vocab_size * m.hidden_size
    last = layers * per_layer + head
    return last / (flops_per_token(recipe) / lay.pp)


def bubble_fraction(recipe: Recipe) -> float:
    """Pipeline bubble time relative to ideal compute, (pp-1)/(vpp*m)."""
    lay = recipe.layout
    return (lay.pp - 1) / (lay.vpp * lay.num_microbatches)


def recompute_factor(recipe: Recipe) -> float:
    """Executed FLOPs / model FLOPs: recompute re-runs (part of) the forward."""
    m, F = recipe.model, flops_per_token(recipe)
    if recipe.layout.recompute == "full":  # forward is 2N of the 6N: one more forward = +1/3
        return 4 / 3
    if recipe.layout.recompute == "selective":
        attention_fwd = 4 * m.num_layers * m.num_attention_heads * m.kv_channels * recipe.train.seq_len
        return 1 + attention_fwd / F
    return 1.0


@dataclass
class StepTime:
    ideal: float       # seconds per step at the stated MFU, no bubble/communication/recompute
    compute: float     # ideal x recompute factor x stage imbalance
    tp_comm: float
    dp_comm: float
    bubble: float
    step: float        # the layout's estimate
    tokens_per_s: float
    mfu: float         # model FLOPs / (gpus * peak * step)


def step_time(recipe: Recipe, hw: Hardware) -> StepTime:
    """The simple time model of the module docstring."""
    m, lay, t = recipe.model, recipe.layout, recipe.train
    tokens = lay.global_batch * t.seq_len
    peak = hw.gpu_tflops * 1e12
    ideal = tokens * flops_per_token(recipe) / (hw.gpus * peak * hw.mfu)
    compute = ideal * recompute_factor(recipe) * stage_imbalance(recipe)
    e = ACTIVATION_BYTES[t.precision]
    n_collectives = 6 if lay.recompute == "full" else 4
    per_layer = n_collectives * 2 * (lay.tp - 1) / lay.tp * t.seq_len * lay.micro_batch * m.hidden_size * e
    tp_comm = lay.num_microbatches * (m.num_layers // lay.pp) * per_layer / hw.tp_bandwidth
    n, ring, mb = stage_params(recipe, 0), (lay.dp - 1) / lay.dp, lay.num_microbatches
    grads, weights = (n * BYTES_PER_PARAM[t.precision][k] for k in ("gradients", "weights"))
    if lay.zero_stage <= 1:    # one all-reduce (or reduce-scatter + all-gather) per step
        dp_bytes = 2 * ring * grads
    elif lay.zero_stage == 2:  # reduce-scatter after every micro batch, all-gather after the step
        dp_bytes = mb * ring * grads + ring * weights
    else:                      # ZeRO-3 also gathers weights in forward and backward
        dp_bytes = mb * ring * grads + 2 * mb * ring * weights
    dp_comm = dp_bytes / hw.data_parallel_bandwidth
    bubble = bubble_fraction(recipe)
    step = (compute + tp_comm) * (1 + bubble) + dp_comm
    return StepTime(ideal, compute, tp_comm, dp_comm, bubble, step, tokens / step,
                    tokens * flops_per_token(recipe) / (hw.gpus * peak * step))


# ----------------------------------------------------------------------------- plan

@dataclass
class Plan:
    recipe: Recipe
    hardware: Hardware
    memory: dict[str, int]   # estimate_memory() of the most loaded pipeline rank
    pp_rank: int
    time: StepTime

    @property
    def fits(self) -> bool:
        return self.memory["total"] <= self.hardware.usable_memory


def make_plan(recipe: Recipe, hw: Hardware) -> Plan:
    """Memory and time of ``recipe`` on ``hw``; refuses a layout that does not use ``hw.gpus``."""
    lay = recipe.layout
    if lay.world_size != hw.gpus:
        hint = (f"layout.dp={hw.gpus // (lay.tp * lay.pp)}" if hw.gpus % (lay.tp * lay.pp) == 0
                else f"a tp x pp that divides {hw.gpus}")
        raise DoesNotFit(f"layout tp x pp x dp = {lay.tp} x {lay.pp} x {lay.dp} = {lay.world_size} "
                        f"GPUs, but --gpus {hw.gpus}: set {hint} (or run with --search)")
    rank = peak_pp_rank(recipe)
    return Plan(recipe, hw, estimate_memory(recipe, rank), rank, step_time(recipe, hw))


def check_fits(plan: Plan) -> None:
    """Raise DoesNotFit naming the biggest memory items when the layout does not fit."""
    if plan.fits:
        return
    mem, hw = plan.memory, plan.hardware
    parts = sorted(((v, k) for k, v in mem.items() if k != "total"), reverse=True)
    biggest = ", ".join(f"{k} {v / GiB:.1f}" for v, k in parts[:3])
    raise DoesNotFit(
        f"layout does not fit: {mem['total'] / GiB:.1f} GiB per GPU (pipeline stage "
        f"{plan.pp_rank}) > {hw.usable_memory / GiB:.1f} GiB usable of {hw.gpu_memory / GiB:.1f} GiB "
        f"(largest: {biggest} GiB). Try layout.recompute=full, a higher layout.zero_stage, more "
        f"tp/pp, a smaller micro_batch, or tools/plan.py --search")


def with_layout(recipe: Recipe, **layout) -> Recipe:
    """The recipe with layout fields replaced, validated (raises RecipeError when invalid)."""
    tree = recipe.model_dump(mode="json")
    tree["layout"].update(layout)
    return recipe_from_tree(tree)


def search(recipe: Recipe, hw: Hardware, top: int = 10, stats: dict | None = None) -> list[Plan]:
    """Valid layouts for ``hw.gpus`` that fit, fastest first (ties: less memory).

    Enumerates tp in 1,2,4,8 (sequence parallel whenever tp > 1: same communication, less
    memory), pp dividing the layers, ZeRO 0-3, micro batch 1/2/4 and the recompute modes;
    interleaving (vpp 1, 2, 4) when pp > 1; the recipe's own rules (config.recipe_problems)
    reject impossible combinations. ``stats`` (a dict), if given, gets ``valid``: how many valid
    layouts were tried (0: none can use exactly ``hw.gpus`` GPUs, whatever their memory).
    """
    L = recipe.model.num_layers
    found, valid = [], 0
    for tp, pp, vpp, zero, mb, rc in itertools.product(
            (1, 2, 4, 8), range(1, L + 1), (1, 2, 4), (0, 1, 2, 3), (1, 2, 4),
            ("none", "selective", "full")):
        if hw.gpus % (tp * pp) or L % pp:
            continue
        try:
            cand = with_layout(recipe, tp=tp, pp=pp, vpp=vpp, dp=hw.gpus // (tp * pp),
                               zero_stage=zero, micro_batch=mb, recompute=rc,
                               sequence_parallel=tp > 1)
        except RecipeError:
            continue
        valid += 1
        plan = make_plan(cand, hw)
        if plan.fits:
            found.append(plan)
    if stats is not None:
        stats["valid"] = valid
    found.sort(key=lambda p: (-p.time.tokens_per_s, p.memory["total"]))
    return found[:top]


