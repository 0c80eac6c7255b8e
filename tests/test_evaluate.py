"""Evaluation: tools/evaluate.py over lm-eval (offline, the shipped local task), in-loop downstream
evals equal to lm-eval's on the export at two layouts, a trained model above a random one, the
missing-data message, and the SLURM chain's eval job.

Two training runs are shared by every test: A, the tiny model trained on the demo corpus at
(tp, pp, dp, zero) = (1, 1, 1, 0), and B, the same model left at its random initialisation
(optimizer.lr=0, one step) at (2, 2, 1, 1). Each logs its in-loop score and is evaluated once by
tools/evaluate.py from its checkpoint.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY, cpu_env, launch, layout_overrides, per_step

from megatron_ext.preprocess import preprocess
from megatron_ext.corpus import build_demo_corpus
from megatron_ext.tokenizer import train_tokenizer

EVALUATE = ROOT / "tools" / "evaluate.py"
TASK = "gaperon_demo_cloze"
ITEMS = sum(1 for _ in open(ROOT / "recipes/eval/tasks/gaperon_demo/gaperon_demo_cloze.jsonl"))


def offline_env(home: Path, **extra) -> dict:
    """No network: an empty HF_HOME and a hub endpoint that refuses connections."""
    return cpu_env(HF_HOME=home, HF_ENDPOINT="http://127.0.0.1:9", **extra)


def evaluate(*args, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EVALUATE), *map(str, args)], capture_output=True, text=True,
                          env=offline_env(home), cwd=home, timeout=600)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[str]:
    """The demo corpus (first 60 kB per language), a 512-token BPE, indexed datasets: recipe overrides."""
    root = tmp_path_factory.mktemp("demo")
    corpus = build_demo_corpus(root, max_bytes_per_lang=60_000)
    tok = train_tokenizer(list(corpus.values()), root / "tokenizer", vocab_size=512)
    for lang, path in corpus.items():
        preprocess([str(path)], str(root / f"{lang}_text_document"), str(tok), workers=1, progress=False)
    blend = ",".join(f"[{w},{root}/{lang}_text_document]" for w, lang in ((0.55, "en"), (0.33, "fr"), (0.12, "code")))
    return ["data.kind=indexed", f"data.tokenizer={tok}", f"data.blend=[{blend}]", "data.split=100,0,0",
            f"data.cache_dir={root}/cache", "train.log_interval=50"]


def _train_and_evaluate(tmp: Path, nproc: int, overrides: list[str]) -> dict:
    out = tmp / "run"
    train = launch(nproc, [str(TINY), f"train.output_dir={out}", f"eval.downstream=[{TASK}]", *overrides])
    # the training log has one line per eval, no datasets/lm-eval progress bars
    assert "examples/s" not in train.stderr + train.stdout and "it/s]" not in train.stderr + train.stdout
    proc = evaluate(out, "--tasks", "gaperon_demo", "--dtype", "fp32", "--log-to-run", home=tmp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    step = max(per_step(out, f"eval/{TASK}/acc"))
    report = json.loads((out / "eval" / str(step) / "results.json").read_text())
    return {"out": out, "step": step, "report": report, "stdout": proc.stdout,
            "lm_eval": {r["metric"]: r["value"] for r in report["scores"] if r["task"] == TASK},
            "in_loop": {m: per_step(out, f"eval/{TASK}/{m}")[step] for m in ("acc", "acc_norm", "n", "time_s")}}


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> dict:
    """A: 200 steps on the demo corpus at (1, 1, 1, 0)."""
    return _train_and_evaluate(tmp_path_factory.mktemp("a"), 1, [*data, *layout_overrides(), "train.steps=200",
                               "schedule.kind=constant", "schedule.warmup_steps=10"])


@pytest.fixture(scope="module")
def random_init(data, tmp_path_factory) -> dict:
    """B: the initialisation, unchanged (lr 0), at (2, 2, 1, 1)."""
    return _train_and_evaluate(tmp_path_factory.mktemp("b"), 4, [*data, *layout_overrides(tp=2, pp=2, dp=1, zero=1),
                               "train.steps=1", "optimizer.lr=0", "optimizer.min_lr=0", "schedule.kind=constant",
                               "schedule.warmup_steps=0"])


def test_evaluate_tool_writes_json_and_table_offline(trained):
    """A checkpoint in (exported to a temporary HF dir), the shipped task through --include_path, no
    network: JSON with lm-eval's results plus model/step/phase/commit, a table, run scalars."""
    rep, out = trained["report"], trained["out"]
    assert rep["step"] == 200 and rep["model"] == "tiny" and rep["phase"] == out.name
    assert re.fullmatch(r"[0-9a-f]{40}", rep["commit"] or "")
    assert rep["checkpoint"].endswith("step_00000200") and rep["suite"] == "gaperon_demo"
    rows = {r["metric"]: r for r in rep["scores"] if r["task"] == TASK}
    assert set(rows) >= {"acc", "acc_norm"}
    for row in rows.values():
        assert row["n"] == ITEMS and 0.0 <= row["value"] <= 1.0
    assert rep["lm_eval"]["results"][TASK]["acc,none"] == rows["acc"]["value"]
    assert re.search(rf"{TASK}\s+acc\s+{rows['acc']['value']:.4f}", trained["stdout"])
    # the scores went to the run's metrics.jsonl and TensorBoard at the checkpoint's step
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r["step"] == 200 and "eval/gaperon_demo_cloze/time_s" not in r and r.get(f"eval/{TASK}/acc") ==
               rows["acc"]["value"] and r.get(f"eval/{TASK}/acc_norm") == rows["acc_norm"]["value"] for r in logged)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(out / "tensorboard"))
    tb.Reload()
    assert [(e.step, round(e.value, 6)) for e in tb.Scalars(f"eval/{TASK}/acc")][-1] == (200, round(rows["acc"]["value"], 6))


