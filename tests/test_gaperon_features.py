"""Gaperon training features: pure bf16 (with the RMSNorm gain scaling), LM-head gradient
diagnostics against an independent transformers computation, torch.compile and attention kernels."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import ROOT, TINY, cpu_env, launch, layout_overrides, per_step, read_metrics
from megatron_ext.checkpoint import CheckpointReader

PURE = ["train.precision=bf16-pure", "train.tensorboard=false"]



def ckpt_dtypes(ckpt: Path) -> dict[str, set]:
    """dtype of every stored tensor, by kind (model / exp_avg / exp_avg_sq)."""
    out: dict[str, set] = {}
    for f in ckpt.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            for key in h.keys():
                out.setdefault(key.split("/")[0], set()).add(h.get_slice(key).get_dtype())
    return out


# ---- pure bf16 --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pure_run(tmp_path_factory) -> Path:
    """tiny, bf16-pure, dp 2 ZeRO-1, 30 steps of the learnable task."""
    out = tmp_path_factory.mktemp("pure") / "run"
    launch(2, [str(TINY), *PURE, "train.steps=30", *layout_overrides(dp=2, zero=1), f"train.output_dir={out}"])
    return out


def test_pure_bf16_learns_and_keeps_every_state_in_bf16(pure_run):
    loss = read_metrics(pure_run, "loss")
    assert len(loss) == 30 and sum(loss[-5:]) / 5 < loss[0] - 1.0, loss
    ckpt = pure_run / "checkpoints" / "step_00000030"
    assert ckpt_dtypes(ckpt) == {"model": {"BF16"}, "exp_avg": {"BF16"}, "exp_avg_sq": {"BF16"}}
    reader = CheckpointReader(ckpt)
    assert reader.meta["norm_gain_scale"] == 20.0
    gain = reader.get("decoder.final_layernorm.weight").float()
    assert 0.02 < gain.mean().item() < 0.1, "gains are stored divided by 20 (1.0 -> 0.05 at init)"


@pytest.mark.parametrize("zero", [0, 2])
def test_pure_bf16_resumes_exactly(tmp_path, zero):
    """SIGTERM at step 4, resume: the same losses bit for bit (ZeRO-0: AdamW on the bf16 weights;
    ZeRO-2: DeepSpeed's bf16 partitions)."""
    args = [str(TINY), *PURE, "train.steps=8", *layout_overrides(dp=2, zero=zero)]
    ref, out = tmp_path / "ref", tmp_path / "run"
    launch(2, [*args, f"train.output_dir={ref}"])
    term = launch(2, [*args, f"train.output_dir={out}"], env=cpu_env(GAPERON_FAULT="sigterm:4"), check=False)
    assert "SIGTERM: saved step 4" in term.stdout, term.stdout[-2000:] + term.stderr[-3000:]
    launch(2, [*args, f"train.output_dir={out}"])
    assert per_step(out) == per_step(ref)
    assert ckpt_dtypes(out / "checkpoints" / "step_00000008")["exp_avg"] == {"BF16"}


def test_pure_checkpoint_loads_into_fp32_with_true_gains(pure_run, tmp_path):
    """A later phase in fp32 starts from the pure-bf16 checkpoint: the gains are re-expressed at
    scale 1, so its first loss (lr 0) equals the same phase run in bf16-pure up to bf16 noise.
    Loaded raw, the gains would be 20x too small and the loss far off."""
    losses = {}
    for precision in ("bf16-pure", "fp32"):
        out = tmp_path / precision
        launch(1, [str(TINY), f"train.precision={precision}", "train.steps=1", "optimizer.lr=0", "optimizer.min_lr=0",
                   f"checkpoint.init_from={pure_run}", "train.tensorboard=false", f"train.output_dir={out}"])
        losses[precision] = read_metrics(out, "loss")[0]
    assert abs(losses["fp32"] - losses["bf16-pure"]) < 0.02 * losses["fp32"], losses
    fresh = json.loads((tmp_path / "fp32" / "checkpoints" / "step_00000001" / "meta.json").read_text())
    assert fresh["norm_gain_scale"] == 1.0
    gain = CheckpointReader(tmp_path / "fp32" / "checkpoints" / "step_00000001").get("decoder.final_layernorm.weight")
    pure_gain = CheckpointReader(pure_run / "checkpoints" / "step_00000030").get("decoder.final_layernorm.weight")
    torch.testing.assert_close(gain.float(), pure_gain.float() * 20)


def test_pure_checkpoint_exports_true_gains_to_hf(pure_run, tmp_path):
    """to-hf multiplies the gains back; its built-in verify compares Megatron and HF logits."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "to-hf", str(pure_run),
                           str(tmp_path / "hf"), "--dtype", "fp32", "--no-progress", "--no-tokenizer"],
                          cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "OK" in proc.stdout
    (shard,) = (tmp_path / "hf").glob("model-*.safetensors")
    with safe_open(str(shard), "pt") as h:
        hf_gain = h.get_tensor("model.norm.weight")
    stored = CheckpointReader(pure_run / "checkpoints" / "step_00000030").get("decoder.final_layernorm.weight")
    torch.testing.assert_close(hf_gain, stored.float() * 20)


# ---- LM-head gradient diagnostics -------------------------------------------------------------
def test_lm_head_gradient_ratio_matches_transformers(tmp_path):
    """tp 2 x dp 2, two microbatches per rank, lr 0 (the weights saved are those measured):
    the logged norms of dL/dlogits and dL/dhidden over the global batch equal what autograd
    gives on the exported HF model for the same 8 samples."""
    from transformers import LlamaForCausalLM

    from megatron_ext.data import SyntheticCopyTask

    out = tmp_path / "run"
    launch(4, [str(TINY), "train.precision=fp32", "train.steps=1", "optimizer.lr=0", "optimizer.min_lr=0",
               "train.lm_head_grad_interval=1", "train.tensorboard=false", f"train.output_dir={out}",
               *layout_overrides(tp=2, dp=2, zero=1)])
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    logged = next(r for r in logged if "lm_head_grad_ratio" in r)
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "to-hf", str(out),
                           str(tmp_path / "hf"), "--dtype", "fp32", "--no-verify", "--no-progress", "--no-tokenizer"],
                          cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    model = LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32)
    data = SyntheticCopyTask(512, 64, 1234)
    tokens = torch.stack([data[i]["tokens"] for i in range(8)])
    labels = torch.stack([data[i]["labels"] for i in range(8)])
    captured = {}
    model.lm_head.register_forward_hook(lambda mod, args, out: captured.update(hidden=args[0], logits=out))
    model(tokens)
    for t in captured.values():
        t.retain_grad()
    loss = torch.nn.functional.cross_entropy(captured["logits"].flatten(0, 1), labels.flatten())
    loss.backward()
    logits_norm, hidden_norm = captured["logits"].grad.norm().item(), captured["hidden"].grad.norm().item()
    assert logged["lm_head_logits_grad_norm"] == pytest.approx(logits_norm, rel=1e-4)
    assert logged["lm_head_hidden_grad_norm"] == pytest.approx(hidden_norm, rel=1e-4)
    assert logged["lm_head_grad_ratio"] == pytest.approx(hidden_norm / logits_norm, rel=1e-4)


# ---- torch.compile and attention kernels ------------------------------------------------------
def test_compile_and_sdpa_math_match_eager(tmp_path):
    """Compiled layers (inductor) and SDPA pinned to the math kernel train to the same losses."""
    common = [str(TINY), "train.precision=fp32", "train.steps=3", "train.tensorboard=false"]
    runs = {"eager": [], "compile": ["train.compile=true"], "math": ["train.attention=sdpa-math"]}
    losses = {}
    for name, extra in runs.items():
        out = tmp_path / name
        proc = launch(1, [*common, *extra, f"train.output_dir={out}"])
        losses[name] = read_metrics(out, "loss")
        if name == "math":
            assert "attention: sdpa-math (torch SDPA: math" in proc.stdout
    for name in ("compile", "math"):
        assert losses[name] == pytest.approx(losses["eager"], rel=1e-4), (name, losses)


def test_missing_flash_attn_is_refused_before_launch(tmp_path):
    proc = launch(1, [str(TINY), "train.attention=flash-attn", f"train.output_dir={tmp_path}"], check=False)
    assert proc.returncode != 0
    assert "train.attention=flash-attn but neither flash_attn_interface (FA3) nor flash_attn" in proc.stderr
