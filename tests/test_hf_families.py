"""Hugging Face families beyond plain Llama-3: Llama-3.1/3.2 rope scaling in and out (logit parity
with transformers), QK-norm Llama -> Qwen3, OLMo-2 blocks <-> Olmo2ForCausalLM, chat exports whose
generate() stops at the end of a turn, and from-hf's recipe that a fine-tune starts from.

Megatron runs only in subprocesses here (the CLI, torchrun): its CPU device layer is process-wide.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TINY, launch, layout_overrides
from megatron_ext import convert
from megatron_ext.checkpoint import CheckpointReader
from megatron_ext.config import recipe_from_tree
from test_convert import TINY_SHAPES, assert_same_hf_tensors, run_cli

# Values chosen so the scaling bites at the tiny model's head dim 16 and theta 500000: of its 8
# frequencies (wavelengths 6.3, 32, 167, 862, ... positions) the first is kept, the second is in
# the blended band (between 128/8 = 16 and 128/2 = 64) and the rest are stretched 8x. low/high
# are not Llama-3.1's 1/4, so Megatron's built-in (fixed 1/4/8192) scaling would not match.
LLAMA3 = dict(factor=8.0, low_freq_factor=2.0, high_freq_factor=8.0, original_max_position_embeddings=128)
SEQ = 256  # = max_position_embeddings: positions far past original_max_position_embeddings


def diff_of(proc) -> float:
    return float(re.search(r"max abs logit diff ([0-9.e+-]+)", proc.stdout).group(1))


def assert_parity(proc, what: str) -> None:
    """A to-hf / from-hf run verified the whole model's logits against transformers to 1e-4."""
    assert "the whole model" in proc.stdout and diff_of(proc) <= 1e-4, proc.stdout
    print(f"{what} parity:", [ln for ln in proc.stdout.splitlines() if "verify:" in ln][-1])


def export_and_load(run: Path, out: Path, architecture: str, model_type: str, q_norm: torch.Tensor,
                    timeout: int = 300) -> None:
    """Export ``run`` at fp32 with the whole model verified; transformers loads it as
    ``architecture`` with layer 1's q_norm equal to ``q_norm``."""
    assert_parity(run_cli("to-hf", run, out, "--dtype", "fp32", "--verify-layers", "0", "--no-tokenizer",
                          timeout=timeout),
                  f"{model_type} export")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [architecture] and cfg["model_type"] == model_type
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert type(model).__name__ == architecture
    assert torch.equal(model.model.layers[1].self_attn.q_norm.weight.detach(), q_norm)


def assert_reexports_identically(back: Path, out: Path, again: Path) -> None:
    convert.to_hf(back, again, dtype="fp32", verify_layers=None, progress=False, no_tokenizer=True)
    assert_same_hf_tensors(out, again)


def make_hf_llama3(path: Path, vocab: int = 512, seed: int = 0, tied: bool = False, rope: dict | None = None,
                   **config) -> Path:
    """A random tiny Llama-3.1-style model (rope_type llama3; ``rope`` overrides its scaling), saved by
    transformers itself; ``tied``: input and output embeddings shared, as Llama-3.2 1B/3B."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    shapes = {k: v for k, v in TINY_SHAPES.items() if k != "rope_theta"}
    cfg = LlamaConfig(vocab_size=vocab, tie_word_embeddings=tied, **shapes, **config,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **(rope or LLAMA3)})
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return path


def without_scaling(src: Path, dst: Path) -> Path:
    """A copy of an HF dir whose config.json says plain RoPE (the negative control)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["rope_scaling"] = None
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


