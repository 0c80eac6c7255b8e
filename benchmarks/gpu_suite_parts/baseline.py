"""The transformers baseline: plain PyTorch + LlamaForCausalLM on the same batch and sequence as
tput_mixed, in a worker process (``gpu_suite.py --_worker baseline SPEC``)."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from .common import SCRIPT
from .metrics import error_of, mfu
from .planner import plan_tools
from .runner import Suite
from .throughput import Shapes


BASELINE_WORKER = "baseline"


def step_baseline(s: Suite, shapes: Shapes) -> dict:
    mb = shapes.micro_batch(s)
    if not mb:
        return {"status": "error", "error": "no micro batch"}
    overrides = s.base_overrides(s.scratch / "baseline", shapes.steps) + s.layout(mb) + ["train.precision=bf16-mixed"]
    spec = {"recipe": s.recipe("1.5b"), "overrides": overrides, "steps": shapes.steps - shapes.warmup,
            "warmup": shapes.warmup, "out": str(s.scratch / "baseline.json")}
    res = s.run("baseline", [([sys.executable, str(SCRIPT), "--_worker", BASELINE_WORKER, json.dumps(spec)], s.env())],
                90 if s.dry else 120)[0]
    path = Path(spec["out"])
    if res["rc"] != 0 or not path.exists():
        return {"status": "error", "error": error_of(res), "seconds": res["seconds"]}
    row = {"status": "ok", **json.loads(path.read_text()), "seconds": res["seconds"], "log": res["log"]}
    plan, load_recipe = plan_tools(s)
    r = load_recipe(spec["recipe"], overrides)
    row["mfu"] = mfu(row["tokens_per_s"], plan.flops_per_token(r))
    return row


def worker_baseline(spec: dict) -> None:
    """Plain PyTorch + transformers: LlamaForCausalLM, fp32 weights + bf16 autocast, fused AdamW,
    SDPA, same micro batch, global batch and sequence as the trainer's run. An OOM halves the
    micro batch and doubles accumulation (same tokens per step)."""
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_ext.config import load_recipe
    from megatron_ext.device import use_gpu

    r = load_recipe(spec["recipe"], spec["overrides"])
    m, lay, t = r.model, r.layout, r.train
    device = torch.device("cuda" if use_gpu() else "cpu")
    on_gpu = device.type == "cuda"
    if not on_gpu:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    config = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
                         num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                         num_key_value_heads=m.num_kv_heads, head_dim=m.kv_channels, rope_theta=m.rope_theta,
                         rms_norm_eps=m.norm_eps, max_position_embeddings=m.max_position_embeddings,
                         tie_word_embeddings=False, attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            **({"fused": True} if on_gpu else {}))
    global_batch, micro = lay.global_batch, lay.micro_batch
    oom_at = []

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    while True:
        accum = global_batch // micro
        tokens = torch.randint(0, m.vocab_size, (micro, t.seq_len), device=device)

        def step():
            for _ in range(accum):
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    loss = model(input_ids=tokens, labels=tokens).loss
                (loss / accum).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), r.optimizer.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        try:
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()
            for _ in range(spec["warmup"]):
                step()
            sync()
            start = time.perf_counter()
            for _ in range(spec["steps"]):
                loss = step()
            sync()
            sec = (time.perf_counter() - start) / spec["steps"]
            break
        except torch.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            oom_at.append(micro)
            if micro == 1:
                raise
            micro //= 2
            torch.cuda.empty_cache()
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else \
        __import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss / 2**20
    out = {"tokens_per_s": global_batch * t.seq_len / sec, "step_s": sec, "peak_mem_gib": peak,
           "micro_batch": micro, "global_batch": global_batch, "seq_len": t.seq_len, "layers": m.num_layers,
           "timed_steps": spec["steps"], "warmup_steps": spec["warmup"], "last_loss": float(loss),
           "what": "LlamaForCausalLM, fp32 weights + bf16 autocast, fused AdamW, sdpa",
           "transformers": transformers.__version__, "torch": torch.__version__}
    if oom_at:
        out["oom_at_micro_batch"] = oom_at
    Path(spec["out"]).write_text(json.dumps(out))
    print(json.dumps(out))
