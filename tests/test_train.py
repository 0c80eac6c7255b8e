"""End-to-end training on CPU: the loss falls on the learnable task, bf16-mixed runs, logs land,
the step line says where the run is, and the start-up is free of the known library noise."""
from __future__ import annotations

import re

from conftest import TINY, cpu_env, launch, read_metrics

from megatron_ext import quiet


def test_loss_decreases_and_logs(tmp_path):
    proc = launch(1, [str(TINY), "train.steps=30", "train.precision=fp32", "train.eval_interval=15",
                      f"train.output_dir={tmp_path}"])
    rows = read_metrics(tmp_path, "tokens_seen")
    assert rows == [i * 8 * 64 for i in range(1, 31)]  # global batch 8, seq 64
    eta = read_metrics(tmp_path, "eta_s")
    assert eta[-1] == 0 and all(e > 0 for e in eta[:-1]), eta
    assert re.search(r"^step 15/30 \| loss .* \| tokens 7680 \| elapsed 0:00:\d\d \| eta 0:\d\d:\d\d$",
                     proc.stdout, re.M), proc.stdout
    assert re.search(r"^step 15/30 \| valid_loss \S+ \| valid_s ", proc.stdout, re.M)
    loss = read_metrics(tmp_path, "loss")
    assert len(loss) == 30
    assert sum(loss[-5:]) / 5 < loss[0] - 0.8, loss
    valid = read_metrics(tmp_path, "valid_loss")
    assert len(valid) == 2 and valid[1] < valid[0]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "recipe.yaml").is_file()


def _known_noise(text: str) -> list[str]:
    patterns = [p for _, p in quiet.KNOWN_WARNINGS] + list(quiet.KNOWN_LOG_LINES)
    return [line for line in text.splitlines() if any(re.search(p, line) for p in patterns)]


def test_bf16_mixed_runs_with_zero1_quietly(tmp_path):
    proc = launch(2, [str(TINY), "train.steps=8", "train.precision=bf16-mixed", "layout.dp=2", "layout.zero_stage=1",
                      "train.tensorboard=false", f"train.output_dir={tmp_path}"])
    loss = read_metrics(tmp_path, "loss")
    assert len(loss) == 8 and loss[-1] < loss[0]
    assert all(n is not None and n > 0 for n in read_metrics(tmp_path, "grad_norm"))
    assert _known_noise(proc.stdout + proc.stderr) == []
    assert "Warning" not in proc.stderr, proc.stderr  # nothing else warned either

    # GAPERON_VERBOSE=1 shows everything again, on every rank.
    proc = launch(2, [str(TINY), "train.steps=2", "layout.dp=2", "layout.zero_stage=1", "train.tensorboard=false",
                      f"train.output_dir={tmp_path / 'verbose'}"], env=cpu_env(GAPERON_VERBOSE=1))
    noise = _known_noise(proc.stdout + proc.stderr)
    assert len(noise) >= 2 * 5, noise  # each rank: Apex/TE fallbacks, deprecations, DeepSpeed's CPU notices
    assert any("Setting accelerator to CPU" in line for line in noise)
    assert any("built successfully" in line for line in noise)