# ---- Llama-3.1 rope scaling -------------------------------------------------------------------
def test_llama3_schema_and_hf_config():
    tree = {"model": dict(hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=128,
                          rope_scaling={"type": "llama3", **LLAMA3})}
    recipe = recipe_from_tree(tree)
    cfg = convert.hf_config(recipe)
    want = {"rope_type": "llama3", **LLAMA3}
    assert cfg["rope_scaling"] == want and cfg["rope_parameters"] == {**want, "rope_theta": 500000.0}
    back = convert.recipe_from_hf_config(cfg).model.rope_scaling
    assert back == recipe.model.rope_scaling
    # transformers 4 layout (rope_scaling only, the Llama-3.1 release's config.json) reads the same
    old = {k: v for k, v in cfg.items() if k != "rope_parameters"}
    assert convert.recipe_from_hf_config(old).model.rope_scaling == recipe.model.rope_scaling
    from transformers import LlamaConfig

    assert LlamaConfig.from_dict(cfg).rope_parameters == {**want, "rope_theta": 500000.0}
    from megatron_ext.config import RecipeError

    for bad, words in (({"factor": 0.5}, "factor"), ({"low_freq_factor": 4.0, "high_freq_factor": 1.0}, "low < high")):
        tree["model"]["rope_scaling"] = {"type": "llama3", **LLAMA3, **bad}
        with pytest.raises(RecipeError, match=words):
            recipe_from_tree(tree)


