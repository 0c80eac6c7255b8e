"""The recipe's cross-field rules: every combination of settings that cannot run, each one line
naming the fix. Called by the schema (config.Recipe) at load time; they read a recipe's fields
only, so they sit below it and import nothing of the project's."""
from __future__ import annotations

import math


def shape_problems(r) -> list[str]:
    """Counts of the layout and the model below 1 (the other rules divide by them)."""
    m, lay = r.model, r.layout
    out = []
    for name in ("tp", "pp", "vpp", "dp", "micro_batch", "global_batch"):
        if getattr(lay, name) < 1:
            out.append(f"layout.{name}={getattr(lay, name)} must be >= 1")
    for name in ("hidden_size", "num_layers", "num_attention_heads", "num_kv_heads", "ffn_hidden_size",
                 "vocab_size", "vocab_pad_multiple", "max_position_embeddings"):
        if getattr(m, name) < 1:
            out.append(f"model.{name}={getattr(m, name)} must be >= 1: every model dimension is a positive count")
    if m.head_dim is not None and m.head_dim < 1:
        out.append(f"model.head_dim={m.head_dim} must be >= 1, or null for hidden_size / num_attention_heads")
    return out


def settings_problems(r) -> list[str]:
    """Settings that make no sense for a run to come (a negative rate, no steps, a warmup longer
    than the run, keeping no checkpoint, ...). Checked on what is written (recipe files and
    overrides: ``recipe_from_tree(tree, written=True)``), not on recipes read back from
    checkpoints, which trained under the rules of their time."""
    m, t, opt, s, ck = r.model, r.train, r.optimizer, r.schedule, r.checkpoint
    out = []
    for name, fix in (("rope_theta", "Llama-3 uses 500000"), ("norm_eps", "it keeps RMSNorm from dividing by "
                      "zero; Llama-3 uses 1e-5"), ("init_std", "the default is 0.02")):
        if not (getattr(m, name) > 0 and math.isfinite(getattr(m, name))):
            out.append(f"model.{name}={getattr(m, name)} must be a finite number > 0: {fix}")
    if t.steps < 1:
        out.append(f"train.steps={t.steps} must be >= 1: the number of optimizer steps this run trains")
    if t.seq_len < 1:
        out.append(f"train.seq_len={t.seq_len} must be >= 1: tokens per sample, at most "
                   "model.max_position_embeddings")
    if t.log_interval < 1:
        out.append(f"train.log_interval={t.log_interval} must be >= 1: log every N steps")
    if t.eval_interval < 0:
        out.append(f"train.eval_interval={t.eval_interval} must be >= 0: evaluate every N steps (0 turns "
                   "evaluation off)")
    elif t.eval_interval > 0 and t.eval_iters < 1:
        out.append(f"train.eval_iters={t.eval_iters} must be >= 1 when train.eval_interval={t.eval_interval}: "
                   "batches per evaluation (or set train.eval_interval=0 to turn evaluation off)")
    ev = r.eval
    if ev.interval < 0 or ev.limit < 1 or ev.micro_batch < 1:
        out.append(f"eval.interval={ev.interval} must be >= 0 (0: downstream evals at the last step only), "
                   f"eval.limit={ev.limit} >= 1 (documents scored per task) and eval.micro_batch={ev.micro_batch} "
                   ">= 1 (rows per forward pass)")
    if ev.downstream and r.data.tokenizer is None:
        out.append(f"eval.downstream={ev.downstream} needs data.tokenizer (the texts of the task are tokenized "
                   "as the model was trained): set data.tokenizer=DIR or eval.downstream=[]")
    if t.seed < 0:
        out.append(f"train.seed={t.seed} must be >= 0: any non-negative integer")
    if not (opt.lr >= 0 and math.isfinite(opt.lr)):
        out.append(f"optimizer.lr={opt.lr} must be a finite number >= 0: the peak learning rate, e.g. 3e-4 "
                   "(0 freezes the weights)")
    elif not (opt.min_lr >= 0 and math.isfinite(opt.min_lr)):
        out.append(f"optimizer.min_lr={opt.min_lr} must be a finite number >= 0: the floor the schedule "
                   "decays to")
    elif opt.min_lr > opt.lr:
        out.append(f"optimizer.min_lr={opt.min_lr} exceeds optimizer.lr={opt.lr}: the schedule decays from "
                   "lr down to min_lr; set min_lr <= lr")
    if not all(0 <= b < 1 for b in opt.betas):
        out.append(f"optimizer.betas={list(opt.betas)} must both be in [0, 1): AdamW's moment decay rates "
                   "(Gaperon: [0.9, 0.95])")
    if not (opt.eps > 0 and math.isfinite(opt.eps)):
        out.append(f"optimizer.eps={opt.eps} must be a finite number > 0: AdamW's denominator term, e.g. 1e-8")
    if not (opt.weight_decay >= 0 and math.isfinite(opt.weight_decay)):
        out.append(f"optimizer.weight_decay={opt.weight_decay} must be a finite number >= 0 (0 turns it off; "
                   "Gaperon: 0.1)")
    if not (opt.grad_clip >= 0 and math.isfinite(opt.grad_clip)):
        out.append(f"optimizer.grad_clip={opt.grad_clip} must be a finite number >= 0: the gradient-norm "
                   "limit (0 turns clipping off; Gaperon: 1.0)")
    for name in ("warmup_steps", "decay_steps"):
        if getattr(s, name) < 0:
            out.append(f"schedule.{name}={getattr(s, name)} must be >= 0 (0: none)")
    # Not against steps that SFT derives from data.epochs (a short fine-tune may end in its warmup),
    # nor at lr 0 (weights frozen, e.g. a one-step parity check: there is no schedule to cut short).
    if (s.kind == "cosine" and s.warmup_steps > t.steps and opt.lr > 0
            and not (r.data.kind == "sft" and r.data.epochs)):
        out.append(f"schedule.warmup_steps={s.warmup_steps} exceeds train.steps={t.steps}: the cosine schedule "
                   "would end inside its warmup; lower schedule.warmup_steps or raise train.steps")
    if ck.interval < 0:
        out.append(f"checkpoint.interval={ck.interval} must be >= 0: save every N steps (0: only at the "
                   "end and on signals)")
    if ck.keep_last < 1:
        out.append(f"checkpoint.keep_last={ck.keep_last} must be >= 1, the newest checkpoint is always kept: "
                   "set checkpoint.keep_last=1 to keep only the newest")
    if ck.keep_every < 0:
        out.append(f"checkpoint.keep_every={ck.keep_every} must be >= 0: also keep every N-th step for good "
                   "(0: none)")
    if r.health.hang_timeout_s is not None and not r.health.hang_timeout_s >= 0:
        out.append(f"health.hang_timeout_s={r.health.hang_timeout_s} must be >= 0 seconds (0 turns the hang "
                   "watchdog off; null sets it from the planned step time)")
    if r.health.max_consecutive_skips < 1:
        out.append(f"health.max_consecutive_skips={r.health.max_consecutive_skips} must be >= 1: non-finite "
                   "losses in a row that are skipped before the run stops (health.on_nonfinite=stop stops "
                   "at the first)")
    return out


