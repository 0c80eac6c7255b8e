"""End-to-end training on CPU: the loss falls on the learnable task, bf16-mixed runs, logs land."""
from __future__ import annotations

from conftest import TINY, launch, read_metrics


def test_loss_decreases_and_logs(tmp_path):
    launch(1, [str(TINY), "train.steps=30", "train.precision=fp32", "train.eval_interval=15",
               f"train.output_dir={tmp_path}"])
    loss = read_metrics(tmp_path, "loss")
    assert len(loss) == 30
    assert sum(loss[-5:]) / 5 < loss[0] - 0.8, loss
    valid = read_metrics(tmp_path, "valid_loss")
    assert len(valid) == 2 and valid[1] < valid[0]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "recipe.yaml").is_file()


def test_bf16_mixed_runs_with_zero1(tmp_path):
    launch(2, [str(TINY), "train.steps=8", "train.precision=bf16-mixed", "layout.dp=2", "layout.zero_stage=1",
               "train.tensorboard=false", f"train.output_dir={tmp_path}"])
    loss = read_metrics(tmp_path, "loss")
    assert len(loss) == 8 and loss[-1] < loss[0]
    assert all(n is not None and n > 0 for n in read_metrics(tmp_path, "grad_norm"))
