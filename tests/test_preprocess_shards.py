"""Preprocessing at scale: --shard I/N parts merged are byte for byte the unsharded run; merge refuses
missing, incomplete and foreign parts; a rerun keeps complete parts; SIGTERM, a lost worker and a
killed parent end cleanly; the fast encoder gives Hugging Face tokenizers' ids or is not used."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent

from megatron_ext import preprocess as pp  # noqa: E402
from megatron_ext.fast_bpe import ADVERSARIAL, FastBPE  # noqa: E402
from megatron_ext.readers import split  # noqa: E402
from megatron_ext.tokenizer import fast_encoder, load_tokenizer, train_tokenizer  # noqa: E402
from megatron_ext.cli.preprocess import main  # noqa: E402

TOOL = str(ROOT / "tools" / "preprocess_data.py")



@pytest.fixture(scope="module")
def texts(corpus) -> list[str]:
    """Paragraphs of the fr/en/code demo documents: many small real documents."""
    docs = [json.loads(line)["text"] for p in corpus.values() for line in open(p, encoding="utf-8")]
    return [p for d in docs for p in d.split("\n\n") if len(p.strip()) > 20]


@pytest.fixture(scope="module")
def inputs(texts, tmp_path_factory) -> list[Path]:
    """A big JSONL (split by byte range), a whole-file .txt, a Parquet of 6 row groups (split by row
    group), with bad and empty documents to report by file:line."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("inputs")
    big = d / "big.jsonl"
    with open(big, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts[:30]):
            f.write(json.dumps({"text": t[:400]}, ensure_ascii=False) + "\n")
            if i in (5, 22):
                f.write('{"text": broken\n')
            if i == 25:
                f.write('{"text": ""}\n')
    (d / "doc.txt").write_text(texts[31], encoding="utf-8")
    pq.write_table(pa.table({"text": [t[:300] for t in texts[32:92]]}), d / "rows.parquet", row_group_size=6)
    return [big, d / "doc.txt", d / "rows.parquet"]


def files_of(prefix: Path) -> dict[str, bytes]:
    return {ext: Path(f"{prefix}{ext}").read_bytes() for ext in (".bin", ".idx")}


def run_shards(inputs, prefix, tok, n, **kw) -> list[pp.Summary]:
    return [pp.preprocess(inputs, str(prefix), str(tok), shard=(i, n), on_error="skip", progress=False, **kw)
            for i in range(n)]


@pytest.fixture(scope="module")
def unsharded(inputs, bpe, tmp_path_factory) -> tuple[Path, pp.Summary]:
    prefix = tmp_path_factory.mktemp("one") / "ds"
    return prefix, pp.preprocess(inputs, str(prefix), str(bpe), on_error="skip", progress=False)


def test_three_shards_merged_equal_the_unsharded_run(inputs, bpe, unsharded, tmp_path, capsys):
    one, ref = unsharded
    pieces = [split([str(p) for p in inputs], "doc", "text", i, 3) for i in range(3)]
    big = [p for part in pieces for p in part if p.path.endswith("big.jsonl")]
    rows = [p for part in pieces for p in part if p.path.endswith(".parquet")]
    assert len(big) >= 2 and all(p.end >= 0 for p in big), "the big JSONL is cut by byte range"
    assert len({id(p) for p in rows}) >= 2 and len(rows) >= 2, "the Parquet is cut by row groups"

    prefix = tmp_path / "ds"
    run_shards(inputs, prefix, bpe, 3)
    run_shards(inputs, tmp_path / "w2", bpe, 3, workers=2, chunk_docs=4)  # workers do not change a part
    for i in range(3):
        assert files_of(pp.part_prefix(str(prefix), i, 3)) == files_of(pp.part_prefix(str(tmp_path / "w2"), i, 3))
    assert main(["merge", "--output-prefix", str(prefix)]) == 0
    out = capsys.readouterr().out
    assert files_of(prefix) == files_of(one)
    report = json.loads(Path(f"{prefix}.report.json").read_text())
    assert (report["documents"], report["tokens"], report["bytes_in"]) == (ref.documents, ref.tokens, ref.bytes_in)
    # file:line of skipped documents found inside byte ranges are the unsharded run's
    assert [tuple(s) for s in report["skipped"]] == [tuple(s) for s in ref.skipped]
    assert report["skipped_count"] == 3 and len(report["per_part"]) == 3
    assert all(p["seconds"] > 0 and p["tokens"] > 0 for p in report["per_part"])
    assert f"documents: {ref.documents:,}" in out and "big.jsonl:7: malformed JSON" in out

    from megatron.core.datasets.indexed_dataset import IndexedDataset
    ds = IndexedDataset(str(prefix))
    assert len(ds) == ref.documents and pp.dataset_tokens(str(prefix)) == ref.tokens
    tok = load_tokenizer(bpe)
    assert np.array(ds[len(ds) - 1]).tolist()[-1] == tok.eos_id


