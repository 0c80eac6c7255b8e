#!/usr/bin/env python
"""GPU proof in one command: correctness, throughput, MFU and the planner's error on one H100/H200.

On a CPU machine, once (fetches/builds the wheels the GPU image lacks into ``wheels/``, ignored):

    .venv/bin/python benchmarks/gpu_suite.py --prepare

On the GPU machine (device tool: run in the repo root, ``carry=["wheels"]``, timeout_s=560):

    bash benchmarks/gpu_suite.sh          # = OUT=$OUT python3 benchmarks/gpu_suite.py --install-carried

A rerun of some sub-steps on the same (still warm) machine merges into the same JSON:
``bash benchmarks/gpu_suite.sh --only tput_compile,proxy_24b --budget 300``.

``--install-carried`` unpacks ``wheels/*.whl`` with ``pip install --no-deps --no-index --target
.gpu_suite_site`` (a zip fallback when pip is unusable) and puts that folder first on PYTHONPATH;
the machine's own torch (2.11 + CUDA 13), transformers, safetensors, ... are used as they are.

Everything is written to ``$OUT/gpu_suite.json`` and ``$OUT/gpu_suite.md`` (OUT defaults to
./gpu_suite_out) after every sub-step, so a timeout still returns figures. Each sub-step runs its
processes with its own time budget, capped by what is left of ``--budget`` (default 470 s); one
that fails records its error and the suite goes on. Sub-steps, in priority order:

  install, env            carried wheels, versions, GPU, TE / flash-attn importable
  correctness_tiny        recipes/tiny.yaml, 20 steps, GPU vs CPU, fp32 (<= 1e-3 rel per step) and
                          bf16-mixed (max rel diff reported, next to the bf16-vs-fp32 gap)
  tput_mixed              1.5b (16 layers, seq 4096, dp=1, ZeRO-1), bf16-mixed, sdpa, no compile
  baseline                plain PyTorch + transformers LlamaForCausalLM step, same batch and seq
                          (fp32 weights + bf16 autocast, fused AdamW, SDPA) -> ratio
  tput_pure               as tput_mixed in bf16-pure
  proxy_8b, proxy_24b     full-width 4-layer proxies (24b: 2 layers if 4 do not fit), tp=1
  correctness_hf          1.5b shapes with 2 layers (time-bound), fp32, lr=0: the trainer's
                          first-step loss vs LlamaForCausalLM loaded from our to-hf export
  tput_compile            tput_mixed with train.compile=true
  tput_te                 tput_mixed with train.attention=te (skipped unless importable)
  tput_cudnn              tput_mixed with train.attention=sdpa-cudnn (sdpa lets torch pick: flash)
  tput_chunked_ce         tput_mixed with train.loss_chunk_tokens=2048 (no full logits kept: tokens/s
                          and peak memory against tput_mixed decide whether the recipes turn it on)
  tput_cwt                tput_mixed headless (model.head=none, train.objective=cwt: contrastive
                          weight tying, no [tokens, vocab] logits): tokens/s and peak memory vs tput_mixed
  sft_varlen              packed SFT on the 1.5b shapes (synthetic conversations, realistic lengths):
                          tokens/s and trained tokens/s with train.packed_attention=varlen (cu_seqlens:
                          flash-attn varlen when importable, else per-document SDPA) vs dense (the
                          [b, 1, s, s] block mask), and their first-step losses
  planner                 (d) and the issue's goals, from the runs above

Every training run goes through the real trainer (tools/train.py), in a fresh run directory
under a scratch folder (not $OUT), with no checkpoint I/O; tokens/s come from its
metrics.jsonl, excluding warm-up steps. MFU = tokens/s x megatron_ext/plan.py flops_per_token /
989 TFLOP/s (megatron_ext/errors.py PEAK_TFLOPS["H100"]). The planner section compares
planned_mem_gib with peak_mem_gib (torch.cuda.max_memory_allocated) for every run, and
plan.step_time at the measured MFU with the measured step time.

``--dry-run`` runs the whole suite on CPU (GAPERON_DEVICE=cpu) with recipes/tiny.yaml everywhere
and few steps (tests/test_gpu_suite.py), so the suite cannot rot between GPU sessions.
``--only a,b`` reruns the named sub-steps and merges them into an existing gpu_suite.json.

The sub-steps' code lives in benchmarks/gpu_suite_parts/ (one job a module, listed in its
__init__.py); this file keeps the CLI, the sub-step table and the order they run in.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys

from gpu_suite_parts.baseline import BASELINE_WORKER, step_baseline, worker_baseline
from gpu_suite_parts.correctness import HF_LOSS_WORKER, step_correctness_hf, step_correctness_tiny, worker_hf_loss
from gpu_suite_parts.environment import step_env, step_install
from gpu_suite_parts.planner import step_planner
from gpu_suite_parts.report import render_markdown
from gpu_suite_parts.runner import Suite, run_steps
from gpu_suite_parts.sft import step_sft_varlen
from gpu_suite_parts.throughput import Shapes, proxy, tput
from gpu_suite_parts.wheels import prepare

__all__ = ["main", "render_markdown"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare", action="store_true", help="CPU machine: fetch/build the carried wheels into wheels/")
    p.add_argument("--install-carried", action="store_true", help="GPU machine: install wheels/ first (into .gpu_suite_site)")
    p.add_argument("--dry-run", action="store_true", help="CPU, recipes/tiny.yaml everywhere, few steps")
    p.add_argument("--out", help="output folder (default $OUT, else ./gpu_suite_out)")
    p.add_argument("--budget", type=float, default=470.0, help="seconds for the whole suite (default 470)")
    p.add_argument("--only", help="comma-separated sub-steps to run (merged into an existing gpu_suite.json)")
    p.add_argument("--skip", help="comma-separated sub-steps to leave out")
    p.add_argument("--hf-layers", type=int, default=2, help="layers of the 1.5b correctness check (default 2)")
    p.add_argument("--parallel", type=int, default=1,
                   help="sub-steps run side by side (default 1; only for --dry-run, GPU figures need 1)")
    p.add_argument("--scratch", help="folder for run directories (default: the system temp dir)")
    p.add_argument("--_worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.parallel > 1 and not args.dry_run:
        p.error("--parallel is for --dry-run only: parallel runs would share the GPU")
    if args._worker:
        kind, spec = args._worker
        {BASELINE_WORKER: worker_baseline, HF_LOSS_WORKER: worker_hf_loss}[kind](json.loads(spec))
        return 0
    if args.prepare:
        return prepare()

    s = Suite(args)
    shapes = Shapes(s)
    steps = [
        ("install", lambda s, sh: step_install(s)),
        ("env", lambda s, sh: step_env(s)),
        ("correctness_tiny", lambda s, sh: step_correctness_tiny(s)),
        ("tput_mixed", tput({"name": "tput_mixed", "precision": "bf16-mixed"}, 75)),
        ("baseline", step_baseline),
        ("tput_pure", tput({"name": "tput_pure", "precision": "bf16-pure"}, 65)),
        ("proxy_8b", proxy("8b", (4,), 60)),
        ("correctness_hf", step_correctness_hf),
        ("proxy_24b", proxy("24b", (4, 2), 70)),
        ("tput_compile", tput({"name": "tput_compile", "precision": "bf16-mixed", "compile": True,
                               "dry_skip": "torch.compile is GPU-only in this suite (minutes to start on CPU)"}, 110,
                              warmup_extra=2)),
        ("tput_te", tput({"name": "tput_te", "precision": "bf16-mixed", "attention": "te",
                          "needs": "transformer_engine"}, 65)),
        ("tput_cudnn", tput({"name": "tput_cudnn", "precision": "bf16-mixed", "attention": "sdpa-cudnn",
                             "dry_skip": "the cuDNN SDPA kernel is GPU-only"}, 65)),
        ("tput_chunked_ce", tput({"name": "tput_chunked_ce", "precision": "bf16-mixed",
                                  "extra": ["train.loss_chunk_tokens=2048"]}, 65)),
        ("tput_cwt", tput({"name": "tput_cwt", "precision": "bf16-mixed",
                           "extra": ["model.head=none", "train.objective=cwt"]}, 65)),
        ("sft_varlen", step_sft_varlen),
        ("planner", step_planner),
    ]
    print(f"gpu suite -> {s.out} (budget {args.budget:.0f} s{', dry run' if s.dry else ''})", flush=True)
    run_steps(s, shapes, steps)
    shutil.rmtree(s.scratch, ignore_errors=True)
    print((s.out / "gpu_suite.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
