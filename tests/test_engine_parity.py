"""Parity matrix: every (tp, pp, dp, zero) layout trains the same model to the same losses and grad
norms as one process, step by step (fp32, relative difference <= 1e-4)."""
from __future__ import annotations

import pytest

from conftest import PARITY_COMMON as COMMON, PARITY_STEPS as STEPS, TINY, launch, layout_overrides, read_metrics

LAYOUTS = [  # (tp, pp, dp, zero, vpp)
    (2, 1, 1, 0, 1),
    (1, 2, 1, 0, 1),
    (1, 1, 2, 1, 1),
    (1, 1, 2, 2, 1),
    (1, 1, 2, 3, 1),
    (2, 2, 1, 1, 1),
    (2, 1, 2, 1, 1),
    (1, 2, 2, 1, 1),
    (2, 1, 2, 2, 1),
    (1, 2, 1, 0, 2),  # interleaved: 2 virtual stages of 1 layer per rank
    (1, 2, 2, 1, 2),
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    launch(1, [str(TINY), *COMMON, *layout_overrides(), f"train.output_dir={out}"])
    return read_metrics(out, "loss"), read_metrics(out, "grad_norm")


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.parametrize("tp,pp,dp,zero,vpp", LAYOUTS, ids=lambda v: str(v))
def test_layout_matches_single_process(reference, tmp_path, tp, pp, dp, zero, vpp):
    ref_loss, ref_norm = reference
    launch(tp * pp * dp, [str(TINY), *COMMON, *layout_overrides(tp, pp, dp, zero, vpp),
                          f"train.output_dir={tmp_path}"])
    loss, norm = read_metrics(tmp_path, "loss"), read_metrics(tmp_path, "grad_norm")
    assert len(loss) == STEPS == len(ref_loss)
    for step, (a, b) in enumerate(zip(loss, ref_loss), 1):
        assert _rel(a, b) <= 1e-4, f"step {step}: loss {a} vs single-process {b}"
    for step, (a, b) in enumerate(zip(norm, ref_norm), 1):
        assert _rel(a, b) <= 1e-4, f"step {step}: grad norm {a} vs single-process {b}"
    assert loss[-1] < loss[0]


def test_sequence_parallel_matches_single_process(reference, tmp_path):
    """tp=2 with sequence parallelism (norms see half the sequence each) and ZeRO-1 over dp=2."""
    ref_loss, ref_norm = reference
    launch(4, [str(TINY), *COMMON, *layout_overrides(2, 1, 2, 1), "layout.sequence_parallel=true",
               f"train.output_dir={tmp_path}"])
    loss, norm = read_metrics(tmp_path, "loss"), read_metrics(tmp_path, "grad_norm")
    assert len(loss) == STEPS
    for step, (a, b, c, d) in enumerate(zip(loss, ref_loss, norm, ref_norm), 1):
        assert _rel(a, b) <= 1e-4 and _rel(c, d) <= 1e-4, f"step {step}: loss {a} vs {b}, grad norm {c} vs {d}"


# ---- OLMo-2 blocks (post-sublayer norms, QK-norm over the whole q/k, all-reduced across TP) ----
@pytest.fixture(scope="module")
def olmo2_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref-olmo2")
    launch(1, [str(TINY), *COMMON, "model.block=olmo2", *layout_overrides(), f"train.output_dir={out}"])
    return read_metrics(out, "loss"), read_metrics(out, "grad_norm")


@pytest.mark.parametrize("tp,pp,dp,zero", [(2, 2, 1, 1), (2, 1, 2, 1)], ids=lambda v: str(v))
def test_olmo2_sequence_parallel_matches_single_process(olmo2_reference, olmo2_tp2pp2, tmp_path, tp, pp, dp, zero):
    """model.block=olmo2 with sequence parallelism: tp2 x pp2 (the shared run the HF export test
    also uses) and tp2 x ZeRO-1 dp2 train to the single-process losses and grad norms."""
    ref_loss, ref_norm = olmo2_reference
    out = olmo2_tp2pp2
    if (tp, pp, dp, zero) != (2, 2, 1, 1):
        out = tmp_path
        launch(tp * pp * dp, [str(TINY), *COMMON, "model.block=olmo2", *layout_overrides(tp, pp, dp, zero),
                              "layout.sequence_parallel=true", f"train.output_dir={out}"])
    loss, norm = read_metrics(out, "loss"), read_metrics(out, "grad_norm")
    assert len(loss) == STEPS == len(ref_loss) and loss[-1] < loss[0]
    for step, (a, b, c, d) in enumerate(zip(loss, ref_loss, norm, ref_norm), 1):
        assert _rel(a, b) <= 1e-4 and _rel(c, d) <= 1e-4, f"step {step}: loss {a} vs {b}, grad norm {c} vs {d}"
