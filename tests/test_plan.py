"""Planner tests: parameter counts (recipe formula == planner == a built Megatron model), memory
estimates against what PyTorch/DeepSpeed actually allocate on CPU, the shipped recipes, and the
refusals (a layout that does not fit, a search where nothing fits).

Memory is measured as the bytes of the distinct tensor storages the training state references
(parameters, .grad, optimizer state, DeepSpeed's flat buffers), and activations as the storages
autograd saves for backward (a saved-tensors hook). Neither tracemalloc (blind to torch's C++
allocations) nor RSS (hundreds of MB of libraries and malloc caches around a few-MB model) can
measure a small model; summing storages counts exactly what is live, views of one flat buffer once.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_ext.errors import free_port

ROOT = Path(__file__).resolve().parent.parent

from megatron_ext.config import RecipeError, load_recipe  # noqa: E402
from megatron_ext.plan import (BYTES_PER_PARAM, STATE_KEYS, GiB, Hardware, PlanError, activation_bytes,  # noqa: E402
                               check_fits, count_params, estimate_memory, flops_per_token,
                               inflight_layers, layer_activation_bytes, layer_params, make_plan, matmul_params,
                               search, stage_params, with_layout)

RECIPES = {name: ROOT / "recipes" / f"{name}.yaml" for name in ("1.5b", "8b", "24b")}
# Exact counts (untied embeddings, vocab 128,256 = a multiple of 128, so no padding).
EXACT = {"1.5b": 1_498_482_688, "8b": 8_030_261_248, "24b": 23_543_567_360}
DESIGN = {  # DESIGN.md table: hidden, layers, heads, kv heads, head dim, ffn
    "1.5b": (2048, 16, 32, 8, 64, 8192),
    "8b": (4096, 32, 32, 8, 128, 14336),
    "24b": (5120, 40, 32, 8, 128, 32768),
}
TOKENS = {"1.5b": 3e12, "8b": 4e12, "24b": 2e12}
LR = {"1.5b": 3e-4, "8b": 3e-4, "24b": 2e-4}


def hw_for(recipe, **kw) -> Hardware:
    return Hardware(gpus=recipe.layout.world_size, **kw)


# ----------------------------------------------------------------------------- pure arithmetic

@pytest.mark.parametrize("name", RECIPES)
def test_param_count_formula_equals_planner(name):
    m = load_recipe(RECIPES[name]).model
    assert m.num_params() == count_params(m) == count_params(m, padded=True) == EXACT[name]
    if name == "1.5b":
        assert abs(m.num_params() / 1.50e9 - 1) < 0.005
    if name == "8b":
        assert round(m.num_params() / 1e9, 2) == 8.03


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_follow_design_and_gaperon(name):
    r = load_recipe(RECIPES[name])
    m, lay, opt, t = r.model, r.layout, r.optimizer, r.train
    assert (m.hidden_size, m.num_layers, m.num_attention_heads, m.num_kv_heads, m.kv_channels,
            m.ffn_hidden_size) == DESIGN[name]
    assert (m.vocab_size, m.max_position_embeddings, m.rope_theta, m.norm_eps) == (128256, 4096, 5e5, 1e-5)
    assert (opt.lr, opt.betas, opt.eps, opt.weight_decay, opt.grad_clip) == (LR[name], (0.9, 0.95), 1e-8, 0.1, 1.0)
    assert (r.schedule.kind, r.schedule.warmup_steps) == ("wsd", 2000)
    assert (lay.global_batch, t.seq_len, t.precision) == (1024, 4096, "bf16-mixed")
    assert abs(t.steps * 1024 * 4096 / TOKENS[name] - 1) < 1e-3
    assert r.data.kind == "indexed" and r.data.blend


@pytest.mark.parametrize("name", RECIPES)
def test_shipped_layouts_fit_and_rank_first(name):
    r = load_recipe(RECIPES[name])
    hw = hw_for(r)
    plan = make_plan(r, hw)
    check_fits(plan)  # raises if not
    best = search(r, hw, top=1)[0]
    keys = ("tp", "pp", "vpp", "zero_stage", "recompute")
    assert {k: getattr(best.recipe.layout, k) for k in keys} == {k: getattr(r.layout, k) for k in keys}
    assert plan.time.tokens_per_s == pytest.approx(best.time.tokens_per_s, rel=0.005)


@pytest.mark.parametrize("precision", BYTES_PER_PARAM)
@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_zero_partitions_the_byte_table(precision, zero):
    base = load_recipe(ROOT / "recipes/tiny.yaml", [f"train.precision={precision}", "layout.zero_stage=1"])
    if precision == "bf16-mixed" and zero == 0:
        with pytest.raises(RecipeError, match="bf16-mixed needs layout.zero_stage >= 1"):
            with_layout(base, dp=8, global_batch=16, zero_stage=zero)
        return
    r = with_layout(base, dp=8, global_batch=16, zero_stage=zero)
    n = count_params(r.model, padded=True)
    mem = estimate_memory(r)
    table = dict(BYTES_PER_PARAM[precision])
    if zero == 0:
        table["master_weights"] = 0  # no DeepSpeed wrapper: AdamW updates the weights in place
    expect = {"optimizer_states": zero >= 1, "master_weights": zero >= 1, "gradients": zero >= 2}
    for key, partitioned in expect.items():
        assert mem[key] == n * table[key] // (8 if partitioned else 1), key
    if zero < 3:
        assert mem["weights"] == n * table["weights"]
    else:  # a 1/8 shard plus two gathered layers (current + prefetch)
        assert mem["weights"] == n * table["weights"] // 8 + 2 * sum(layer_params(r.model)) * table["weights"]


def test_activation_model_properties():
    r = load_recipe(RECIPES["8b"])
    L = r.model.num_layers
    sp = with_layout(r, tp=4, dp=16, sequence_parallel=True)
    no_sp = with_layout(r, tp=4, dp=16, sequence_parallel=False)
    assert layer_activation_bytes(sp) < layer_activation_bytes(no_sp) < layer_activation_bytes(r)
    assert layer_activation_bytes(r, "full") * 20 < layer_activation_bytes(r, "none")
    # 1F1B: stage 0 holds pp micro batches of L/pp layers = L; the last stage one micro batch.
    p4 = with_layout(r, pp=4, dp=16)
    assert inflight_layers(p4, 0) == L and inflight_layers(p4, 3) == L // 4
    # Interleaved: L * (1 + (pp-1)/(pp*vpp)) layers on stage 0 (Korthikanti sec. 4.2.3).
    v2 = with_layout(r, pp=4, vpp=2, dp=16)
    assert inflight_layers(v2, 0) == L * (1 + 3 / 8)
    # Logits live on the last stage only.
    assert activation_bytes(p4, 3) - inflight_layers(p4, 3) * layer_activation_bytes(p4) > 2 * GiB


def test_flops_and_bubble():
    r = load_recipe(RECIPES["8b"])
    m = r.model
    assert flops_per_token(r) == 6 * matmul_params(m) + 12 * 32 * 32 * 128 * 4096
    assert matmul_params(m) == EXACT["8b"] - m.vocab_size * m.hidden_size - 65 * m.hidden_size
    p = make_plan(with_layout(r, pp=4, vpp=2, dp=16), Hardware(gpus=64))
    assert p.time.bubble == pytest.approx(3 / (2 * 64))  # (pp-1)/(vpp*m), m = 1024/16


def test_refuses_layout_that_does_not_fit():
    r = load_recipe(RECIPES["8b"], ["layout.dp=1"])
    plan = make_plan(r, Hardware(gpus=1, gpu_memory=80 * GiB))
    assert not plan.fits
    with pytest.raises(PlanError, match="does not fit.*recompute"):
        check_fits(plan)


def test_refuses_gpu_count_mismatch():
    r = load_recipe(RECIPES["8b"])
    with pytest.raises(PlanError, match="layout.dp=4"):
        make_plan(r, Hardware(gpus=4))


def test_search_returns_none_when_nothing_fits():
    r = load_recipe(RECIPES["24b"])
    assert search(r, Hardware(gpus=4, gpu_memory=80 * GiB)) == []


def test_search_results_fit_and_are_ranked():
    plans = search(load_recipe(RECIPES["8b"]), Hardware(gpus=64))
    assert len(plans) == 10
    assert all(p.fits and p.recipe.layout.world_size == 64 for p in plans)
    speeds = [p.time.tokens_per_s for p in plans]
    assert speeds == sorted(speeds, reverse=True)


def test_cli():
    def run(*args):
        return subprocess.run([sys.executable, str(ROOT / "tools/plan.py"), *args],
                              capture_output=True, text=True, cwd=ROOT)
    ok = run("recipes/8b.yaml", "--gpus", "64", "--gpu-memory", "80GiB")
    assert ok.returncode == 0 and "FITS" in ok.stdout and "8.030B" in ok.stdout
    oom = run("recipes/8b.yaml", "layout.dp=1", "--gpus", "1")
    assert oom.returncode == 1 and "does not fit" in oom.stderr
    none = run("recipes/24b.yaml", "--gpus", "4", "--search")
    assert none.returncode == 1 and "no layout" in none.stderr


# ----------------------------------------------------------------------------- built models (torch)

@pytest.fixture(scope="module")
def mcore():
    """A one-rank gloo world with Megatron's parallel state, as tools use on CPU."""
    torch = pytest.importorskip("torch")
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_ext.device import setup_device

    if setup_device(0).type != "cpu":
        pytest.skip("CPU measurement tests: run with GAPERON_DEVICE=cpu")
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1)
    yield torch
    ps.destroy_model_parallel()
    if created:
        dist.destroy_process_group()


