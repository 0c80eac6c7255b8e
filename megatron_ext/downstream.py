"""In-loop downstream evals: multiple-choice tasks scored by the training model itself.

``eval.downstream: [task, ...]`` names lm-eval multiple-choice tasks (the shipped local
``gaperon_demo_cloze``, or any whose data is on disk offline); every ``eval.interval`` steps and at
the last step the loop logs ``eval/<task>/acc``, ``acc_norm`` and ``time_s``.

Same numbers as lm-eval on the export, by construction: rank 0 asks lm-eval itself for each task's
requests (its contexts, continuations and target delimiter, the first ``eval.limit`` documents),
then splits every (context, continuation) pair into tokens exactly as lm-eval's HF model does
(trailing spaces of the context move to the continuation; the continuation's tokens are those of
``context + continuation`` after the context's; left-truncated to the model's context length).
The model runs forward only under its own TP/PP/DP layout through Megatron's schedule, with no
export; acc takes the argmax of the summed log-likelihoods, acc_norm of the sums divided by the
choice's length in characters, first index on ties (lm-eval's rules).
"""
from __future__ import annotations

import io
import math
import os
import time
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from .config import Recipe, RecipeError


@dataclass
class Item:
    """One document: its choices' token rows (context + continuation) and lengths."""

    task: str
    rows: list[list[int]]  # per choice: the tokens the model reads, then the one it predicts last
    cont_lens: list[int]  # per choice: how many of the last tokens are the continuation
    char_lens: list[int]  # per choice: len(choice), acc_norm's normaliser
    gold: int


