"""HF <-> our checkpoint conversion: exact round trips, logits parity with Megatron, the trainer
starting from an import, the published 1.5B architecture, and every bad input refused clearly.

Megatron runs only in subprocesses here (the CLI, torchrun): its CPU device layer is process-wide.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import ROOT, TINY, cpu_env, launch, layout_overrides
from megatron_ext import convert
from megatron_ext.checkpoint import FORMAT_VERSION, CheckpointReader
from megatron_ext.config import load_recipe, recipe_from_tree
from megatron_ext.sharding import local_name

CLI = str(ROOT / "tools" / "convert_checkpoint.py")
TINY_SHAPES = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   intermediate_size=256, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=500000.0)


def make_hf(path: Path, vocab: int = 512, dtype=torch.float32, seed: int = 0) -> Path:
    """A random tiny LlamaForCausalLM (tiny.yaml's shapes), saved with save_pretrained. No download."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, tie_word_embeddings=False, **TINY_SHAPES))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # non-trivial gains, so a misplaced norm cannot hide
                p.uniform_(0.5, 1.5)
    model.to(dtype).save_pretrained(path)
    return path


def make_tokenizer(path: Path, n: int) -> Path:
    """A word-level HF tokenizer with exactly ``n`` tokens, Llama-3's BOS/EOS last."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(n - 2)}
    vocab.update({"<|begin_of_text|>": n - 2, "<|end_of_text|>": n - 1})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path.mkdir(parents=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>"}))
    return path


def hf_tensors(d: Path) -> dict[str, torch.Tensor]:
    index = d / "model.safetensors.index.json"
    where = (json.loads(index.read_text())["weight_map"] if index.is_file()
             else {k: "model.safetensors" for k in safe_open(str(d / "model.safetensors"), "pt").keys()})
    out = {}
    for name, f in where.items():
        with safe_open(str(d / f), "pt") as h:
            out[name] = h.get_tensor(name)
    return out


def assert_same_hf_tensors(a: Path, b: Path) -> None:
    """Two HF model dirs hold the same tensor names with bit-identical values."""
    ta, tb = hf_tensors(a), hf_tensors(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def run_cli(*args, check_rc: int | None = 0, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, CLI, *map(str, args), "--no-progress"] if args[0] != "verify"
                          else [sys.executable, CLI, *map(str, args)],
                          cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=timeout)
    if check_rc is not None and proc.returncode != check_rc:
        raise AssertionError(f"{args} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def patch_meta_recipe(ckpt: Path, **model) -> None:
    import yaml

    meta = json.loads((ckpt / "meta.json").read_text())
    tree = yaml.safe_load(meta["recipe"])
    tree["model"].update(model)
    meta["recipe"] = yaml.safe_dump(tree, sort_keys=False)
    (ckpt / "meta.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory) -> Path:
    return make_hf(tmp_path_factory.mktemp("hf") / "tiny-llama")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """tiny trained 3 steps at tp 2, pp 2, ZeRO-1 (fp32 master weights + Adam states)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    launch(4, [str(TINY), "train.steps=3", "train.precision=fp32", f"train.output_dir={out}",
               *layout_overrides(tp=2, pp=2, zero=1)])
    return out


# ---- HF -> ours -> HF ------------------------------------------------------------------------
@pytest.mark.parametrize("vocab,dtype,export", [(500, torch.float32, "fp32"), (512, torch.bfloat16, "bf16")])
def test_round_trip_is_bit_identical(tmp_path, monkeypatch, vocab, dtype, export):
    """vocab 500 is padded to 512 in our format and cut again on export. Vocab matrices move in
    blocks of 7 rows here, so block edges fall inside TP shards and inside the padding."""
    monkeypatch.setattr(convert.ckpt_read, "ROW_BLOCK_BYTES", 7 * 64 * 4)
    src = make_hf(tmp_path / "src", vocab=vocab, dtype=dtype)
    ours = convert.from_hf(src, tmp_path / "ours", tp=2, pp=2, verify_layers=None, progress=False)
    assert sorted(p.name for p in ours.iterdir()) == sorted(
        ["meta.json", "recipe.yaml"] + [f"tp{t:02d}_pp{p:02d}_w000.safetensors" for t in range(2) for p in range(2)])
    reader = CheckpointReader(ours)
    assert reader.recipe.model.vocab_size == vocab and reader.recipe.layout.tp == 2
    emb = reader.get("embedding.word_embeddings.weight")
    assert emb.shape == (512, 64) and emb.dtype == torch.float32 and not emb[vocab:].any()
    back = convert.to_hf(ours, tmp_path / "back", dtype=export, shard_size="100KB", verify_layers=None,
                         progress=False, no_tokenizer=True)
    assert len(list(back.glob("model-*-of-*.safetensors"))) > 1  # several shards + index
    a, b = hf_tensors(src), hf_tensors(back)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def test_te_spec_names_round_trip(hf_tiny, tmp_path):
    """Checkpoints from Transformer Engine's layer spec name the norms linear_qkv.layer_norm_weight /
    linear_fc1.layer_norm_weight; both directions accept them."""
    ours = convert.from_hf(hf_tiny, tmp_path / "ours", tp=2, pp=1, spec="te", verify_layers=None, progress=False)
    names = CheckpointReader(ours).names()
    assert "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight" in names
    assert "decoder.layers.3.mlp.linear_fc1.layer_norm_weight" in names
    assert not any("input_layernorm" in n or "pre_mlp_layernorm" in n for n in names)
    back = convert.to_hf(ours, tmp_path / "back", dtype="fp32", verify_layers=None, progress=False, no_tokenizer=True)
    assert_same_hf_tensors(hf_tiny, back)


def test_import_meta_matches_trainer_checkpoints(hf_tiny, trained, tmp_path):
    """from-hf writes what checkpoint.save writes: same keys, index schema and file naming."""
    ours = convert.from_hf(hf_tiny, tmp_path / "ours", tp=2, pp=2, verify_layers=None, progress=False)
    mine = json.loads((ours / "meta.json").read_text())
    saved = CheckpointReader(trained).meta
    assert set(saved) <= set(mine) and mine["format"] == FORMAT_VERSION
    assert (mine["step"], mine["consumed_samples"], mine["skipped_steps"], mine["adam_step"]) == (0, 0, 0, 0)
    assert set(mine["layout"]) == set(saved["layout"])
    saved_model = {k for k in saved["index"] if k.startswith("model/")}
    assert set(mine["index"]) == saved_model  # same names
    shapes = lambda reader, k: [s.shape for s in reader.shards(k)]  # noqa: E731
    theirs, ours_reader = CheckpointReader(trained), CheckpointReader(ours)
    assert all(shapes(ours_reader, k) == shapes(theirs, k) for k in saved_model)  # same TP shards


def test_fused_merge_equals_checkpoint_reader(trained):
    """The export reads TP shards straight into the output dtype; same values as the reader's merge."""
    reader = CheckpointReader(trained)
    for kind in ("model", "exp_avg"):
        for name in reader.names(kind):
            ref = reader.get(name, kind)
            for dtype in (torch.float32, torch.bfloat16):
                assert torch.equal(convert.read_merged(reader, name, dtype, kind), ref.to(dtype)), (kind, name)


# ---- trainer starts from an import ----------------------------------------------------------
def test_trainer_starts_from_import(hf_tiny, tmp_path):
    """checkpoint.init_from=<from-hf output>: the trainer loads it (here re-sharded from tp 2 to
    pp 2, and written with Transformer Engine's fused-norm names, which the local spec loads); with
    lr 0 the weights it saves after 2 steps are exactly the imported ones, under local-spec names,
    and export back to HF is bit-identical to the original."""
    ours = convert.from_hf(hf_tiny, tmp_path / "ours", tp=2, pp=1, spec="te", verify_layers=None, progress=False)
    run = tmp_path / "run"
    proc = launch(2, [str(TINY), "train.steps=2", "train.precision=fp32", f"train.output_dir={run}",
                      f"checkpoint.init_from={ours}", "optimizer.lr=0", "optimizer.min_lr=0",
                      *layout_overrides(tp=1, pp=2)])
    assert f"phase starts from {ours}" in proc.stdout
    before, after = CheckpointReader(ours), CheckpointReader(run)
    assert after.meta["step"] == 2
    assert any("layer_norm_weight" in n for n in before.names())
    assert not any("layer_norm_weight" in n for n in after.names())
    for name in before.names():
        assert torch.equal(before.get(name), after.get(local_name(name))), name
    back = convert.to_hf(run, tmp_path / "back", dtype="fp32", verify_layers=None, progress=False, no_tokenizer=True)
    a, b = hf_tensors(hf_tiny), hf_tensors(back)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- a trained checkpoint exports to a model HF runs identically ----------------------------
def test_trained_checkpoint_exports_with_equal_logits(trained, tmp_path):
    tok = make_tokenizer(tmp_path / "tok", 300)
    out = tmp_path / "hf"
    proc = run_cli("to-hf", trained, out, "--dtype", "fp32", "--verify-layers", "0", "--tokenizer", tok)
    diff = float(re.search(r"max abs logit diff ([0-9.e+-]+)", proc.stdout).group(1))
    assert "the whole model" in proc.stdout and diff <= 1e-4, proc.stdout
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["vocab_size"], cfg["bos_token_id"], cfg["eos_token_id"]) == (512, 298, 299)
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 299
    assert hf_tensors(out)["lm_head.weight"].shape == (512, 64)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert model.dtype == torch.float32 and model.config.rope_parameters["rope_theta"] == 500000.0
    ids = AutoTokenizer.from_pretrained(out, local_files_only=True)("w1 w2 w3", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape == (1, ids.shape[1] + 5) and int(gen.max()) < 512

    # the default export: bf16, checked on its first 2 layers; and verify catches a bad mapping
    proc = run_cli("to-hf", trained, tmp_path / "bf16", "--no-tokenizer")
    assert "first 2 of 4 layers" in proc.stdout and ": OK" in proc.stdout
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    from safetensors.torch import load_file, save_file

    shard = next((tmp_path / "bf16").glob("model-*.safetensors"))
    sd = load_file(shard)
    k, v = "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight"
    sd[k], sd[v] = sd[v].clone(), sd[k].clone()
    save_file(sd, shard, metadata={"format": "pt"})
    proc = run_cli("verify", trained, tmp_path / "bf16", "--layers", "1", check_rc=1)
    assert "FAILED" in proc.stdout


# ---- the published 1.5B architecture --------------------------------------------------------
def test_1p5b_export_config_is_gaperon_1p5b():
    path = ROOT / "recipes" / "1.5b.yaml"
    if path.is_file():
        recipe = load_recipe(path, ["data.kind=synthetic"])
    else:  # DESIGN.md shapes until the recipe lands
        recipe = recipe_from_tree({"model": dict(name="gaperon-1.5b", hidden_size=2048, num_layers=16,
                                                 num_attention_heads=32, num_kv_heads=8, head_dim=64,
                                                 ffn_hidden_size=8192, vocab_size=128256,
                                                 max_position_embeddings=4096, rope_theta=500000.0)})
    cfg = convert.hf_config(recipe)
    want = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                intermediate_size=8192, vocab_size=128256, max_position_embeddings=4096, rope_theta=500000.0,
                rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                hidden_act="silu", model_type="llama", torch_dtype="bfloat16")
    assert {k: cfg[k] for k in want} == want

    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaConfig.from_dict(cfg)
    assert hf.rope_parameters["rope_theta"] == 500000.0 and hf.head_dim == 64
    with torch.device("meta"):
        n = sum(p.numel() for p in LlamaForCausalLM(hf).parameters())
    assert n == recipe.model.num_params()
    assert abs(n - 1.50e9) <= 0.005 * 1.50e9, n


