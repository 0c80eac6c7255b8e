"""A TP change on resume: each rank reads the element ranges of its new shard from the stored
shards that hold them (CheckpointReader.read_resharded), equal to cutting the merged canonical
tensor, and reads about its share of the bytes, not the whole tensor."""
from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import save_file

from megatron_ext import checkpoint
from megatron_ext.sharding import shard

L = "decoder.layers.0."
SHAPES = {  # canonical shapes, one tensor of every split kind
    "embedding.word_embeddings.weight": (48, 8),          # rows
    L + "self_attention.linear_qkv.weight": (32, 8),       # rows (query groups)
    L + "self_attention.linear_proj.weight": (8, 16),      # columns
    L + "self_attention.k_proj_layernorm.weight": (16,),   # 1-D, rows
    L + "mlp.linear_fc1.weight": (48, 8),                  # [gate; up]
    L + "mlp.linear_fc2.weight": (8, 24),                  # columns
    L + "input_layernorm.weight": (8,),                    # replicated
}


def _write(path, tensors: dict[str, torch.Tensor], tp: int, pieces: int, rnd: random.Random) -> None:
    """A format-3 checkpoint of ``tensors`` at ``tp``, each TP shard cut at random places into
    ``pieces`` fragments spread over ``pieces`` files (as DP ranks would write them)."""
    path.mkdir()
    files: dict[str, dict] = {}
    index = {}
    for name, full in tensors.items():
        entries = []
        for r in range(tp):
            flat = shard(name, full, r, tp).reshape(-1)
            cuts = sorted({0, flat.numel(), *rnd.sample(range(1, flat.numel()), pieces - 1)})
            parts = []
            for w, (a, b) in enumerate(zip(cuts, cuts[1:])):
                fname, fkey = f"tp{r:02d}_pp00_w{w:03d}.safetensors", f"model/{name}@{a}"
                files.setdefault(fname, {})[fkey] = flat[a:b].clone()
                parts.append([fname, fkey, a, b - a])
            entries.append({"shape": list(shard(name, full, r, tp).shape), "parts": parts})
        index[f"model/{name}"] = entries
    for fname, frags in files.items():
        save_file(frags, str(path / fname))
    (path / "meta.json").write_text(json.dumps({"format": 3, "step": 1, "index": index}))


@pytest.mark.parametrize("stored_tp", [1, 2, 4])
def test_resharded_ranges_equal_the_cut_canonical_tensor(tmp_path, stored_tp):
    rnd = random.Random(stored_tp)
    gen = torch.Generator().manual_seed(stored_tp)
    tensors = {n: torch.randn(s, generator=gen) for n, s in SHAPES.items()}
    _write(tmp_path / "ckpt", tensors, stored_tp, pieces=3, rnd=rnd)
    reader = checkpoint.CheckpointReader(tmp_path / "ckpt", verified=True)
    for tp in (1, 2, 4):
        for name, full in tensors.items():
            key = f"model/{name}"
            for rank in range(tp):
                want = shard(name, full, rank, tp).reshape(-1)
                assert reader.shard_numel(key, name, tp) == want.numel()
                ranges = [(0, want.numel())] + [tuple(sorted(rnd.sample(range(want.numel() + 1), 2)))
                                                for _ in range(6)]
                for lo, hi in ranges:
                    if lo == hi:
                        continue
                    before = checkpoint.IO_BYTES["read"]
                    got = reader.read_resharded(key, name, tp, rank, lo, hi)
                    read = checkpoint.IO_BYTES["read"] - before
                    assert torch.equal(got, want[lo:hi]), (name, stored_tp, tp, rank, lo, hi)
                    share = (hi - lo) * 4
                    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
                        # column split: whole stored rows, at most new/stored TP times the share
                        width = want.numel() // full.shape[0]
                        rows = -(-hi // width) - lo // width
                        assert read <= rows * full.shape[1] // min(tp, stored_tp) * 4, (name, read)
                    else:
                        assert read == share, (name, stored_tp, tp, rank, lo, hi, read, share)


@pytest.mark.parametrize("dp", [1, 3, 4, 64])
def test_replicated_shares_cut_the_stage_end_to_end(dp):
    """Without ZeRO the DP ranks write the stage's parameters end to end in dp even ranges: every
    parameter is tiled exactly once, no rank writes more than ceil(total / dp) elements, and a
    tensor is cut only where a range ends inside it (dp - 1 cuts in all, not dp per tensor)."""
    from types import SimpleNamespace

    chunks = [torch.nn.Sequential(torch.nn.Linear(8, 24), torch.nn.LayerNorm(24)), torch.nn.Linear(24, 5)]
    engine = SimpleNamespace(chunks=chunks)
    params = [p for c in chunks for p in c.parameters()]
    total = sum(p.numel() for p in params)
    shares = [checkpoint.replicated_shares(engine, r, dp) for r in range(dp)]
    for p in params:
        ranges = sorted(s[id(p)] for s in shares if s[id(p)][0] < s[id(p)][1])
        assert ranges[0][0] == 0 and ranges[-1][1] == p.numel()
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), ranges
    assert max(sum(hi - lo for lo, hi in s.values()) for s in shares) == -(-total // dp)
    fragments = sum(1 for s in shares for lo, hi in s.values() if lo < hi)
    assert fragments <= len(params) + dp - 1, (fragments, len(params), dp)
