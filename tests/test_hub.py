"""Exports a Hub user can publish: tied-embedding models in and out (Llama-3.2 shapes), the
tokenizer carried from import through training to export, the refusal when there is none, the
model card, and a pad token that batched generate() takes without a warning.

Megatron runs only in subprocesses here (the CLI, torchrun): its CPU device layer is process-wide.
"""
from __future__ import annotations

import json
import logging
import re
import warnings
from pathlib import Path

import pytest
import torch

from conftest import PARITY_COMMON, TINY, launch, layout_overrides, read_metrics
from megatron_ext import convert
from megatron_ext.checkpoint import CheckpointReader
from test_convert import hf_tensors, run_cli
from test_hf_families import make_hf_llama3

# Llama-3.2 1B/3B's rope scaling (factor 32); at head dim 16 and theta 500000 it keeps 4 of the 8
# frequencies, blends one and stretches three, so a model without it computes other logits.
LLAMA32_ROPE = dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
PAD = "<|finetune_right_pad_id|>"
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def _tokenizer_files(dst: Path, n: int) -> None:
    """A word-level HF tokenizer of exactly ``n`` tokens with Llama-3's BOS/EOS and pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(n - 3)}
    vocab.update({PAD: n - 3, BOS: n - 2, EOS: n - 1})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(dst / "tokenizer.json"))
    (dst / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS}))


@pytest.fixture(scope="module")
def llama32(tmp_path_factory) -> Path:
    """A random Llama-3.2-shaped HF model (tied embeddings, rope llama3 factor 32; tiny dims) with
    its tokenizer, as the Hub serves one: no lm_head.weight in the file."""
    path = make_hf_llama3(tmp_path_factory.mktemp("hf") / "llama-3.2-tiny", tied=True, rope=LLAMA32_ROPE,
                          bos_token_id=510, eos_token_id=511)
    _tokenizer_files(path, 512)
    assert "lm_head.weight" not in hf_tensors(path)
    return path


@pytest.fixture(scope="module")
def round_trip(llama32, tmp_path_factory) -> dict:
    """from-hf --tp 2 --pp 2 -> 2 steps at lr 0 at tp 1, pp 2, dp 2 (ZeRO-1: another layout, the
    tied head a copy on the last stage) from a recipe that is only ``base: OUT/recipe.yaml`` plus
    its steps -> an eval result for that step -> to-hf, with neither --tokenizer nor --no-tokenizer."""
    d = tmp_path_factory.mktemp("round-trip")
    ours, run, hf = d / "ours", d / "run", d / "hf"
    imported = run_cli("from-hf", llama32, ours, "--tp", "2", "--pp", "2", "--verify-layers", "0")
    (d / "phase.yaml").write_text(
        f"base: {ours / 'recipe.yaml'}\n"
        "layout: {tp: 1, pp: 2, dp: 2, zero_stage: 1, micro_batch: 2, global_batch: 8}\n"
        "optimizer: {lr: 0.0, min_lr: 0.0}\n"
        f"train: {{steps: 2, seq_len: 64, precision: fp32, output_dir: {run}, tensorboard: false}}\n"
        "data: {kind: synthetic}\n")
    trained = launch(4, [str(d / "phase.yaml")])
    (run / "eval" / "2").mkdir(parents=True)
    (run / "eval" / "2" / "results.json").write_text(json.dumps({"step": 2, "scores": [
        {"task": "gaperon_demo", "metric": "acc", "value": 0.3125, "stderr": 0.0341, "n": 185}]}))
    exported = run_cli("to-hf", run, hf, "--dtype", "fp32", "--verify-layers", "0")
    return {"src": llama32, "ours": ours, "run": run, "hf": hf, "imported": imported, "trained": trained,
            "exported": exported}


def _diff(proc) -> float:
    return float(re.search(r"max abs logit diff ([0-9.e+-]+)", proc.stdout).group(1))


def test_tied_llama32_round_trip_is_bit_identical(round_trip):
    src, ours, run, hf = (round_trip[k] for k in ("src", "ours", "run", "hf"))
    model = CheckpointReader(ours).recipe.model
    assert model.tie_embeddings and model.rope_scaling.factor == 32.0
    assert "output_layer.weight" not in CheckpointReader(ours).names()
    assert "output_layer.weight" not in CheckpointReader(run).names()  # the last stage's copy is not saved
    assert f"phase starts from {ours.resolve()}" in round_trip["trained"].stdout
    assert len(read_metrics(run)) == 2
    a, b = hf_tensors(src), hf_tensors(hf)
    assert a.keys() == b.keys() and "lm_head.weight" not in b
    assert all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["rope_scaling"] == {"rope_type": "llama3", **LLAMA32_ROPE}
    for what in ("imported", "exported"):  # Megatron (tied) vs transformers, whole model
        proc = round_trip[what]
        assert "the whole model" in proc.stdout and _diff(proc) <= 1e-4, proc.stdout
        print(f"{what}:", [ln for ln in proc.stdout.splitlines() if "verify:" in ln][-1])

    from transformers import AutoModelForCausalLM

    m_src = AutoModelForCausalLM.from_pretrained(src, local_files_only=True)
    m_out = AutoModelForCausalLM.from_pretrained(hf, local_files_only=True)
    assert m_out.lm_head.weight.data_ptr() == m_out.model.embed_tokens.weight.data_ptr()  # tied on load
    ids = torch.randint(0, 512, (2, 256), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(m_src(ids).logits, m_out(ids).logits)


def test_tied_training_matches_single_process(tmp_path, capsys):
    """model.tie_embeddings at tp 2 x pp 2 (ZeRO-1): the embedding's gradient from the first stage
    and its copy's from the last are summed over the embedding group; losses and grad norms equal
    one process's to 1e-5. Its checkpoint exports (weights only) with the head tied."""
    common = [c for c in PARITY_COMMON if not c.startswith("train.steps")] + ["train.steps=3",
                                                                              "model.tie_embeddings=true"]
    launch(1, [str(TINY), *common, *layout_overrides(), f"train.output_dir={tmp_path / 'one'}"])
    launch(4, [str(TINY), *common, *layout_overrides(2, 2, 1, 1), f"train.output_dir={tmp_path / 'tp2pp2'}"])
    for key in ("loss", "grad_norm"):
        ref, got = read_metrics(tmp_path / "one", key), read_metrics(tmp_path / "tp2pp2", key)
        assert len(ref) == len(got) == 3
        rel = max(abs(a - b) / abs(b) for a, b in zip(got, ref))
        print(f"tied {key}: max relative difference {rel:.2e} over 3 steps")
        assert rel <= 1e-5, (key, got, ref)
    assert read_metrics(tmp_path / "one")[-1] < read_metrics(tmp_path / "one")[0]

    # no tokenizer anywhere: refused in one line naming both ways out, nothing written
    out = tmp_path / "hf"
    capsys.readouterr()
    assert convert.main(["to-hf", str(tmp_path / "tp2pp2"), str(out), "--no-verify", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "--tokenizer" in err and "--no-tokenizer" in err, err
    assert not out.exists()
    assert convert.main(["to-hf", str(tmp_path / "tp2pp2"), str(out), "--no-tokenizer", "--no-verify",
                         "--no-progress"]) == 0
    assert "state no bos/eos/pad ids" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["bos_token_id"] is None
    assert not (out / "tokenizer.json").exists() and "lm_head.weight" not in hf_tensors(out)


def test_tokenizer_carried_from_import_to_export(round_trip):
    src, ours, run, hf = (round_trip[k] for k in ("src", "ours", "run", "hf"))
    assert (ours / "tokenizer" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert CheckpointReader(ours).recipe.data.tokenizer == str((ours / "tokenizer").resolve())
    assert "tokenizer:" in (ours / "recipe.yaml").read_text()
    assert CheckpointReader(run).recipe.data.tokenizer == str((ours / "tokenizer").resolve())  # via base:
    cfg, gen = (json.loads((hf / f).read_text()) for f in ("config.json", "generation_config.json"))
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (510, 511, 509)
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (510, 511, 509)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf, local_files_only=True)
    assert tok("w1 w2").input_ids == [1, 2] and tok.pad_token == PAD and tok.eos_token_id == 511

    # weights only: the ids still come from the recipe's tokenizer
    bare = hf.parent / "bare"
    run_cli("to-hf", run, bare, "--no-tokenizer", "--no-verify", "--card", "none")
    assert json.loads((bare / "config.json").read_text())["eos_token_id"] == 511
    assert not (bare / "tokenizer.json").exists() and not (bare / "README.md").exists()


def test_model_card(round_trip):
    card = (round_trip["hf"] / "README.md").read_text()
    print(card)
    header = card.split("---\n")[1]
    import yaml

    meta = yaml.safe_load(header)
    assert meta["license"] and meta["language"] == ["fr", "en", "code"]
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert "LlamaForCausalLM" in card and "tied input/output embeddings | yes" in card
    assert "llama3 scaling factor 32" in card
    assert "imported from Hugging Face `llama-3.2-tiny`" in card  # the phase chain reaches the import
    assert "| 2 | `run` | 2 | 1.02k (seq 64) | synthetic" in card  # 2 steps x 8 sequences x 64 tokens
    assert "| gaperon_demo | acc | 0.3125 | 0.0341 | 185 |" in card
    assert "tools/convert_checkpoint.py to-hf" in card and "Precision: fp32" in card


def test_batched_left_padded_generate_equals_one_at_a_time(round_trip):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = round_trip["hf"]
    tok = AutoTokenizer.from_pretrained(hf, local_files_only=True, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(hf, local_files_only=True).eval()
    prompts = ["w5 w17 w3 w200 w41 w9 w77", "w8 w1"]
    records: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Catch(level=logging.WARNING)
    logging.getLogger("transformers").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batch = tok(prompts, return_tensors="pt", padding=True)
            assert (batch.input_ids[1, :5] == 509).all()  # left-padded with the pad token
            together = model.generate(**batch, max_new_tokens=6, do_sample=False)
            # no attention mask: transformers infers it from the stated pad id (and warns without one)
            inferred = model.generate(batch.input_ids, max_new_tokens=6, do_sample=False)
            alone = [model.generate(**tok([p], return_tensors="pt"), max_new_tokens=6, do_sample=False)
                     for p in prompts]
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    for row, row2, single in zip(together, inferred, alone):
        assert row[-6:].tolist() == row2[-6:].tolist() == single[0, -6:].tolist()
    pad_words = [m for m in records + [str(w.message) for w in caught] if "pad" in m.lower() or "mask" in m.lower()]
    assert not pad_words, pad_words
