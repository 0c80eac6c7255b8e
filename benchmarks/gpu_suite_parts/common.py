"""What every part of the GPU suite shares: the repository's paths, the peak TFLOP/s MFU is quoted
against, and the entry script the worker processes re-run.

The suite runs as ``python benchmarks/gpu_suite.py`` (sys.path[0] = benchmarks/), on a GPU machine
with that machine's own Python, before anything is installed: gpu_suite.sh puts the repository root
on PYTHONPATH (a venv made by setup.sh has the project installed), and megatron_ext.errors needs
nothing beyond the standard library. Child processes get the
root (and .gpu_suite_site) through PYTHONPATH (runner.Suite.env).
"""
from __future__ import annotations

from pathlib import Path

from megatron_ext.errors import PEAK_TFLOPS, free_port

ROOT = Path(__file__).resolve().parent.parent.parent

__all__ = ["FLOPS_NOTE", "PEAK", "ROOT", "SCRIPT", "SITE", "TINY", "WHEELS", "free_port"]

SCRIPT = ROOT / "benchmarks" / "gpu_suite.py"  # the entry point: `SCRIPT --_worker KIND SPEC` runs a worker
WHEELS = ROOT / "wheels"
SITE = ROOT / ".gpu_suite_site"
TINY = ROOT / "recipes" / "tiny.yaml"
PEAK = PEAK_TFLOPS["H100"]  # dense bf16, H100 SXM / H200
FLOPS_NOTE = (f"MFU = tokens/s x flops_per_token / {PEAK:.0f} TFLOP/s; flops_per_token is megatron_ext/plan.py's: "
              "6 x matmul params (layers + output layer, no embedding lookup) + 12 x layers x heads x "
              "head_dim x seq for attention (causal counted as full s x s, as the planner does)")
