"""DeepSpeed ZeRO around Megatron-Core model chunks: process groups, the optimizer, one train step.

Who does what:
  * Megatron-Core owns the model and the tensor/pipeline process groups, and with pp > 1 its
    pipeline schedule (1F1B or interleaved) runs the microbatches.
  * DeepSpeed owns the optimizer: ZeRO partitioning, the data-parallel gradient reduction, fp32
    master weights in bf16-mixed, gradient clipping and a grad norm that is global over TP x PP x DP.

DeepSpeed runs in its "unmanaged gradient accumulation" mode: backward passes only accumulate
locally and ``engine.step()`` is the boundary that reduces and updates, once per global batch. That
is what lets Megatron's schedule drive the backward passes with pp > 1 (ZeRO 0/1 there; ZeRO 2/3
partition gradients during backward, which DeepSpeed forbids with pipelining). With pp = 1 the
microbatches go through ``engine.backward`` so ZeRO 2/3 can reduce-scatter as gradients appear.

Loss scaling is per token: every microbatch contributes ``sum(token losses) / tokens in the global
batch``, times dp because DeepSpeed averages gradients over data-parallel ranks. The gradient is
then that of the exact per-token mean over the global batch, whatever the split into
microbatches, DP ranks or pipeline stages, and whatever the padding (SFT).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta
from functools import partial

import deepspeed
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from .errors import GaperonError
from . import quiet
from .attention import thd_inputs
from .config import Recipe
from .cwt_loss import EmbeddingCopy
from .device import backend, setup_device


class LaunchError(GaperonError, RuntimeError):
    """The processes were launched in a way this recipe cannot use."""


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _launch_env() -> tuple[int, int, int]:
    """(rank, world, local rank) from torchrun's variables, else from srun's (one task per GPU)."""
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def init_distributed(recipe: Recipe) -> DistInfo:
    """Start torch.distributed (NCCL on GPU, gloo on CPU), DeepSpeed and Megatron's groups."""
    rank, world, local_rank = _launch_env()
    lay = recipe.layout
    if world != lay.world_size:
        raise LaunchError(
            f"launched {world} processes but the recipe's layout needs tp x pp x dp = "
            f"{lay.tp} x {lay.pp} x {lay.dp} = {lay.world_size}: launch {lay.world_size} "
            f"processes or set layout.dp={max(1, world // (lay.tp * lay.pp))}")
    # DeepSpeed reads these itself; srun only sets SLURM_* ones.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    device = setup_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend(), rank=rank, world_size=world,
                                timeout=timedelta(minutes=int(os.environ.get("GAPERON_DIST_TIMEOUT_MIN", 30))))
    with quiet.known_prints_dropped():  # DeepSpeed prints that it built its CPU shm op, per rank
        deepspeed.init_distributed(dist_backend=backend(), verbose=False)
    init_model_parallel(recipe)
    model_parallel_cuda_manual_seed(recipe.train.seed)
    return DistInfo(rank, world, local_rank, device)


def init_model_parallel(recipe: Recipe, gloo_side_groups: bool = True) -> None:
    """Megatron's tensor/pipeline/data groups for the recipe's layout (this rank's place in them).
    ``gloo_side_groups=False``: without Megatron's gloo side groups, which the rehearsal's fake
    process group cannot create (and nothing of ours uses)."""
    lay = recipe.layout
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=lay.tp,
        pipeline_model_parallel_size=lay.pp,
        virtual_pipeline_model_parallel_size=lay.vpp if lay.vpp > 1 else None,
        create_gloo_process_groups=gloo_side_groups,
    )


