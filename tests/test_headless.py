"""Headless pretraining (model.head=none, train.objective=cwt; megatron_ext/cwt_loss.py): the loss
is gapetron's cwt_loss on the model's own hidden states (checked against a plain-torch
implementation of the formula), and every layout trains the same model to the same losses and
gradient norms as one process."""
from __future__ import annotations

import json
import sys

import pytest

from conftest import PARITY_COMMON, PARITY_STEPS, ROOT, TINY, launch, layout_overrides, read_metrics

HEADLESS = ["model.head=none", "train.objective=cwt"]
WORKER = ROOT / "tests" / "cwt_worker.py"


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def test_loss_is_the_formula_on_the_models_hidden_states(tmp_path):
    """One process builds tiny headless (fp32), runs a micro batch with padding, captures the
    final hidden states and the input embedding, and reports the model's per-token losses; the
    formula is recomputed here with plain torch (gapetron: every target of the micro batch is a
    negative, the positive and its duplicates included; masked positions are neither)."""
    import torch

    launch(1, [str(WORKER), str(TINY), str(tmp_path)])
    got = torch.load(tmp_path / "cwt.pt")
    for temperature, case in got.items():
        h, emb, labels, mask, losses = case["hidden"], case["embedding"], case["labels"], case["mask"], case["losses"]
        hb = h.transpose(0, 1).double()  # [b, s, H]
        keep = mask.bool()
        x, t = hb[keep], labels[keep]  # real positions only
        e = emb.double()[t]  # positives, and (all of them) the negatives
        scores = x @ e.t() / temperature
        positive = (x * e).sum(-1) / temperature
        ratio = torch.cat([torch.zeros(len(x), 1, dtype=x.dtype), scores - positive[:, None]], 1)
        expected = torch.logsumexp(ratio, -1)
        assert torch.allclose(losses[keep].double(), expected, rtol=1e-5, atol=1e-6), temperature
        assert (losses[~keep] == 0).all()
        # duplicates of a target count as negatives: the micro batch repeats token ids
        assert len(set(t.tolist())) < len(t)


# ---- parity: one launch per layout, losses and grad norms against one process ----------------
LAYOUTS = [  # (tp, pp, dp, zero, sequence_parallel)
    (2, 1, 1, 0, False),
    (1, 2, 1, 0, False),
    (1, 1, 2, 1, False),
    (2, 2, 1, 1, True),
]


@pytest.fixture(scope="module")
def headless_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("headless-ref") / "run"
    launch(1, [str(TINY), *PARITY_COMMON, *HEADLESS, *layout_overrides(), f"train.output_dir={out}"])
    return out


@pytest.mark.parametrize("tp,pp,dp,zero,sp", LAYOUTS, ids=lambda v: str(v))
def test_headless_layout_matches_single_process(headless_reference, tmp_path, tp, pp, dp, zero, sp):
    ref_loss, ref_norm = read_metrics(headless_reference, "loss"), read_metrics(headless_reference, "grad_norm")
    out = tmp_path / "run"
    launch(tp * pp * dp, [str(TINY), *PARITY_COMMON, *HEADLESS, *layout_overrides(tp, pp, dp, zero),
                          f"layout.sequence_parallel={str(sp).lower()}", f"train.output_dir={out}"])
    loss, norm = read_metrics(out, "loss"), read_metrics(out, "grad_norm")
    assert len(loss) == len(norm) == PARITY_STEPS == len(ref_loss)
    assert loss[-1] < loss[0]
    for step, (a, b, c, d) in enumerate(zip(loss, ref_loss, norm, ref_norm), 1):
        assert _rel(a, b) <= 1e-5 and _rel(c, d) <= 1e-5, f"step {step}: loss {a} vs {b}, grad norm {c} vs {d}"
    print(f"\nparity {(tp, pp, dp, zero, sp)}: max rel loss "
          f"{max(_rel(a, b) for a, b in zip(loss, ref_loss)):.2e}, grad norm "
          f"{max(_rel(a, b) for a, b in zip(norm, ref_norm)):.2e}")