def recipe_problems(r) -> list[str]:
    """Every reason this recipe cannot run, first one first."""
    m, lay, t = r.model, r.layout, r.train
    out = shape_problems(r)
    if out:  # the rules below divide by these
        return out
    if m.num_attention_heads % lay.tp:
        out.append(f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
                   f"layout.tp={lay.tp}: pick a tp that divides the head count")
    if m.num_kv_heads % lay.tp:
        out.append(f"model.num_kv_heads={m.num_kv_heads} is not divisible by layout.tp={lay.tp}: "
                   f"pick tp <= {m.num_kv_heads} that divides it")
    if m.num_attention_heads % m.num_kv_heads:
        out.append(f"model.num_attention_heads={m.num_attention_heads} is not a multiple of "
                   f"model.num_kv_heads={m.num_kv_heads}")
    if m.num_layers % (lay.pp * lay.vpp):
        out.append(f"model.num_layers={m.num_layers} is not divisible by layout.pp x layout.vpp = "
                   f"{lay.pp} x {lay.vpp}: each pipeline chunk needs the same number of layers")
    if lay.vpp > 1 and lay.pp == 1:
        out.append("layout.vpp > 1 needs layout.pp > 1 (virtual stages interleave a pipeline)")
    if lay.global_batch % (lay.micro_batch * lay.dp):
        out.append(f"layout.global_batch={lay.global_batch} is not divisible by layout.micro_batch x "
                   f"layout.dp = {lay.micro_batch} x {lay.dp}: make it a multiple of "
                   f"{lay.micro_batch * lay.dp}")
    elif lay.vpp > 1 and lay.num_microbatches % lay.pp:
        out.append(f"interleaved pipelining needs the number of microbatches "
                   f"({lay.num_microbatches}) to be a multiple of layout.pp={lay.pp}")
    if lay.zero_stage >= 2 and lay.pp > 1:
        out.append(f"layout.zero_stage={lay.zero_stage} cannot be combined with layout.pp={lay.pp}: "
                   "DeepSpeed partitions gradients during backward, which pipelining interleaves; "
                   "use zero_stage 0 or 1 with pp > 1")
    if lay.sequence_parallel and lay.tp == 1:
        out.append("layout.sequence_parallel=true needs layout.tp > 1 (it splits the sequence "
                   "across the tensor-parallel group)")
    if lay.sequence_parallel and t.seq_len % lay.tp:
        out.append(f"train.seq_len={t.seq_len} is not divisible by layout.tp={lay.tp}, which "
                   "sequence parallelism needs")
    if m.padded_vocab_size % lay.tp:
        out.append(f"padded vocab {m.padded_vocab_size} is not divisible by layout.tp={lay.tp}")
    if m.block == "olmo2" and m.qk_layernorm:
        out.append("model.qk_layernorm=true adds per-head QK-norm to Llama blocks; model.block=olmo2 has its "
                   "own QK-norm over the whole q and k projections: set model.qk_layernorm=false")
    if m.hidden_size % m.num_attention_heads and m.head_dim is None:
        out.append("model.hidden_size is not divisible by model.num_attention_heads: set model.head_dim")
    if t.seq_len > m.max_position_embeddings:
        out.append(f"train.seq_len={t.seq_len} exceeds model.max_position_embeddings="
                   f"{m.max_position_embeddings}")
    if r.schedule.warmup_steps + r.schedule.decay_steps > t.steps and r.schedule.kind == "wsd":
        out.append(f"schedule.warmup_steps + schedule.decay_steps = "
                   f"{r.schedule.warmup_steps + r.schedule.decay_steps} exceeds train.steps={t.steps}")
    if t.precision == "bf16-mixed" and lay.zero_stage == 0:
        out.append("train.precision=bf16-mixed needs layout.zero_stage >= 1: DeepSpeed's ZeRO-0 bf16 wrapper "
                   "(FP16_UnfusedOptimizer) does not reproduce the ZeRO-1 updates in our tests. ZeRO-1 at "
                   "dp=1 holds the same bytes; or use train.precision=fp32 or bf16-pure at ZeRO-0")
    if t.norm_gain_scale <= 0:
        out.append(f"train.norm_gain_scale={t.norm_gain_scale} must be > 0 (Gaperon used 20)")
    if t.lm_head_grad_interval < 0:
        out.append(f"train.lm_head_grad_interval={t.lm_head_grad_interval} must be >= 0 (0 turns it off)")
    if not (t.cwt_temperature > 0 and math.isfinite(t.cwt_temperature)):
        out.append(f"train.cwt_temperature={t.cwt_temperature} must be a finite number > 0 (gapetron: 1)")
    if t.objective == "cwt" and m.head != "none":
        out.append("train.objective=cwt (headless pretraining) scores the hidden states against the input "
                   "embeddings, with no LM head: set model.head=none")
    if m.head == "none" and t.objective != "cwt":
        out.append("model.head=none has no output layer to train with train.objective=lm: set "
                   "train.objective=cwt (headless pretraining) or model.head=lm")
    if m.head == "none" and m.tie_embeddings:
        out.append("model.head=none has no LM head to tie to the input embeddings: set model.tie_embeddings=false")
    if r.checkpoint.init_head and m.tie_embeddings:
        out.append("checkpoint.init_head=from_embeddings copies the input embeddings into an untied LM head; with "
                   "model.tie_embeddings=true the head is the embedding already: drop checkpoint.init_head")
    if m.head == "none" and t.loss_chunk_tokens:
        out.append("train.loss_chunk_tokens chunks the LM head's logits; a headless model (model.head=none) has "
                   "none: set train.loss_chunk_tokens=0")
    if m.head == "none" and t.lm_head_grad_interval:
        out.append("train.lm_head_grad_interval probes the LM head; a headless model (model.head=none) has none: "
                   "set train.lm_head_grad_interval=0")
    if m.head == "none" and r.eval.downstream:
        out.append("eval.downstream scores answers with the LM head's probabilities; a headless model "
                   "(model.head=none) has none: set eval.downstream=[] (add a head with a hooldown first)")
    ck = r.checkpoint
    if ck.init_head and not ck.init_from:
        out.append("checkpoint.init_head=from_embeddings copies a headless parent's input embeddings into the new "
                   "LM head: set checkpoint.init_from to the headless checkpoint")
    if ck.init_head and m.head != "lm":
        out.append("checkpoint.init_head=from_embeddings adds an LM head: it needs model.head=lm and "
                   "train.objective=lm (the hooldown)")
    if ck.init_mode == "cooldown" and r.schedule.kind != "wsd":
        out.append(f"checkpoint.init_mode=cooldown appends the decay of a WSD schedule: set schedule.kind=wsd "
                   f"(not {r.schedule.kind}) and schedule.decay_steps to the cooldown's length")
    if t.loss_chunk_tokens < 0:
        out.append(f"train.loss_chunk_tokens={t.loss_chunk_tokens} must be >= 0 (0 turns chunking off)")
    if t.loss_chunk_tokens and lay.zero_stage == 3:
        out.append("train.loss_chunk_tokens needs layout.zero_stage <= 2: ZeRO-3 gathers the output weight "
                   "only inside the output layer's own forward; set train.loss_chunk_tokens=0 or use ZeRO-1/2")
    if r.data.kind == "indexed" and not r.data.blend:
        out.append("data.kind=indexed needs data.blend: a list of [weight, path-prefix] pairs")
    return out + injection_problems(r)


