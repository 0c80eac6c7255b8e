"""Issue 27 without SLURM daemons: the checkpoint-interval advice (planner, submit's warning, the
size recipes), the straggler statistics, and the job script's parsing helpers run under bash."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY

from megatron_ext import plan, slurm
from megatron_ext.config import load_recipe
from megatron_ext.errors import FAILURES_PER_GPU_HOUR

SUBMIT = ROOT / "tools" / "submit.py"


def run_tool(tool: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / tool), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


# ---- point 4: checkpoint interval advice --------------------------------------------------------
def test_young_daly_interval_from_blocking_save_and_mtbf():
    recipe = load_recipe(ROOT / "recipes" / "24b.yaml")
    a = plan.interval_advice(recipe, step_s=7.1, gpus=256)
    assert a.mtbf_s == pytest.approx(3600 / (256 * FAILURES_PER_GPU_HOUR))
    assert 7 < a.mtbf_s / 86400 < 9  # "about one failure per 8 days at 256 GPUs"
    assert a.optimal_s == pytest.approx(math.sqrt(2 * a.blocking_s * a.mtbf_s))
    assert a.steps == round(a.optimal_s / 7.1) and a.is_async
    sync = plan.interval_advice(load_recipe(ROOT / "recipes" / "24b.yaml", ["checkpoint.async_save=false"]), 7.1, 256)
    assert sync.blocking_s > a.blocking_s and sync.steps > a.steps  # a longer blocking save: save less often
    # a failure loses half an interval of every GPU; interval 0: half an allocation
    assert a.lost_gpu_hours(100) == pytest.approx(256 * 100 * 7.1 / 2 / 3600)
    assert a.lost_gpu_hours(0) == pytest.approx(256 * 10)


def test_size_recipes_checkpoint_within_twice_the_advice():
    """The size recipes' intervals follow the planner's advice on their planned clusters (no warning)."""
    profile = slurm.load_profile("example-h100")
    for size, nodes in (("1.5b", 1), ("8b", 8), ("24b", 32)):
        job = slurm.plan_jobs(ROOT / "recipes" / f"{size}.yaml", [], profile)[0]
        assert job.nodes == nodes
        a = slurm.interval_advice(job, profile)
        assert 0 < a.interval <= 2 * a.steps and a.interval * a.step_s >= 0.5 * a.optimal_s, (size, a)
        ck = job.recipe.checkpoint
        assert ck.keep_last >= 2 and ck.keep_every % ck.interval == 0
        assert slurm.interval_warnings([job], profile) == []


def test_plan_prints_the_advice_and_submit_warns_once(tmp_path):
    proc = run_tool("plan.py", ROOT / "recipes" / "24b.yaml", "--gpus", 256, "--cluster", "example-h100")
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("interval"))
    assert "Young-Daly" in line and "MTBF 198 h at 256 GPUs" in line and "checkpoint.interval=100" in line, line
    for override, why in (("checkpoint.interval=0", "checkpoint.interval=0 but"),
                          ("checkpoint.interval=5000", "checkpoint.interval=5000 but")):
        proc = run_tool("submit.py", ROOT / "recipes" / "24b.yaml", "--cluster", "example-h100", override,
                        f"train.output_dir={tmp_path}/r", "--dry-run")
        assert proc.returncode == 0, proc.stderr
        warnings = [x for x in proc.stderr.splitlines() if x.startswith("submit: warning: ") and "Young-Daly" in x]
        assert len(warnings) == 1 and why in warnings[0], proc.stderr
    proc = run_tool("submit.py", ROOT / "recipes" / "24b.yaml", "--cluster", "example-h100",
                    f"train.output_dir={tmp_path}/r", "--dry-run")
    assert "Young-Daly" not in proc.stderr, proc.stderr


def test_bad_failure_rate_is_one_error_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("gpus_per_node: 8\nfailures_per_gpu_hour: 0\n")
    proc = run_tool("plan.py", ROOT / "recipes" / "24b.yaml", "--gpus", 256, "--cluster", bad)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "failures_per_gpu_hour=0" in proc.stderr, proc.stderr
