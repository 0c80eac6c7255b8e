"""correctness_tiny (recipes/tiny.yaml, GPU vs CPU, fp32 and bf16-mixed) and correctness_hf (the
trainer's first-step loss vs LlamaForCausalLM loaded from the to-hf export, and its worker)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from .common import ROOT, SCRIPT, TINY
from .metrics import error_of, read_rows, rel_diffs
from .runner import Suite
from .throughput import Shapes


HF_LOSS_WORKER = "hf-loss"


def _pair(s: Suite, name: str, precision: str, steps: int) -> tuple[list, list, list]:
    """The tiny recipe on the GPU and on CPU, in parallel."""
    zero = 0 if precision == "fp32" else 1
    cmds, dirs = [], []
    for side in ("gpu", "cpu"):
        d = s.fresh_dir(f"{name}-{precision}-{side}")
        dirs.append(d)
        cmds.append((s.train_cmd(str(TINY), s.base_overrides(d, steps, tiny=True) + [f"train.precision={precision}",
                                                                           f"layout.zero_stage={zero}"]),
                     s.env(cpu=side == "cpu", strict_fp32=precision == "fp32")))
    return cmds, dirs, [precision] * 2


def step_correctness_tiny(s: Suite) -> dict:
    steps = 20
    cmds, dirs = [], []
    for precision in ("fp32", "bf16-mixed"):
        c, d, _ = _pair(s, "tiny", precision, steps)
        cmds += c
        dirs += d
    if s.dry:  # both sides would be the same CPU command: run the "cpu" ones, the "gpu" side reads them
        ran = s.run("correctness_tiny", cmds[1::2], 150)
        res = [r for r in ran for _ in (0, 1)]
        dirs = [d for d in dirs[1::2] for _ in (0, 1)]
    else:
        res = s.run("correctness_tiny", cmds, 100)
    out = {"status": "ok", "steps": steps, "seconds": max(r["seconds"] for r in res)}
    losses = {}
    for (precision, side), r, d in zip([(p, sd) for p in ("fp32", "bf16-mixed") for sd in ("gpu", "cpu")], res, dirs):
        rows = [x["loss"] for x in read_rows(d) if "loss" in x]
        if r["rc"] != 0 or len(rows) != steps:
            out["status"] = "error"
            out.setdefault("errors", []).append(f"{precision} {side}: {error_of(r)} ({len(rows)} steps logged)")
        losses[f"{precision}_{side}"] = rows
    out["losses"] = losses
    if losses.get("fp32_gpu") and losses.get("fp32_cpu"):
        d = rel_diffs(losses["fp32_gpu"], losses["fp32_cpu"])
        out["fp32_max_rel_diff"] = max(d)
        out["fp32_pass"] = max(d) <= 1e-3
        if not out["fp32_pass"]:
            out["status"] = "fail"
    if losses.get("bf16-mixed_gpu") and losses.get("bf16-mixed_cpu"):
        out["bf16_max_rel_diff"] = max(rel_diffs(losses["bf16-mixed_gpu"], losses["bf16-mixed_cpu"]))
        if losses.get("fp32_cpu"):  # the size of bf16 noise itself: bf16-mixed vs fp32 on the same device
            out["bf16_vs_fp32_cpu_max_rel_diff"] = max(rel_diffs(losses["bf16-mixed_cpu"], losses["fp32_cpu"]))
    return out


def step_correctness_hf(s: Suite, shapes: Shapes) -> dict:
    """Trainer first-step loss (fp32, lr=0 so the saved weights are the ones that produced it)
    vs transformers LlamaForCausalLM loaded from our to-hf export of that checkpoint."""
    layers = None if s.dry else s.args.hf_layers
    d = s.fresh_dir("correctness_hf")
    overrides = s.base_overrides(d, 1) + s.layout(1, zero=0) + [
        "train.precision=fp32", "train.attention=sdpa", "optimizer.lr=0", "optimizer.min_lr=0",
        "checkpoint.save_at_end=true"] + ([f"model.num_layers={layers}"] if layers else [])
    recipe = s.recipe("1.5b")
    out = {"status": "ok", "layers": layers or "all (tiny)",
           "note": None if s.dry else f"1.5b widths and vocab with {layers} of 16 layers (time-bound: the checkpoint, "
                                      "export and HF load scale with the layers)"}
    res = s.run("correctness_hf-train", [(s.train_cmd(recipe, overrides), s.env(strict_fp32=True))], 90 if s.dry else 120)[0]
    rows = [r for r in read_rows(d) if "loss" in r]
    if res["rc"] != 0 or not rows:
        return {**out, "status": "error", "error": "train: " + error_of(res)}
    out["trainer_loss"] = rows[0]["loss"]
    hf = s.scratch / "correctness_hf-export"
    res = s.run("correctness_hf-export", [([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "to-hf",
                                            str(d / "checkpoints"), str(hf), "--dtype", "fp32", "--no-verify",
                                            "--no-progress", "--no-tokenizer", "--card", "none"], s.env())], 60 if s.dry else 90)[0]
    if res["rc"] != 0:
        return {**out, "status": "error", "error": "to-hf: " + error_of(res)}
    shutil.rmtree(d / "checkpoints", ignore_errors=True)
    spec = {"recipe": recipe, "overrides": overrides, "hf_dir": str(hf), "out": str(s.scratch / "hf_loss.json")}
    res = s.run("correctness_hf-load", [([sys.executable, str(SCRIPT), "--_worker", HF_LOSS_WORKER, json.dumps(spec)],
                                         s.env(strict_fp32=True))], 60 if s.dry else 90)[0]
    shutil.rmtree(hf, ignore_errors=True)
    if res["rc"] != 0 or not Path(spec["out"]).exists():
        return {**out, "status": "error", "error": "hf load: " + error_of(res)}
    hf_out = json.loads(Path(spec["out"]).read_text())
    out.update(hf_loss=hf_out["loss"], hf_device=hf_out["device"], transformers=hf_out["transformers"])
    out["rel_diff"] = abs(out["trainer_loss"] - out["hf_loss"]) / abs(out["hf_loss"])
    out["pass"] = out["rel_diff"] <= 1e-4
    if not out["pass"]:
        out["status"] = "fail"
    return out


def worker_hf_loss(spec: dict) -> None:
    """The trainer's first global batch through LlamaForCausalLM from the export, in fp32."""
    import torch
    import transformers
    from transformers import LlamaForCausalLM

    from megatron_ext.config import load_recipe
    from megatron_ext.data import build_datasets, microbatches
    from megatron_ext.device import use_gpu

    r = load_recipe(spec["recipe"], spec["overrides"])
    device = torch.device("cuda" if use_gpu() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = LlamaForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.float32, attn_implementation="sdpa",
                                             local_files_only=True).to(device).eval()
    train, _ = build_datasets(r)
    total, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for mb in microbatches(train, 0, r, 0):
            logits = model(input_ids=mb["tokens"].to(device)).logits.float()
            losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), mb["labels"].to(device).flatten(),
                                                       reduction="none")
            mask = mb["loss_mask"].to(device).flatten().double()
            total += (losses.double() * mask).sum().cpu()
            count += mask.sum().cpu()
    out = {"loss": float(total / count), "device": str(device), "transformers": transformers.__version__}
    Path(spec["out"]).write_text(json.dumps(out))
    print(json.dumps(out))
