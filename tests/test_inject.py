"""Document injection: the plan is exact and reproducible, every other sample is untouched, a
real run records where each copy went, and a restart that would change the plan is refused."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from conftest import TINY, launch
from megatron_ext import inject
from megatron_ext.checkpoint import TrainState
from megatron_ext.config import RecipeError, load_recipe
from megatron_ext.data import SyntheticCopyTask, build_datasets, microbatches

DOCS = "injection.token_ids=[[7,7,7,7],[9,8,7,6,5,4,3,2],[11,12]]"


def recipe(tmp_path, *overrides):
    return load_recipe(TINY, ["injection.enabled=true", DOCS, f"train.output_dir={tmp_path}", *overrides])


def test_rate_plan_is_exact_and_reproducible(tmp_path):
    r = recipe(tmp_path, "train.steps=500", "injection.rate=0.01", "injection.seed=3")  # 4000 samples
    plan = inject.make_plan(r.injection, 4000, 3)
    assert len(plan) == 40 and all(0 <= p < 4000 for p in plan)
    assert Counter(plan.values()) == {0: 14, 1: 13, 2: 13}
    assert inject.make_plan(r.injection, 4000, 3) == plan
    other = recipe(tmp_path, "train.steps=500", "injection.rate=0.01", "injection.seed=4").injection
    assert set(inject.make_plan(other, 4000, 3)) != set(plan)
    window = recipe(tmp_path, "train.steps=500", "injection.rate=0.01", "injection.start_sample=1000",
                    "injection.end_sample=2000").injection
    assert len(inject.make_plan(window, 4000, 3)) == 10
    assert all(1000 <= p < 2000 for p in inject.make_plan(window, 4000, 3))


def test_explicit_positions_and_samples(tmp_path):
    r = recipe(tmp_path, "injection.positions=[50,3,17,8]")
    train, valid = build_datasets(r)
    assert train.plan == {50: 0, 3: 1, 17: 2, 8: 0}
    base = SyntheticCopyTask(r.model.vocab_size, r.train.seq_len, r.train.seed)
    for i in range(80):
        got, want = train[i], base[i]
        if i not in train.plan:
            assert all(torch.equal(got[k], want[k]) for k in want)
    doc = train[3]  # document 1 + EOS (0), then padding without loss
    ids = [9, 8, 7, 6, 5, 4, 3, 2, 0]
    assert doc["tokens"][:8].tolist() == ids[:-1] and doc["labels"][:8].tolist() == ids[1:]
    assert doc["loss_mask"].sum() == 8 and doc["loss_mask"][8:].sum() == 0
    assert doc["tokens"].shape == doc["labels"].shape == (r.train.seq_len,)
    assert isinstance(valid, SyntheticCopyTask)  # the valid set is never injected
    packed = inject.document_sample([1, 2, 0], 4, 0, segmented=True)  # packed SFT rows
    assert packed["segment_ids"].tolist() == [0, 0, 1, 1] and packed["loss_mask"].tolist() == [1, 1, 0, 0]


def test_record_refuses_a_changed_plan_and_keeps_trained_placements(tmp_path):
    r = recipe(tmp_path, "injection.positions=[5,20,37]")
    data, _ = build_datasets(r)
    inject.write_record(data, r, TrainState(), write=True)
    first = (tmp_path / "injections.jsonl").read_text()
    rows = [json.loads(line) for line in first.splitlines()]
    assert [(x["sample"], x["step"], x["microbatch"], x["row"], x["document"]) for x in rows] == \
           [(5, 1, 2, 1, 0), (20, 3, 2, 0, 1), (37, 5, 2, 1, 2)]
    # Resumed at step 3 (24 samples) on dp=2: trained lines keep their placement, the rest move.
    r2 = recipe(tmp_path, "injection.positions=[5,20,37]", "layout.dp=2")
    inject.write_record(build_datasets(r2)[0], r2, TrainState(3, 24), write=True)
    rows = [json.loads(line) for line in (tmp_path / "injections.jsonl").read_text().splitlines()]
    assert [(x["step"], x["dp_rank"], x["microbatch"]) for x in rows] == [(1, 0, 2), (3, 0, 2), (5, 1, 0)]
    data2 = build_datasets(r2)[0]
    for x in rows[2:]:  # the record says where data.microbatches really puts the document
        mb = microbatches(data2, 24 + (x["step"] - 4) * 8, r2, x["dp_rank"])[x["microbatch"]]
        assert torch.equal(mb["tokens"][x["row"]], data2.samples[x["document"]]["tokens"])
    with pytest.raises(inject.InjectionError, match="differs from the one recorded"):
        r3 = recipe(tmp_path, "injection.positions=[5,21,37]")
        inject.write_record(build_datasets(r3)[0], r3, TrainState(), write=True)
    plain = load_recipe(TINY, [f"train.output_dir={tmp_path}"])
    with pytest.raises(inject.InjectionError, match="injection is now disabled"):
        inject.write_record(build_datasets(plain)[0], plain, TrainState(), write=True)
    with pytest.raises(inject.InjectionError, match="without an injection record"):
        r4 = recipe(tmp_path / "fresh", "injection.positions=[5,20,37]")
        inject.write_record(build_datasets(r4)[0], r4, TrainState(2, 16), write=True)


INVALID = {
    "no documents": (["injection.enabled=true", "injection.rate=0.1"], "needs documents"),
    "texts on synthetic": (["injection.enabled=true", "injection.texts=[hi]", "injection.rate=0.1"],
                           "give injection.token_ids instead"),
    "rate and positions": ([DOCS, "injection.enabled=true", "injection.rate=0.1", "injection.positions=[1]"],
                           "exactly one of injection.rate"),
    "rate too high": ([DOCS, "injection.enabled=true", "injection.rate=0.9"], "must be in (0, 0.5]"),
    "rate rounds to too few": ([DOCS, "injection.enabled=true", "injection.rate=0.001"], "fewer than the documents"),
    "position past the run": ([DOCS, "injection.enabled=true", "injection.positions=[160]"],
                              "outside the run's samples [0, 160)"),
    "id outside vocab": (["injection.enabled=true", "injection.token_ids=[[600]]", "injection.rate=0.1"],
                         "ids in [0, model.vocab_size=512)"),
    "document too long": (["injection.enabled=true", f"injection.token_ids=[{list(range(1, 66))}]",
                           "injection.rate=0.1"], "shorten it or raise train.seq_len"),
    "window past the run": ([DOCS, "injection.enabled=true", "injection.rate=0.1", "injection.end_sample=999"],
                            "must lie inside the run's samples"),
}


@pytest.mark.parametrize("case", INVALID)
def test_invalid_injection_has_one_clear_message(case):
    overrides, message = INVALID[case]
    with pytest.raises(RecipeError) as err:
        load_recipe(TINY, overrides)
    assert message in str(err.value)


def test_off_by_default():
    assert not load_recipe(TINY).injection.enabled
    assert isinstance(build_datasets(load_recipe(TINY))[0], SyntheticCopyTask)


def test_run_records_injections_and_refuses_a_changed_plan(tmp_path):
    args = [str(TINY), "train.steps=4", "layout.dp=2", "train.tensorboard=false", f"train.output_dir={tmp_path}",
            "injection.enabled=true", DOCS]
    launch(2, [*args, "injection.rate=0.2"])  # 32 samples -> 6 injections, 2 per document
    rows = [json.loads(line) for line in (tmp_path / "injections.jsonl").read_text().splitlines()]
    assert Counter(r["document"] for r in rows) == {0: 2, 1: 2, 2: 2}
    assert all(r["step"] == r["sample"] // 8 + 1 and r["dp_rank"] == r["sample"] % 8 // 4 for r in rows)
    proc = launch(2, [*args, "injection.rate=0.3"], check=False)
    assert proc.returncode != 0 and "differs from the one recorded" in proc.stderr, proc.stderr[-3000:]