def test_more_shards_than_units_and_empty_parts_still_merge(inputs, bpe, unsharded, tmp_path):
    one, _ = unsharded
    small = [inputs[1]]  # one whole-file document: parts 0..3 are empty but for one
    run_shards(small, tmp_path / "ds", bpe, 4)
    assert pp.merge(str(tmp_path / "ds"))["documents"] == 1
    ref = tmp_path / "ref"
    pp.preprocess(small, str(ref), str(bpe), progress=False)
    assert files_of(tmp_path / "ds") == files_of(ref)


def test_merge_refuses_missing_incomplete_and_foreign_parts(inputs, bpe, corpus, tmp_path, capsys):
    prefix = tmp_path / "ds"
    run_shards(inputs, prefix, bpe, 3)
    part1 = pp.part_prefix(str(prefix), 1, 3)

    def refused(fragment: str):
        assert main(["merge", "--output-prefix", str(prefix)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and fragment in err, err
        assert not Path(f"{prefix}.bin").exists() and not Path(f"{prefix}.idx").exists()

    saved = files_of(part1)
    with open(part1 + ".bin", "ab") as f:  # a part whose .bin is not what its sidecar says
        f.write(b"\0\0")
    refused(f"part 1 of 3 ({part1}) is incomplete ({part1}.bin has {len(saved['.bin']) + 2} bytes")
    Path(part1 + ".json").unlink()
    refused("is incomplete (.bin and .idx without its .json sidecar): rerun it with --shard 1/3")
    for ext in (".bin", ".idx"):
        Path(part1 + ext).unlink()
    refused("part 1 of 3")
    other = train_tokenizer([corpus["en"]], tmp_path / "other", vocab_size=520)
    pp.preprocess(inputs, str(prefix), str(other), shard=(1, 3), on_error="skip", progress=False)
    refused("made with a different tokenizer")
    # resume: a rerun of the array with the first tokenizer keeps parts 0 and 2, redoes part 1
    stamps = {i: os.stat(pp.part_prefix(str(prefix), i, 3) + ".bin").st_mtime_ns for i in (0, 2)}
    assert [s.resumed for s in run_shards(inputs, prefix, bpe, 3)] == [True, False, True]
    assert stamps == {i: os.stat(pp.part_prefix(str(prefix), i, 3) + ".bin").st_mtime_ns for i in (0, 2)}
    assert pp.merge(str(prefix))["parts"] == 3


def test_bad_shard_argument_is_one_line(inputs, bpe, tmp_path, capsys):
    assert main(["--input", str(inputs[0]), "--output-prefix", str(tmp_path / "x"), "--tokenizer", str(bpe),
                 "--shard", "3/3", "--no-progress"]) == 2
    assert "error: --shard 3/3: write I/N with 0 <= I < N" in capsys.readouterr().err
    assert main(["merge", "--output-prefix", str(tmp_path / "x")]) == 2
    assert "no parts" in capsys.readouterr().err


# ------------------------------------------------------------------------- ending cleanly

def _env():
    return {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _start(args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, TOOL, *map(str, args)], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(cond, timeout=90.0):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def long_input(texts, tmp_path_factory) -> Path:
    """Enough documents that a 2-worker run takes several seconds on a shared 2-core machine."""
    path = tmp_path_factory.mktemp("long") / "long.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for k in range(12):
            for t in texts:
                f.write(json.dumps({"text": f"{k} {t}"}, ensure_ascii=False) + "\n")
    return path


def _workers(pid: int) -> list[int]:
    import psutil
    return [c.pid for c in psutil.Process(pid).children(recursive=True)]


def _alive(pid: int) -> bool:
    import psutil
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_sigterm_lost_worker_and_killed_parent_end_cleanly(long_input, bpe, tmp_path):
    prefix = tmp_path / "ds"
    part = pp.part_prefix(str(prefix), 1, 2)
    args = ["--input", long_input, "--output-prefix", prefix, "--tokenizer", bpe, "--workers", 2,
            "--chunk-docs", 4, "--shard", "1/2", "--encoder", "hf", "--no-progress"]
    temps = lambda: list(tmp_path.glob("ds.part-1-of-2.tmp-*"))  # noqa: E731

    # 1. SIGTERM (scancel, time limit): exit 143, one line, no part, no temporary, no worker left
    proc = _start(args)
    assert _wait_for(lambda: temps()), proc.communicate()
    kids = _workers(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == ("stopped by SIGTERM: nothing written under the output prefix; "
                                            "run again to redo it") and "Traceback" not in err, err
    assert not temps() and not list(tmp_path.glob("ds.part-1-of-2.*"))
    assert _wait_for(lambda: not any(map(_alive, kids)), 10), "workers outlived the run"

    # 2. a worker killed (as by the OOM killer): one error line, exit 1, nothing written
    proc = _start(args)
    assert _wait_for(lambda: temps()), proc.communicate()
    os.kill(_workers(proc.pid)[-1], signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("error: a tokenizing worker process died (killed by SIGKILL"), err
    assert not list(tmp_path.glob("ds.part-1-of-2.*"))

    # 3. the parent killed outright: its workers die with it; the next run removes its temporary
    proc = _start(args)
    assert _wait_for(lambda: temps()), proc.communicate()
    kids = _workers(proc.pid)
    proc.kill()
    proc.communicate()
    assert _wait_for(lambda: not any(map(_alive, kids)), 10), "workers outlived their killed parent"
    assert temps()
    summary = pp.preprocess([long_input], str(prefix), str(bpe), shard=(1, 2), progress=False)
    assert not temps() and not summary.resumed and pp.part_problem(part, None) is None


def test_sigusr1_in_process_ends_like_ctrl_c(long_input, bpe, tmp_path, capsys):
    """SIGUSR1 (a time-limit warning) mid-run: exit 138, the one line, nothing under the prefix, and
    the previous handler back in place."""
    import threading

    # Eight times the long input: the run must still be going when the signal comes 1.5 s in,
    # even on an idle machine with the tokenizer warm (the plain long input can finish first).
    longer = tmp_path.parent / f"{tmp_path.name}-longer.jsonl"
    longer.write_text(long_input.read_text(encoding="utf-8") * 8, encoding="utf-8")
    before = signal.getsignal(signal.SIGUSR1)
    timer = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGUSR1))
    timer.start()
    try:
        code = main(["--input", str(longer), "--output-prefix", str(tmp_path / "ds"), "--tokenizer", str(bpe),
                     "--workers", "1", "--encoder", "hf", "--shard", "0/1", "--no-progress"])
    finally:
        timer.cancel()
    assert code == 138 and "stopped by SIGUSR1: nothing written" in capsys.readouterr().err
    assert not list(tmp_path.iterdir()) and signal.getsignal(signal.SIGUSR1) is before


# ------------------------------------------------------------------------------ fast encoder

def _random_texts(n: int, seed: int = 0) -> list[str]:
    alphabet = list("aZé ß'sSTm\t\n\r  0123456789.,;!?-_()[]{}<>|/\\\"#@$%^&*+=~`") + \
        ["<|end_of_text|>", "<|eot_id|>", "😀", "👍🏽", "\u200d", "\u00a0", "\u3000", "\x85", "\x1c", "中", "ا", "\u0301",
         "'ll", "'RE", "   ", "\n\n", "\r\n", "1234"]
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(n)]


def test_fast_encoder_gives_hf_ids_on_adversarial_text_and_the_corpus(bpe, texts, tmp_path):
    tok = load_tokenizer(bpe)
    encode, why = fast_encoder(tok)
    assert why is None
    for text in [*ADVERSARIAL, *texts, *_random_texts(3000)]:
        assert encode(text) == tok.encode(text), repr(text[:80])
    # the pure merge path (ignore_merges off: every piece goes through the merges)
    spec = json.loads((bpe / "tokenizer.json").read_text())
    spec["model"]["ignore_merges"] = False
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "tokenizer.json").write_text(json.dumps(spec))
    ref = load_tokenizer(tmp_path / "m", eos_token="<|end_of_text|>")
    merges = FastBPE(spec)
    for text in [*ADVERSARIAL, *texts[:40], *_random_texts(500, 1)]:
        assert merges.encode(text) == ref.encode(text), repr(text[:80])


def test_fast_encoder_falls_back_when_not_the_same_pipeline(bpe, inputs, tmp_path):
    spec = json.loads((bpe / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "NFC"}
    (tmp_path / "n").mkdir()
    (tmp_path / "n" / "tokenizer.json").write_text(json.dumps(spec))
    other = tmp_path / "n"
    assert fast_encoder(load_tokenizer(other, eos_token="<|end_of_text|>"))[1] == "it has a normalizer"
    s = pp.preprocess([inputs[0]], str(tmp_path / "a"), str(other), eos_token="<|end_of_text|>",
                      on_error="skip", progress=False)
    assert s.encoder == "hf"
    with pytest.raises(pp.PreprocessError, match="--encoder fast: the fast encoder cannot be used"):
        pp.preprocess([inputs[0]], str(tmp_path / "b"), str(other), eos_token="<|end_of_text|>",
                      encoder="fast", progress=False)
    fast = pp.preprocess([inputs[0]], str(tmp_path / "f"), str(bpe), on_error="skip", progress=False)
    hf = pp.preprocess([inputs[0]], str(tmp_path / "h"), str(bpe), on_error="skip", encoder="hf", progress=False)
    assert (fast.encoder, hf.encoder) == ("fast", "hf")
    assert files_of(tmp_path / "f") == files_of(tmp_path / "h")


def test_plan_reads_token_counts_for_epochs_per_blend_component(unsharded, tmp_path, capsys):
    from megatron_ext.config import load_recipe
    from megatron_ext.plan_report import blend_epochs
    from megatron_ext.cli.plan import main as plan_main

    one, ref = unsharded
    blend = json.dumps([[3, str(one)], [1, str(tmp_path / "missing")]])
    over = ["data.kind=indexed", f"data.blend={blend}", 'data.split="90,10,0"', "train.steps=10",
            "layout.global_batch=8", "train.seq_len=64"]
    rows = blend_epochs(load_recipe(ROOT / "recipes" / "tiny.yaml", over))
    assert rows[0]["tokens"] == ref.tokens and rows[1]["tokens"] is None
    assert rows[0]["drawn"] == 10 * 8 * 64 * 0.75
    assert abs(rows[0]["epochs"] - 10 * 8 * 64 * 0.75 / (ref.tokens * 0.9)) < 1e-9
    assert plan_main([str(ROOT / "recipes" / "tiny.yaml"), *over, "--epochs"]) == 2  # a dataset is missing
    out, err = capsys.readouterr()
    assert f"{rows[0]['epochs']:,.2f} epochs" in out and "dataset not found" in out
    assert err.startswith("error: --epochs: 1 data.blend dataset(s)") and str(tmp_path / "missing") in err
