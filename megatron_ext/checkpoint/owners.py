"""Who writes and reads what: the checkpoint's ownership rules as pure functions of shapes, layout,
ZeRO stage and rank (no tensor data, no process group, no DeepSpeed engine).

The save (:mod:`.save`) and the load (:mod:`.load`) decide each rank's element ranges here and take
the data from DeepSpeed's buffers over exactly those ranges, checking that DeepSpeed holds the same
ones (``param._hp_mapping``, ZeRO-3's ``ds_tensor``); ``tools/rehearse.py`` (megatron_ext/rehearse.py)
calls the same functions for every rank of a 256-GPU layout on one CPU. The arithmetic is
DeepSpeed 0.19's (``zero/stage_1_and_2.py``: a parameter group flattened in order, padded to a
multiple of 2 x dp, cut in dp equal partitions; ``zero/partition_parameters.py``: each ZeRO-3
parameter padded to a multiple of dp), cross-checked against a real engine by
tests/test_rehearse.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# DeepSpeed's ZeRO-1/2 ``nccl_start_alignment_factor``: a group's flat buffer is padded to a
# multiple of this x dp elements (with ``parameter_alignment`` off, our config's default).
ZERO12_ALIGNMENT = 2


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a rank's model chunks, as the checkpoint sees it: canonical name, this
    rank's TP shard shape, and the optimizer parameter group DeepSpeed flattens it into."""

    name: str
    shape: tuple[int, ...]
    group: int
    stored: bool = True  # False: a tied head's copy of the embedding, read as it, written by the first stage only

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def param_specs(chunks, weight_decay: float) -> list:
    """(parameter, ParamSpec) of every parameter of ``chunks`` in module order; works on meta
    tensors. The groups are :func:`megatron_ext.engine.param_groups`'s, the ones the engine
    hands DeepSpeed."""
    from ..engine import param_groups
    from ..model import canonical_names

    group_of = {id(p): g for g, grp in enumerate(param_groups(chunks, weight_decay)) for p in grp["params"]}
    out = []
    for chunk in chunks:
        names = canonical_names(chunk)
        for module_name, param in chunk.named_parameters():
            shape = tuple(param.ds_shape) if hasattr(param, "ds_shape") else tuple(param.shape)
            out.append((param, ParamSpec(names[module_name], shape, group_of.get(id(param), -1),
                                         stored=not getattr(param, "tied_copy", False))))
    return out