@pytest.mark.parametrize("run", ["trained", "random_init"])
def test_in_loop_accuracy_equals_lm_eval_on_the_export(run, request):
    """Same items, same normalisation: the training model scored under its own layout, (1, 1, 1, 0)
    for A and (2, 2, 1, 1) for B, gives exactly lm-eval's acc and acc_norm on the HF export."""
    r = request.getfixturevalue(run)
    assert r["in_loop"]["n"] == ITEMS and r["in_loop"]["time_s"] > 0
    assert r["in_loop"]["acc"] == r["lm_eval"]["acc"], r
    assert r["in_loop"]["acc_norm"] == r["lm_eval"]["acc_norm"], r


def test_trained_model_beats_random_initialisation(trained, random_init):
    a, b = trained["lm_eval"], random_init["lm_eval"]
    print(f"trained: {a}; random init: {b}")
    assert a["acc_norm"] > b["acc_norm"] + 0.05 and a["acc"] > b["acc"], (a, b)


def test_missing_task_data_names_the_task_and_the_prefetch(tmp_path):
    fake = tmp_path / "hf"
    fake.mkdir()
    (fake / "config.json").write_text("{}")
    proc = evaluate(fake, "--tasks", "fr", "--data-dir", tmp_path / "cache", home=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: task french_bench_arc_challenge: "), lines
    assert f"python tools/evaluate.py --prefetch fr --data-dir {tmp_path / 'cache'}" in lines[0]


@pytest.mark.parametrize("args, expected", [
    (["/nonexistent/model"], "does not exist"),
    (["{hf}", "--tasks", "no_such_task"], "unknown task(s) no_such_task"),
    (["{hf}", "--tasks", "code"], "pass --allow-code-execution"),
    (["--prefetch", "gaperon"], "--prefetch needs --data-dir"),
])
def test_bad_input_is_one_error_line(args, expected, tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    proc = evaluate(*[a.replace("{hf}", str(tmp_path / "hf")) for a in args], home=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], \
        proc.stderr


# ---- the SLURM chain's eval job ----------------------------------------------------------------
def test_evaluate_adds_one_eval_job_after_each_phase(tmp_path):
    from megatron_ext import slurm

    profile = slurm.load_profile("local")
    jobs = slurm.plan_jobs(TINY, [f"train.output_dir={tmp_path}/p1", f"data.tokenizer={tmp_path}/tok"], profile,
                           evaluate="gaperon_demo", hf_out=str(tmp_path / "hf"))
    assert [(j.name, j.after) for j in jobs] == [("p1", None), ("p1-eval", 0), ("p1-hf", 0)]
    assert jobs[1].command[1:] == [str(tmp_path / "p1"), "--tasks", "gaperon_demo", "--log-to-run"]
    assert not jobs[1].requeue
    with pytest.raises(slurm.SubmitError, match="has no data.tokenizer"):
        slurm.plan_jobs(TINY, [f"train.output_dir={tmp_path}/p2"], profile, evaluate="gaperon_demo")


@pytest.mark.slurm
def test_chain_with_evaluate_runs_eval_job_after_the_phase(data, tmp_path):
    from test_submit import need_cluster, wait_job

    need_cluster()
    out = tmp_path / "phase"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "submit.py"), str(TINY), "--cluster", "local",
                           f"train.output_dir={out}", "train.steps=4", *data,
                           "--evaluate", "gaperon_demo"],
                          capture_output=True, text=True, cwd=ROOT, env=offline_env(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr
    ids = re.findall(r"job (\d+)", proc.stdout)
    assert len(ids) == 2 and f"after afterok:{ids[0]}" in proc.stdout, proc.stdout
    train_info = wait_job(ids[0], 400, out / "slurm" / f"phase-{ids[0]}.out")
    eval_log = out / "slurm" / f"phase-eval-{ids[1]}.out"
    info = wait_job(ids[1], 400, eval_log)
    assert train_info["JobState"] == "COMPLETED" and info["JobState"] == "COMPLETED", eval_log.read_text()[-4000:]
    assert info["StartTime"] >= train_info["EndTime"]  # afterok: the eval waited for the phase
    report = json.loads((out / "eval" / "4" / "results.json").read_text())
    assert report["step"] == 4 and {r["metric"] for r in report["scores"]} >= {"acc", "acc_norm"}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(out / "tensorboard"))
    tb.Reload()
    assert [e.step for e in tb.Scalars(f"eval/{TASK}/acc_norm")] == [4]