def encode_pair(encode, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a request into context and continuation tokens (causal models)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        raise ValueError("an empty context: lm-eval scores those after a prefix token; not supported in-loop")
    whole, ctx = encode(context + continuation), encode(context)
    return ctx, whole[len(ctx):]


@contextmanager
def _quiet_loading():
    """No datasets/lm-eval progress bars in the training log (one line per eval is what it gets):
    their bars go to stderr, which is set aside while tasks load; errors still raise."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bar()
    try:
        with redirect_stderr(io.StringIO()):
            yield
    finally:
        if was_enabled:
            datasets.enable_progress_bar()


def load_items(recipe: Recipe) -> list[Item]:
    """Every task's first ``eval.limit`` documents, tokenized (rank 0: lm-eval and the data live there)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .evaluate import Suite, build_tasks
    from .tokenizer import load_tokenizer

    hf = load_tokenizer(recipe.data.tokenizer).hf
    encode = partial(hf.encode, add_special_tokens=False)
    max_len = recipe.model.max_position_embeddings  # the export's, so lm-eval's max_length too
    items = []
    for name in recipe.eval.downstream:
        with _quiet_loading():
            task = build_tasks(Suite(name, [name])).get(name)
        if task is None or getattr(task, "OUTPUT_TYPE", None) != "multiple_choice":
            raise ValueError(f"eval.downstream: {name} is not one multiple-choice lm-eval task (groups and "
                             "generation tasks are for tools/evaluate.py)")
        with _quiet_loading():
            task.build_all_requests(limit=recipe.eval.limit, rank=0, world_size=1)
        by_doc: dict[int, list] = {}
        for inst in task.instances:
            by_doc.setdefault(inst.doc_id, []).append(inst)
        for doc_id in sorted(by_doc):
            insts = sorted(by_doc[doc_id], key=lambda i: i.idx)
            doc = insts[0].doc
            choices = task.doc_to_choice(doc)
            gold = task.doc_to_target(doc)
            gold = choices.index(gold) if isinstance(gold, str) else int(gold)
            rows, cont_lens = [], []
            for inst in insts:
                ctx, cont = encode_pair(encode, *inst.arguments)
                rows.append((ctx + cont)[-(max_len + 1):])
                cont_lens.append(len(cont))
            items.append(Item(name, rows, cont_lens, [len(c) for c in choices], gold))
    return items


class DownstreamEval:
    """Built once per run on every rank, before the model (a task whose data is missing stops the run
    at once): rank 0 reads the tasks and broadcasts the tokenized items."""

    def __init__(self, recipe: Recipe, is_main: bool):
        self.recipe = recipe
        box = [None]
        if is_main:
            from .evaluate import EvalError

            try:
                box[0] = load_items(recipe)
            except (EvalError, ValueError) as err:
                box[0] = str(err)
        dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], str):
            raise RecipeError(f"eval.downstream: {box[0]}")
        self.items: list[Item] = box[0]
        self.rows = [(row, n) for it in self.items for row, n in zip(it.rows, it.cont_lens)]
        quantum = math.lcm(8, recipe.layout.tp)  # sequence parallelism splits the sequence over tp
        self.seq = -(-max(len(r) - 1 for r, _ in self.rows) // quantum) * quantum

    def _batches(self, rows: list[tuple[list[int], int]]) -> list[dict]:
        """Rows -> microbatches of exactly eval.micro_batch rows (Megatron's schedule sends fixed shapes),
        right-padded to ``self.seq`` (causal attention: padding after a row changes nothing in it)."""
        lay = self.recipe.layout
        mb = self.recipe.eval.micro_batch
        n_mb = max(1, -(-len(rows) // mb))
        n_mb = -(-n_mb // lay.pp) * lay.pp  # the interleaved schedule wants a multiple of pp
        out = []
        for b in range(n_mb):
            tokens = torch.zeros(mb, self.seq, dtype=torch.long)
            labels = torch.zeros(mb, self.seq, dtype=torch.long)
            mask = torch.zeros(mb, self.seq, dtype=torch.float32)
            for j, (row, n_cont) in enumerate(rows[b * mb:(b + 1) * mb]):
                n = len(row) - 1
                tokens[j, :n] = torch.tensor(row[:-1])
                labels[j, :n] = torch.tensor(row[1:])
                mask[j, n - n_cont:n] = 1.0
            out.append({"tokens": tokens, "labels": labels, "loss_mask": mask})
        return out

    @staticmethod
    def _forward_step(device, data_iterator, model):
        mb = {k: v.to(device) for k, v in next(data_iterator).items()}
        pos = torch.arange(mb["tokens"].shape[1], device=device).unsqueeze(0).expand_as(mb["tokens"])
        token_losses = model(mb["tokens"], pos, None, labels=mb["labels"])

        def loss_func(mask, losses):
            row_ll = -(losses.float() * mask).sum(dim=1)
            return row_ll.sum(), mask.sum().to(torch.int), {"row_ll": row_ll.detach().to(torch.float64)}

        return token_losses, partial(loss_func, mb["loss_mask"])

    @torch.no_grad()
    def loglikelihoods(self, engine) -> torch.Tensor:
        """Summed log-likelihood of every (item, choice) row, on every rank; DP ranks split the rows."""
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        mine = list(range(dp_rank, len(self.rows), dp))
        per_rank = -(-len(self.rows) // dp)  # equal shares: pad with copies of row 0
        batches = self._batches([self.rows[i] for i in mine] + [self.rows[0]] * (per_rank - len(mine)))
        chunks, device = engine.chunks, engine.info.device
        engine.module.eval()  # train_step sets train() again
        iters = [iter(batches) for _ in chunks]
        reduced = get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, device), data_iterator=iters if len(iters) > 1 else iters[0],
            model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=len(batches), seq_length=self.seq,
            micro_batch_size=self.recipe.eval.micro_batch, forward_only=True)
        out = torch.zeros(len(self.rows), dtype=torch.float64, device=device)
        if ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0:
            got = torch.cat([r["row_ll"] for r in reduced])[:len(mine)]
            out[torch.tensor(mine, dtype=torch.long, device=device)] = got
        dist.all_reduce(out)  # one contributor per row
        return out.cpu()

    def run(self, engine) -> dict[str, float]:
        """``eval/<task>/acc``, ``acc_norm``, ``n`` and ``time_s`` (the whole forward pass's time)."""
        t0 = time.perf_counter()
        lls = self.loglikelihoods(engine).tolist()
        seconds = time.perf_counter() - t0
        per_task: dict[str, list[tuple[float, float]]] = {}
        k = 0
        for it in self.items:
            ll = lls[k:k + len(it.rows)]
            k += len(it.rows)
            pred = max(range(len(ll)), key=lambda i: (ll[i], -i))  # numpy's argmax: first on ties
            pred_norm = max(range(len(ll)), key=lambda i: (ll[i] / it.char_lens[i], -i))
            per_task.setdefault(it.task, []).append((float(pred == it.gold), float(pred_norm == it.gold)))
        metrics = {}
        for task, hits in per_task.items():
            metrics[f"eval/{task}/acc"] = sum(h[0] for h in hits) / len(hits)
            metrics[f"eval/{task}/acc_norm"] = sum(h[1] for h in hits) / len(hits)
            metrics[f"eval/{task}/n"] = len(hits)
            metrics[f"eval/{task}/time_s"] = seconds
        return metrics
