"""Resume exactness on real indexed data: a small fr/en/code corpus preprocessed into three indexed
datasets, blended by megatron's builder; 2 ranks (dp=2, ZeRO-1) trained without a break, and again
stopped by SIGTERM after step 3 then resumed, give bitwise the same per-step losses. In this
process: the index cache is deterministic (a fresh build equals the one the runs wrote) and the
global batch at consumed-samples k is exactly samples [k, k + global_batch) split over the DP ranks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY, cpu_env, launch, per_step
from megatron_ext import preprocess as pp
from megatron_ext.config import load_recipe
from megatron_ext.corpus import build_demo_corpus
from megatron_ext.data import build_indexed, microbatches
from megatron_ext.tokenizer import load_tokenizer, train_tokenizer

STEPS, STOP_AT, GLOBAL_BATCH, DP = 8, 3, 8, 2
WEIGHTS = {"en": 0.5, "fr": 0.3, "code": 0.2}


@pytest.fixture(scope="module")
def indexed(tmp_path_factory) -> dict:
    """Tokenizer + three indexed datasets (en, fr, code) from the offline demo corpus."""
    root = tmp_path_factory.mktemp("indexed")
    corpus = build_demo_corpus(root / "corpus", max_bytes_per_lang=24_000)
    tok = train_tokenizer(list(corpus.values()), root / "tokenizer", vocab_size=512)
    prefixes = {}
    for lang in WEIGHTS:
        # the corpus cuts ~16 KB documents; paragraphs make a few dozen, so every split has some
        lines = Path(corpus[lang]).read_text(encoding="utf-8").splitlines()
        docs = [p for line in lines for p in json.loads(line)["text"].split("\n\n") if len(p.strip()) > 40]
        assert len(docs) >= 20, (lang, len(docs))
        src = root / f"{lang}.jsonl"
        src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
        prefixes[lang] = str(root / f"{lang}_text_document")
        pp.preprocess([src], prefixes[lang], str(tok), workers=1, progress=False)
    return {"root": root, "tokenizer": str(tok), "prefixes": prefixes}


def overrides(indexed: dict, cache: str) -> list[str]:
    blend = [[w, indexed["prefixes"][lang]] for lang, w in WEIGHTS.items()]
    return ["data.kind=indexed", f"data.tokenizer={indexed['tokenizer']}", f"data.blend={json.dumps(blend)}",
            f"data.cache_dir={indexed['root'] / cache}", 'data.split="90,10,0"',
            f"model.vocab_size={load_tokenizer(indexed['tokenizer']).vocab_size}", "train.seq_len=64",
            f"train.steps={STEPS}", "train.precision=fp32", "train.tensorboard=false", "train.eval_interval=4",
            "train.eval_iters=1",
            f"layout.dp={DP}", "layout.zero_stage=1", "layout.micro_batch=2", f"layout.global_batch={GLOBAL_BATCH}",
            "checkpoint.interval=0"]



def train(indexed, out: Path, cache: str, fault: str | None = None, check: bool = True):
    env = cpu_env(**({"GAPERON_FAULT": fault} if fault else {}))
    return launch(DP, [str(TINY), *overrides(indexed, cache), f"train.output_dir={out}"], env=env, check=check)


def test_sigterm_resume_on_indexed_data_is_exact(indexed, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "run"
    train(indexed, ref, "cache-ref")  # its own index cache: the runs below build theirs again

    term = train(indexed, out, "cache-run", fault=f"sigterm:{STOP_AT}", check=False)
    assert term.returncode != 0, "the SIGTERM run should exit with the requeue code (85)"
    assert f"SIGTERM: saved step {STOP_AT}; exiting with 85" in term.stdout, term.stdout[-2000:] + term.stderr[-3000:]
    ckpts = out / "checkpoints"
    meta = json.loads((ckpts / (ckpts / "latest").read_text().strip() / "meta.json").read_text())
    assert meta["step"] == STOP_AT and meta["consumed_samples"] == STOP_AT * GLOBAL_BATCH

    resumed = train(indexed, out, "cache-run")
    assert f"at step {STOP_AT} ({STOP_AT * GLOBAL_BATCH} samples consumed" in resumed.stdout, resumed.stdout[-2000:]
    expected, got = per_step(ref), per_step(out)
    assert sorted(expected) == sorted(got) == list(range(1, STEPS + 1))
    for step in expected:  # fp32 on CPU, same data in the same order: bitwise equal
        assert got[step] == expected[step], f"step {step}: {got[step]!r} != {expected[step]!r}"
    assert per_step(out, "valid_loss") == per_step(ref, "valid_loss") and len(per_step(ref, "valid_loss")) == 2

    # The samples themselves, rebuilt in this process (no torch.distributed set up here).
    recipe = load_recipe(TINY, overrides(indexed, "cache-run") + [f"train.output_dir={out}"])
    n = STEPS * GLOBAL_BATCH
    used, _ = build_indexed(recipe, n, 0)  # reads the cache the training runs wrote
    fresh_recipe = load_recipe(TINY, overrides(indexed, "cache-fresh") + [f"train.output_dir={out}"])
    fresh, _ = build_indexed(fresh_recipe, n, 0)  # builds the indices again from scratch
    assert len(used) == len(fresh) >= n
    samples = [used[i] for i in range(n)]
    for i, s in enumerate(samples):
        f = fresh[i]
        assert all(torch.equal(s[k], f[k]) for k in ("tokens", "labels", "loss_mask")), f"sample {i} differs"
        assert s["tokens"].shape == (64,) and torch.equal(s["tokens"][1:], s["labels"][:-1])
    assert len({tuple(s["tokens"].tolist()) for s in samples}) > n // 2  # real, varied text
    vocab = recipe.model.vocab_size
    assert all(int(s["tokens"].max()) < vocab and int(s["labels"].max()) < vocab for s in samples)

    for k in (0, STOP_AT * GLOBAL_BATCH, (STEPS - 1) * GLOBAL_BATCH):
        ranks = [microbatches(used, k, recipe, rank) for rank in range(DP)]
        assert all(len(mbs) == recipe.layout.num_microbatches for mbs in ranks)
        got_batch = torch.cat([m["tokens"] for mbs in ranks for m in mbs])
        assert torch.equal(got_batch, torch.stack([s["tokens"] for s in samples[k:k + GLOBAL_BATCH]])), k


def test_split_without_documents_is_refused_not_looped(indexed, tmp_path):
    """megatron-core loops forever building a split that gets none of a dataset's documents; the
    build names the dataset instead (before any index is built)."""
    src = tmp_path / "few.jsonl"
    src.write_text("".join(json.dumps({"text": f"document {i} " * 50}) + "\n" for i in range(3)))
    few = str(tmp_path / "few_text_document")
    pp.preprocess([src], few, indexed["tokenizer"], workers=1, progress=False)
    base = overrides(indexed, "cache-few")
    blend = [[0.9, indexed["prefixes"]["en"]], [0.1, few]]
    recipe = load_recipe(TINY, [*base, f"data.blend={json.dumps(blend)}", 'data.split="90,10,0"'])
    with pytest.raises(ValueError, match=r"leaves the valid split of .*few_text_document without a document \(it has 3\)"):
        build_indexed(recipe, 64, 8)
    assert not (indexed["root"] / "cache-few").exists()
