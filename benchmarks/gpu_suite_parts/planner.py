"""The planner against the measurements: micro-batch choice, planned memory and step time per run,
and the planner sub-step with the issue's goals."""
from __future__ import annotations

import site
from typing import TYPE_CHECKING

from .common import PEAK, SITE
from .metrics import mfu
from .runner import Suite

if TYPE_CHECKING:
    from .throughput import Shapes


def plan_tools(s: Suite):
    if s.use_site:
        site.addsitedir(str(SITE))  # the carried wheels, installed by --install-carried
    from megatron_ext import plan
    from megatron_ext.config import load_recipe

    return plan, load_recipe


def pick_micro_batch(s: Suite, recipe: str, overrides: list[str], candidates=(16, 12, 8, 6, 4, 3, 2, 1)) -> tuple[int, dict]:
    """The largest micro batch the planner says fits in 90% of this GPU's memory."""
    plan, load_recipe = plan_tools(s)
    memory = s.gpu_memory or 80 * 2**30
    hw = plan.Hardware(gpus=1, gpu_memory=memory)
    for mb in candidates:
        r = load_recipe(recipe, overrides + s.layout(mb))
        est = plan.estimate_memory(r, attention="sdpa")
        if est["total"] <= hw.usable_memory:
            return mb, {"planned_total_gib": est["total"] / 2**30, "usable_gib": hw.usable_memory / 2**30}
    return 0, {"usable_gib": hw.usable_memory / 2**30}


def planner_figures(s: Suite, recipe: str, overrides: list[str], measured: dict) -> dict:
    """plan.step_time at the measured MFU vs the measured step time, plus flops per token."""
    plan, load_recipe = plan_tools(s)
    r = load_recipe(recipe, overrides)
    fpt = plan.flops_per_token(r)
    out = {"flops_per_token": fpt}
    if measured.get("tokens_per_s"):
        m = mfu(measured["tokens_per_s"], fpt)
        hw = plan.Hardware(gpus=1, gpu_memory=s.gpu_memory or 80 * 2**30, gpu_tflops=PEAK, mfu=max(m, 1e-9))
        p = plan.make_plan(r, hw)
        out.update(mfu=m, plan_step_s=p.time.step, plan_mem_total_gib=p.memory["total"] / 2**30,
                   plan_mem_allocator_gib=(p.memory["total"] - p.memory["overhead"]) / 2**30)
    return out


def step_planner(s: Suite, shapes: Shapes) -> dict:
    """(d) and the goals, from the runs above: planned vs measured memory and step time."""
    sec = s.results["sections"]
    rows = []
    for name, v in sec.items():
        if name.startswith(("tput_", "proxy_")) and v.get("status") == "ok":
            rows.append({"run": name, **{k: v.get(k) for k in (
                "peak_mem_gib", "planned_mem_gib", "plan_mem_error", "step_s", "plan_step_s", "plan_step_error",
                "mfu", "tokens_per_s", "plan_mem_total_gib")}})
    mixed, pure, base = sec.get("tput_mixed", {}), sec.get("tput_pure", {}), sec.get("baseline", {})
    goals = {
        "mfu_1p5b_mixed": mixed.get("mfu"),
        "ratio_vs_transformers": (mixed["tokens_per_s"] / base["tokens_per_s"]
                                  if mixed.get("tokens_per_s") and base.get("tokens_per_s") else None),
        "mfu_8b_proxy": sec.get("proxy_8b", {}).get("mfu"),
        "pure_over_mixed_tokens_per_s": (pure["tokens_per_s"] / mixed["tokens_per_s"]
                                         if pure.get("tokens_per_s") and mixed.get("tokens_per_s") else None),
        "mixed_minus_pure_peak_gib": (mixed["peak_mem_gib"] - pure["peak_mem_gib"]
                                      if mixed.get("peak_mem_gib") is not None and pure.get("peak_mem_gib") is not None else None),
        "mixed_minus_pure_planned_gib": (mixed["planned_mem_gib"] - pure["planned_mem_gib"]
                                         if mixed.get("planned_mem_gib") and pure.get("planned_mem_gib") else None),
        "max_abs_plan_mem_error": max((abs(r["plan_mem_error"]) for r in rows if r.get("plan_mem_error") is not None),
                                      default=None),
    }
    targets = {"mfu_1p5b_mixed": 0.45, "ratio_vs_transformers": 1.3, "mfu_8b_proxy": 0.50,
               "pure_over_mixed_tokens_per_s": 1.0}
    met = {k: goals[k] >= t for k, t in targets.items() if goals[k] is not None}
    if goals["max_abs_plan_mem_error"] is not None:
        met["plan_mem_within_10pct"] = goals["max_abs_plan_mem_error"] <= 0.10
    return {"status": "ok" if rows else "error", "runs": rows, "goals": goals, "met": met,
            **({} if rows else {"error": "no throughput run succeeded"}),
            "note": "planned = the trainer's planned_mem_gib (estimate_memory minus the fixed CUDA/NCCL overhead, "
                    "the allocator's view) vs peak_mem_gib = torch.cuda.max_memory_allocated; plan step s = "
                    "plan.make_plan(recipe, Hardware(gpus=1, mfu=measured MFU)).time.step; at dp=1, pp=1, no recompute it has no "
                    "communication or bubble term, so it reproduces the measured step up to the stage-imbalance factor: "
                    "it checks that the quoted MFU is the planner's MFU"}