# ---- bad input ------------------------------------------------------------------------------
def _copy_ckpt(trained: Path, dst: Path) -> Path:
    src = CheckpointReader(trained).path
    shutil.copytree(src, dst)
    return dst


# The CLI is `sys.exit(main())`; the subprocess runs above cover its exit codes 0 and 1, so the
# bad-input cases call main() in-process (a CLI process costs ~15 s of imports on 2 cores).
def test_missing_shard_file_is_named(trained, tmp_path, capsys):
    ckpt = _copy_ckpt(trained, tmp_path / "ckpt")
    (ckpt / "tp01_pp01_w000.safetensors").unlink()
    assert convert.main(["to-hf", str(ckpt), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "tp01_pp01_w000.safetensors" in err and "tensor-parallel rank 1, pipeline stage 1" in err
    assert not (tmp_path / "out").exists()  # nothing half-written left behind


def test_shape_mismatch_with_recipe(trained, tmp_path, capsys):
    ckpt = _copy_ckpt(trained, tmp_path / "ckpt")
    patch_meta_recipe(ckpt, ffn_hidden_size=128)
    assert convert.main(["to-hf", str(ckpt), str(tmp_path / "out"), "--no-verify", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "linear_fc1.weight" in err and "(256, 64)" in err and "ffn 128" in err
    assert not (tmp_path / "out").exists()


def test_tokenizer_larger_than_vocab(trained, tmp_path, capsys):
    tok = make_tokenizer(tmp_path / "tok", 600)
    rc = convert.main(["to-hf", str(trained), str(tmp_path / "out"), "--tokenizer", str(tok), "--no-verify"])
    assert rc == 2 and "600 tokens" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_output_dir_not_empty(trained, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["to-hf", str(trained), str(out), "--no-verify", "--no-progress", "--shard-size", "200KB", "--no-tokenizer"]
    assert convert.main(args) == 2 and "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert convert.main(args + ["--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "config.json").is_file()
    assert not list(out.glob(".convert-tmp-*"))
    (out / "model.safetensors").write_bytes(b"stale")  # would shadow the index: refused even so
    assert convert.main(args + ["--overwrite"]) == 2 and "model.safetensors" in capsys.readouterr().err


def test_qk_layernorm_recipe_without_its_weights(trained, tmp_path, capsys):
    """QK-norm models export to Qwen3 (tests/test_hf_families.py); a recipe saying QK-norm over a
    checkpoint that has no q/k norm gains is refused, naming the missing tensor."""
    ckpt = _copy_ckpt(trained, tmp_path / "ckpt")
    patch_meta_recipe(ckpt, qk_layernorm=True)
    assert convert.main(["to-hf", str(ckpt), str(tmp_path / "out"), "--no-verify"]) == 2
    assert "q_layernorm.weight" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("change,words", [  # tie_word_embeddings: imported (tests/test_hub.py)
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_type 'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "mistral"}, "model_type"),
])
def test_unrepresentable_hf_configs_refused(tmp_path, capsys, change, words):
    d = tmp_path / "hf"
    d.mkdir()
    cfg = {"model_type": "llama", "vocab_size": 512, "tie_word_embeddings": False, "intermediate_size": 256,
           "hidden_act": "silu", **{k: v for k, v in TINY_SHAPES.items()}, **change}
    (d / "config.json").write_text(json.dumps(cfg))
    assert convert.main(["from-hf", str(d), str(tmp_path / "out"), "--no-verify"]) == 2
    err = capsys.readouterr().err
    assert "cannot represent" in err and words in err and not (tmp_path / "out").exists()


def test_hf_weights_not_matching_config(hf_tiny, tmp_path, capsys):
    d = tmp_path / "hf"
    shutil.copytree(hf_tiny, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (d / "config.json").write_text(json.dumps(cfg))
    assert convert.main(["from-hf", str(d), str(tmp_path / "out"), "--no-verify"]) == 2
    assert "gate_proj.weight" in capsys.readouterr().err


def test_parse_size():
    assert convert.parse_size("5GB") == 5 * 10**9 and convert.parse_size("2GiB") == 2 * 2**30
    with pytest.raises(convert.ConvertError):
        convert.parse_size("lots")
