"""Bad input is refused up front: exit status 2, one line on stderr that names the key (or file)
and the fix, no traceback, nothing built or written. Through the real command lines:
tools/train.py for recipes and overrides, tools/plan.py and tools/submit.py --dry-run for their
options and cluster profiles."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY, cpu_env

from megatron_ext.slurm import SubmitError, parse_slurm_time


def run(script: str, *args, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / script), *map(str, args)], cwd=ROOT,
                          env=cpu_env(), capture_output=True, text=True, timeout=timeout)


def assert_refused(proc: subprocess.CompletedProcess, needles: list[str]) -> str:
    """Exit 2 with exactly one stderr line containing every needle; returns that line."""
    err = proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-2000:]}\n--- stderr\n{err[-4000:]}"
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"stderr is not one line:\n{err[-4000:]}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


# ---- recipe values and overrides: tools/train.py --------------------------------------------
BAD_OVERRIDES = {
    "no steps": (["train.steps=0"], ["train.steps=0", "must be >= 1"]),
    "cosine warmup past the end": (["train.steps=5", "schedule.warmup_steps=6"],
                                   ["schedule.warmup_steps=6 exceeds train.steps=5", "lower schedule.warmup_steps"]),
    "wsd warmup + decay past the end": (["schedule.kind=wsd", "schedule.warmup_steps=10", "schedule.decay_steps=11"],
                                        ["schedule.warmup_steps + schedule.decay_steps = 21 exceeds train.steps=20"]),
    "negative decay steps": (["schedule.decay_steps=-1"], ["schedule.decay_steps=-1 must be >= 0"]),
    "min_lr above lr": (["optimizer.min_lr=0.1"], ["optimizer.min_lr=0.1 exceeds optimizer.lr=0.003",
                                                   "set min_lr <= lr"]),
    "negative lr": (["optimizer.lr=-3e-4", "optimizer.min_lr=0"],
                    ["optimizer.lr=-0.0003", "must be a finite number >= 0"]),
    "beta of 1": (["optimizer.betas=[0.9, 1.0]"], ["optimizer.betas=[0.9, 1.0]", "in [0, 1)"]),
    "eps 0": (["optimizer.eps=0"], ["optimizer.eps=0.0", "must be a finite number > 0"]),
    "negative weight decay": (["optimizer.weight_decay=-0.1"], ["optimizer.weight_decay=-0.1", "0 turns it off"]),
    "negative grad clip": (["optimizer.grad_clip=-1"], ["optimizer.grad_clip=-1.0", "0 turns clipping off"]),
    "log interval 0": (["train.log_interval=0"], ["train.log_interval=0 must be >= 1"]),
    "negative eval interval": (["train.eval_interval=-5"], ["train.eval_interval=-5 must be >= 0"]),
    "eval without batches": (["train.eval_interval=5", "train.eval_iters=0"],
                             ["train.eval_iters=0 must be >= 1 when train.eval_interval=5", "train.eval_interval=0"]),
    "empty sequences": (["train.seq_len=0"], ["train.seq_len=0 must be >= 1"]),
    "no kv heads": (["model.num_kv_heads=0"], ["model.num_kv_heads=0 must be >= 1"]),  # was a ZeroDivisionError
    "vocab pad multiple 0": (["model.vocab_pad_multiple=0"], ["model.vocab_pad_multiple=0 must be >= 1"]),
    "head dim 0": (["model.head_dim=0"], ["model.head_dim=0 must be >= 1, or null"]),
    "norm eps 0": (["model.norm_eps=0"], ["model.norm_eps=0.0 must be a finite number > 0"]),
    "negative blend weight": (["data.kind=indexed", "data.blend=[[0.5, /d/en], [-0.1, /d/fr]]"],
                              ["data.blend[1] has weight -0.1", "must be finite and >= 0"]),
    "all-zero blend": (["data.kind=indexed", "data.blend=[[0, /d/en], [0.0, /d/fr]]"],
                       ["data.blend weights are all 0", "positive weight"]),
    "blend entry not a pair": (["data.valid_blend=[[0.5]]"],
                               ["data.valid_blend[0]=[0.5] is not a [weight, path-prefix] pair"]),
    "split of two numbers": (['data.split="98,2"'], ["data.split='98,2' must be three non-negative numbers",
                                                     '"98,2,0"']),
    "keep no checkpoint": (["checkpoint.keep_last=0"], ["checkpoint.keep_last=0 must be >= 1",
                                                        "the newest checkpoint is always kept"]),
    "negative keep_every": (["checkpoint.keep_every=-1"], ["checkpoint.keep_every=-1 must be >= 0"]),
    "no skip allowed": (["health.max_consecutive_skips=0"], ["health.max_consecutive_skips=0 must be >= 1",
                                                              "health.on_nonfinite=stop"]),
    "negative seed": (["train.seed=-1"], ["train.seed=-1 must be >= 0"]),
    "unknown block": (["model.block=gpt2"], ["model.block='gpt2'", "'llama' or 'olmo2'"]),
    "olmo2 with per-head qk norm": (["model.block=olmo2", "model.qk_layernorm=true"],
                                    ["model.block=olmo2 has its own QK-norm", "set model.qk_layernorm=false"]),
    "override value not YAML": (["train.steps=[1"], ["override 'train.steps=[1'", "line 1, column 3",
                                                     "fix the YAML syntax"]),
    "override with empty key": (["=3"], ["override '=3' has an empty key", "section.key=value"]),
}


@pytest.mark.parametrize("case", BAD_OVERRIDES)
def test_bad_recipe_value_refused_before_anything_is_made(case, tmp_path):
    overrides, needles = BAD_OVERRIDES[case]
    out = tmp_path / "run"
    proc = run("train.py", TINY, *overrides, f"train.output_dir={out}")
    assert_refused(proc, needles)
    assert not out.exists(), "a refused recipe must not create its output dir"


def test_refused_recipe_leaves_an_existing_run_untouched(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "metrics.jsonl").write_bytes(b'{"step": 1, "loss": 6.2}\n')
    before = {p.relative_to(out): p.read_bytes() if p.is_file() else None for p in out.rglob("*")}
    proc = run("train.py", TINY, "checkpoint.keep_last=0", f"train.output_dir={out}")
    assert_refused(proc, ["checkpoint.keep_last=0"])
    assert {p.relative_to(out): p.read_bytes() if p.is_file() else None for p in out.rglob("*")} == before


# ---- recipe files: syntax, base chains --------------------------------------------------------
def _files(tmp_path: Path, case: str) -> tuple[Path, list[str]]:
    """(the recipe to run, needles) for one broken file layout written under tmp_path."""
    def w(name: str, text: str) -> Path:
        (tmp_path / name).write_text(text)
        return tmp_path / name

    if case == "syntax error":
        path = w("bad.yaml", f"base: {TINY}\ntrain:\n  steps: 3\n   seed: 1\n")
        return path, [str(path), "line 4, column 8", "fix the YAML syntax"]
    if case == "syntax error in the base":
        w("broken-base.yaml", "model: {hidden_size: 64\n")
        path = w("child.yaml", "base: broken-base.yaml\n")
        return path, [str(tmp_path / "broken-base.yaml"), "line 2, column 1", "fix the YAML syntax"]
    if case == "base cycle":
        w("b.yaml", "base: a.yaml\n")
        path = w("a.yaml", "base: b.yaml\n")
        return path, ["base: cycle", f"{tmp_path}/a.yaml -> {tmp_path}/b.yaml -> {tmp_path}/a.yaml",
                      "remove the base: key"]
    if case == "based on itself":
        path = w("self.yaml", "base: self.yaml\n")
        return path, ["base: cycle", f"{path} -> {path}"]
    if case == "missing base":
        path = w("orphan.yaml", "base: no-such-size.yaml\n")
        return path, [f"{path}: base: no-such-size.yaml not found", "fix the path"]
    if case == "key given twice":
        path = w("twice.yaml", f"base: {TINY}\ntrain: {{steps: 3}}\ntrain: {{seed: 7}}\n")
        return path, [str(path), "key 'train' is given twice (also on line 2)", "keep one of them"]
    if case == "not a mapping":
        path = w("list.yaml", "- model\n- train\n")
        return path, [str(path), "a recipe is a YAML mapping, got list"]
    raise KeyError(case)


@pytest.mark.parametrize("case", ["syntax error", "syntax error in the base", "base cycle", "based on itself",
                                  "missing base", "key given twice", "not a mapping"])
def test_bad_recipe_file_is_named(case, tmp_path):
    path, needles = _files(tmp_path, case)
    out = tmp_path / "run"
    assert_refused(run("train.py", path, f"train.output_dir={out}"), needles)
    assert not out.exists()


# ---- tools/plan.py ----------------------------------------------------------------------------
@pytest.mark.parametrize("args, needles", [
    (["--gpus", "0"], ["--gpus 0 must be >= 1"]),
    (["--mfu", "1.5"], ["--mfu 1.5 must be in (0, 1]"]),
    (["--gpu-tflops", "0"], ["--gpu-tflops 0 must be > 0"]),
    (["--dp-bandwidth", "-40"], ["--dp-bandwidth -40 must be > 0"]),
    (["--search", "--top", "0"], ["--top 0 must be >= 1"]),
    (["--gpu-memory", "lots"], ["--gpu-memory", "'lots'", "write e.g. 80GiB"]),
    (["--gpus", "64", "train.steps=0"], ["recipes/8b.yaml", "train.steps=0 must be >= 1"]),
], ids=["gpus 0", "mfu above 1", "no tflops", "negative bandwidth", "top 0", "unreadable memory", "bad recipe"])
def test_plan_refuses_bad_input(args, needles):
    proc = run("plan.py", "recipes/8b.yaml", *args)
    assert_refused(proc, needles)
    assert proc.stdout == ""


def test_plan_takes_overrides_after_options_and_keeps_exit_1_for_does_not_fit():
    ok = run("plan.py", "recipes/8b.yaml", "--gpus", "64", "--gpu-memory", "80GiB", "layout.recompute=full")
    assert ok.returncode == 0, ok.stderr
    assert "recompute=full" in ok.stdout and "FITS" in ok.stdout
    oom = run("plan.py", "recipes/8b.yaml", "--gpus", "1", "layout.dp=1")
    assert oom.returncode == 1 and "does not fit" in oom.stderr and "Traceback" not in oom.stderr


# ---- tools/submit.py --------------------------------------------------------------------------
def _profile(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(f"gpus_per_node: 2\ndevice: cpu\n{text}")
    return path


@pytest.mark.parametrize("args, profile, needles", [
    (["--nodes", "0"], None, ["--nodes 0 must be >= 1"]),
    (["--gpus-per-node", "0"], None, ["--gpus-per-node 0 must be >= 1"]),
    (["--max-requeues", "-1"], None, ["--max-requeues -1 must be >= 0"]),
    (["--time", "20h"], None, ["--time '20h' is not a SLURM time limit", "hours:minutes:seconds"]),
    (["--time", "1"], None, ["signal_seconds=60 is not smaller than the time limit --time=1 (60 s)"]),
    ([], 'time: "1 day"\n', ["site.yaml is invalid: time='1 day' is not a SLURM time limit", "days-hours"]),
    ([], "time: 20:00:00\n", ["time=72000 is a number", 'quote it, e.g. time: "20:00:00"']),
    ([], 'time: "00:05:00"\nsignal_seconds: 300\n', ["signal_seconds=300 is not smaller than the time limit "
                                                     "time=00:05:00 (300 s)", "lower signal_seconds"]),
    ([], "signal_seconds: 0\n", ["signal_seconds=0 must be > 0"]),
    ([], "env: {A: [1\n", ["site.yaml: YAML error at line 4, column 1", "fix the YAML syntax"]),
], ids=["nodes 0", "gpus per node 0", "negative requeues", "unreadable time", "time shorter than signal",
        "profile time unreadable", "profile time unquoted", "profile signal after limit", "profile signal 0",
        "profile syntax"])
def test_submit_refuses_bad_input(args, profile, needles, tmp_path):
    cluster = ["--cluster", _profile(tmp_path, profile) if profile is not None else "local"]
    out = tmp_path / "run"
    proc = run("submit.py", TINY, *cluster, *args, "layout.dp=2", f"train.output_dir={out}", "--dry-run")
    line = assert_refused(proc, needles)
    assert line.startswith("error: ")
    assert proc.stdout == "" and not out.exists(), "nothing rendered, nothing written"


def test_slurm_time_formats():
    ok = {"90": 5400, "90:30": 5430, "20:00:00": 72000, "2-12": 216000, "2-12:30": 217800,
          "2-12:30:15": 217815, "UNLIMITED": math.inf, "infinite": math.inf}
    assert {t: parse_slurm_time(t) for t in ok} == ok
    for bad in ("20h", "1:2:3:4", "2-", "-5", "1.5", "", "1-2-3"):
        with pytest.raises(SubmitError, match="not a SLURM time"):
            parse_slurm_time(bad)
