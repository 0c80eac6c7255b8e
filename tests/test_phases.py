"""Phase-mix recipes (recipes/phases/): each loads; its weights give the documented language
proportions (and the table in its header says the same); the instruction share of
Drop-in-the-ocean stays under 2%; each phase starts from the previous phase's run; the LR steps
down from phase to phase and mid-training ends at 0."""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import pytest

from megatron_ext.config import load_recipe
from megatron_ext.schedule import lr_at

PHASES_DIR = Path(__file__).resolve().parent.parent / "recipes" / "phases"
CHAIN = ["naive", "drop-in-the-ocean", "mid-training"]  # in training order
DATA_ROOT = "/path/to/data/"
# Gaperon's documented language proportions (share of the mix, inclusive)
RANGES = {"en": (0.54, 0.65), "fr": (0.24, 0.39), "code": (0.08, 0.14)}
TABLE_NAMES = {"English": "en", "French": "fr", "code": "code"}


def load(name: str):
    return load_recipe(PHASES_DIR / f"{name}.yaml")


def shares(recipe, part: int) -> dict[str, float]:
    """Weight per path component ``part`` under DATA_ROOT (0: language, 1: kind)."""
    out: dict[str, float] = defaultdict(float)
    for weight, prefix in recipe.data.blend:
        assert prefix.startswith(DATA_ROOT), prefix
        out[prefix[len(DATA_ROOT):].split("/")[part]] += weight
    return dict(out)


def test_every_phase_file_is_in_the_chain():
    assert sorted(p.stem for p in PHASES_DIR.glob("*.yaml")) == sorted(CHAIN)


@pytest.mark.parametrize("name", CHAIN)
def test_language_proportions(name):
    recipe = load(name)
    assert recipe.data.kind == "indexed" and recipe.data.tokenizer
    assert recipe.model.name == "gaperon-8b" and recipe.model.vocab_size == 128256  # from base: ../8b.yaml
    assert sum(w for w, _ in recipe.data.blend) == pytest.approx(1.0, abs=1e-9)
    assert all(w > 0 for w, _ in recipe.data.blend)
    assert len({p for _, p in recipe.data.blend}) == len(recipe.data.blend), "a prefix listed twice"
    langs = shares(recipe, 0)
    assert set(langs) == set(RANGES), langs
    for lang, (lo, hi) in RANGES.items():
        assert lo <= langs[lang] <= hi, f"{name}: {lang} is {langs[lang]:.3f}, documented {lo:.0%}-{hi:.0%}"
    # the header table states the same per-language totals and ranges as the weights
    text = (PHASES_DIR / f"{name}.yaml").read_text()
    rows = re.findall(r"^#\s+(English|French|code)\s.*?([\d.]+)\s+(\d+)-(\d+)%\s*$", text, re.M)
    assert len(rows) == 3, rows
    for label, total, lo, hi in rows:
        lang = TABLE_NAMES[label]
        assert float(total) == pytest.approx(langs[lang], abs=1e-9), (name, label)
        assert (int(lo) / 100, int(hi) / 100) == RANGES[lang], (name, label)


def test_mix_kinds_per_phase():
    kinds = {name: shares(load(name), 1) for name in CHAIN}
    naive, drop, mid = (kinds[n] for n in CHAIN)
    assert 0.70 <= naive["web"] <= 0.80 and "instruct" not in naive  # Naive: 70-80% web
    assert 0 < drop["instruct"] < 0.02  # Drop-in-the-ocean: < 2% instruction-like
    assert drop["web"] == pytest.approx(naive["web"], abs=0.02)  # otherwise the same mix
    assert mid["web"] < naive["web"] - 0.2 and mid.get("synthetic", 0) > 0  # high quality: less web


def test_each_phase_starts_from_the_previous_one():
    recipes = [load(name) for name in CHAIN]
    assert recipes[0].checkpoint.init_from is None
    for prev, cur in zip(recipes, recipes[1:]):
        assert cur.checkpoint.init_from is not None
        assert Path(cur.checkpoint.init_from) in (Path(prev.train.output_dir), Path(prev.train.output_dir) / "checkpoints")
        assert cur.checkpoint.init_mode == "model+optimizer"
    dirs = [r.train.output_dir for r in recipes]
    assert len(set(dirs)) == len(dirs), "two phases share an output_dir: the second would resume the first"
    seeds = [r.train.seed for r in recipes]
    assert len(set(seeds)) == len(seeds), "two phases share a seed: the same sample order"


def test_lr_steps_down_and_mid_training_ends_at_zero():
    naive, drop, mid = (load(name) for name in CHAIN)
    assert naive.optimizer.lr > drop.optimizer.lr > mid.optimizer.lr
    for r in (naive, drop):  # stable phases: the LR is held to the end
        assert lr_at(r.train.steps - 1, r) == r.optimizer.lr
    assert mid.schedule.kind == "wsd" and mid.schedule.decay_steps > 0
    assert lr_at(mid.train.steps - mid.schedule.decay_steps - 1, mid) == mid.optimizer.lr
    assert lr_at(mid.train.steps - 1, mid) == 0.0