class MegatronMPU:
    """The model-parallel unit DeepSpeed asks for, answered from Megatron's parallel_state.

    "Model parallel" is TP x PP: DeepSpeed sums grad norms over it and counts a replicated
    parameter (a norm gain) only on tensor-parallel rank 0 of each stage.
    """

    get_model_parallel_group = staticmethod(ps.get_model_parallel_group)
    get_data_parallel_group = staticmethod(ps.get_data_parallel_group)
    get_data_parallel_rank = staticmethod(ps.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(ps.get_data_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_pipeline_model_parallel_group = staticmethod(ps.get_pipeline_model_parallel_group)
    get_pipeline_model_parallel_rank = staticmethod(ps.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(ps.get_pipeline_model_parallel_world_size)

    # DeepSpeed counts replicated parameters where this is 0: it must be the TP rank, so that
    # every pipeline stage's norm gains are counted once.
    get_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)

    @staticmethod
    def get_model_parallel_world_size():
        return dist.get_world_size(group=ps.get_model_parallel_group())


def deepspeed_config(recipe: Recipe, on_gpu: bool) -> dict:
    lay, opt, precision = recipe.layout, recipe.optimizer, recipe.train.precision
    cfg = {
        "train_micro_batch_size_per_gpu": lay.micro_batch,
        "gradient_accumulation_steps": lay.num_microbatches,
        "managed_gradient_accumulation": False,
        # Unwrapped (ZeRO-0, no bf16 section) DeepSpeed would clip without keeping the norm: ClippedAdamW clips.
        "gradient_clipping": 0.0 if unwrapped(lay.zero_stage, precision) else opt.grad_clip,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {
            "stage": lay.zero_stage,
            "overlap_comm": on_gpu and lay.zero_stage >= 2,
            "contiguous_gradients": lay.zero_stage >= 2,
            "reduce_bucket_size": 5e7,
            "allgather_bucket_size": 5e7,
        },
    }
    if precision == "bf16-mixed":
        cfg["bf16"] = {"enabled": True}
    elif precision == "bf16-pure" and lay.zero_stage >= 1:
        # ZeRO keeps its own copy of each partition to update: make that copy, the gradients it
        # reduces and the Adam moments bf16 too. At ZeRO-0 no bf16 section is needed: DeepSpeed
        # then hands torch's AdamW the bf16 parameters themselves (no copy at all).
        cfg["bf16"] = {"enabled": True, "bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}
        cfg["data_types"] = {"grad_accum_dtype": "bf16"}
    return cfg


def unwrapped(zero_stage: int, precision: str) -> bool:
    """DeepSpeed hands the client optimizer the step itself: ZeRO-0 without a bf16 section
    (fp32, or bf16-pure; bf16-mixed needs ZeRO >= 1)."""
    return zero_stage == 0 and precision in ("fp32", "bf16-pure")


class ClippedAdamW(torch.optim.AdamW):
    """torch's AdamW for ZeRO-0, where no DeepSpeed wrapper clips, reports the norm or skips: it
    clips to the global norm over TP x PP (gradients are already reduced over DP at the step) and
    skips the update when that norm is not finite, as DeepSpeed's ZeRO optimizers do. The norm
    lands in ``_global_grad_norm``, where DeepSpeed's engine reads every optimizer's."""

    def __init__(self, groups, norm_params: list[torch.nn.Parameter], max_norm: float, **kwargs):
        super().__init__(groups, **kwargs)
        self.norm_params = norm_params  # the module's order: the norm sums in the order it always did
        self.max_norm = max_norm
        self._global_grad_norm: float | None = None

    def step(self, closure=None):
        self._global_grad_norm = float(self._clip())
        if not math.isfinite(self._global_grad_norm):
            for p in self.norm_params:  # with every gradient None AdamW would change nothing either
                p.grad = None
            return None
        return super().step(closure)

    def _clip(self) -> torch.Tensor:
        """deepspeed.runtime.utils.clip_grad_norm_ (the same operations in the same order, so the
        same bits) with one foreach norm and one foreach scale instead of a Python loop of each."""
        from deepspeed.runtime.utils import is_model_parallel_parameter
        from deepspeed.utils import groups

        params = [p for p in self.norm_params if p.grad is not None]
        counted = [p.grad.detach() for p in params
                   if MegatronMPU.get_model_parallel_rank() == 0 or is_model_parallel_parameter(p)]
        if counted:
            norms = torch._foreach_norm(counted, 2, dtype=torch.float32)
            total = torch.stack(norms).pow(2.0).sum().float()
        else:
            total = torch.tensor([0.0], device=params[0].device if params else None)
        dist.all_reduce(total, group=MegatronMPU.get_model_parallel_group())
        total = total.pow(1.0 / 2.0)
        # DeepSpeed averages the norm over data-parallel ranks (equal here: grads are reduced)
        pg = groups._get_data_parallel_group()
        total = total * 1.0 / float(dist.get_world_size(group=pg))
        dist.all_reduce(total, group=pg)
        if not params:
            return total
        coef = torch.min(torch.tensor([1.0], device=total.device),
                         torch.tensor([float(self.max_norm)], device=total.device) / (total + 1e-6))
        torch._foreach_mul_([p.grad.detach() for p in params], coef.reshape(()))
        return total


def _grads_to_none(params: list[torch.nn.Parameter]) -> None:
    for p in params:
        p.grad = None


def param_groups(chunks: list[torch.nn.Module], weight_decay: float) -> list[dict]:
    """No weight decay on norm gains and on the input embedding (Gaperon's recipe)."""
    decay, no_decay = [], []
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            if not p.requires_grad:
                continue
            # a tied head's copy on the last stage is the embedding: treated alike on both stages
            skip = p.ndim < 2 or name.endswith("word_embeddings.weight") or getattr(p, "tied_copy", False)
            (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class ModelChunks(torch.nn.ModuleList):
    """This rank's model chunks as one module for DeepSpeed; calls go to the first chunk."""

    def forward(self, *args, **kwargs):
        return self[0](*args, **kwargs)


@dataclass
class StepResult:
    loss: float
    grad_norm: float | None
    tokens: int  # trained tokens in the global batch
    skipped: bool = False  # non-finite loss or gradient norm: no update was applied
    lm_head: dict | None = None  # gradient norms at the LM head, on diagnosed steps


class LMHeadProbe:
    """Norms of the loss gradient reaching the logits and the final hidden states (the output
    layer's input), over the whole global batch: the "LM head is a gradient bottleneck"
    measurement (Gaperon, arXiv 2510.25771). Hooks exist only while a probe is open, so steps
    without diagnostics run the untouched model.

    Each microbatch's loss is scaled by dp / global tokens (see the module docstring), so the
    captured gradients are dp times those of the global mean loss. Logits are vocab-sharded over
    TP (shares add up); the hidden-state gradient is whole on every TP rank, or a sequence slice
    under sequence parallelism."""

    def __init__(self, chunks: list[torch.nn.Module], sequence_parallel: bool):
        self.sq = {"logits": 0.0, "hidden": 0.0}
        self.sequence_parallel = sequence_parallel
        self.heads = [c for c in chunks if getattr(c, "post_process", False)]
        self.handles = [c.output_layer.register_forward_hook(self._on_forward) for c in self.heads]
        for c in self.heads:
            c.plain_loss = True  # the hooks need the output layer's own forward

    def _capture(self, key: str):
        def hook(grad):
            self.sq[key] += grad.detach().float().pow(2).sum().item()
        return hook

    def _on_forward(self, module, args, output):
        if torch.is_grad_enabled():
            args[0].register_hook(self._capture("hidden"))
            (output[0] if isinstance(output, tuple) else output).register_hook(self._capture("logits"))

    def close(self, device) -> dict[str, float]:
        for h in self.handles:
            h.remove()
        for c in self.heads:
            c.plain_loss = False
        dp, tp = ps.get_data_parallel_world_size(), ps.get_tensor_model_parallel_world_size()
        hidden_copies = 1 if self.sequence_parallel else tp
        local = torch.tensor([self.sq["logits"], self.sq["hidden"] / hidden_copies],
                             dtype=torch.float64, device=device) / dp**2
        dist.all_reduce(local)  # ranks without the output layer add zeros
        logits, hidden = local.sqrt().tolist()
        return {"lm_head_logits_grad_norm": logits, "lm_head_hidden_grad_norm": hidden,
                "lm_head_grad_ratio": hidden / logits if logits else float("nan")}


def _position_ids(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def attention_mask(mb: dict) -> torch.Tensor | None:
    """Block-diagonal causal mask [b, 1, s, s] (True = masked, Megatron's convention) for packed
    samples that carry ``segment_ids``; None (plain causal) otherwise. RoPE is relative, so a
    document packed at offset k attends exactly as it would alone."""
    seg = mb.get("segment_ids")
    if seg is None:
        return None
    s = seg.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=seg.device).tril()
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal
    return ~allowed.unsqueeze(1)


class Engine:
    """One optimizer step per call of :meth:`train_step`, on this rank's microbatches."""

    def __init__(self, recipe: Recipe, chunks: list[torch.nn.Module], info: DistInfo):
        self.recipe, self.info = recipe, info
        self.chunks = chunks
        self.module = ModelChunks(chunks)
        opt = recipe.optimizer
        kwargs = dict(lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps,
                      **({"fused": True} if info.on_gpu else {"foreach": False}))
        groups = param_groups(chunks, opt.weight_decay)
        if unwrapped(recipe.layout.zero_stage, recipe.train.precision):
            optimizer = ClippedAdamW(groups, list(self.module.parameters()), opt.grad_clip or float("inf"), **kwargs)
        else:
            optimizer = torch.optim.AdamW(groups, **kwargs)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=self.module, optimizer=optimizer, mpu=MegatronMPU,
            config=deepspeed_config(recipe, info.on_gpu), dist_init_required=False,
        )
        if (self.ds.optimizer is optimizer) != isinstance(optimizer, ClippedAdamW):
            raise RuntimeError(f"internal error: DeepSpeed {'did not wrap' if self.ds.optimizer is optimizer else 'wrapped'}"
                               f" the optimizer at ZeRO-{recipe.layout.zero_stage} {recipe.train.precision}")
        cfg = chunks[0].config
        cfg.calculate_per_token_loss = True  # we scale the loss ourselves (see module docstring)
        cfg.no_sync_func = None
        cfg.finalize_model_grads_func = None
        cfg.grad_scale_func = None
        self.pp = recipe.layout.pp
        self.varlen = recipe.train.packed_attention == "varlen"
        self.sp_params = [p for c in chunks for p in c.parameters() if getattr(p, "sequence_parallel", False)]
        # Tied embeddings at pp > 1: the first stage's embedding and the last stage's copy (both
        # marked ``shared_embedding`` by Megatron-Core) must get the sum of both gradients.
        self.tied_params = [p for c in chunks for p in c.parameters()
                            if recipe.model.tie_embeddings and self.pp > 1 and getattr(p, "shared_embedding", False)]
        self.headless = recipe.model.head == "none"
        self.embedding_copy = None
        if self.headless and self.pp > 1:  # the last stage scores against a copy of the input embedding
            m = recipe.model
            self.embedding_copy = EmbeddingCopy(chunks, m.padded_vocab_size // recipe.layout.tp, m.hidden_size)
        if isinstance(optimizer, ClippedAdamW) and ps.get_data_parallel_world_size() == 1:
            # ZeRO-0 with one data-parallel rank: nothing to average; DeepSpeed would still flatten
            # every gradient, all-reduce it with itself and copy it back at each step.
            self.ds.enable_backward_allreduce = False
        if isinstance(optimizer, ClippedAdamW):
            # DeepSpeed's zero_grad walks named_parameters() at every step (a recursive module walk).
            self.ds.zero_grad = partial(_grads_to_none, list(self.module.parameters()))

    # ---- helpers -------------------------------------------------------------------------
    def _to_device(self, mb: dict) -> dict:
        return {k: v.to(self.info.device, non_blocking=True) for k, v in mb.items()}

    def _global_tokens(self, microbatches: list[dict]) -> torch.Tensor:
        local = sum(mb["loss_mask"].sum() for mb in microbatches).to(torch.float64)
        total = local.reshape(1).to(self.info.device)
        dist.all_reduce(total, group=ps.get_data_parallel_group())
        return total

    def _loss_and_tokens(self, loss_sum_local: torch.Tensor, tokens: torch.Tensor) -> tuple[float, int]:
        """Global mean loss, gathered from the last stage (TP rank 0) of every DP rank, and the
        global batch's token count: one host sync for both."""
        contributes = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
        t = (loss_sum_local if contributes else torch.zeros_like(loss_sum_local)).to(torch.float64)
        dist.all_reduce(t)
        loss, n = torch.stack([t.reshape(()) / tokens.reshape(()), tokens.reshape(())]).tolist()
        return loss, int(n)

    def _reduce_sequence_parallel_grads(self) -> None:
        """Norm gains see only their sequence slice under SP: sum their grads over TP."""
        for p in self.sp_params:
            if p.grad is not None:
                dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())

    def _reduce_tied_embedding_grads(self) -> None:
        """Megatron's finalize_model_grads step for tied embeddings, on ``.grad``: the input
        embedding (first stage) and the head (last stage's copy) are one weight, so each gets the
        sum of both gradients over the embedding group, and both take the same update."""
        for p in self.tied_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, group=ps.get_embedding_group())

    def set_lr(self, lr: float) -> None:
        """On the wrapper and on the optimizer it wraps: some DeepSpeed wrappers (the bf16
        FP16_UnfusedOptimizer at ZeRO-0) keep param_groups of their own that the step never reads."""
        opt = self.ds.optimizer
        while opt is not None:
            for group in opt.param_groups:
                group["lr"] = lr
            opt = getattr(opt, "optimizer", None)

    # ---- forward / backward --------------------------------------------------------------
    def _packed_thd(self, mb: dict) -> bool:
        """Packed rows go through the model as one thd sequence with cu_seqlens (attention.py)."""
        return self.varlen and "segment_ids" in mb

    def _forward(self, model, raw: dict):
        """Token losses of one host microbatch; [b, s], or [1, b*s] for packed rows under varlen."""
        mb = self._to_device(raw)
        if self._packed_thd(raw):
            tokens, labels, params = thd_inputs(mb, self.info.device)
            mask = mb["loss_mask"].reshape(labels.shape) if self.headless else None
            return model(tokens, _position_ids(tokens), None, labels=labels, packed_seq_params=params,
                         loss_mask=mask), mb
        mask = mb["loss_mask"] if self.headless else None  # CWT: masked targets are no negatives
        return model(mb["tokens"], _position_ids(mb["tokens"]), attention_mask(mb), labels=mb["labels"],
                     loss_mask=mask), mb

    def _forward_step(self, scale, data_iterator, model):
        out, mb = self._forward(model, next(data_iterator))
        return out, partial(self._loss_func, mb["loss_mask"], scale)

    @staticmethod
    def _loss_func(loss_mask, scale, token_losses):
        loss_mask = loss_mask.reshape(token_losses.shape)  # [1, b*s] under varlen packing
        loss_sum = (token_losses.float() * loss_mask).sum()
        n = loss_mask.sum().to(torch.int)
        return loss_sum * scale, n, {"loss_sum": loss_sum.detach()}

    def _run_pipeline(self, microbatches: list[dict], scale, forward_only: bool) -> torch.Tensor:
        iters = [iter(microbatches) for _ in self.chunks]
        micro, seq = microbatches[0]["tokens"].shape
        if self._packed_thd(microbatches[0]):  # stages exchange [b*s, 1, h] activations
            micro, seq = 1, micro * seq
        reduced = get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, scale),
            data_iterator=iters if len(iters) > 1 else iters[0],
            model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
            num_microbatches=len(microbatches), seq_length=seq, micro_batch_size=micro,
            forward_only=forward_only,
        )
        total = torch.zeros((), dtype=torch.float64, device=self.info.device)
        for r in reduced:
            total += r["loss_sum"].to(torch.float64)
        return total

    def train_step(self, microbatches: list[dict], lr: float, diagnose_lm_head: bool = False) -> StepResult:
        """Forward/backward every microbatch, then one update, unless the loss or the global
        gradient norm is not finite (both are all-reduced, so every rank skips together: the
        loss here, the norm inside DeepSpeed's step or :class:`ClippedAdamW`).
        ``diagnose_lm_head`` measures :class:`LMHeadProbe`."""
        if not self.module.training:  # a recursive walk over every module otherwise
            self.module.train()
        self.set_lr(lr)
        probe = LMHeadProbe(self.chunks, self.recipe.layout.sequence_parallel) if diagnose_lm_head else None
        tokens = self._global_tokens(microbatches)
        # A device tensor, not a Python float: no host sync before the forward passes. float32, as a
        # Python float would be in ``loss_sum * scale``.
        scale = (ps.get_data_parallel_world_size() / tokens.clamp(min=1)).to(torch.float32).reshape(())
        if self.embedding_copy is not None:
            self.embedding_copy.pull()
        if self.pp > 1:
            loss_sum = self._run_pipeline(microbatches, scale, forward_only=False)
        else:
            loss_sum = torch.zeros((), dtype=torch.float64, device=self.info.device)
            for raw in microbatches:
                token_losses, mb = self._forward(self.ds, raw)
                scaled, _, extra = self._loss_func(mb["loss_mask"], scale, token_losses)
                self.ds.backward(scaled, scale_wrt_gas=False)
                loss_sum += extra["loss_sum"].to(torch.float64)
        loss, n_tokens = self._loss_and_tokens(loss_sum, tokens)
        lm_head = probe.close(self.info.device) if probe else None
        if not math.isfinite(loss):
            self.ds.zero_grad()
            return StepResult(loss, None, n_tokens, skipped=True)
        self._reduce_sequence_parallel_grads()
        self._reduce_tied_embedding_grads()
        if self.embedding_copy is not None:
            self.embedding_copy.push_grad()
        self.ds.step()
        norm = float(self.ds.get_global_grad_norm())
        # ZeRO 1-3 and the bf16 optimizer discard a step whose norm is not finite (and report
        # inf); so does ClippedAdamW. Either way no update was applied.
        return StepResult(loss, norm, n_tokens, skipped=not math.isfinite(norm), lm_head=lm_head)

    @torch.no_grad()
    def eval_totals(self, microbatches: list[dict]) -> tuple[float, float]:
        """(summed token loss, trained tokens) of a global batch: for token-weighted means over
        several batches (a batch of padding rows gives (0, 0))."""
        self.module.eval()
        tokens = self._global_tokens(microbatches)
        if self.embedding_copy is not None:
            self.embedding_copy.pull()
        loss_sum = self._run_pipeline(microbatches, 1.0, forward_only=True)
        total, _ = self._loss_and_tokens(loss_sum, torch.ones_like(tokens))  # the global sum, not a mean
        return total, float(tokens.item())
