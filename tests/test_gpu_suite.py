"""benchmarks/gpu_suite.py end to end on CPU (--dry-run: recipes/tiny.yaml everywhere), so the
one-command GPU proof cannot rot between GPU sessions: every section is written, in the JSON and
the markdown, with finite figures."""
from __future__ import annotations

import json
import math
import subprocess
import sys

from conftest import ROOT, cpu_env

SECTIONS = ["install", "env", "correctness_tiny", "tput_mixed", "baseline", "tput_pure", "proxy_8b",
            "correctness_hf", "proxy_24b", "tput_compile", "tput_te", "tput_cudnn", "tput_chunked_ce", "tput_cwt", "sft_varlen",
            "planner"]
RUNS = ["tput_mixed", "tput_pure", "proxy_8b", "proxy_24b", "tput_chunked_ce", "tput_cwt"]


def numbers(obj):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from numbers(v)


def test_gpu_suite_dry_run(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--dry-run", "--parallel", "2",
                           "--out", str(out), "--scratch", str(tmp_path)],
                          cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "gpu_suite.json").read_text())
    md = (out / "gpu_suite.md").read_text()
    sec = res["sections"]
    assert list(sec) == SECTIONS
    bad = {k: v.get("error") or v.get("errors") for k, v in sec.items() if v["status"] not in ("ok", "skipped")}
    assert not bad, json.dumps(bad, indent=1)[:6000]
    assert all(math.isfinite(x) for x in numbers(sec)), "non-finite figure in gpu_suite.json"
    assert {sec[k]["status"] for k in ("install", "tput_compile", "tput_te", "tput_cudnn")} == {"skipped"}  # no wheels, compile, TE, cuDNN on CPU

    c = sec["correctness_tiny"]
    assert c["fp32_pass"] and c["fp32_max_rel_diff"] == 0.0  # both sides are the CPU in a dry run
    assert all(len(v) == c["steps"] == 20 for v in c["losses"].values())
    assert c["bf16_vs_fp32_cpu_max_rel_diff"] > 0
    h = sec["correctness_hf"]
    assert h["pass"] and h["rel_diff"] <= 1e-4  # trainer first-step loss == HF export's loss
    for name in RUNS:
        r = sec[name]
        for key in ("tokens_per_s", "mfu", "peak_mem_gib", "planned_mem_gib", "plan_mem_error", "step_s",
                    "plan_step_s", "flops_per_token"):
            assert r[key] > 0 or key == "plan_mem_error", (name, key, r.get(key))
        assert r["timed_steps"] == r["steps"] - r["warmup_steps"]
    sv = sec["sft_varlen"]  # packed SFT: varlen vs the dense mask, same data and init
    for how in ("varlen", "dense"):
        assert sv[how]["tokens_per_s"] > 0 and 0 < sv[how]["trained_tokens_per_s"] < sv[how]["tokens_per_s"], sv
    assert sv["varlen_kernel"] == "sdpa-per-document" and sv["first_loss_rel_diff"] <= 1e-6, sv
    assert "## Packed SFT attention" in md
    assert sec["tput_pure"]["precision"] == "bf16-pure" and sec["tput_mixed"]["precision"] == "bf16-mixed"
    assert sec["baseline"]["tokens_per_s"] > 0 and sec["baseline"]["global_batch"] == sec["tput_mixed"]["global_batch"]
    goals = sec["planner"]["goals"]
    assert goals["ratio_vs_transformers"] > 0 and goals["max_abs_plan_mem_error"] is not None
    assert len(sec["planner"]["runs"]) == len(RUNS)
    for heading in ("## Correctness", "## Throughput", "## Goals", "| baseline |", "flops_per_token"):
        assert heading in md
    for name in SECTIONS:
        assert f"| {name} |" in md
    assert (out / "logs" / "tput_mixed.log").exists()


def test_markdown_renders_partial_results():
    """A suite cut short by its timeout still renders: every lookup tolerates a missing section."""
    from benchmarks.gpu_suite_parts.report import render_markdown

    md = render_markdown({"meta": {}, "sections": {"env": {"status": "error", "error": "no GPU"}}})
    assert "no GPU" in md and "## Goals" in md
