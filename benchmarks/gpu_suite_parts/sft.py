"""sft_varlen: packed SFT on synthetic conversations, the varlen path vs the dense block mask."""
from __future__ import annotations

import json
from pathlib import Path

from .metrics import error_of, read_rows, throughput
from .planner import plan_tools
from .runner import Suite
from .throughput import Shapes


def write_sft_data(path: Path, vocab: int, seq_len: int, n: int = 2000, seed: int = 0) -> dict:
    """A prepared SFT directory (megatron_ext/sft.py format 1) of random token ids with a realistic
    length mix (log-normal, median seq_len / 8, a long tail up to seq_len + 1) and the second half
    of each conversation trained: speed figures need lengths, not language."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(np.log(seq_len / 8), 1.0, n)), 4, seq_len + 1).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    path.mkdir(parents=True, exist_ok=True)
    rng.integers(1, vocab, int(offsets[-1]), dtype=np.int32).tofile(path / "tokens.bin")
    mask = np.zeros(int(offsets[-1]), dtype=np.uint8)
    for a, b in zip(offsets[:-1], offsets[1:]):
        mask[(a + b) // 2: b] = 1
    mask.tofile(path / "loss_mask.bin")
    np.save(path / "offsets.npy", offsets)
    meta = {"format": 1, "tokenizer": "synthetic (gpu_suite)", "vocab_size": vocab, "pad_id": 0, "eos_id": 0,
            "seq_len": seq_len, "summary": {"conversations": n}}
    (path / "meta.json").write_text(json.dumps(meta))
    return {"conversations": n, "mean_tokens": float(lengths.mean()), "max_tokens": int(lengths.max())}


def step_sft_varlen(s: Suite, shapes: Shapes) -> dict:
    """Packed SFT: the varlen path vs the dense-mask reference, same data, same init (the two
    runs side by side in a dry run, one after the other on the GPU)."""
    mb = shapes.micro_batch(s)
    if not mb:
        return {"status": "error", "error": "the planner finds no micro batch that fits"}
    _, load_recipe = plan_tools(s)
    recipe = s.recipe("1.5b")
    seq = 64 if s.dry else 4096
    data = write_sft_data(s.scratch / "sft_data", min(load_recipe(recipe, []).model.vocab_size, 32000), seq)
    env = s.results["sections"].get("env", {})
    varlen_kernel = ("flash-attn-varlen" if not s.dry and (env.get("flash_attn") or env.get("flash_attn_interface"))
                     else "sdpa-per-document")
    precision = "fp32" if s.dry else "bf16-mixed"  # the dry run checks loss parity at 1e-6
    extra = [f"train.precision={precision}", "train.attention=sdpa", "train.compile=false", "data.kind=sft",
             f"data.sft_path={s.scratch / 'sft_data'}", "data.packing=true", f"train.seq_len={seq}"]
    ways = ("varlen", "dense")
    dirs = {how: s.fresh_dir(f"sft_{how}") for how in ways}
    cmds = {how: s.train_cmd(recipe, s.base_overrides(dirs[how], shapes.steps) + s.layout(mb) + extra
                             + [f"train.packed_attention={how}"]) for how in ways}
    if s.dry:
        done = dict(zip(ways, s.run("sft_varlen", [(cmds[how], s.env()) for how in ways], 150)))
    else:
        done = {how: s.run(f"sft_{how}", [(cmds[how], s.env())], 150)[0] for how in ways}
    out = {"status": "ok", "data": data, "varlen_kernel": varlen_kernel, "precision": precision, "micro_batch": mb,
           "seq_len": seq}
    for how in ways:
        rows, res = read_rows(dirs[how]), done[how]
        measured = throughput(rows, shapes.warmup, mb * seq)
        timed = [x for x in rows if "trained_tokens_per_s" in x and x["step"] > shapes.warmup]
        out[how] = {"tokens_per_s": measured.get("tokens_per_s"), "step_s": measured.get("step_s"),
                    "peak_mem_gib": measured.get("peak_mem_gib"), "seconds": res["seconds"], "log": res["log"],
                    "trained_tokens_per_s": sum(x["trained_tokens_per_s"] for x in timed) / len(timed) if timed else None,
                    "first_loss": rows[0]["loss"] if rows else None}
        out[how] = {k: v for k, v in out[how].items() if v is not None}
        if res["rc"] != 0 or not measured:
            out["status"] = "error"
            out.setdefault("errors", []).append(f"{how}: {error_of(res)}")
    v, d = out["varlen"], out["dense"]
    if v.get("tokens_per_s") and d.get("tokens_per_s"):
        out["varlen_over_dense_tokens_per_s"] = v["tokens_per_s"] / d["tokens_per_s"]
    if v.get("first_loss") and d.get("first_loss"):
        out["first_loss_rel_diff"] = abs(v["first_loss"] - d["first_loss"]) / abs(d["first_loss"])
    return out
