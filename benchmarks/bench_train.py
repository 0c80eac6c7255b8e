#!/usr/bin/env python
"""Training throughput: our engine (Megatron-Core + DeepSpeed) vs plain PyTorch + transformers.

Both train the same Llama shapes, batch, sequence length and precision (fp32 or bf16 autocast,
AdamW, gradient clipping). Each side runs in its own process, and the two alternate for
``--rounds`` rounds (ours, theirs, ours, theirs, ...), so a machine shared with other jobs moves
both alike; the figures are the median and the min/max of the per-round ratios.

    GPU:  python benchmarks/bench_train.py recipes/1.5b.yaml --seq 4096 --micro-batch 1 --steps 10
    CPU:  GAPERON_DEVICE=cpu python benchmarks/bench_train.py recipes/tiny.yaml --steps 20

On CPU the children run with one intra-op thread (OMP_NUM_THREADS=1, unless set) and the ratio is
also given per CPU-second of the process (all its threads), which other jobs on the machine do not
move. ``--layers K`` benchmarks a reduced-depth proxy of a bigger size (same widths).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed_steps(step_fn, steps: int, warmup: int, on_gpu: bool) -> tuple[float, float, float]:
    """(wall seconds per step, process CPU seconds per step, last loss), after warm-up steps."""
    import torch

    for _ in range(warmup):
        step_fn()
    if on_gpu:
        torch.cuda.synchronize()
    start, cpu0 = time.perf_counter(), time.process_time()
    loss = float("nan")
    for _ in range(steps):
        loss = step_fn()
    if on_gpu:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps, (time.process_time() - cpu0) / steps, float(loss)


def bench_engine(recipe, steps: int, warmup: int) -> dict:
    import torch

    from megatron_ext.data import SyntheticCopyTask, microbatches
    from megatron_ext.engine import Engine, init_distributed
    from megatron_ext.model import build_model

    info = init_distributed(recipe)
    engine = Engine(recipe, build_model(recipe, info.on_gpu), info)
    data = SyntheticCopyTask(recipe.model.vocab_size, recipe.train.seq_len, seed=0)
    batch = microbatches(data, 0, recipe, 0)
    if info.on_gpu:
        torch.cuda.reset_peak_memory_stats()
    sec, cpu, loss = timed_steps(lambda: engine.train_step(batch, recipe.optimizer.lr).loss, steps, warmup,
                                 info.on_gpu)
    peak = torch.cuda.max_memory_allocated() / 2**30 if info.on_gpu else float("nan")
    return {"sec": sec, "cpu": cpu, "loss": loss, "peak_gib": peak}


def bench_transformers(recipe, steps: int, warmup: int) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_ext.data import SyntheticCopyTask, microbatches
    from megatron_ext.device import use_gpu

    device = torch.device("cuda") if use_gpu() else torch.device("cpu")
    m, t = recipe.model, recipe.train
    config = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
                         num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                         num_key_value_heads=m.num_kv_heads, head_dim=m.kv_channels, rope_theta=m.rope_theta,
                         rms_norm_eps=m.norm_eps, max_position_embeddings=m.max_position_embeddings,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    on_gpu = device.type == "cuda"
    model = LlamaForCausalLM(config).to(device)  # fp32 weights = the master copy of bf16-mixed
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.optimizer.lr, betas=tuple(recipe.optimizer.betas),
                            eps=recipe.optimizer.eps, weight_decay=recipe.optimizer.weight_decay,
                            **({"fused": True} if on_gpu else {"foreach": False}))
    bf16 = t.precision != "fp32"
    data = SyntheticCopyTask(m.vocab_size, t.seq_len, seed=0)  # the same samples as ours
    batch = [{k: v.to(device) for k, v in mb.items()} for mb in microbatches(data, 0, recipe, 0)]
    n_tokens = sum(float(mb["loss_mask"].sum()) for mb in batch)

    def step():
        total = 0.0
        for mb in batch:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(input_ids=mb["tokens"]).logits
            # labels are already the next tokens: no second shift (the model's own loss would shift)
            loss_sum = F.cross_entropy(logits.float().flatten(0, 1), mb["labels"].flatten(), reduction="sum")
            (loss_sum / n_tokens).backward()
            total += loss_sum.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.optimizer.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total / n_tokens

    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    sec, cpu, loss = timed_steps(step, steps, warmup, on_gpu)
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else float("nan")
    return {"sec": sec, "cpu": cpu, "loss": loss, "peak_gib": peak}


def build_recipe(args):
    from megatron_ext.config import load_recipe

    base = load_recipe(args.recipe)
    mb = args.micro_batch or base.layout.micro_batch
    over = ["layout.tp=1", "layout.pp=1", "layout.vpp=1", "layout.dp=1", "layout.sequence_parallel=false",
            f"layout.zero_stage={args.zero}", f"layout.micro_batch={mb}",
            f"layout.global_batch={args.global_batch or mb}", "data.kind=synthetic", "train.tensorboard=false"]
    if args.seq:
        over.append(f"train.seq_len={args.seq}")
    if args.layers:
        over.append(f"model.num_layers={args.layers}")
    if args.hidden:
        over.append(f"model.hidden_size={args.hidden}")
        over.append(f"model.ffn_hidden_size={args.hidden * 4}")
    if args.precision:
        over.append(f"train.precision={args.precision}")
    return load_recipe(args.recipe, over)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_child(argv: list[str], which: str) -> dict:
    env = {**os.environ, "MASTER_PORT": str(free_port()), "PYTHONPATH": str(ROOT)}
    env.setdefault("OMP_NUM_THREADS", "1")
    out = subprocess.run([sys.executable, __file__, *argv, "--child", which], env=env, capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{which} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x (min {min(values):.2f}x, max {max(values):.2f}x)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("--seq", type=int)
    p.add_argument("--micro-batch", type=int)
    p.add_argument("--global-batch", type=int, help="default: one micro batch per step")
    p.add_argument("--layers", type=int, help="reduced-depth proxy")
    p.add_argument("--hidden", type=int, help="another width (ffn = 4 x hidden)")
    p.add_argument("--precision", default=None)
    p.add_argument("--zero", type=int, default=0)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--child", choices=["ours", "transformers"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        recipe = build_recipe(args)
        fn = bench_engine if args.child == "ours" else bench_transformers
        print(json.dumps(fn(recipe, args.steps, args.warmup)), flush=True)
        return 0

    from megatron_ext.plan import flops_per_token
    from megatron_ext.metrics import peak_tflops

    recipe = build_recipe(args)
    lay = recipe.layout
    tokens_per_step = lay.global_batch * recipe.train.seq_len
    fpt, peak = flops_per_token(recipe), peak_tflops()
    print(f"model {recipe.model.name} hidden={recipe.model.hidden_size} layers={recipe.model.num_layers} "
          f"seq={recipe.train.seq_len} micro_batch={lay.micro_batch} microbatches={lay.num_microbatches} "
          f"precision={recipe.train.precision} zero={lay.zero_stage} | {fpt / 1e9:.3f} GFLOP/token | "
          f"peak {peak or 'n/a'} TFLOP/s | load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)

    def row(name, r):
        tps = tokens_per_step / r["sec"]
        mfu = f"{tps * fpt / (peak * 1e12) * 100:5.1f}%" if peak else "  n/a"
        print(f"  {name:<34} {r['sec'] * 1000:9.1f} ms/step {r['cpu'] * 1000:9.1f} CPU-ms/step "
              f"{tps:10.0f} tok/s  MFU {mfu}  loss {r['loss']:.4f}  peak {r['peak_gib']:6.2f} GiB", flush=True)

    wall, cpu = [], []
    for rnd in range(args.rounds):
        print(f"round {rnd + 1} (load {os.getloadavg()[0]:.1f})", flush=True)
        ours = run_child(argv, "ours")
        row("megatron-core + deepspeed (ours)", ours)
        if args.skip_baseline:
            continue
        theirs = run_child(argv, "transformers")
        row("pytorch + transformers (baseline)", theirs)
        wall.append(theirs["sec"] / ours["sec"])
        cpu.append(theirs["cpu"] / ours["cpu"])
    if wall:
        print(f"ratio ours / baseline, tokens/s: {spread(wall)} over {len(wall)} rounds", flush=True)
        print(f"ratio ours / baseline, tokens per CPU-s: {spread(cpu)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