# ---- recipe keys and the planner -------------------------------------------------------------
@pytest.mark.parametrize("overrides,needle", [
    (["train.objective=cwt"], "set model.head=none"),
    (["model.head=none"], "set train.objective=cwt"),
    (["model.head=none", "train.objective=cwt", "train.cwt_temperature=0"], "train.cwt_temperature=0"),
    (["model.head=none", "train.objective=cwt", "train.loss_chunk_tokens=64"], "train.loss_chunk_tokens=0"),
    (["checkpoint.init_head=from_embeddings"], "set checkpoint.init_from"),
    (["checkpoint.init_mode=cooldown", "checkpoint.init_from=/x"], "set schedule.kind=wsd"),
    (["checkpoint.init_mode=transfer"], "checkpoint.init_mode"),
])
def test_bad_headless_recipes_are_one_line(overrides, needle):
    from megatron_ext.config import RecipeError, load_recipe

    with pytest.raises(RecipeError) as err:
        load_recipe(TINY, overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_planner_counts_both_objectives():
    """1.5B at seq 4096: headless holds no output layer and no [tokens, vocab] logits, but a
    [tokens, tokens of the micro batch] similarity matrix; its FLOPs replace 6*V*h by 6*T*h."""
    from megatron_ext.config import load_recipe
    from megatron_ext.plan import count_params, estimate_memory, flops_per_token, last_stage_bytes

    path = ROOT / "recipes" / "1.5b.yaml"
    lm, hl = load_recipe(path), load_recipe(path, HEADLESS)
    m, t, lay = lm.model, lm.train, lm.layout
    assert count_params(lm.model) - count_params(hl.model) == m.vocab_size * m.hidden_size
    assert hl.model.num_params() == count_params(hl.model)
    tokens = lay.micro_batch * t.seq_len
    assert last_stage_bytes(lm) >= tokens * m.padded_vocab_size * 4  # the fp32 softmax at least
    assert tokens * tokens * 4 <= last_stage_bytes(hl) < last_stage_bytes(lm) / 4
    mem_lm, mem_hl = estimate_memory(lm), estimate_memory(hl)
    assert mem_hl["total"] < mem_lm["total"] and mem_hl["weights"] < mem_lm["weights"]
    assert flops_per_token(lm) - flops_per_token(hl) == pytest.approx(
        6 * m.vocab_size * m.hidden_size - 6 * tokens * m.hidden_size)
    # pp > 1: the last stage holds a copy of the embedding (weights + gradient, no Adam state)
    lm_pp, hl_pp = (load_recipe(path, extra + ["layout.pp=2", "layout.dp=4"]) for extra in ([], HEADLESS))
    last = estimate_memory(hl_pp, pp_rank=1)
    assert last["optimizer_states"] < estimate_memory(lm_pp, pp_rank=1)["optimizer_states"]


# ---- load modes: one parent (the parity reference, headless, step 10), one child per mode -------
def _child(parent, out, mode: str, *extra: str, nproc: int = 1):
    """A child run from ``parent`` that first saves what its start loaded (faults.save_at_start),
    under another train.seed (so that fresh RNG streams differ from the parent's)."""
    from conftest import cpu_env

    args = [str(TINY), *PARITY_COMMON, *HEADLESS, "train.seed=77", f"checkpoint.init_from={parent}",
            f"checkpoint.init_mode={mode}", f"train.output_dir={out}", *extra]
    launch(nproc, args, env=cpu_env(GAPERON_FAULT="save_at_start:0"))
    return args[1:]


CHILDREN = {  # mode: (overrides, nproc); step-keeping modes count train.steps from the parent's start
    "model": (["train.steps=2"], 1),
    "model+data": (["train.steps=2"], 1),
    "model+optimizer": (["train.steps=2", "layout.tp=2"], 2),  # and a layout change
    "model+optimizer+data": (["train.steps=2"], 1),
    "model+optimizer+lr": (["train.steps=11"], 1),
    "cooldown": (["train.steps=12", "schedule.kind=wsd", "schedule.decay_steps=2"], 1),
    "continue": (["train.steps=11"], 1),
}


def _start_checkpoint(out):
    from megatron_ext.checkpoint import CheckpointReader

    first = sorted((out / "checkpoints").glob("step_*"))[0]
    return CheckpointReader(first)


@pytest.mark.parametrize("mode", list(CHILDREN))
def test_load_mode_keeps_exactly_what_it_says(headless_reference, tmp_path, mode):
    """What the child's start holds against the parent's last checkpoint: step, the next sample
    index, Adam moments (bitwise, every tensor) and the Adam step, RNG streams, and the LR of
    the child's first step."""
    import torch

    from megatron_ext.checkpoint import CheckpointReader, find
    from megatron_ext.config import KEEPS, load_recipe
    from megatron_ext.schedule import lr_at

    parent = CheckpointReader(find(headless_reference / "checkpoints").path)
    p_step, p_samples = parent.meta["step"], parent.meta["consumed_samples"]
    assert (p_step, p_samples) == (10, 80)
    extra, nproc = CHILDREN[mode]
    out = tmp_path / "child"
    args = _child(headless_reference, out, mode, *extra, nproc=nproc)
    keeps_opt, keeps_data, keeps_step, keeps_rng = KEEPS[mode]
    start = _start_checkpoint(out)
    m = start.meta
    assert m["step"] == (p_step if keeps_step else 0)
    assert m["consumed_samples"] == (p_samples if keeps_data else 0)
    assert m["adam_step"] == (parent.meta["adam_step"] if keeps_opt else 0)
    for name in parent.names():
        assert torch.equal(start.get(name), parent.get(name)), name  # weights: always kept
        for kind in ("exp_avg", "exp_avg_sq"):
            if keeps_opt:
                assert torch.equal(start.get(name, kind), parent.get(name, kind)), (name, kind)
            else:  # a fresh optimizer: no moments yet (none stored) or zeros
                assert not start.has(name, kind) or not start.get(name, kind).any(), (name, kind)
    rng = [torch.load(r / "rng" / "rank00000.pt", weights_only=True) for r in (parent.path, start.path)]
    trackers = [r["tracker"] for r in rng]  # Megatron's model-parallel streams, seeded from train.seed
    same = torch.equal(rng[0]["torch"], rng[1]["torch"]) and trackers[0].keys() == trackers[1].keys() and all(
        torch.equal(trackers[0][k], trackers[1][k]) for k in trackers[0])
    assert same == keeps_rng
    # the first new step: its LR is this recipe's schedule at the step the child starts from
    recipe = load_recipe(TINY, args)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if "lr" in r)
    assert first["step"] == m["step"] + 1
    assert first["lr"] == pytest.approx(lr_at(m["step"], recipe), rel=1e-12)
    expected = {"cooldown": 3e-3 + (3e-4 - 3e-3) / 2,  # the first of a 2-step linear decay from the stable LR
                "model": 1.5e-3, "model+data": 1.5e-3, "model+optimizer": 1.5e-3, "model+optimizer+data": 1.5e-3}
    if mode in expected:
        assert first["lr"] == pytest.approx(expected[mode], rel=1e-12)
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == recipe.train.steps


