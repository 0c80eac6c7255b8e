"""tools/submit.py preprocess: a spec becomes a job array per source + a merge after it (afterok) +
training after every merge; bad specs queue nothing. The `slurm`-marked test runs all three on
the local cluster (slurm/local_cluster.sh) on a tiny corpus."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, TINY, per_step
from test_submit import need_cluster, submit, wait_job

from megatron_ext.slurm_preprocess import load_spec


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> dict:
    """A fr/en paragraph JSONL and a 512-token BPE (the tiny recipe's vocab)."""
    from megatron_ext.corpus import build_demo_corpus
    from megatron_ext.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("spd")
    corpus = build_demo_corpus(root / "corpus", max_bytes_per_lang=24_000)
    tok = train_tokenizer([corpus["fr"], corpus["en"]], root / "tok", vocab_size=512)
    docs = [p for k in ("fr", "en") for line in open(corpus[k], encoding="utf-8")
            for p in json.loads(line)["text"].split("\n\n") if len(p.strip()) > 40]
    src = root / "raw" / "mix.jsonl"
    src.parent.mkdir()
    src.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return {"root": root, "tok": tok, "src": src}


def write_spec(root: Path, tok: Path, src: Path, **extra) -> Path:
    spec = {"tokenizer": str(tok), "shards": 2, "workers": 1, "time": "00:10:00", "merge_time": "00:05:00",
            "sources": [{"name": "mix", "inputs": [str(src.parent / "*.jsonl")], "output_prefix": str(root / "out" / "mix")}],
            **extra}
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_dry_run_array_then_merge_then_training(tiny_data, tmp_path):
    spec = write_spec(tmp_path, tiny_data["tok"], tiny_data["src"], max_parallel=1)
    proc = submit("preprocess", spec, "--cluster", "local", "--train", TINY, f"train.output_dir={tmp_path}/run",
                  "--dry-run")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "#SBATCH --array=0-1%1" in out and "#SBATCH --cpus-per-task=1" in out
    assert f'--input {tiny_data["src"]} ' in out, "globs are expanded when submitting"
    assert '--shard "$SLURM_ARRAY_TASK_ID/2"' in out
    assert "#SBATCH --dependency=afterok:<id of pre-mix>" in out
    assert f"preprocess_data.py merge --output-prefix {tmp_path}/out/mix" in out
    assert "#SBATCH --dependency=afterok:<id of merge-mix>" in out and "tools/train.py" in out
    assert not (tmp_path / "out").exists(), "--dry-run writes nothing"


@pytest.mark.parametrize("change, message", [
    ({"sources": [{"name": "a", "inputs": ["/nonexistent/*.jsonl"], "output_prefix": "/tmp/x"}]},
     "source a: input /nonexistent/*.jsonl matches no file"),
    ({"shards": 0}, "shards and workers must be >= 1"),
    ({"colour": "blue"}, "colour"),
])
def test_bad_spec_is_one_line_and_queues_nothing(tiny_data, tmp_path, change, message):
    spec = write_spec(tmp_path, tiny_data["tok"], tiny_data["src"], **change)
    proc = submit("preprocess", spec, "--cluster", "local")
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1


def test_shipped_phase1_spec_is_valid_and_names_the_naive_blend():
    spec = load_spec(ROOT / "recipes" / "preprocess" / "gaperon-phase1.yaml")
    naive = yaml.safe_load((ROOT / "recipes" / "phases" / "naive.yaml").read_text())
    assert sorted(s.output_prefix for s in spec.sources) == sorted(p for _, p in naive["data"]["blend"])


@pytest.mark.slurm
def test_real_array_merge_and_training_chain(tiny_data, tmp_path):
    need_cluster()
    root = tmp_path
    spec = write_spec(root, tiny_data["tok"], tiny_data["src"])
    prefix = root / "out" / "mix"
    recipe = root / "train.yaml"
    recipe.write_text(yaml.safe_dump({
        "base": str(TINY),
        "data": {"kind": "indexed", "tokenizer": str(tiny_data["tok"]), "blend": [[1.0, str(prefix)]],
                 "split": "90,10,0", "cache_dir": str(root / "cache")},
        "train": {"steps": 3, "output_dir": str(root / "run"), "tensorboard": False, "eval_interval": 0,
                  "precision": "fp32"},
        "checkpoint": {"interval": 0}}))
    proc = submit("preprocess", spec, "--cluster", "local", "--train", recipe)
    assert proc.returncode == 0, proc.stderr
    array, merge = re.search(r"array job (\d+) .* merge job (\d+)", proc.stdout).groups()
    train = re.search(r"submitted run: job (\d+)", proc.stdout).group(1)
    log = root / "run" / "slurm" / f"run-{train}.out"
    info = wait_job(train, 600, log)
    assert info["JobState"] == "COMPLETED", log.read_text()[-3000:] if log.exists() else proc.stdout
    for job, tasks in ((array, 2), (merge, 1)):  # training ran afterok on them; their own states:
        out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
        assert re.findall(r"JobState=(\S+)", out) == ["COMPLETED"] * tasks, out
    report = json.loads(Path(f"{prefix}.report.json").read_text())
    assert report["parts"] == 2 and all(p["tokens"] > 0 for p in report["per_part"])
    from megatron_ext import preprocess as pp
    one = root / "one"
    pp.preprocess([tiny_data["src"]], str(one), str(tiny_data["tok"]), on_error="skip", progress=False)
    for ext in (".bin", ".idx"):
        assert Path(f"{prefix}{ext}").read_bytes() == Path(f"{one}{ext}").read_bytes()
    assert sorted(per_step(root / "run")) == [1, 2, 3]
