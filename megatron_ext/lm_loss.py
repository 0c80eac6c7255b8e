"""The output layer and its vocab-parallel cross entropy, a chunk of tokens at a time.

Megatron-Core computes the logits of every token of a micro batch at once and its cross entropy
keeps an fp32 softmax of them for backward: with Llama-3's 128,256-token vocabulary that is
``tokens x V/tp x (2 + 4 [+ 4 transient])`` bytes, about 10 GiB per micro batch of 4 x 4096 at
tp = 1, more than the rest of a 1.5B model's activations. Here no logits outlive their chunk:
forward keeps only each token's log-sum-exp, backward recomputes a chunk's logits to turn them
into the gradients of the hidden states and of the output weight. The price is one more
``tokens x hidden x V/tp`` matmul (about 2/6 of the output layer's FLOPs). The losses are those of
Megatron's path (same logits, same fp32 softmax); only the summation order of the output
weight's gradient differs.

Enabled by ``train.loss_chunk_tokens`` (0 = Megatron's own path).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel


class _ChunkedVocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk):
        """hidden [T, H] (whole on every TP rank), weight [V/tp, H], labels [T] -> losses [T]."""
        group = ps.get_tensor_model_parallel_group()
        v0 = ps.get_tensor_model_parallel_rank() * weight.shape[0]
        local = labels - v0
        mine = (local >= 0) & (local < weight.shape[0])
        local = local.clamp(0, weight.shape[0] - 1)
        lse = torch.empty(labels.shape, dtype=torch.float32, device=hidden.device)
        target = torch.empty_like(lse)
        for i in range(0, hidden.shape[0], chunk):
            logits = (hidden[i:i + chunk] @ weight.t()).float()
            peak = logits.max(dim=-1).values
            dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
            picked = logits.gather(1, local[i:i + chunk, None]).squeeze(1) * mine[i:i + chunk]
            sums = torch.stack([(logits - peak[:, None]).exp().sum(dim=-1), picked])
            dist.all_reduce(sums, group=group)  # the sum of exponentials and the target logit, at once
            lse[i:i + chunk] = peak + sums[0].log()
            target[i:i + chunk] = sums[1]
        ctx.save_for_backward(hidden, weight, local, mine, lse)
        ctx.chunk = chunk
        return lse - target

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, local, mine, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for i in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[i:i + ctx.chunk]
            probs = ((h @ weight.t()).float() - lse[i:i + ctx.chunk, None]).exp()
            rows = torch.arange(h.shape[0], device=h.device)
            probs[rows, local[i:i + ctx.chunk]] -= mine[i:i + ctx.chunk].to(probs.dtype)
            grad_logits = (probs * grad_losses[i:i + ctx.chunk, None].float()).to(h.dtype)
            grad_hidden[i:i + ctx.chunk] = grad_logits @ weight  # a TP partial sum, reduced by the caller's region
            grad_weight += (grad_logits.t() @ h).float()
        return grad_hidden, grad_weight.to(weight.dtype), None, None


def chunked_lm_loss(output_layer, hidden: torch.Tensor, labels: torch.Tensor, chunk: int,
                    weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token losses [b, s] of ``output_layer`` (a Megatron ColumnParallelLinear) on the final
    hidden states [s(/tp under SP), b, H]: what ``GPTModel`` returns when given labels.
    ``weight``: the tied input embedding, when the output layer has none of its own."""
    weight = output_layer.weight if weight is None else weight
    if output_layer.sequence_parallel:
        hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
    else:
        hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden)
    s, b, h = hidden.shape
    flat_labels = labels.transpose(0, 1).reshape(-1)  # [b, s] -> [s*b], the order of hidden's rows
    losses = _ChunkedVocabParallelCrossEntropy.apply(hidden.reshape(s * b, h), weight,
                                                     flat_labels, chunk)
    return losses.view(s, b).transpose(0, 1).contiguous()
