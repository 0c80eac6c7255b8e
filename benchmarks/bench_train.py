#!/usr/bin/env python
"""Training throughput: our engine (Megatron-Core + DeepSpeed) vs plain PyTorch + transformers.

Both train the same Llama shapes, batch, sequence length and precision for the same number of
steps in this one process; the figure that matters is the ratio, measured in the same run.

    GPU:  python benchmarks/bench_train.py recipes/1.5b.yaml --seq 4096 --micro-batch 1 --steps 10
    CPU:  GAPERON_DEVICE=cpu python benchmarks/bench_train.py recipes/tiny.yaml --steps 5

``--layers K`` benchmarks a reduced-depth proxy of a bigger size (same widths).
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time


import torch  # noqa: E402


def timed_steps(step_fn, steps: int, warmup: int, on_gpu: bool) -> float:
    """Seconds per step, after warm-up steps (compilation, allocator growth)."""
    for _ in range(warmup):
        step_fn()
    if on_gpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step_fn()
    if on_gpu:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def bench_engine(recipe, steps, warmup):
    from megatron_ext.data import SyntheticCopyTask, microbatches
    from megatron_ext.engine import Engine, init_distributed
    from megatron_ext.model import build_model

    info = init_distributed(recipe)
    engine = Engine(recipe, build_model(recipe, info.on_gpu), info)
    data = SyntheticCopyTask(recipe.model.vocab_size, recipe.train.seq_len, seed=0)
    batch = microbatches(data, 0, recipe, 0)
    sec = timed_steps(lambda: engine.train_step(batch, recipe.optimizer.lr), steps, warmup, info.on_gpu)
    peak = torch.cuda.max_memory_allocated() / 2**30 if info.on_gpu else float("nan")
    del engine
    return sec, peak, info.device


def bench_transformers(recipe, steps, warmup, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    m, lay, t = recipe.model, recipe.layout, recipe.train
    config = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
                         num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                         num_key_value_heads=m.num_kv_heads, head_dim=m.kv_channels, rope_theta=m.rope_theta,
                         rms_norm_eps=m.norm_eps, max_position_embeddings=m.max_position_embeddings,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    on_gpu = device.type == "cuda"
    model = LlamaForCausalLM(config).to(device)  # fp32 weights = the master copy of bf16-mixed
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            **({"fused": True} if on_gpu else {}))
    bf16 = t.precision != "fp32"
    tokens = torch.randint(0, m.vocab_size, (lay.micro_batch, t.seq_len + 1), device=device)

    def step():
        for _ in range(lay.num_microbatches):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=tokens[:, :-1], labels=tokens[:, 1:]).loss
            (loss / lay.num_microbatches).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.optimizer.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    sec = timed_steps(step, steps, warmup, on_gpu)
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else float("nan")
    return sec, peak


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("--seq", type=int)
    p.add_argument("--micro-batch", type=int)
    p.add_argument("--global-batch", type=int, help="default: one micro batch per step")
    p.add_argument("--layers", type=int, help="reduced-depth proxy")
    p.add_argument("--precision", default=None)
    p.add_argument("--zero", type=int, default=0)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--skip-baseline", action="store_true")
    args = p.parse_args()

    from megatron_ext.config import load_recipe
    from megatron_ext.plan import flops_per_token
    from megatron_ext.train import peak_tflops

    base = load_recipe(args.recipe)
    mb = args.micro_batch or base.layout.micro_batch
    over = ["layout.tp=1", "layout.pp=1", "layout.vpp=1", "layout.dp=1", "layout.sequence_parallel=false",
            f"layout.zero_stage={args.zero}", f"layout.micro_batch={mb}", f"layout.global_batch={args.global_batch or mb}",
            "data.kind=synthetic", "train.tensorboard=false"]
    if args.seq:
        over.append(f"train.seq_len={args.seq}")
    if args.layers:
        over.append(f"model.num_layers={args.layers}")
    if args.precision:
        over.append(f"train.precision={args.precision}")
    recipe = load_recipe(args.recipe, over)
    tokens_per_step = recipe.layout.global_batch * recipe.train.seq_len
    fpt, peak = flops_per_token(recipe), peak_tflops()

    def row(name, sec, mem):
        tps = tokens_per_step / sec
        mfu = f"{tps * fpt / (peak * 1e12) * 100:5.1f}%" if peak else "  n/a"
        print(f"{name:<34} {sec * 1000:10.1f} ms/step {tps:12.0f} tok/s  MFU {mfu}  peak {mem:6.2f} GiB", flush=True)
        return tps

    lay = recipe.layout
    print(f"model {recipe.model.name} layers={recipe.model.num_layers} seq={recipe.train.seq_len} "
          f"micro_batch={lay.micro_batch} microbatches={lay.num_microbatches} precision={recipe.train.precision} "
          f"zero={lay.zero_stage} | {fpt / 1e9:.2f} GFLOP/token | peak {peak or 'n/a'} TFLOP/s", flush=True)
    sec, mem, device = bench_engine(recipe, args.steps, args.warmup)
    ours = row("megatron-core + deepspeed (ours)", sec, mem)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not args.skip_baseline:
        sec, mem = bench_transformers(recipe, args.steps, args.warmup, device)
        theirs = row("pytorch + transformers (baseline)", sec, mem)
        print(f"ratio ours / baseline: {ours / theirs:.2f}x tokens/s", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("MASTER_PORT", "29517")
    sys.exit(main())