@pytest.mark.parametrize("overrides,needle", [
    (["checkpoint.init_mode=cooldown", "schedule.kind=wsd", "schedule.decay_steps=2", "train.steps=11"],
     "set train.steps=12"),
    (["checkpoint.init_mode=model+optimizer+lr", "train.steps=10"], "set train.steps > 10"),
    (["checkpoint.init_mode=continue", "train.steps=11", "optimizer.lr=1e-3"], "init_mode=cooldown"),
    (["model.head=lm", "train.objective=lm"], "checkpoint.init_head=from_embeddings"),
])
def test_load_mode_refusals_name_the_fix(headless_reference, tmp_path, overrides, needle):
    """Refused by rank 0 before the model is built: one line, exit 2."""
    from megatron_ext.checkpoint import CheckpointError, plan_start
    from megatron_ext.config import load_recipe

    recipe = load_recipe(TINY, [*PARITY_COMMON, *HEADLESS, f"checkpoint.init_from={headless_reference}",
                                f"train.output_dir={tmp_path}", *overrides])
    with pytest.raises(CheckpointError) as err:
        plan_start(recipe)
    assert needle in str(err.value) and "\n" not in str(err.value)


# ---- the hooldown: an LM head from the input embeddings, then a normal HF export ---------------
def test_hooldown_head_is_the_embedding_and_exports_with_the_trainers_loss(headless_reference, tmp_path, capsys):
    """cooldown + init_head=from_embeddings at tp=2 (a layout change): the new head is an exact
    copy of the parent's input embedding with zero Adam moments, every other tensor keeps its
    moments; to-hf refuses the headless parent in one line naming the hooldown, and exports the
    hooldown's checkpoint as a LlamaForCausalLM whose loss on the trainer's validation samples is
    the logged valid_loss."""
    import torch

    from megatron_ext import convert
    from megatron_ext.checkpoint import CheckpointReader, find
    from megatron_ext.config import load_recipe
    from megatron_ext.data import build_datasets, microbatches
    from megatron_ext.train import valid_batches

    parent_path = find(headless_reference / "checkpoints").path
    assert convert.main(["to-hf", str(parent_path), str(tmp_path / "refused"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error:") and "hooldown" in err and "init_head" in err, err

    out = tmp_path / "hooldown"
    args = _child(headless_reference, out, "cooldown", "model.head=lm", "train.objective=lm",
                  "checkpoint.init_head=from_embeddings", "schedule.kind=wsd", "schedule.decay_steps=2",
                  "train.steps=12", "train.eval_interval=2", "layout.tp=2", nproc=2)
    parent, start = CheckpointReader(parent_path), _start_checkpoint(out)
    emb = "embedding.word_embeddings.weight"
    assert torch.equal(start.get("output_layer.weight"), parent.get(emb))
    assert not start.get("output_layer.weight", "exp_avg").any()
    for name in parent.names():
        assert torch.equal(start.get(name, "exp_avg_sq"), parent.get(name, "exp_avg_sq")), name

    hf = tmp_path / "hf"
    assert convert.main(["to-hf", str(find(out / "checkpoints").path), str(hf), "--dtype", "fp32",
                         "--verify-layers", "0", "--no-progress", "--no-tokenizer"]) == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, local_files_only=True).eval()
    recipe = load_recipe(TINY, args)
    _, valid = build_datasets(recipe)
    total = count = 0.0
    with torch.no_grad():
        for i in range(valid_batches(valid, recipe)):
            for mb in microbatches(valid, i * recipe.layout.global_batch, recipe, 0):
                logits = model(mb["tokens"]).logits.double()
                ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), mb["labels"].flatten(), reduction="none")
                total += float((ce * mb["loss_mask"].flatten()).sum())
                count += float(mb["loss_mask"].sum())
    logged = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "valid_loss" in r]
    assert logged[-1]["step"] == 12
    assert _rel(total / count, logged[-1]["valid_loss"]) <= 1e-5, (total / count, logged[-1]["valid_loss"])


