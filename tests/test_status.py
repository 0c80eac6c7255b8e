"""tools/status.py on real tiny runs: one finished (resumed, one step skipped on a NaN loss), one
stopped by SIGTERM (exit 85), one still going with no checkpoint yet; restarts from SLURM logs that slurm/train.sbatch.tmpl really wrote.

The three runs are trained once for the module (1 CPU rank, 12 steps), each as one process
without torchrun: the exit code is the trainer's own, the live run's pid is the one run.lock
names, and no run waits for DeepSpeed's shm op, which torchrun's variables make it build. The SLURM logs in tests/data/slurm/ are verbatim copies
of jobs of test_slurm_lifecycle.py on the local two-node cluster (slurm/local_cluster.sh):
tiny-47 (plain scancel: saved, stopped), tiny-48 (scancel --signal=TERM: saved and requeued, then
an admin scontrol requeue), tiny-50 (a hung rank: exit 86, crash restart).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, TINY, cpu_env, free_port, read_metrics
from megatron_ext import status

STEPS = 12
COMMON = ["train.precision=fp32", "train.tensorboard=false", f"train.steps={STEPS}", "train.eval_interval=4",
          "checkpoint.interval=4", "health.hang_timeout_s=0"]
LOGS = ROOT / "tests" / "data" / "slurm"
STATUS = [sys.executable, str(ROOT / "tools" / "status.py")]


def trainer(out: Path, *extra, fault: str = "") -> subprocess.Popen:
    """tools/train.py on 1 CPU rank, with a fault armed (faults.py); on its own port (two run at once)."""
    cmd = [sys.executable, str(ROOT / "tools" / "train.py"), str(TINY), *COMMON, f"train.output_dir={out}", *extra]
    env = cpu_env(GAPERON_FAULT=fault, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port())
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("status")
    # Still going, no checkpoint: hangs (alive, holding run.lock) once step 3 is logged.
    live = trainer(root / "live", "checkpoint.interval=0", fault="hang:3")
    tick = time.monotonic()
    stopped = trainer(root / "stopped", fault="sigterm:6")  # SIGTERM once step 6 is logged
    out, _ = stopped.communicate(timeout=300)
    stopped_wall = time.monotonic() - tick
    assert stopped.returncode == 85, out[-3000:]
    shutil.copytree(root / "stopped", root / "finished")
    finished = trainer(root / "finished", fault="nan_loss:9")  # resumes at step 6, skips step 9, ends at 12
    out, _ = finished.communicate(timeout=300)
    assert finished.returncode == 0, out[-3000:]
    deadline = time.monotonic() + 300
    while 3 not in {r["step"] for r in status.read_metrics(root / "live" / "metrics.jsonl")}:
        assert live.poll() is None and time.monotonic() < deadline, live.stdout.read()[-3000:]
        time.sleep(0.2)
    while_live = status.collect(root / "live")
    live.kill()
    live.wait()
    live.stdout.close()
    return {"root": root, "stopped_wall": stopped_wall, "while_live": while_live}


def test_finished_run(runs, tmp_path):
    run = runs["root"] / "finished"
    p = subprocess.run([*STATUS, str(run)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    screen = p.stdout
    print(screen)
    losses, valid = read_metrics(run, "loss"), read_metrics(run, "valid_loss")
    assert f"finished, step {STEPS} of {STEPS}" in screen
    assert "tiny, 312k params; 12 steps x 8 seqs x 64 tokens; fp32; cosine" in screen
    assert "tp 1 x pp 1 x dp 1 = 1 rank; vpp 1, ZeRO 0, micro batch 2, global batch 8" in screen
    assert f"step {STEPS}: checkpoints/step_{STEPS:08d} (2 on disk" in screen
    assert f"step {STEPS}: loss {losses[-1]:.4f}, valid loss {valid[-1]:.4f} (step {STEPS})" in screen
    assert f"{STEPS} / {STEPS} steps (100%), 6.14k of 6.14k tokens; done" in screen
    assert "skipped     1 (non-finite loss or gradient norm): steps 9" in screen
    assert "eval        none logged" in screen
    assert "restarts    none seen: no SLURM logs" in screen

    st = json.loads(subprocess.run([*STATUS, str(run), "--json"], capture_output=True, text=True).stdout)
    assert st["state"] == "finished" and st["checkpoint"]["step"] == STEPS and st["checkpoint"]["notes"] == []
    assert st["skipped_steps"] == [9] and st["checkpoint"]["skipped_steps"] == 1
    assert st["recipe"]["tree"]["train"]["steps"] == STEPS

    # eval scores as the eval loop logs them (eval/<task>/<metric> at a step), on a copy
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    with open(copy / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": STEPS, "eval/hellaswag/acc_norm": 0.3125, "eval/fr_bench/acc": 0.25}) + "\n")
    screen = status.render(status.collect(copy))
    assert f"eval        fr_bench/acc 0.25 (step {STEPS})\n            hellaswag/acc_norm 0.3125 (step {STEPS})" in screen


def test_run_stopped_by_a_signal(runs):
    run = runs["root"] / "stopped"
    st = status.collect(run)
    screen = status.render(st)
    print(screen)
    assert st["state"] == "stopped" and st["holder"] is None  # the lock was released on the way out
    assert st["step"] == 6 and st["checkpoint"]["step"] == 6  # saved on the signal
    assert "stopped at step 6 of 12" in screen and "step 6: checkpoints/step_00000006" in screen
    # ETA: the 6 steps left at the logged step time, which is below this process's whole wall time per step
    assert 0 < st["step_time_s"] < runs["stopped_wall"] / 6
    assert st["eta_s"] == pytest.approx(6 * st["step_time_s"])
    assert f"6 / 12 steps (50%), 3.07k of 6.14k tokens; ETA {status.duration(st['eta_s'])}" in screen
    assert "once restarted" in screen


def test_run_with_no_checkpoint_yet(runs):
    st = runs["while_live"]
    screen = status.render(st)
    print(screen)
    assert st["state"] == "running" and st["holder"]["alive"] and st["step"] == 3
    assert "running, step 3 of 12" in screen and "run.lock held by a process" in screen
    assert "checkpoint  none yet (a restart starts from step 0)" in screen
    assert st["eta_s"] == pytest.approx(9 * st["step_time_s"]) and "once restarted" not in screen

    after = status.collect(runs["root"] / "live")  # killed: its lock stays behind
    assert after["state"] == "stopped" and not after["holder"]["alive"]
    assert "stale run.lock of a process" in status.render(after)


def test_plot_writes_the_curves(runs, tmp_path):
    from matplotlib.image import imread

    run = runs["root"] / "finished"
    png = tmp_path / "curves.png"
    p = subprocess.run([*STATUS, str(run), "--plot", str(png)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert f"plot        {png}" in p.stdout
    image = imread(png)  # decodes, or raises
    assert image.shape == (600, 800, 4)

    series = status.plot(run, tmp_path / "again.png")
    trained = [s for s in range(1, STEPS + 1) if s != 9]  # the skipped step is no point of the curves
    assert list(series["loss"]) == trained == list(series["lr"])
    assert list(series["valid_loss"]) == [4, 8, 12]
    assert series["loss"][STEPS] == read_metrics(run, "loss")[-1]

    def columns(color: str) -> np.ndarray:
        """Pixel columns that hold the curve's colour (the legend's samples are a few columns only)."""
        from matplotlib.colors import to_rgb

        near = np.abs(image[..., :3] - np.array(to_rgb(color))).max(axis=-1) < 0.05
        return np.flatnonzero(near.any(axis=0))

    for color, span in (("tab:blue", 0.7), ("tab:orange", 0.45), ("tab:green", 0.7)):  # loss, valid (4..12), lr
        cols = columns(color)
        assert cols.size and cols.max() - cols.min() > span * image.shape[1], color


def test_restarts_from_real_slurm_logs(runs, tmp_path):
    finished = tmp_path / "finished"
    shutil.copytree(runs["root"] / "finished", finished)
    (finished / "slurm").mkdir()
    for name in ("tiny-48.out", "tiny-50.out"):
        shutil.copy(LOGS / name, finished / "slurm")
    jobs = status.read_slurm_logs(finished / "slurm")
    assert [(j["job"], j["restarts"], j["requeues"], j["crash_restarts"]) for j in jobs] == [("48", 2, 2, 0),
                                                                                         ("50", 1, 0, 1)]
    # each decision with the last step rank 0 had logged ("SIGTERM: step 10 was already saved", ...)
    assert [(e["step"], e["what"].split(":")[0]) for e in jobs[0]["events"]] == [
        (10, "checkpoint saved (exit 85)"), (19, "SLURM requeued this job itself (admin scontrol requeue or preemption; srun exit 85)"),
        (80, "training finished")]
    assert jobs[1]["events"][0]["step"] == 25
    assert jobs[1]["events"][0]["what"].startswith("crash restart 1 of 3: srun exit 86 (hang watchdog")
    screen = status.render(status.collect(finished), width=200)
    assert "restarts    3 in 2 jobs (2 requeues after a save or by SLURM, 1 crash restart)" in screen
    assert "12-01 10:45:59 job 50 after step 25: crash restart 1 of 3: srun exit 86 (hang watchdog" in screen

    stopped = tmp_path / "stopped"  # a plain scancel: the screen says why the run is not going on
    shutil.copytree(runs["root"] / "stopped", stopped)
    (stopped / "slurm").mkdir()
    shutil.copy(LOGS / "tiny-47.out", stopped / "slurm")
    screen = status.render(status.collect(stopped))
    assert "restarts    0 in 1 job (0 requeues after a save or by SLURM, 0 crash restarts)" in screen
    assert "last SLURM decision: cancelled (scancel: SIGTERM to this shell" in screen

    # the logs' routine lines are still the ones the template writes
    template = (ROOT / "slurm" / "train.sbatch.tmpl").read_text()
    for prefix in status.ROUTINE:
        assert f'log "{prefix}' in template, prefix
    assert "of at most ${MAX_REQUEUES} requeues," in template and "of at most ${MAX_CRASH_RESTARTS} crash restarts)" in template


@pytest.mark.parametrize("what", ["missing", "empty", "file"])
def test_not_a_run_dir_is_one_error_line(tmp_path, what):
    path = tmp_path / "run"
    if what == "empty":
        path.mkdir()
    elif what == "file":
        path.write_text("x")
    p = subprocess.run([*STATUS, str(path), "--plot"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stdout == ""
    assert len(p.stderr.splitlines()) == 1 and p.stderr.startswith(f"error: {path} ")
    assert {"missing": "does not exist", "empty": "is not a run directory", "file": "is not a directory"}[what] in p.stderr