def _build(recipe, init=True, monkeypatch=None):
    import megatron_ext.model as model_mod

    if not init:  # counting shapes only: skip drawing billions of random numbers
        monkeypatch.setattr(model_mod, "init_weights", lambda *a, **k: None)
    return model_mod.build_model(recipe, on_gpu=False)


def _numel(chunks) -> int:
    return sum(p.numel() for c in chunks for p in c.parameters())


SINGLE = ["layout.tp=1", "layout.pp=1", "layout.vpp=1", "layout.dp=1", "layout.sequence_parallel=false"]


@pytest.mark.parametrize("name,extra", [("1.5b", []), ("8b", []), ("24b", []),
                                        ("24b", ["model.qk_layernorm=true"]), ("24b", ["model.block=olmo2"])])
def test_built_model_param_count(mcore, monkeypatch, name, extra):
    """Build 1- and 2-layer versions (uninitialised, so nothing is touched: fast, no RAM) and
    extrapolate the exact full-depth count: c(L) = c(1) + (L - 1) * (c(2) - c(1))."""
    full = load_recipe(RECIPES[name], SINGLE + extra).model
    counts = {}
    for layers in (1, 2):
        r = load_recipe(RECIPES[name], SINGLE + extra + [f"model.num_layers={layers}"])
        counts[layers] = _numel(_build(r, init=False, monkeypatch=monkeypatch))
        assert counts[layers] == count_params(r.model, padded=True) == r.model.num_params()
    built = counts[1] + (full.num_layers - 1) * (counts[2] - counts[1])
    assert built == count_params(full, padded=True) == full.num_params()
    qk_norm_gains = {"model.qk_layernorm=true": 2 * 128, "model.block=olmo2": (32 + 8) * 128}  # per layer
    assert built == EXACT[name] + full.num_layers * sum(qk_norm_gains[x] for x in extra)