# ---- tools/submit.py --cooldown-from (dry run) -------------------------------------------------
def test_submit_cooldown_from_branches_a_wsd_run(tmp_path):
    """One cooldown job per listed step, each in its own output dir, starting from that step's
    checkpoint with init_mode=cooldown and train.steps = step + decay; a step already on disk is
    branched at once, the others wait (afterok) for the stable run, submitted first."""
    import subprocess

    from megatron_ext import slurm

    run = tmp_path / "stable"
    (run / "checkpoints" / "step_00000020").mkdir(parents=True)
    (run / "checkpoints" / "step_00000020" / "meta.json").write_text("{}")
    over = ["schedule.kind=wsd", "schedule.warmup_steps=2", "schedule.decay_steps=10", "train.steps=100",
            "checkpoint.interval=20", "checkpoint.keep_every=20", f"train.output_dir={run}"]
    profile = slurm.load_profile("local")
    jobs = slurm.plan_jobs(TINY, over, profile, cooldown_from=[20, 40, 60])
    stable, *branches = jobs
    assert stable.recipe.train.output_dir == str(run) and stable.after is None
    for job, step in zip(branches, (20, 40, 60)):
        r = job.recipe
        assert r.train.output_dir == f"{run}-cooldown{step}"
        assert r.checkpoint.init_from == str(run / "checkpoints" / f"step_{step:08d}")
        assert (r.checkpoint.init_mode, r.schedule.kind, r.schedule.decay_steps, r.train.steps) == (
            "cooldown", "wsd", 10, step + 10)
        assert job.after == (None if step == 20 else 0)
    # every checkpoint on disk: only the branches; --cooldown-steps sets their length
    jobs = slurm.plan_jobs(TINY, over, profile, cooldown_from=[20], cooldown_steps=5)
    assert len(jobs) == 1 and jobs[0].after is None and jobs[0].recipe.train.steps == 25
    # the CLI, dry run: three cooldown scripts, the two later ones after the stable run
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "submit.py"), str(TINY), *over, "--cluster", "local",
                           "--cooldown-from", "20,40,60", "--dry-run"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("# ---- job") == 4 and proc.stdout.count("afterok:<id of stable>") == 2
    assert proc.stdout.count("cooldown of ") == 3
    # refusals: one line, exit 2
    for extra, needle in ((["--cooldown-from", "30"], "would not keep step 30"),
                          (["--cooldown-from", "95"], "stable phase, 1..90"),
                          (["--cooldown-from", "x"], "positive integers"),
                          (["--cooldown-from", "20", "schedule.kind=cosine"], "branches a WSD run")):
        proc = subprocess.run([sys.executable, str(ROOT / "tools" / "submit.py"), str(TINY), *over, "--cluster",
                               "local", "--dry-run", *extra], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and needle in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