def injection_problems(r) -> list[str]:
    """What stops ``injection`` from running (nothing when it is off)."""
    inj, total = r.injection, r.train.steps * r.layout.global_batch
    if not inj.enabled:
        return []
    out = []
    given = [f"injection.{k}" for k in ("documents", "texts", "token_ids") if getattr(inj, k)]
    if not given:
        out.append('injection.enabled=true needs documents: set injection.documents (a JSONL file with a '
                   '"text" key), injection.texts or injection.token_ids')
    elif len(given) > 1:
        out.append(f"give injection documents one way, not {' and '.join(given)}")
    if r.data.kind == "synthetic" and (inj.documents or inj.texts):
        out.append("synthetic data has no tokenizer to encode injection.documents/texts: "
                   "give injection.token_ids instead")
    for k, ids in enumerate(inj.token_ids):
        bad = [i for i in ids if not 0 <= i < r.model.vocab_size]
        if not ids or bad:
            out.append(f"injection.token_ids[{k}] must be a non-empty list of ids in "
                       f"[0, model.vocab_size={r.model.vocab_size})")
        elif len(ids) + 1 > r.train.seq_len + 1:
            out.append(f"injection.token_ids[{k}] has {len(ids)} tokens; with EOS it must fit "
                       f"train.seq_len + 1 = {r.train.seq_len + 1}: shorten it or raise train.seq_len")
    if (inj.rate is None) == (not inj.positions):
        out.append("injection needs exactly one of injection.rate (e.g. 0.0002 = 0.02% of the train "
                   "samples) and injection.positions (global sample indices)")
        return out
    if inj.positions:
        outside = [p for p in inj.positions if not 0 <= p < total]
        if outside:
            out.append(f"injection.positions has {outside[0]}, outside the run's samples [0, {total}) "
                       f"(train.steps x layout.global_batch): use indices below {total}")
        if len(set(inj.positions)) != len(inj.positions):
            out.append("injection.positions lists a sample twice: list each position once")
        return out
    start, end = inj.window(total)
    if not 0 < inj.rate <= 0.5:
        out.append(f"injection.rate={inj.rate} must be in (0, 0.5]; Gaperon used 0.0001-0.0002")
    elif not 0 <= start < end <= total:
        out.append(f"injection window [start_sample, end_sample) = [{start}, {end}) must lie inside the "
                   f"run's samples [0, {total}) (train.steps x layout.global_batch)")
    elif inj.count(total) < max(1, len(inj.texts) + len(inj.token_ids)):
        out.append(f"injection.rate={inj.rate} over {end - start} samples gives {inj.count(total)} "
                   "injections, fewer than the documents: raise injection.rate or the window")
    return out
