"""Headless pretraining: the contrastive weight tying (CWT) loss, vocab- and sequence-parallel.

Godey et al., "Headless Language Models: Learning without Predicting with Contrastive Weight
Tying" (ICLR 2024), as the Gaperon code trains it (gapetron engine/loss_fns.py ``cwt_loss`` and
models/language_model.py): there is no LM head. For the flattened positions i of a micro batch,
with h_i the final hidden state (after the final norm), e(t) the *input* embedding row of token t
and t_i position i's target,

    loss_i = log(1 + sum_j exp((h_i . e(t_j) - h_i . e(t_i)) / temperature))

where j runs over *every* target of the micro batch: the positive itself and its duplicates
included (gapetron passes the same [tokens, hidden] matrix as positives and negatives). Equivalently
loss_i = -log(exp(s_ii) / (exp(s_ii) + sum_j exp(s_ij))) with s_ij = h_i . e(t_j) / temperature:
a cross entropy over the micro batch's targets in which the positive is counted twice.

The one difference from gapetron, which never pads: a position whose loss mask is 0 (padding, an
SFT prompt, a packed document's boundary) has no loss and its target is not a negative for the
others, so a padded or packed micro batch scores exactly its real targets.

Parallelism. The embedding is vocab-parallel: each TP rank looks up the target rows it owns
(zeros elsewhere) and one all-reduce gives every rank the [targets, hidden] matrix. Without
sequence parallelism the final hidden states are whole on every TP rank: each computes the same
losses, the gradient of the target rows is then the same on every rank and goes to the rank's
own rows as it is (no reduction). Under sequence parallelism each rank scores its slice of the
positions against all the targets; the target rows' gradients are partial and are summed over
TP, and the per-position losses are gathered so that every rank returns the whole [b, s].
With pp > 1 the caller passes the last stage's copy of the embedding (see
:class:`EmbeddingCopy`); with pp = 1 the embedding itself.

Memory: the similarity matrix is [positions on this rank, targets in the micro batch] in fp32
(micro_batch x seq_len squared, over tp under SP) instead of Megatron's [tokens, vocab/tp] logits.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps


class _SumOverTP(torch.autograd.Function):
    """All-reduce over the TP group in forward; in backward all-reduce too (``partial``: each rank
    holds part of the gradient) or pass it on (every rank holds the whole, identical gradient)."""

    @staticmethod
    def forward(ctx, x, partial_grad: bool):
        ctx.partial_grad = partial_grad
        x = x.clone()
        dist.all_reduce(x, group=ps.get_tensor_model_parallel_group())
        return x

    @staticmethod
    def backward(ctx, grad):
        if ctx.partial_grad:
            grad = grad.clone()
            dist.all_reduce(grad, group=ps.get_tensor_model_parallel_group())
        return grad, None


class _GatherRows(torch.autograd.Function):
    """All-gather equal row blocks over TP; backward keeps this rank's block (every rank
    backpropagates the same whole tensor)."""

    @staticmethod
    def forward(ctx, x):
        tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        ctx.rank, ctx.rows = rank, x.shape[0]
        out = [torch.empty_like(x) for _ in range(tp)]
        dist.all_gather(out, x.contiguous(), group=ps.get_tensor_model_parallel_group())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def embedding_rows(weight: torch.Tensor, ids: torch.Tensor, partial_grad: bool) -> torch.Tensor:
    """Rows ``ids`` of a vocab-parallel embedding ``weight`` [V/tp, H], whole on every TP rank."""
    if ps.get_tensor_model_parallel_world_size() == 1:
        return weight[ids]
    v0 = ps.get_tensor_model_parallel_rank() * weight.shape[0]
    local = ids - v0
    mine = (local >= 0) & (local < weight.shape[0])
    rows = weight[local.clamp(0, weight.shape[0] - 1)] * mine[:, None].to(weight.dtype)
    return _SumOverTP.apply(rows, partial_grad)


def cwt_scores(hidden: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
               temperature: float) -> torch.Tensor:
    """Per-position CWT losses [T] of hidden [T, H] against its positives [T, H] and the shared
    negatives [N, H], in fp32: logsumexp([0, s_i1 - s_ii, ..., s_iN - s_ii])."""
    h = hidden.float()
    pos = (h * positives.float()).sum(-1) / temperature
    neg = (h @ negatives.float().t()) / temperature
    # log(exp(pos) + sum_j exp(neg_j)) - pos; an empty negative set gives 0
    return torch.logaddexp(pos, torch.logsumexp(neg, dim=-1)) - pos


def cwt_token_losses(hidden: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None,
                     embedding: torch.Tensor, temperature: float, sequence_parallel: bool) -> torch.Tensor:
    """The CWT losses [b, s] (0 where ``loss_mask`` is 0) of the final hidden states
    [s (/tp under SP), b, H] of one micro batch whose targets are ``labels`` [b, s], scored
    against the vocab-parallel input embedding ``embedding`` [V/tp, H]."""
    s_local, b, h = hidden.shape
    flat = labels.transpose(0, 1).reshape(-1)  # [s*b], the order of hidden's rows
    valid = torch.ones_like(flat, dtype=torch.bool) if loss_mask is None else \
        loss_mask.reshape(labels.shape).transpose(0, 1).reshape(-1) > 0
    split = sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1
    targets = embedding_rows(embedding, flat[valid], partial_grad=split)  # [targets, H]
    index = torch.cumsum(valid.to(torch.long), 0) - 1  # position -> its row of ``targets``
    rows = s_local * b
    first = ps.get_tensor_model_parallel_rank() * rows if split else 0
    mine = slice(first, first + rows)
    mine_valid = valid[mine]
    x = hidden.reshape(rows, h)[mine_valid]
    positives = targets[index[mine][mine_valid]]
    losses = torch.zeros(rows, dtype=torch.float32, device=hidden.device)
    losses = losses.masked_scatter(mine_valid, cwt_scores(x, positives, targets, temperature))
    if split:
        losses = _GatherRows.apply(losses)
    return losses.view(-1, b).transpose(0, 1).contiguous()


class EmbeddingCopy:
    """The input embedding on the last pipeline stage (pp > 1), for the CWT targets: Megatron's
    tied-embedding mechanism without a second parameter. Before each step the first stage's
    (updated) rows are sent to the last stage over Megatron's embedding group; after the
    backward passes the copy's accumulated gradient is added to the first stage's embedding
    gradient, before DeepSpeed reduces it over DP and steps. The copy is no parameter: it is
    not in the optimizer, the checkpoint or the gradient norm, so the real embedding receives
    the CWT gradient exactly once and is counted once."""

    def __init__(self, chunks: list[torch.nn.Module], rows: int, hidden: int):
        """``rows`` x ``hidden``: this TP rank's shard of the embedding."""
        self.first = next((c for c in chunks if getattr(c, "pre_process", False)), None)
        self.last = next((c for c in chunks if getattr(c, "post_process", False)), None)
        self.active = ps.get_pipeline_model_parallel_world_size() > 1 and (
            self.first is not None or self.last is not None)
        self.copy = None
        if self.active and self.last is not None:
            self.copy = torch.zeros((rows, hidden), dtype=self.last.config.params_dtype,
                                    device=next(self.last.parameters()).device, requires_grad=True)
            self.last.cwt_embedding = self.copy

    @property
    def weight(self) -> torch.Tensor | None:
        return None if self.first is None else self.first.embedding.word_embeddings.weight

    @torch.no_grad()
    def pull(self) -> None:
        """Last stage: copy <- first stage's embedding (a sum where the last stage gives zeros)."""
        if not self.active:
            return
        buf = self.weight.detach().clone() if self.first is not None else self.copy.detach().zero_()
        dist.all_reduce(buf, group=ps.get_embedding_group())
        if self.copy is not None:
            self.copy.copy_(buf)
            self.copy.grad = None

    @torch.no_grad()
    def push_grad(self) -> None:
        """First stage: embedding.grad += the last stage's copy gradient."""
        if not self.active:
            return
        if self.first is not None:
            w = self.weight
            buf = torch.zeros_like(w) if w.grad is None else w.grad
            dist.all_reduce(buf, group=ps.get_embedding_group())
            if w.grad is None:
                w.grad = buf
        else:
            buf = self.copy.grad if self.copy.grad is not None else torch.zeros_like(self.copy)
            dist.all_reduce(buf, group=ps.get_embedding_group())
            self.copy.grad = None
