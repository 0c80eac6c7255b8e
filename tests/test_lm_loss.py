"""The chunked output layer + cross entropy (megatron_ext/lm_loss.py) trains exactly as Megatron's
path: same losses and grad norms at fp32 under tensor parallelism with sequence parallelism and
under pipelining (chunks that do not divide the tokens), and the LM-head probe still works."""
from __future__ import annotations

import pytest
from conftest import TINY, launch, layout_overrides, per_step

from megatron_ext.config import RecipeError, load_recipe

STEPS = ["train.steps=4", "train.precision=fp32", "train.tensorboard=false", "checkpoint.save_at_end=false"]


def _run(tmp_path, name, nproc, *overrides):
    out = tmp_path / name
    launch(nproc, [str(TINY), *STEPS, *overrides, f"train.output_dir={out}"])
    return per_step(out, "loss"), per_step(out, "grad_norm"), out


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def test_chunked_loss_matches_megatron_path(tmp_path):
    ref_loss, ref_norm, _ = _run(tmp_path, "plain", 1)
    runs = {
        "tp2-sp": _run(tmp_path, "tp2", 2, *layout_overrides(tp=2, layout__sequence_parallel="true"),
                       "train.loss_chunk_tokens=48", "train.lm_head_grad_interval=2"),
        "pp2": _run(tmp_path, "pp2", 2, *layout_overrides(pp=2, zero=1), "train.loss_chunk_tokens=100"),
    }
    for name, (loss, norm, _) in runs.items():
        assert sorted(loss) == [1, 2, 3, 4]
        for step in loss:
            assert _rel(loss[step], ref_loss[step]) <= 1e-5, (name, step, loss[step], ref_loss[step])
            assert _rel(norm[step], ref_norm[step]) <= 1e-5, (name, step, norm[step], ref_norm[step])
    probe = per_step(runs["tp2-sp"][2], "lm_head_logits_grad_norm")
    assert sorted(probe) == [2, 4] and all(v > 0 for v in probe.values())


def test_chunked_loss_refused_with_zero3():
    with pytest.raises(RecipeError, match="loss_chunk_tokens needs layout.zero_stage <= 2"):
        load_recipe(TINY, ["train.loss_chunk_tokens=64", "layout.zero_stage=3"])