def even_range(n: int, rank: int, size: int) -> tuple[int, int]:
    """Rank ``rank``'s part of ``n`` elements split in ``size`` equal (ceil) chunks."""
    chunk = -(-n // size)
    return min(n, rank * chunk), min(n, (rank + 1) * chunk)


def replicated_ranges(numels: list[int], dp_rank: int, dp_size: int) -> list[tuple[int, int]]:
    """Without ZeRO every DP rank holds the same states: the flat range of each parameter this
    DP rank writes. The stage's parameters, end to end, are cut into dp even ranges (as ZeRO-1
    cuts its flat buffer), so each rank writes 1/dp of the bytes and a tensor is split only where
    a cut falls in it: meta.json's index grows by dp fragments per stage, not dp per tensor."""
    lo, hi = even_range(sum(numels), dp_rank, dp_size)
    out, offset = [], 0
    for n in numels:
        out.append((min(max(lo - offset, 0), n), min(max(hi - offset, 0), n)))
        offset += n
    return out


def zero12_ranges(numels: list[int], dp_rank: int, dp_size: int) -> list[tuple[int, int]]:
    """ZeRO-1/2: the flat range of each parameter of one optimizer group (in group order) that DP
    rank ``dp_rank``'s partition holds ((0, 0): none), as DeepSpeed cuts it: the group flattened
    end to end, padded to a multiple of 2 x dp, split in dp equal partitions."""
    alignment = ZERO12_ALIGNMENT * dp_size
    size = -(-sum(numels) // alignment) * alignment // dp_size
    lo, hi = dp_rank * size, (dp_rank + 1) * size
    out, offset = [], 0
    for n in numels:
        a, b = max(lo, offset), min(hi, offset + n)
        out.append((a - offset, b - offset) if a < b else (0, 0))
        offset += n
    return out


def zero3_range(n: int, dp_rank: int, dp_size: int) -> tuple[int, int, int]:
    """ZeRO-3: the flat range [lo, hi) of an n-element parameter that DP rank ``dp_rank``'s
    partition holds, and the partition's size p. DeepSpeed pads the tensor to dp * p elements,
    p = ceil(n / dp), and rank r holds elements [r * p, (r + 1) * p): the last partition ends in
    padding, and a rank with r * p >= n holds nothing but padding (n = 5 at dp = 4: p = 2, rank 3)."""
    size = -(-n // dp_size)
    lo = dp_rank * size
    return min(lo, n), min(lo + size, n), size


def owned_ranges(specs: list[ParamSpec], zero_stage: int, dp_rank: int, dp_size: int) -> list[tuple[int, int]]:
    """The flat range of each parameter's TP shard whose master weight and Adam moments DP rank
    ``dp_rank`` holds and writes: its ZeRO partition (ZeRO-1/2: DeepSpeed's cut of each group's
    flat buffer; ZeRO-3: the parameter's own partition, padding trimmed), or without ZeRO its
    even share of the replicated states (:func:`replicated_ranges`). (lo, lo): nothing."""
    if zero_stage == 0:
        return replicated_ranges([s.numel for s in specs], dp_rank, dp_size)
    if zero_stage == 3:
        return [zero3_range(s.numel, dp_rank, dp_size)[:2] for s in specs]
    out: list[tuple[int, int]] = [(0, 0)] * len(specs)
    for g in sorted({s.group for s in specs}):
        members = [i for i, s in enumerate(specs) if s.group == g and s.numel > 0]
        for i, r in zip(members, zero12_ranges([specs[i].numel for i in members], dp_rank, dp_size)):
            out[i] = r
    return out


def load_ranges(numel: int, zero_stage: int, owned: tuple[int, int], dp_rank: int, dp_size: int,
                moments: tuple[str, ...]) -> dict[str, tuple[int, int, bool]]:
    """What a rank reads of one parameter's TP shard on load, per state kind: (lo, hi, gathered).
    ``gathered``: the DP group all-gathers the pieces into the whole shard (each DP rank reads an
    even 1/dp); otherwise the range is the rank's own partition. ZeRO-3: every state is the own
    partition; ZeRO-1/2: the weight is whole (gathered), the moments the own partition; without
    ZeRO: every state whole (gathered)."""
    whole = (*even_range(numel, dp_rank, dp_size), True)
    own = (*owned, False)
    if zero_stage == 3:
        return {k: own for k in ("model", *moments)}
    if zero_stage == 0:
        return {k: whole for k in ("model", *moments)}
    return {"model": whole, **{k: own for k in moments}}


def shard_file(tp_rank: int, pp_rank: int, dp_rank: int) -> str:
    """The tensor file of the rank at (tp, pp, dp)."""
    return f"tp{tp_rank:02d}_pp{pp_rank:02d}_w{dp_rank:03d}.safetensors"


def rng_file(rank: int) -> str:
    return f"rng/rank{rank:05d}.pt"


def fragment_key(kind: str, name: str, start: int) -> str:
    return f"{kind}/{name}@{start}"


def build_index(gathered) -> tuple[dict, dict[str, int], str | None]:
    """meta.json's index and files from every rank's (fname, entries, sizes), entries
    (key, tp, shape, fkey, start, numel): ({key: {tp: {"shape", "parts"}}}, files, error). The
    error (None when fine) says which fragments do not tile a shard exactly."""
    index: dict[str, dict[int, dict]] = {}
    files: dict[str, int] = {}
    for fname, entries, sizes in gathered:
        files.update(sizes)
        for key, tp, shape, fkey, start, numel in entries:
            shard_entry = index.setdefault(key, {}).setdefault(tp, {"shape": list(shape), "parts": []})
            shard_entry["parts"].append([fname, fkey, start, numel])
    for key, by_tp in index.items():  # every shard must be tiled by its fragments, exactly
        for tp, entry in by_tp.items():
            entry["parts"].sort(key=lambda p: p[2])
            ends = [0] + [p[2] + p[3] for p in entry["parts"]]
            if [p[2] for p in entry["parts"]] != ends[:-1] or ends[-1] != math.prod(entry["shape"]):
                return index, files, f"internal error: the fragments of {key} (tp {tp}) do not tile it"
    return {k: [v[t] for t in sorted(v)] for k, v in sorted(index.items())}, files, None
