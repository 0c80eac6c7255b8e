"""The planner's printouts: one plan (memory per category, step time, checkpoint I/O, interval
advice), the layout search table, and the epochs each blend dataset gets (read from its .idx)."""
from __future__ import annotations

from .config import Recipe
from .plan import (BYTES_PER_PARAM, FS_BANDWIDTH_GBS, HEADROOM, ZERO_PARTITIONS_FROM, GiB, Plan, activation_bytes,
                   checkpoint_io, count_params, flops_per_token, inflight_layers, layer_activation_bytes,
                   matmul_params, recompute_factor, stage_imbalance, stage_params)


def _gib(n: float) -> str:
    return f"{n / GiB:8.2f}"


def _b(n: float) -> str:
    """A parameter count in B or M."""
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.3f}M"


def _layout_line(lay) -> str:
    return (f"tp={lay.tp} pp={lay.pp} vpp={lay.vpp} dp={lay.dp} "
            f"sp={'on' if lay.sequence_parallel else 'off'} zero={lay.zero_stage} "
            f"micro_batch={lay.micro_batch} global_batch={lay.global_batch} "
            f"({lay.num_microbatches} microbatches/step) recompute={lay.recompute}")


def format_plan(plan: Plan, title: str = "") -> str:
    """A readable report of one plan."""
    r, hw, mem, tm = plan.recipe, plan.hardware, plan.memory, plan.time
    m, lay, prec = r.model, r.layout, r.train.precision
    table = BYTES_PER_PARAM[prec]
    rank = plan.pp_rank
    per_gpu = stage_params(r, rank)

    def state_line(key: str, label: str) -> str:
        if table[key] == 0:
            return f"  {label:<18} {'none':<34} {_gib(0)}"
        split = f" / dp {lay.dp} (ZeRO-{lay.zero_stage})" if lay.zero_stage >= ZERO_PARTITIONS_FROM[key] else ""
        return f"  {label:<18} {f'{table[key]} B/param{split}':<34} {_gib(mem[key])}"

    acts = {rc: activation_bytes(r, rank, rc) for rc in ("none", "selective", "full")}
    per_mb = {rc: layer_activation_bytes(r, rc) * (m.num_layers // lay.pp) for rc in acts}
    steps_days = r.train.steps * tm.step / 86400
    ck = checkpoint_io(r)
    lines = [
        f"plan {title} ({m.name}, {prec}, seq {r.train.seq_len}) on {hw.gpus} GPUs x "
        f"{hw.gpu_memory / GiB:.1f} GiB, {hw.gpu_tflops:g} TFLOP/s peak, MFU {hw.mfu:.0%}",
        f"layout      {_layout_line(lay)}",
        f"parameters  {_b(count_params(m))} total ({_b(count_params(m, padded=True))} with vocab "
        f"padded to {m.padded_vocab_size}); per GPU {_b(per_gpu)} on pipeline stage {rank}"
        + (f", {_b(per_gpu / lay.dp)} after ZeRO-3" if lay.zero_stage == 3 else ""),
        f"memory per GPU (most loaded: pipeline stage {rank})            GiB",
        state_line("weights", "weights"),
        state_line("gradients", "gradients"),
        state_line("master_weights", "master weights"),
        state_line("optimizer_states", "optimizer states"),
        f"  {'activations':<18} {f'{inflight_layers(r, rank)} layer x microbatch in flight':<34} "
        f"{_gib(mem['activations'])}",
        f"  {'overhead':<18} {'CUDA context, NCCL, workspaces':<34} {_gib(mem['overhead'])}",
        f"  {'total':<18} {f'usable {hw.usable_memory / GiB:.1f} ({HEADROOM:.0%} headroom)':<34} "
        f"{_gib(mem['total'])}  {'FITS' if plan.fits else 'DOES NOT FIT'}",
        f"activations per micro batch ({lay.micro_batch} x {r.train.seq_len} tokens, "
        f"{m.num_layers // lay.pp} layers) GiB: none {per_mb['none'] / GiB:.2f}, selective "
        f"{per_mb['selective'] / GiB:.2f}, full {per_mb['full'] / GiB:.2f}; stage {rank} total "
        f"with recompute none/selective/full: {acts['none'] / GiB:.1f} / "
        f"{acts['selective'] / GiB:.1f} / {acts['full'] / GiB:.1f}",
        f"compute     FLOPs/token = 6N + 12*L*a*d*s = {flops_per_token(r) / 1e9:.2f} GFLOP "
        f"(N = {_b(matmul_params(m))} matmul weights)",
        f"  at MFU {hw.mfu:.0%}: step {tm.ideal:.2f} s, "
        f"{lay.global_batch * r.train.seq_len / tm.ideal:,.0f} tokens/s",
        f"  layout model: bubble {tm.bubble:.1%} (pp-1)/(vpp*m), recompute x{recompute_factor(r):.2f}, "
        f"stage imbalance x{stage_imbalance(r):.2f}, "
        f"TP comm {tm.tp_comm:.2f} s, DP comm {tm.dp_comm:.2f} s -> step {tm.step:.2f} s, "
        f"{tm.tokens_per_s:,.0f} tokens/s ({tm.tokens_per_s / hw.gpus:,.0f}/GPU), MFU {tm.mfu:.1%}",
        f"  train.steps={r.train.steps} ({r.train.steps * lay.global_batch * r.train.seq_len / 1e12:.2f}T "
        f"tokens): {steps_days:.1f} days",
        f"checkpoint  {ck.total / 1e9:.1f} GB; per rank {ck.write / 1e9:.2f} GB written and read "
        f"({ck.ratio:.2f}x ideal); save/load ~{ck.save_s:.1f} s at {FS_BANDWIDTH_GBS:g} GB/s per rank",
    ]
    return "\n".join(lines)


def format_search(plans: list[Plan]) -> str:
    """Top layouts as a table."""
    head = (f"{'#':>2} {'tp':>2} {'pp':>2} {'vpp':>3} {'dp':>4} {'zero':>4} {'mb':>2} {'recompute':<9} "
            f"{'GiB/GPU':>7} {'bubble':>6} {'step s':>6} {'tokens/s':>10} {'MFU':>5}")
    rows = [head]
    for i, p in enumerate(plans, 1):
        lay, tm = p.recipe.layout, p.time
        rows.append(f"{i:>2} {lay.tp:>2} {lay.pp:>2} {lay.vpp:>3} {lay.dp:>4} {lay.zero_stage:>4} "
                    f"{lay.micro_batch:>2} {lay.recompute:<9} {p.memory['total'] / GiB:>7.1f} "
                    f"{tm.bubble:>6.1%} {tm.step:>6.2f} {tm.tokens_per_s:>10,.0f} {tm.mfu:>5.1%}")
    return "\n".join(rows)


def blend_epochs(recipe: Recipe) -> list[dict]:
    """Per ``data.blend`` component: the tokens ``train.steps`` draw from it (its normalised weight
    of steps x global batch x seq len) and how many passes that makes over its train split, with
    the dataset's token count read from its .idx (``tokens`` None where the dataset is missing)."""
    from .config import split_fractions
    from .preprocess import PreprocessError, dataset_tokens

    total = recipe.train.steps * recipe.layout.global_batch * recipe.train.seq_len
    weights = sum(w for w, _ in recipe.data.blend) or 1.0
    fractions = split_fractions(recipe.data.split)
    train_share = fractions[0] / sum(fractions)
    rows = []
    for weight, prefix in recipe.data.blend:
        try:
            tokens = dataset_tokens(prefix)
        except (PreprocessError, OSError, ValueError):
            tokens = None
        drawn = total * weight / weights
        epochs = drawn / (tokens * train_share) if tokens else None
        rows.append({"prefix": prefix, "share": weight / weights, "drawn": drawn, "tokens": tokens, "epochs": epochs})
    return rows


def format_epochs(recipe: Recipe) -> str:
    rows = blend_epochs(recipe)
    if not rows:
        return "data        no data.blend: nothing to count"
    total = recipe.train.steps * recipe.layout.global_batch * recipe.train.seq_len
    lines = [f"data        train.steps={recipe.train.steps} draw {total / 1e9:,.2f}B tokens; epochs over each "
             f"component's train split ({recipe.data.split}):"]
    for r in rows:
        have = (f"{r['tokens'] / 1e9:,.3f}B tokens -> {r['epochs']:,.2f} epochs" if r["tokens"]
                else "dataset not found (no .idx)")
        lines.append(f"  {r['share']:6.1%}  {r['drawn'] / 1e9:10,.3f}B drawn  {have}  {r['prefix']}")
    return "\n".join(lines)