@pytest.mark.parametrize("change,words", [
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_type 'linear'"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}}, "rope_type 'dynamic'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}}, "lacks high_freq_factor"),
    ({"rope_scaling": {**{"rope_type": "llama3"}, **LLAMA3},
      "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **LLAMA3, "factor": 4.0}}, "disagree"),
])
def test_unrepresentable_rope_refused(tmp_path, capsys, change, words):
    d = tmp_path / "hf"
    d.mkdir()
    cfg = {"model_type": "llama", "vocab_size": 512, "tie_word_embeddings": False, "hidden_act": "silu",
           **TINY_SHAPES, **change}
    (d / "config.json").write_text(json.dumps(cfg))
    assert convert.main(["from-hf", str(d), str(tmp_path / "out"), "--no-verify"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot represent" in err and words in err and "\n" not in err, err


def test_llama3_import_logit_parity(tmp_path):
    """HF (rope_type llama3) -> ours: the Megatron model built from the imported checkpoint equals
    transformers on 256-token sequences (positions 2x past original_max_position_embeddings);
    against the same weights with plain RoPE it does not (so the check sees the scaling). The
    import exports back bit-identically, with the same rope config."""
    src = make_hf_llama3(tmp_path / "src")
    ours = convert.from_hf(src, tmp_path / "ours", tp=2, pp=2, verify_layers=None, progress=False)
    rs = CheckpointReader(ours).recipe.model.rope_scaling
    assert rs is not None and rs.model_dump() == {"type": "llama3", **LLAMA3}
    proc = run_cli("verify", ours, src, "--seq-len", SEQ, "--tol", "1e-4")
    assert "the whole model" in proc.stdout and diff_of(proc) <= 1e-4, proc.stdout
    print("import parity:", proc.stdout.strip().splitlines()[-1])
    plain = run_cli("verify", ours, without_scaling(src, tmp_path / "plain"), "--seq-len", SEQ, check_rc=None)
    assert diff_of(plain) > 1e-3, plain.stdout  # the scaling matters at these positions (FAILED)

    back = convert.to_hf(ours, tmp_path / "back", dtype="fp32", verify_layers=None, progress=False, no_tokenizer=True)
    assert_same_hf_tensors(src, back)
    from transformers import AutoConfig

    assert (AutoConfig.from_pretrained(back).rope_parameters == AutoConfig.from_pretrained(src).rope_parameters
            == {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3})


@pytest.fixture(scope="module")
def trained_llama3(tmp_path_factory) -> Path:
    """tiny with llama3 rope scaling, trained 3 steps at tp 2, pp 2, ZeRO-1, fp32."""
    out = tmp_path_factory.mktemp("trained-llama3") / "run"
    scaling = "{type: llama3, " + ", ".join(f"{k}: {v}" for k, v in LLAMA3.items()) + "}"
    launch(4, [str(TINY), "train.steps=3", "train.precision=fp32", f"train.output_dir={out}",
               f"model.rope_scaling={scaling}", *layout_overrides(tp=2, pp=2, zero=1)])
    return out


def test_llama3_export_logit_parity(trained_llama3, tmp_path):
    """ours (trained at tp2/pp2 with llama3 scaling) -> HF: transformers computes the same logits
    on 256-token sequences; the same export with its rope scaling deleted does not."""
    assert CheckpointReader(trained_llama3).recipe.model.rope_scaling.model_dump() == {"type": "llama3", **LLAMA3}
    out = tmp_path / "hf"
    run_cli("to-hf", trained_llama3, out, "--dtype", "fp32", "--no-verify", "--no-tokenizer")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_scaling"] == {"rope_type": "llama3", **LLAMA3}
    proc = run_cli("verify", trained_llama3, out, "--seq-len", SEQ, "--tol", "1e-4")
    assert "the whole model" in proc.stdout and diff_of(proc) <= 1e-4, proc.stdout
    print("export parity:", proc.stdout.strip().splitlines()[-1])
    plain = run_cli("verify", trained_llama3, without_scaling(out, tmp_path / "plain"), "--seq-len", SEQ,
                    check_rc=None)
    assert diff_of(plain) > 1e-4, plain.stdout  # what the parity check would catch


# ---- chat exports that stop ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory) -> Path:
    """Our BPE tokenizer (Llama-3 layout: BOS post-processor, <|eot_id|>, chat template,
    model_max_length 131072), 300 tokens."""
    from megatron_ext.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("chat-tok")
    (d / "docs.txt").write_text("\n".join(f"the cat {i} sat on the mat and said hello world" for i in range(200)))
    return train_tokenizer([d / "docs.txt"], d / "tok", vocab_size=300)


@pytest.fixture(scope="module")
def chat_export(chat_tokenizer, tmp_path_factory) -> Path:
    """An SFT-style export: a tiny model (imported from HF, as a fine-tuned checkpoint would be)
    exported with the chat tokenizer."""
    from test_convert import make_hf

    d = tmp_path_factory.mktemp("chat-export")
    ours = convert.from_hf(make_hf(d / "src"), d / "ours", verify_layers=None, progress=False)
    return convert.to_hf(ours, d / "hf", dtype="fp32", tokenizer=chat_tokenizer, verify_layers=None, progress=False)


def test_generation_config_lists_every_end_of_turn(chat_export, chat_tokenizer):
    from megatron_ext.tokenizer import load_tokenizer

    tok = load_tokenizer(chat_tokenizer)
    eot = json.loads((chat_tokenizer / "tokenizer.json").read_text())["added_tokens"]
    eot = next(t["id"] for t in eot if t["content"] == "<|eot_id|>")
    gen = json.loads((chat_export / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.eos_id, eot] and gen["bos_token_id"] == tok.bos_id
    assert json.loads((chat_export / "config.json").read_text())["eos_token_id"] == tok.eos_id


class _Force:
    """Logits processor: new tokens 1..n-1 are ``fill``, token n is ``stop`` (argmax by far)."""

    def __init__(self, prompt_len: int, n: int, fill: int, stop: int):
        self.prompt_len, self.n, self.fill, self.stop = prompt_len, n, fill, stop

    def __call__(self, input_ids, scores):
        new = input_ids.shape[1] - self.prompt_len
        scores = torch.full_like(scores, -1e9)
        scores[:, self.stop if new >= self.n - 1 else self.fill] = 0.0
        return scores


def test_generate_stops_at_eot(chat_export):
    """The model emits <|eot_id|> as its 3rd token: generate() with the exported generation
    config stops there; with EOS alone (the old export) it runs on to max_new_tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

    model = AutoModelForCausalLM.from_pretrained(chat_export, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(chat_export, local_files_only=True)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    prompt = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)["input_ids"]
    n0 = prompt.shape[1]
    force = LogitsProcessorList([_Force(n0, 3, tok.convert_tokens_to_ids("the"), eot)])
    out = model.generate(prompt, max_new_tokens=20, do_sample=False, logits_processor=force)
    assert out.shape[1] == n0 + 3 and int(out[0, -1]) == eot
    old = model.generate(prompt, max_new_tokens=20, do_sample=False, logits_processor=force,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    assert old.shape[1] == n0 + 20  # the bug this fixes: the turn's end does not stop generation


def test_exported_tokenizer_matches_training(chat_export, chat_tokenizer):
    """Plain text tokenizes as preprocessing did (no BOS); the chat template gives exactly the ids
    SFT trained on (one BOS, from the template); model_max_length is the model's context."""
    from transformers import AutoTokenizer

    from megatron_ext.sft import ChatEncoder
    from megatron_ext.tokenizer import load_tokenizer

    orig = AutoTokenizer.from_pretrained(chat_tokenizer, local_files_only=True)
    assert orig("the cat").input_ids[0] == orig.bos_token_id and orig.model_max_length == 131072  # as shipped
    tok = AutoTokenizer.from_pretrained(chat_export, local_files_only=True)
    assert tok.model_max_length == 256 == json.loads((chat_export / "config.json").read_text())["max_position_embeddings"]
    text = "the cat 7 sat on the mat"
    assert tok(text).input_ids == load_tokenizer(chat_tokenizer).encode(text)  # preprocess.py: encode + [eos]
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "the cat sat"}]
    ids = tok.apply_chat_template(messages, return_dict=True)["input_ids"]
    enc = ChatEncoder(str(chat_tokenizer))
    assert ids == enc.encode(messages).ids.tolist() and ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert tok.apply_chat_template(messages[:1], add_generation_prompt=True, return_dict=True)["input_ids"] == \
        enc.prompt_ids(messages[:1])


# ---- Llama blocks with per-head QK-norm -> Qwen3 ------------------------------------------------
def test_qk_norm_exports_to_qwen3_with_equal_logits(tmp_path):
    """model.qk_layernorm=true (Megatron's per-head RMSNorm on q and k before RoPE, one head_dim
    gain shared by the heads) is Qwen3's q_norm/k_norm: trained 3 steps at tp2/pp2 with non-unit
    q/k gains, exported to Qwen3ForCausalLM, transformers gives the same logits; the export
    imports back bit-identically."""
    run = tmp_path / "run"
    launch(4, [str(TINY), "train.steps=3", "train.precision=fp32", f"train.output_dir={run}", "model.qk_layernorm=true",
               "optimizer.lr=0.03", *layout_overrides(tp=2, pp=2, zero=1)])
    reader = CheckpointReader(run)
    qn = reader.get("decoder.layers.1.self_attention.q_layernorm.weight")
    assert qn.shape == (16,) and (qn - qn.mean()).abs().max() > 1e-3  # trained: not all one value
    out = tmp_path / "hf"
    export_and_load(run, out, "Qwen3ForCausalLM", "qwen3", qn)
    back = convert.from_hf(out, tmp_path / "back", tp=2, pp=1, verify_layers=None, progress=False)
    assert CheckpointReader(back).recipe.model.qk_layernorm
    assert_reexports_identically(back, out, tmp_path / "again")


# ---- OLMo-2 blocks -> Olmo2ForCausalLM -----------------------------------------------------------
def test_olmo2_exports_to_olmo2_and_imports_back(olmo2_tp2pp2, tmp_path):
    """model.block=olmo2 trained 10 steps at tp2/pp2 with sequence parallelism (the parity
    matrix's run): exported to Olmo2ForCausalLM, transformers computes the same logits; the export
    imports back (at tp2) with the same logits and exports again bit-identically."""
    reader = CheckpointReader(olmo2_tp2pp2)
    assert reader.recipe.model.block == "olmo2"
    qn = reader.get("decoder.layers.1.self_attention.q_proj_layernorm.weight")
    assert qn.shape == (64,) and (qn - qn.mean()).abs().max() > 1e-3  # trained, per head and dim
    out = tmp_path / "hf"
    export_and_load(olmo2_tp2pp2, out, "Olmo2ForCausalLM", "olmo2", qn, timeout=900)
    back = tmp_path / "back"
    assert_parity(run_cli("from-hf", out, back, "--tp", "2", "--verify-layers", "0", timeout=900), "olmo2 import")
    assert CheckpointReader(back).recipe.model.block == "olmo2"
    assert_reexports_identically(back, out, tmp_path / "again")


def test_family_rules_split_like_the_model():
    """Each family's rule says how TP cuts its tensor; that is what sharding.py (init, checkpoints)
    does, for every tensor of every family."""
    from megatron_ext.sharding import split_dim

    for over in ({}, {"qk_layernorm": True}, {"block": "olmo2"}):
        tree = {"model": dict(hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                              ffn_hidden_size=128, **over)}
        m = recipe_from_tree(tree).model
        fam = convert.family_of(m)
        assert fam.holds(m) and [f for f in convert.FAMILIES if f.holds(m)] == [fam]
        rules = convert.rules(m)
        assert list(rules) == list(convert.canonical_shapes(m))
        assert all(r.tp_split == split_dim(n) for n, r in rules.items()), fam.architecture


# ---- from-hf's recipe starts a fine-tune; an SFT export finds its tokenizer ----------------------
def test_import_recipe_starts_sft_whose_export_finds_its_tokenizer(chat_tokenizer, tmp_path, capsys):
    """from-hf writes recipe.yaml beside the checkpoint; an SFT recipe that only adds ``base:``
    and its data trains from the import (2 ranks, tp 2). Its recipe names no data.tokenizer:
    to-hf takes the tokenizer from the prepared SFT data's meta.json, and, when that tokenizer is
    not on this machine, refuses in one line (exit 2) instead of exporting none."""
    from conftest import read_metrics
    from megatron_ext import sft
    from megatron_ext.config import load_recipe
    from megatron_ext.tokenizer import load_tokenizer
    from test_convert import make_hf

    ours = tmp_path / "ours"
    run_cli("from-hf", make_hf(tmp_path / "src", vocab=300), ours, "--tp", "2", "--no-verify")
    base = load_recipe(ours / "recipe.yaml")
    assert base.model == CheckpointReader(ours).recipe.model and base.layout.tp == 2
    assert base.checkpoint.init_from == str(ours.resolve()) and base.checkpoint.init_mode == "model"

    tok = tmp_path / "tok"
    shutil.copytree(chat_tokenizer, tok)
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"the cat {i} sat"},
                                                      {"role": "assistant", "content": "hello world"}]}) + "\n"
                             for i in range(60)))
    sft.prepare([str(chats)], str(tok), str(tmp_path / "prepared"), 64)
    run, lr = tmp_path / "run", 1e-3
    (tmp_path / "sft.yaml").write_text(
        f"base: {ours / 'recipe.yaml'}\n"
        "layout: {micro_batch: 2, global_batch: 4}\n"
        f"optimizer: {{lr: {lr}, min_lr: 0.0, weight_decay: 0.0}}\n"
        "schedule: {kind: constant, warmup_steps: 0}\n"
        f"train: {{steps: 3, seq_len: 64, precision: fp32, attention: sdpa, output_dir: {run}, tensorboard: false}}\n"
        f"data: {{kind: sft, sft_path: {tmp_path / 'prepared'}, packing: true}}\n")
    proc = launch(2, [str(tmp_path / "sft.yaml")])
    assert f"phase starts from {ours.resolve()}" in proc.stdout, proc.stdout[-2000:]
    assert len(read_metrics(run)) == 3
    name = "decoder.layers.0.mlp.linear_fc1.weight"
    moved = (CheckpointReader(run).get(name) - CheckpointReader(ours).get(name)).abs().max().item()
    assert 0 < moved <= 3 * lr * 1.01  # three Adam steps from the imported weights, not a fresh init

    hf = tmp_path / "hf"
    run_cli("to-hf", run, hf, "--dtype", "fp32", "--no-verify")
    info = load_tokenizer(tok)
    eot = json.loads((tok / "tokenizer.json").read_text())["added_tokens"]
    eot = next(t["id"] for t in eot if t["content"] == "<|eot_id|>")
    cfg, gen = (json.loads((hf / f).read_text()) for f in ("config.json", "generation_config.json"))
    assert (hf / "tokenizer.json").is_file() and (cfg["bos_token_id"], cfg["eos_token_id"]) == (info.bos_id, info.eos_id)
    assert gen["eos_token_id"] == [info.eos_id, eot]

    tok.rename(tmp_path / "tok-elsewhere")
    capsys.readouterr()
    assert convert.main(["to-hf", str(run), str(tmp_path / "hf2"), "--no-verify", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "--tokenizer" in err and str(tok) in err, err
    assert not (tmp_path / "hf2").exists()
