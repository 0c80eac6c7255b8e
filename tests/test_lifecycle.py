"""How a training process ends: stop signals from its first line to its exit, the run
directory's lock, and the hang watchdog. (The SLURM side of each, with real jobs, is in
test_slurm_lifecycle.py.)"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY, cpu_env, launch, layout_overrides, per_step
from test_checkpoint_integrity import snapshot

COMMON = ["train.precision=fp32", "train.tensorboard=false", "checkpoint.interval=2"]


def train_once(out: Path, *extra, fault: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """One process, no torchrun: its exit code is the trainer's own."""
    cmd = [sys.executable, str(ROOT / "tools" / "train.py"), str(TINY), *COMMON, f"train.output_dir={out}", *extra]
    env = cpu_env(**({"GAPERON_FAULT": fault} if fault else {}), **(env or {}))
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    p = train_once(out, "train.steps=4")
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_signal_before_the_first_step_exits_85_without_saving(tmp_path, trained):
    fresh = tmp_path / "fresh"
    p = train_once(fresh, "train.steps=4", fault="sigterm_at_start:0")
    assert p.returncode == 85, p.stderr[-3000:]
    assert "SIGTERM: no step trained yet, nothing saved" in p.stdout
    assert not list((fresh / "checkpoints").glob("step_*"))

    resumed = tmp_path / "resumed"
    shutil.copytree(trained, resumed)
    before = snapshot(resumed / "checkpoints")
    p = train_once(resumed, "train.steps=8", fault="sigterm_at_start:0")
    assert p.returncode == 85, p.stderr[-3000:]
    assert "resumes from step 4" in p.stdout
    assert snapshot(resumed / "checkpoints") == before  # the checkpoint latest names is untouched


def test_signals_after_the_final_save_leave_exit_0(tmp_path):
    """SIGTERM every millisecond from the moment the exit code is decided until the process is gone."""
    p = train_once(tmp_path / "run", "train.steps=2", fault="sigterm_at_exit:0")
    assert p.returncode == 0, (p.returncode, p.stderr[-3000:])
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000002"


def _lock(out: Path, **owner) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "run.lock"
    path.write_text(json.dumps({"host": socket.gethostname(), "since": "earlier", **owner}))
    return path


def test_run_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    out = tmp_path / "run"
    lock = _lock(out, job_id=None, pid=os.getpid())  # this test process: alive
    before = snapshot(out)
    p = train_once(out, "train.steps=2")
    assert p.returncode == 2
    assert f"is in use by a process (host {socket.gethostname()}, pid {os.getpid()}" in p.stderr
    assert "Traceback" not in p.stderr and snapshot(out) == before

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _lock(out, job_id=None, pid=int(dead.stdout))
    p = train_once(out, "train.steps=2")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "took over" in p.stdout and not lock.exists()  # released at exit

    _lock(out, job_id="4242", host="another-node", pid=1)  # this job before its requeue
    p = train_once(out, "train.steps=4", env={"SLURM_JOB_ID": "4242"})
    assert p.returncode == 0 and "took over" in p.stdout, p.stderr[-3000:]


def test_hang_dumps_stacks_and_exits_86_then_resumes_exactly(tmp_path):
    layout = layout_overrides(dp=2, zero=1)
    steps = ["train.steps=6", *COMMON, *layout, "train.output_dir={}"]
    ref = tmp_path / "ref"
    launch(2, [str(TINY), *[s.format(ref) for s in steps]])
    out = tmp_path / "run"
    hung = launch(2, [str(TINY), *[s.format(out) for s in steps], "health.hang_timeout_s=3"],
                  env=cpu_env(GAPERON_FAULT="hang:3:1"), check=False, timeout=120)
    assert hung.returncode != 0
    assert hung.stderr.count("no training step finished for 3 s") == 2, hung.stderr[-4000:]
    assert "exiting with 86" in hung.stderr and "most recent call first" in hung.stderr
    assert "exitcode  : 86" in hung.stderr  # torchrun's summary of the failed ranks
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    resumed = launch(2, [str(TINY), *[s.format(out) for s in steps]])
    assert "at step 2" in resumed.stdout
    assert per_step(out) == per_step(ref)