@pytest.mark.parametrize("tp,pp", [(1, 2), (2, 1), (4, 2), (8, 1)])
def test_per_gpu_params_match_built_model_shards(mcore, monkeypatch, tp, pp):
    """Per-GPU counts of the planner == the built model's tensors split by the project's own
    TP sharding map (megatron_ext.sharding) and by pipeline stage."""
    from megatron_ext.model import canonical_names
    from megatron_ext.sharding import split_dim

    r = load_recipe(RECIPES["1.5b"], SINGLE + ["model.num_layers=2"])
    (chunk,) = _build(r, init=False, monkeypatch=monkeypatch)
    per_stage = [0] * pp
    for name, p in chunk.named_parameters():
        canon = canonical_names(chunk)[name]
        if canon.startswith("embedding"):
            stage = 0
        elif canon.startswith("decoder.layers."):
            stage = int(canon.split(".")[2]) // (2 // pp)
        else:  # final_layernorm, output_layer
            stage = pp - 1
        per_stage[stage] += p.numel() // tp if split_dim(canon) is not None else p.numel()
    laid_out = with_layout(r, tp=tp, pp=pp, dp=1)
    assert [stage_params(laid_out, s) for s in range(pp)] == per_stage


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one buffer count once)."""
    seen = {}
    for t in tensors:
        if t is not None:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _tensors_in(obj, depth=0):
    """Tensors (and their .grad) reachable through lists, tuples and dicts."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
        yield obj.grad
    elif depth < 6 and isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_in(v, depth + 1)
    elif depth < 6 and isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors_in(v, depth + 1)


