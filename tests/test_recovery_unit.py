"""Issue 27 without SLURM daemons: the checkpoint-interval advice (planner, submit's warning, the
size recipes), the straggler statistics, and the job script's parsing helpers run under bash."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import time

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


# ---- point 5: the weak endings --------------------------------------------------------------------
from test_submit import fake_sbatch, run_rendered  # noqa: E402,F401,F811  (fixture and the fake-SLURM runner)


def test_stop_signal_before_the_handlers_is_a_saveless_requeue(tmp_path):
    """USR1/TERM in a rank's first ~0.3 s kills it with 138/143: a requeue without a save, no node blamed."""
    for rc_in, name in ((138, "USR1"), (143, "TERM")):
        rc, out, calls = run_rendered(tmp_path / name, srun_rc=rc_in, restarts=0,
                                      srun_err=f"srun: error: node-b: task 3: Exited with exit code {rc_in}")
        assert rc == 0 and calls[-1] == "scontrol requeue 4321", out
        assert f"a stop signal (SIG{name}) reached the ranks before their handlers were installed" in out, out
        assert "crash restart 1" not in out and not any("ExcNodeList" in c for c in calls), out
        assert "nothing saved (the stop signal came first): requeueing, restart 1 of 3" in out, out
        assert not (tmp_path / name / "logs" / "tiny-4321.crash-restarts").exists()


def test_allocations_that_train_no_step_stop_requeueing(tmp_path):
    outs = [run_rendered(tmp_path, srun_rc=85, restarts=r)[:2] for r in range(3)]
    assert [rc for rc, _ in outs] == [0, 0, 85], outs[-1][1]
    assert "3 allocations in a row trained no step" in outs[-1][1] and "requeueing" not in outs[-1][1]
    # one allocation that trained a step starts the count again
    rc, out, _ = run_rendered(tmp_path, srun_rc=85, restarts=2, srun_err="step 7/80 | loss 4.1\nSIGUSR1: saved step 7")
    assert rc == 0 and "requeueing" in out, out
    assert (tmp_path / "logs" / "tiny-4321.idle-allocations").read_text().strip() == "0"


def test_plain_scancel_after_training_finished_releases_the_afterok_chain(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "squeue").write_text('#!/bin/bash\nprintf "1002 afterok:4321(unfulfilled)\\n1003 afterok:999\\n"\n')
    rc, out, calls = run_rendered(tmp_path, srun_rc=0, restarts=0, term=True, FAKE_STATE="COMPLETING")
    assert rc == 0 and "scontrol update jobid=1002 dependency=" in calls, calls
    assert not any("1003" in c for c in calls), calls
    assert "after training had finished (exit 0)" in out and "released the jobs waiting on it (afterok): 1002" in out
    assert "resubmit" not in out, out


def test_submit_refuses_a_run_dir_whose_lock_holder_is_alive(fake_sbatch, tmp_path):  # noqa: F811  (the fixture imported above)
    env, calls = fake_sbatch
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.lock").write_text(f'{{"job_id": null, "host": "{os.uname().nodename}", "pid": {os.getpid()}, '
                                  '"since": "now"}')
    proc = subprocess.run([sys.executable, str(SUBMIT), str(TINY), f"train.output_dir={run}"], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{run} is in use by a process" in proc.stderr and "nothing was submitted" in proc.stderr
    assert not calls.exists()
    (run / "run.lock").write_text('{"job_id": null, "host": "' + os.uname().nodename + '", "pid": 999999999}')
    proc = subprocess.run([sys.executable, str(SUBMIT), str(TINY), f"train.output_dir={run}"], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and calls.exists(), proc.stderr  # a dead holder's lock is no obstacle


def test_time_limit_that_leaves_no_training_is_refused_and_a_short_one_warned(tmp_path):
    base = [TINY, "--cluster", "local", f"train.output_dir={tmp_path}/r", "--dry-run"]
    proc = run_tool("submit.py", *base, "--time", "2")  # 120 s - 60 s signal - 60 s start-up (local profile)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "leaves no time to train" in proc.stderr, proc.stderr
    proc = run_tool("submit.py", *base, "--time", "2:30")
    assert proc.returncode == 0 and proc.stderr.count("leaves ~30 s of training per allocation") == 1, proc.stderr
    assert "leaves" not in run_tool("submit.py", *base, "--time", "10").stderr


@pytest.mark.slurm
def test_resubmitted_spec_cancels_a_merge_whose_array_was_cancelled(tmp_path):
    """SLURM keeps a merge whose array lost a task PENDING forever (DependencyNeverSatisfied)."""
    from test_submit import need_cluster
    from megatron_ext.slurm_preprocess import cancel_stale_merges

    need_cluster()
    log_dir = tmp_path / "slurm"
    log_dir.mkdir()
    sbatch = lambda *a: subprocess.run(["sbatch", "--parsable", "-p", "debug", "-o", "/dev/null", *a], capture_output=True,
                                       text=True, check=True).stdout.strip().split(";")[0]
    (log_dir / "merge-web.1.sbatch").write_text("#!/bin/bash\ntrue\n")
    array = sbatch("--array=0-1", "--wrap", "sleep 60")
    merge = sbatch("-J", "merge-web", f"--dependency=afterok:{array}", str(log_dir / "merge-web.1.sbatch"))
    other = sbatch("-J", "merge-web", f"--dependency=afterok:{array}", "--wrap", "true")  # another spec's merge
    try:
        subprocess.run(["scancel", array], check=True)
        end = time.time() + 30
        while time.time() < end and "DependencyNeverSatisfied" not in subprocess.run(
                ["squeue", "-h", "-j", merge, "-o", "%r"], capture_output=True, text=True).stdout:
            time.sleep(0.5)
        assert cancel_stale_merges("web", log_dir) == [merge]
        time.sleep(1)
        assert subprocess.run(["squeue", "-h", "-j", merge, "-o", "%T"], capture_output=True, text=True).stdout.strip() \
            in ("", "CANCELLED")
    finally:
        subprocess.run(["scancel", array, merge, other])
