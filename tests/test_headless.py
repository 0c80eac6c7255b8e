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