def _batch(torch, recipe):
    b, s = recipe.layout.micro_batch, recipe.train.seq_len
    ids = torch.randint(0, recipe.model.vocab_size, (b, s))
    return ids, torch.arange(s).expand(b, s)


def _model_states(mem: dict) -> int:
    return sum(mem[k] for k in STATE_KEYS)


def test_model_state_memory_fp32_adamw(mcore):
    """fp32 + torch AdamW after a step and a second backward (weights, grads and both Adam
    moments alive at once): the 4 + 4 + 8 bytes/param estimate is exact to a few scalars."""
    torch = mcore
    r = load_recipe(ROOT / "recipes/tiny.yaml", ["train.precision=fp32"])
    (model,) = _build(r)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids, pos = _batch(torch, r)
    for _ in range(2):
        model(ids, pos, None, labels=ids).mean().backward()
        if not opt.state:
            opt.step()
    params = list(model.parameters())
    measured = _storage_bytes([*params, *(p.grad for p in params), *_tensors_in(opt.state)])
    estimated = _model_states(estimate_memory(r))
    assert abs(measured / estimated - 1) < 0.05, (measured, estimated)


def test_model_state_memory_bf16_mixed_deepspeed(mcore, monkeypatch):
    """bf16-mixed under real DeepSpeed ZeRO-1 (dp=1): bf16 weights and grads, fp32 master and
    Adam states, 2 + 2 + 4 + 8 bytes/param; DeepSpeed's own buffers and padding are the rest."""
    torch = mcore
    deepspeed = pytest.importorskip("deepspeed")
    monkeypatch.setenv("LOCAL_RANK", "0")
    r = load_recipe(ROOT / "recipes/tiny.yaml", ["train.precision=bf16-mixed", "layout.zero_stage=1"])
    (model,) = _build(r)
    engine, opt, _, _ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
        config={"train_micro_batch_size_per_gpu": r.layout.micro_batch, "gradient_accumulation_steps": 1,
                "bf16": {"enabled": True}, "zero_optimization": {"stage": 1},
                "zero_allow_untested_optimizer": True})
    ids, pos = _batch(torch, r)
    engine.backward(engine(ids, pos, None, labels=ids).float().mean())
    engine.step()
    engine.backward(engine(ids, pos, None, labels=ids).float().mean())  # grads + states alive
    measured = _storage_bytes([*_tensors_in(list(model.parameters())), *_tensors_in(vars(opt)),
                               *_tensors_in(opt.optimizer.state)])
    estimated = _model_states(estimate_memory(r))
    assert abs(measured / estimated - 1) < 0.2, (measured, estimated)


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
@pytest.mark.parametrize("recompute,block", [("none", "llama"), ("selective", "llama"), ("full", "llama"),
                                             ("none", "olmo2")])
