"""Recipes: every invalid combination fails at load time with its own message; overrides and
``base:`` inheritance work; the LR schedules have the shapes they promise."""
from __future__ import annotations

import pytest

from conftest import TINY, launch
from megatron_ext.config import Recipe, RecipeError, load_recipe
from megatron_ext.schedule import lr_at

INVALID = {
    "heads not divisible by tp": (["layout.tp=3"], "num_attention_heads=4 is not divisible by layout.tp=3"),
    "kv heads not divisible by tp": (["model.num_attention_heads=8", "layout.tp=4"],
                                     "num_kv_heads=2 is not divisible by layout.tp=4"),
    "layers not divisible by pp": (["layout.pp=3"], "num_layers=4 is not divisible by layout.pp x layout.vpp = 3 x 1"),
    "layers not divisible by pp x vpp": (["layout.pp=2", "layout.vpp=4"],
                                         "num_layers=4 is not divisible by layout.pp x layout.vpp = 2 x 4"),
    "global batch vs micro x dp": (["layout.dp=3"], "global_batch=8 is not divisible by layout.micro_batch x layout.dp = 2 x 3"),
    "zero2 with pp": (["layout.pp=2", "layout.zero_stage=2"], "zero_stage=2 cannot be combined with layout.pp=2"),
    "zero3 with pp": (["layout.pp=2", "layout.zero_stage=3"], "zero_stage=3 cannot be combined with layout.pp=2"),
    "sequence parallel with tp 1": (["layout.sequence_parallel=true"], "sequence_parallel=true needs layout.tp > 1"),
    "unknown key": (["layout.tensor_parallel=2"], "unknown key 'layout.tensor_parallel'"),
    "unknown section": (["trainer.steps=3"], "unknown key 'trainer'"),
    "bad precision": (["train.precision=fp16"], "train.precision"),
    "bf16-mixed at zero 0": (["train.precision=bf16-mixed"], "bf16-mixed needs layout.zero_stage >= 1"),
    "bad attention kernel": (["train.attention=flash3"], "train.attention"),
    "bad norm gain scale": (["train.norm_gain_scale=0"], "norm_gain_scale=0.0 must be > 0"),
    "vpp without pp": (["layout.vpp=2"], "layout.vpp > 1 needs layout.pp > 1"),
    "seq longer than positions": (["train.seq_len=512"], "exceeds model.max_position_embeddings=256"),
}


@pytest.mark.parametrize("case", INVALID)
def test_invalid_recipe_has_one_clear_message(case):
    overrides, message = INVALID[case]
    with pytest.raises(RecipeError) as err:
        load_recipe(TINY, overrides)
    assert message in str(err.value)


def test_cli_rejects_bad_recipe_before_launching(tmp_path):
    proc = launch(1, [str(TINY), "layout.tp=3", f"train.output_dir={tmp_path}"], check=False)
    assert proc.returncode != 0
    assert "not divisible by layout.tp=3" in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_wrong_process_count_names_the_fix(tmp_path):
    proc = launch(2, [str(TINY), f"train.output_dir={tmp_path}"], check=False)
    assert "launched 2 processes but the recipe's layout needs tp x pp x dp = 1 x 1 x 1 = 1" in proc.stderr
    assert "layout.dp=2" in proc.stderr


def test_overrides_and_base_inheritance(tmp_path):
    child = tmp_path / "phase.yaml"
    child.write_text(f"base: {TINY}\noptimizer: {{lr: 1.0e-4, min_lr: 1.0e-5}}\n")
    r = load_recipe(child, ["train.steps=7", "optimizer.betas=[0.9, 0.99]"])
    assert isinstance(r, Recipe)
    assert r.optimizer.lr == 1e-4 and r.train.steps == 7 and r.optimizer.betas == (0.9, 0.99)
    assert r.model.hidden_size == 64  # inherited


def test_schedules():
    cos = load_recipe(TINY, ["train.steps=100", "schedule.warmup_steps=10", "optimizer.lr=1.0", "optimizer.min_lr=0.1"])
    assert lr_at(0, cos) == pytest.approx(0.1) and lr_at(9, cos) == pytest.approx(1.0)
    assert lr_at(99, cos) == pytest.approx(0.1, abs=1e-3)
    assert all(lr_at(s, cos) >= lr_at(s + 1, cos) for s in range(10, 99))
    wsd = load_recipe(TINY, ["train.steps=100", "schedule.kind=wsd", "schedule.warmup_steps=10",
                             "schedule.decay_steps=20", "optimizer.lr=1.0", "optimizer.min_lr=0.0"])
    assert [lr_at(s, wsd) for s in (10, 50, 79)] == [1.0, 1.0, 1.0]
    assert lr_at(89, wsd) == pytest.approx(0.5) and lr_at(99, wsd) == pytest.approx(0.0)

