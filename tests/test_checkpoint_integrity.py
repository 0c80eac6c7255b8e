"""Nothing lost: a kill at every point of the save / rotate sequence, a dangling or damaged
``latest``, a poisoned gradient, and resumes the checkpoint cannot serve are all handled, and the
losses still equal an uninterrupted run's.

One run directory is walked through every fault in turn (one launch per fault), so that each
launch checks both what the previous fault left and how the next start copes with it.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import ROOT, TINY, cpu_env, launch, layout_overrides, per_step
from megatron_ext import checkpoint, convert

STEPS = 12
COMMON = [f"train.steps={STEPS}", "train.precision=fp32", "train.tensorboard=false", "checkpoint.interval=2",
          "checkpoint.keep_last=2"]


def run(out, *extra, fault=None, nproc=1, layout=None, check=True, env_extra=None):
    env = cpu_env(**({"GAPERON_FAULT": fault} if fault else {}), **(env_extra or {}))
    return launch(nproc, [str(TINY), *COMMON, *layout_overrides(**(layout or {})), f"train.output_dir={out}",
                          *extra], env=env, check=check)


def steps_on_disk(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("step_*"))


def latest(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


def assert_no_fake_complete(out: Path) -> None:
    """Every step_* that exists is complete: meta.json parses and every file it lists has its size."""
    for p in (out / "checkpoints").glob("step_*"):
        assert checkpoint.problem(p) is None, checkpoint.problem(p)


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    out = tmp_path_factory.mktemp("ref") / "run"
    run(out)
    return per_step(out)


def test_kills_at_every_save_and_rotate_point_lose_nothing(tmp_path, reference):
    out = tmp_path / "run"
    ckpts = out / "checkpoints"

    # 1. killed after writing step 4's files, before the rename: step 4 does not exist.
    p = run(out, fault="kill_before_commit:4", check=False)
    assert p.returncode != 0
    assert latest(out) == "step_00000002" and steps_on_disk(out) == ["step_00000002"]
    assert (ckpts / ".tmp-step_00000004").is_dir()

    # 2. resumes from 2 (the leftover is cleaned); killed after step 6 is renamed, before latest moves.
    p = run(out, fault="kill_before_latest:6", check=False)
    assert "resumed from" in p.stdout and "at step 2" in p.stdout
    assert not (ckpts / ".tmp-step_00000004").exists()
    assert latest(out) == "step_00000004" and "step_00000006" in steps_on_disk(out)

    # 3. latest is the truth: resumes from 4, re-saves 6 over the uncommitted copy; killed after
    #    latest names 8, before rotation.
    p = run(out, fault="kill_before_rotate:8", check=False)
    assert "at step 4" in p.stdout
    assert latest(out) == "step_00000008"
    assert steps_on_disk(out) == ["step_00000004", "step_00000006", "step_00000008"]

    # 4. resumes from 8; saving 10 rotates 4 and 6 away: killed with step 4 renamed, not yet removed.
    p = run(out, fault="kill_during_rotate:4", check=False)
    assert "at step 8" in p.stdout
    assert latest(out) == "step_00000010"
    assert not (ckpts / "step_00000004").exists() and (ckpts / ".deleting-step_00000004").is_dir()
    assert_no_fake_complete(out)

    # 5. a user rolls back by deleting the newest checkpoint, and step 8 is damaged (truncated):
    #    the run falls back to the newest complete one, 6, and says so.
    shutil.rmtree(ckpts / "step_00000010")
    shard = ckpts / "step_00000008" / "tp00_pp00_w000.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    damaged = snapshot(ckpts / "step_00000008")
    p = run(out)
    assert "latest names step_00000010, which is not usable" in p.stdout
    assert "skipped step_00000008" in p.stdout and "truncated" in p.stdout
    assert "at step 6" in p.stdout
    #    The damaged step 8 is moved aside once (one line), byte for byte, before step 8 is re-saved.
    aside = list(ckpts.glob("damaged-step_00000008-*"))
    assert len(aside) == 1 and snapshot(aside[0]) == damaged
    assert p.stdout.count("moved the damaged step_00000008 aside") == 1
    assert latest(out) == f"step_{STEPS:08d}"
    assert not list(ckpts.glob(".*"))
    assert_no_fake_complete(out)

    got = per_step(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, loss in reference.items():  # fp32 on one CPU process: bitwise identical
        assert got[step] == loss, f"step {step}: {got[step]} != {loss}"


def test_stop_on_a_saved_step_keeps_that_checkpoint(tmp_path, reference):
    """A stop signal right after step 4 was saved does not write step 4 again (the directory
    latest names is never replaced in place), and the restart picks up exactly."""
    out = tmp_path / "run"
    p = run(out, fault="sigterm:4", check=False)
    assert "SIGTERM: step 4 was already saved" in p.stdout
    assert latest(out) == "step_00000004"
    before = snapshot(out / "checkpoints" / "step_00000004")
    p = run(out, "train.steps=4")  # a restart with nothing left to train: exits 0, rewrites nothing
    assert "this run is complete" in p.stdout
    assert snapshot(out / "checkpoints" / "step_00000004") == before
    run(out)
    assert per_step(out) == reference
    rng = out / "checkpoints" / f"step_{STEPS:08d}" / "rng" / "rank00000.pt"
    assert torch.load(rng, weights_only=True)["torch"].dtype == torch.uint8  # no pickled code


def _all_finite(ckpt: Path) -> bool:
    for f in ckpt.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            if not all(torch.isfinite(h.get_tensor(k)).all() for k in h.keys()):
                return False
    return True


@pytest.mark.parametrize("layout", [dict(), dict(dp=2, zero=1)], ids=["zero0", "dp2-zero1"])
def test_nonfinite_gradient_with_finite_loss_is_skipped_on_all_ranks(tmp_path, layout):
    out = tmp_path / "run"
    nproc = layout.get("dp", 1)
    rank = nproc - 1  # only the last rank's gradient is poisoned: all ranks must still skip
    run(out, "train.steps=6", "checkpoint.interval=3", nproc=nproc, layout=layout, fault=f"nan_grad:3:{rank}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in rows if r.get("skipped")]
    assert [r["step"] for r in skipped] == [3]
    assert math.isfinite(skipped[0]["loss"])  # the loss was finite
    assert not math.isfinite(skipped[0]["grad_norm"])  # the gradient norm was not
    later = [r for r in rows if r["step"] > 3 and not r.get("skipped")]
    assert later and all(torch.isfinite(torch.tensor(r["loss"])) for r in later)
    for ckpt in (out / "checkpoints").glob("step_*"):
        assert _all_finite(ckpt), ckpt

    stop = tmp_path / "stop"
    p = run(stop, "train.steps=6", "checkpoint.interval=2", "health.on_nonfinite=stop", nproc=nproc,
            layout=layout, fault=f"nan_grad:3:{rank}", check=False)
    assert p.returncode != 0
    assert "non-finite gradient norm at step 3" in p.stderr and "step_00000002" in p.stderr
    assert latest(stop) == "step_00000002" and _all_finite(stop / "checkpoints" / "step_00000002")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    run(out, "train.steps=4")
    return out


def _refused(out: Path, *extra, expect: list[str]):
    """A start that must fail before the model is built, with one line, leaving every byte as it
    was. One process without torchrun (whose agent prints a traceback of its own for any failure)."""
    before = snapshot(out) if out.exists() else None
    cmd = [sys.executable, str(ROOT / "tools" / "train.py"), str(TINY), *COMMON, "train.steps=4",
           f"train.output_dir={out}", *extra]
    p = subprocess.run(cmd, cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=300)
    lines = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert p.returncode == 2 and len(lines) == 1, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    for word in expect:
        assert word in lines[0], lines[0]
    assert "gaperon:" not in p.stdout  # the model was never built
    assert (snapshot(out) if out.exists() else None) == before
    return lines[0]


@pytest.mark.parametrize("case", ["shape", "steps-back", "corrupt-meta", "dangling-latest", "bad-init-from"])
def test_resume_that_cannot_work_is_refused_before_the_model(tmp_path, trained, case):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    ckpts = out / "checkpoints"
    if case == "shape":
        _refused(out, "model.hidden_size=128", "model.num_attention_heads=8",
                 expect=["model.hidden_size=64", "recipe: 128", "train.output_dir"])
    elif case == "steps-back":
        _refused(out, "train.steps=3", expect=["step 4", "train.steps=3", "train.steps >= 4"])
    elif case == "corrupt-meta":
        for meta in ckpts.glob("step_*/meta.json"):
            meta.write_text(meta.read_text()[:200])
        _refused(out, expect=["no complete checkpoint", "meta.json is unreadable", "move that directory away"])
    elif case == "dangling-latest":
        for p in ckpts.glob("step_*"):
            shutil.rmtree(p)
        _refused(out, expect=["latest", "no complete checkpoint", "starting again from step 0"])
    else:
        fresh = tmp_path / "phase2"
        before = snapshot(out)
        line = _refused(fresh, f"checkpoint.init_from={ckpts / 'step_00000099'}",
                        expect=["checkpoint.init_from", "no complete checkpoint"])
        assert snapshot(out) == before and line


def test_to_hf_refuses_damaged_checkpoints_and_unwritable_output(tmp_path, trained, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained / "checkpoints" / "step_00000004", ckpt)
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert convert.main(["to-hf", str(ckpt), str(blocker / "hf"), "--no-progress", "--no-verify", "--no-tokenizer"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "writable output directory" in err and str(blocker) in err

    shard = ckpt / "tp00_pp00_w000.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    assert convert.main(["to-hf", str(ckpt), str(tmp_path / "hf"), "--no-progress", "--no-verify", "--no-tokenizer"]) == 2
    err = capsys.readouterr().err.strip()
    assert "tp00_pp00_w000.safetensors" in err and "truncated" in err
    shard.write_bytes(data)

    (ckpt / "meta.json").write_text("{not json")
    assert convert.main(["to-hf", str(ckpt), str(tmp_path / "hf"), "--no-progress", "--no-verify", "--no-tokenizer"]) == 2
    err = capsys.readouterr().err.strip()
    assert "meta.json is unreadable" in err and err.count("\n") == 0
    assert not (tmp_path / "hf").exists()


def test_background_save_killed_mid_write_keeps_the_previous_checkpoint(tmp_path, reference):
    """checkpoint.async_save: the writer thread is killed with its files half written; latest still
    names the previous checkpoint, and the resumed run (also asynchronous) equals the reference."""
    out = tmp_path / "run"
    p = run(out, "checkpoint.async_save=true", fault="kill_during_save:6", check=False)
    assert p.returncode != 0
    assert latest(out) == "step_00000004" and (out / "checkpoints" / ".tmp-step_00000006").is_dir()
    p = run(out, "checkpoint.async_save=true")
    assert "at step 4" in p.stdout
    assert latest(out) == f"step_{STEPS:08d}"
    assert_no_fake_complete(out)
    assert per_step(out) == reference
    blocking = [r for r in per_step(out, "checkpoint_blocking_s").values()]
    # an async save blocks the loop only while it stages (a positive, measured time, under a second here)
    assert blocking and all(0 < b < 5 for b in blocking), blocking


def test_each_rank_reads_and_writes_only_its_share(tmp_path):
    """dp 2 x ZeRO-1 and tp 2: bytes each rank wrote at a save and read at a resume (counted by the
    reader and writer themselves), against the ideal: the checkpoint's bytes / world size. Then
    the same at TP changes (tp 2 -> 1 (dp 4, no ZeRO) -> 2 on 4 ranks), where each rank once read its whole stage
    (4x the ideal here): now its share, up to 2x on the column-split quarter of the weights when
    the TP degree grows (whole stored rows are read, see CheckpointReader.read_resharded)."""
    out, stats = tmp_path / "run", tmp_path / "io"
    layout, merged = dict(tp=2, dp=2, zero=1), dict(dp=4, zero=0)
    for steps, phase, lay in ((2, "save", layout), (3, "load", layout), (4, "tp2-to-1", merged),
                              (5, "tp1-to-2", layout)):
        run(out, f"train.steps={steps}", nproc=4, layout=lay, env_extra={"GAPERON_IO_STATS": stats / phase})
    ckpt = out / "checkpoints" / latest(out)  # step 5, at tp 2 x dp 2 again: the same bytes as step 2
    ideal = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file() and f.name != "meta.json") / 4
    for phase, key, bound in (("save", "written", 1.25), ("load", "read", 1.25), ("tp2-to-1", "read", 1.25),
                              ("tp2-to-1", "written", 1.25), ("tp1-to-2", "read", 1.5)):
        per_rank = [json.loads(p.read_text())[key] for p in sorted((stats / phase).glob("rank*.json"))]
        assert len(per_rank) == 4 and max(per_rank) <= bound * ideal, (phase, key, per_rank, ideal)
    # Without ZeRO (step 4, dp 4) the replicated states are cut end to end, not each tensor in dp
    # parts: the index holds each tensor once, plus one fragment per cut that falls inside one.
    index = json.loads((out / "checkpoints" / "step_00000004" / "meta.json").read_text())["index"]
    tensors = sum(1 for key in index if key.startswith("model/"))
    for kind in checkpoint.STATE_KINDS:
        parts = sum(len(s["parts"]) for key, shards in index.items() if key.startswith(kind + "/") for s in shards)
        assert parts <= tensors + 3, (kind, parts, tensors)  # was tensors x 4


def _as_format_2(src: Path, dst: Path) -> None:
    """Rewrite a checkpoint as format 2 wrote it: one file per (tp, pp) rank holding whole TP
    shards, the index listing one file per TP rank."""
    from safetensors.torch import save_file

    reader = checkpoint.CheckpointReader(src)
    dst.mkdir(parents=True)
    shutil.copytree(src / "rng", dst / "rng")
    files: dict[str, dict] = {}
    index = {}
    for key in reader.meta["index"]:
        names = []
        for t in range(len(reader.shards(key))):
            fname = f"tp{t:02d}_pp00_w000.safetensors"
            files.setdefault(fname, {})[key] = reader.read_shard(key, t).contiguous()
            names.append(fname)
        index[key] = names
    for fname, tensors in files.items():
        save_file(tensors, str(dst / fname))
    meta = {**reader.meta, "format": 2, "index": index,
            "files": {f.relative_to(dst).as_posix(): f.stat().st_size for f in dst.rglob("*") if f.is_file()}}
    (dst / "meta.json").write_text(json.dumps(meta))


def test_format_2_checkpoints_still_resume_exactly(tmp_path, trained):
    new, old = tmp_path / "new", tmp_path / "old"
    shutil.copytree(trained, new)
    old.mkdir()
    _as_format_2(trained / "checkpoints" / "step_00000004", old / "checkpoints" / "step_00000004")
    (old / "checkpoints" / "latest").write_text("step_00000004\n")
    a = checkpoint.CheckpointReader(new)
    b = checkpoint.CheckpointReader(old)
    for key in a.meta["index"]:
        kind, name = key.split("/", 1)
        assert torch.equal(a.get(name, kind), b.get(name, kind)), key
    run(new, "train.steps=6")
    p = run(old, "train.steps=6")
    assert "at step 4" in p.stdout
    assert per_step(old) == {s: v for s, v in per_step(new).items() if s > 4}