def test_activation_estimate_matches_saved_tensors(mcore, precision, recompute, block):
    """The local-spec (SDPA) formula against every tensor autograd saves in one forward (OLMo-2
    blocks too: post-sublayer norms and the whole-projection QK-norm)."""
    torch = mcore
    r = load_recipe(ROOT / "recipes/tiny.yaml", [
        f"train.precision={precision}", f"layout.recompute={recompute}", "train.attention=sdpa", "layout.zero_stage=1",
        "model.vocab_size=128", "train.seq_len=128", "model.max_position_embeddings=128", f"model.block={block}"])
    (model,) = _build(r)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved.append(t)
        return t

    ids, pos = _batch(torch, r)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, pos, None, labels=ids)
    measured, estimated = _storage_bytes(saved), activation_bytes(r, 0, transient=False)
    assert abs(measured / estimated - 1) < 0.10, (measured, estimated)


def test_estimate_memory_for_the_backend_built():
    r = load_recipe(RECIPES["8b"])
    te, sdpa = estimate_memory(r), estimate_memory(r, attention="sdpa")
    assert set(te) == {*STATE_KEYS, "activations", "overhead", "total"}
    assert te["total"] == sum(v for k, v in te.items() if k != "total")
    assert sdpa["activations"] > te["activations"] and sdpa["weights"] == te["weights"]
    assert estimate_memory(r, attention="te") == te


@pytest.mark.parametrize("zero", [0, 1])
def test_model_state_memory_bf16_pure_deepspeed(mcore, monkeypatch, zero):
    """bf16-pure under our own DeepSpeed config: every model state is bf16 (asserted), and the
    bytes match the planner (ZeRO-0: 2 + 2 + 0 + 4 per param; ZeRO-1: DeepSpeed's bf16 copy of the
    partition adds 2)."""
    torch = mcore
    deepspeed = pytest.importorskip("deepspeed")
    from megatron_ext.engine import deepspeed_config

    monkeypatch.setenv("LOCAL_RANK", "0")
    r = load_recipe(ROOT / "recipes/tiny.yaml", ["train.precision=bf16-pure", f"layout.zero_stage={zero}"])
    (model,) = _build(r)
    config = {**deepspeed_config(r, on_gpu=False), "gradient_accumulation_steps": 1,
              "managed_gradient_accumulation": True}
    engine, opt, _, _ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3), config=config)
    ids, pos = _batch(torch, r)
    for _ in range(2):
        engine.backward(engine(ids, pos, None, labels=ids).float().mean())
        if not getattr(opt, "optimizer", opt).state:
            engine.step()
    base = getattr(opt, "optimizer", opt)
    states = list(_tensors_in(base.state))
    assert {t.dtype for t in model.parameters()} == {torch.bfloat16}
    assert {t.dtype for t in states if t is not None and t.ndim} == {torch.bfloat16}
    measured = _storage_bytes([*_tensors_in(list(model.parameters())), *_tensors_in(vars(opt)), *states])
    estimated = _model_states(estimate_memory(r))
    assert abs(measured / estimated - 1) < 0.2, (measured, estimated)


def test_olmo2_24b_planned_with_its_norms():
    """recipes/24b.yaml's Gaperon-faithful option (model.block=olmo2): its extra gains are counted
    (TP-split like the heads), its norms are never TE-fused, and the shipped layout still fits."""
    llama, olmo2 = load_recipe(RECIPES["24b"]), load_recipe(RECIPES["24b"], ["model.block=olmo2"])
    assert count_params(olmo2.model) - count_params(llama.model) == 40 * (32 + 8) * 128
    assert stage_params(olmo2, 0) - stage_params(llama, 0) == 20 * (32 + 8) * 128 // 2
    assert layer_activation_bytes(olmo2) > layer_activation_bytes(llama)
    assert make_plan(olmo2, hw_for(olmo2)).fits
