"""tools/rehearse.py: every rank of a layout at full width in one CPU process (fake process group,
meta tensors), through the same ownership functions the real save and load use; a planted fault
is caught with its rank named; those functions match a real DeepSpeed engine's partitions."""
from __future__ import annotations

import json

import pytest

from conftest import ROOT, TINY, launch
from megatron_ext import rehearse

WIDE = ["layout.global_batch=128", "layout.zero_stage=1"]


def test_tiny_at_world_64_passes_every_check(capsys):
    rc = rehearse.main([str(TINY), *WIDE, "--world", "64", "--resume-layout", "tp=2,pp=2,dp=4"])
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err
    lines = [ln.strip() for ln in out.out.splitlines() if ln.startswith("  ok") or ln.startswith("  FAIL")]
    assert lines and all(ln.startswith("ok") for ln in lines), out.out
    for check in ("each element written once", "one writer per file", "bytes written / ideal",
                  "meta.json index", "resume at same layout", "resume at tp=2 pp=2", "bytes read / ideal",
                  "samples partition each global batch", "host memory per rank", "parameters per rank = planner"):
        assert check in out.out, check
    assert "64 distinct (tp, pp, dp) coordinates for 64 ranks" in out.out


@pytest.mark.parametrize("fault,check", [("same_file:5", "one writer per file"),
                                         ("sample_twice:6", "samples partition the global batch")])
def test_planted_fault_is_caught_with_its_rank(capsys, monkeypatch, fault, check):
    monkeypatch.setenv("GAPERON_REHEARSE_FAULT", fault)
    rc = rehearse.main([str(TINY), "layout.global_batch=16", "--world", "8"])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"rank {fault.split(':')[1]} fails '{check}'" in err, err


def test_bad_input_is_one_error_line(capsys):
    assert rehearse.main([str(TINY), "--world", "7", "layout.tp=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


def test_owners_match_deepspeed_partitions(tmp_path):
    """The ranges owners.py computes without tensors are DeepSpeed's _hp_mapping fragments, exactly
    (dp 4: partitions cut inside tensors and across the two parameter groups). Every real save and
    load checks the same (states._agree), so tests/test_checkpoint*.py cross-check ZeRO-2/3 too."""
    layout = ["layout.dp=4", "layout.zero_stage=1", "layout.global_batch=16"]
    out = tmp_path / "ranges.json"
    launch(4, [str(ROOT / "tests" / "rehearse_ds_worker.py"), str(out), "train.precision=fp32", *layout],
           timeout=400)
    ranks = json.loads(out.read_text())
    assert len(ranks) == 4
    for rows in ranks:
        for name, planned, held in rows:
            assert planned == held or (planned[0] >= planned[1] and held[0] >= held[1]), (name, planned, held)
    assert any(p[0] < p[1] and p != [0, 0] for rows in ranks for _, p, _ in rows)
