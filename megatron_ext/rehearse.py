"""Rehearse a recipe at full width on one CPU: for every rank of its layout, the real code that
decides what the rank does, with a fake process group and meta tensors (no data, no collectives).

    python tools/rehearse.py recipes/24b.yaml                         # the recipe's world (256)
    python tools/rehearse.py recipes/24b.yaml --resume-layout tp=4,pp=1,dp=64 --steps 4
    python tools/rehearse.py recipes/tiny.yaml --world 64

Per rank: Megatron-Core's parallel state (``initialize_model_parallel`` under torch's ``fake``
backend, engine.init_model_parallel), the model chunks on the meta device (model.build_model, once
per (tp, pp) coordinate), the ZeRO partition and the checkpoint files and element ranges it writes
(checkpoint.owners: the functions save and load call), meta.json (checkpoint.format.build_meta
over owners.build_index), what it reads on a resume at the same layout and at ``--resume-layout``
(checkpoint.owners.load_ranges and CheckpointReader's index-only read plans), and its samples of
the first K steps (data.sample_indices). Bookkeeping is in intervals: O(world x parameters).

Checks, each printed with its figure: every checkpointed element written by exactly one rank; no
two ranks write one file; every element a rank needs on resume read exactly once by it; bytes
written and read per rank against ideal; meta.json's size and its growth from world 64 to 256;
the first K steps' samples partition each global batch as a one-rank run draws it, every rank of
a DP group drawing the same; parameters per rank and checkpoint bytes against the planner
(megatron_ext/plan.py); host memory a save and a load need per rank.

Exit 0 when every check holds, 1 naming the first failing rank and check, 2 on bad input.
``GAPERON_REHEARSE_FAULT=same_file:RANK`` or ``sample_twice:RANK`` plants a fault (tests only).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

from .config import RecipeError, load_recipe
from .errors import ArgParser, GaperonError, report

GiB = 1024**3
STORED_BYTES = {"fp32": 4, "bf16-mixed": 4, "bf16-pure": 2}  # per element of a stored state (save.py's dtypes)
KINDS = ("model", "exp_avg", "exp_avg_sq")


class RehearseError(GaperonError, ValueError):
    """Bad input to the rehearsal (a world or layout the recipe cannot take)."""


@dataclass
class Failure:
    rank: int
    check: str
    detail: str


@dataclass
class Coord:
    rank: int
    tp: int
    pp: int
    dp: int
    dp_size: int


@dataclass
class Layout:
    """One layout rehearsed: the recipe at it, each rank's coordinates (from Megatron's parallel
    state) and each (tp, pp) coordinate's parameters (from the meta model)."""

    recipe: object
    coords: list[Coord] = field(default_factory=list)
    specs: dict = field(default_factory=dict)  # (tp, pp) -> [ParamSpec]
    seconds: float = 0.0


def parse_layout(text: str) -> dict:
    out = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in ("tp", "pp", "vpp", "dp", "zero_stage", "zero") or not value.strip().isdigit():
            raise RehearseError(f"--resume-layout {text!r}: give key=value pairs of tp, pp, vpp, dp, zero_stage, "
                                "e.g. tp=4,pp=1,dp=64")
        out["zero_stage" if key == "zero" else key] = int(value)
    return out


def at_layout(recipe, what: str, **changes):
    from .plan import with_layout

    lay = recipe.layout
    if changes.get("pp", lay.pp) == 1 and "vpp" not in changes:
        changes["vpp"] = 1
    if changes.get("tp", lay.tp) == 1:
        changes.setdefault("sequence_parallel", False)
    try:
        return with_layout(recipe, **changes)
    except RecipeError as err:
        raise RehearseError(f"{what}: {' '.join(str(err).split())}") from None


def _fault() -> tuple[str, int] | None:
    spec = os.environ.get("GAPERON_REHEARSE_FAULT")
    if not spec:
        return None
    kind, _, rank = spec.partition(":")
    return kind, int(rank)


# ---------------------------------------------------------------------------- per rank, real code

def rehearse_layout(recipe) -> Layout:
    """Every rank's coordinates from Megatron's own initialize_model_parallel under the fake
    backend, and the meta model of each (tp, pp) coordinate."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from .checkpoint.owners import param_specs
    from .engine import init_model_parallel
    from .model import build_model

    out, t0 = Layout(recipe), time.perf_counter()
    world = recipe.layout.world_size
    for rank in range(world):
        dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
        try:
            init_model_parallel(recipe, gloo_side_groups=False)
            c = Coord(rank, ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                      ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
            out.coords.append(c)
            if (c.tp, c.pp) not in out.specs:
                chunks = build_model(recipe, on_gpu=False, meta=True)
                out.specs[(c.tp, c.pp)] = [s for _, s in param_specs(chunks, recipe.optimizer.weight_decay)]
                del chunks
        finally:
            ps.destroy_model_parallel()
            dist.destroy_process_group()
    out.seconds = time.perf_counter() - t0
    return out


def rank_writes(recipe, coord: Coord, specs) -> list[tuple]:
    """(key, tp, shape, fragment key, start, numel) this rank writes, as save._stage builds them."""
    from .checkpoint.owners import fragment_key, owned_ranges

    out = []
    for spec, (lo, hi) in zip(specs, owned_ranges(specs, recipe.layout.zero_stage, coord.dp, coord.dp_size)):
        if hi > lo and spec.stored:
            for kind in KINDS:
                out.append((f"{kind}/{spec.name}", coord.tp, spec.shape, fragment_key(kind, spec.name, lo), lo, hi - lo))
    return out


def tiling_failures(intervals: dict, sizes: dict, check: str, what: str) -> list[Failure]:
    """``intervals``: key -> [(lo, hi, rank)]; each key's intervals must tile [0, sizes[key]) once."""
    out = []
    for key, items in intervals.items():
        items.sort()
        pos, last = 0, None
        for lo, hi, rank in items:
            if lo < pos:
                out.append(Failure(rank, check, f"{what} {key} elements [{lo}, {min(hi, pos)}) twice (also rank {last})"))
                break
            if lo > pos:
                out.append(Failure(rank, check, f"{what} {key} elements [{pos}, {lo}) by no rank (next: rank {rank})"))
                break
            pos, last = hi, rank
        else:
            if pos != sizes[key]:
                out.append(Failure(last if last is not None else 0, check,
                                   f"{what} {key} elements [{pos}, {sizes[key]}) by no rank"))
    return out


@dataclass
class Saved:
    meta: dict
    written: dict[int, int]  # rank -> bytes
    files: dict[str, int]
    failures: list[Failure]
    total: int


def rehearse_save(lay: Layout) -> Saved:
    """What every rank writes, the checks on it, and the meta.json the commit would write."""
    from .checkpoint.format import build_meta
    from .checkpoint.owners import build_index, rng_file, shard_file

    recipe = lay.recipe
    elt = STORED_BYTES[recipe.train.precision]
    fault = _fault()
    failures, by_file, gathered, written = [], {}, [], {}
    spans, sizes = {}, {}
    for c in lay.coords:
        fname = shard_file(c.tp, c.pp, c.dp)
        if fault and fault[0] == "same_file" and c.rank == fault[1]:
            other = lay.coords[fault[1] - 1] if fault[1] else lay.coords[1]
            fname = shard_file(other.tp, other.pp, other.dp)
        entries = rank_writes(recipe, c, lay.specs[(c.tp, c.pp)])
        nbytes = sum(e[5] for e in entries) * elt
        written[c.rank] = nbytes
        for f in (fname, rng_file(c.rank)):
            if f in by_file:
                failures.append(Failure(c.rank, "one writer per file", f"{f} is also written by rank {by_file[f]}"))
            by_file.setdefault(f, c.rank)
        for key, tp, shape, _, start, numel in entries:
            k = (key, tp)
            spans.setdefault(k, []).append((start, start + numel, c.rank))
            sizes[k] = shape_numel(shape)
        gathered.append((fname, entries, {fname: nbytes, rng_file(c.rank): 20_000} if entries else
                         {rng_file(c.rank): 20_000}))
    # every (tensor, TP shard) must be covered; a shard no rank writes has no spans at all
    for (tp, pp), specs in lay.specs.items():
        for s in specs:
            for kind in KINDS:
                if (f"{kind}/{s.name}", tp) not in spans:
                    failures.append(Failure(0, "each element written once", f"{kind}/{s.name} tp {tp}: written by no rank"))
    failures += tiling_failures(spans, sizes, "each element written once", "written:")
    index, files, why = build_index(gathered)  # the commit's own index and tiling check
    if why and not failures:
        failures.append(Failure(0, "each element written once", why))
    lay_ = recipe.layout
    meta = build_meta(recipe, recipe.train.steps, 0, 0, 1, lay_.dp, lay_.world_size, recipe.train.stored_gain_scale,
                      files, index)
    return Saved(meta, written, files, failures, sum(sizes.values()) * elt)


def shape_numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass
class Loaded:
    read: dict[int, int]
    peak_whole: dict[int, int]  # rank -> bytes of the largest whole shard it assembles
    failures: list[Failure]


def rehearse_load(saved: Saved, lay: Layout) -> Loaded:
    """What every rank of ``lay`` reads resuming from ``saved``: owners.load_ranges (the load's
    ranges), CheckpointReader.resharded_reads / range_reads (the reader's plan) over the index."""
    from .checkpoint.owners import load_ranges, owned_ranges
    from .checkpoint.reader import CheckpointReader
    from .sharding import te_name

    recipe = lay.recipe
    reader = CheckpointReader.from_meta(saved.meta)
    elt = STORED_BYTES[saved.meta["precision"]]
    zero = recipe.layout.zero_stage
    failures, read, peak = [], {}, {}
    needed, sizes = {}, {}  # (key, tp, pp) -> [(lo, hi, rank)] over the DP group
    for c in lay.coords:
        specs = lay.specs[(c.tp, c.pp)]
        nbytes, whole, bad = 0, 0, None
        for spec, own in zip(specs, owned_ranges(specs, zero, c.dp, c.dp_size)):
            name = spec.name if reader.has(spec.name) or not reader.has(te_name(spec.name)) else te_name(spec.name)
            ranges = load_ranges(spec.numel, zero, own, c.dp, c.dp_size, KINDS[1:])
            for kind, (lo, hi, gathered) in ranges.items():
                key = f"{kind}/{name}"
                if not reader.has(name, kind):
                    bad = bad or f"the checkpoint has no {key}"
                    continue
                if reader.shard_numel(key, name, recipe.layout.tp) != spec.numel:
                    bad = bad or f"{key}: {reader.shard_numel(key, name, recipe.layout.tp)} elements stored per shard, {spec.numel} needed"
                    continue
                k = (key, c.tp, c.pp)
                needed.setdefault(k, []).append((lo, hi, c.rank))
                sizes[k] = spec.numel
                if gathered:
                    whole = max(whole, spec.numel * elt)
                if hi <= lo:
                    continue
                how, reads = reader.resharded_reads(key, name, recipe.layout.tp, c.tp, lo, hi)
                seen = []
                for st, a, b in reads:
                    got = sum(y - x for _, x, y in reader.range_reads(key, st, a, b))
                    if got != b - a:
                        bad = bad or f"{key} shard {st} elements [{a}, {b}): the index holds {got} of them"
                    seen.append((st, a, b))
                    nbytes += (b - a) * elt
                seen.sort()
                for (s0, a0, b0), (s1, a1, b1) in zip(seen, seen[1:]):
                    if s0 == s1 and a1 < b0:
                        bad = bad or f"{key} shard {s1} elements [{a1}, {min(b0, b1)}) read twice"
                if how == "ranges" and sum(b - a for _, a, b in reads) != hi - lo:
                    bad = bad or f"{key}: reads give {sum(b - a for _, a, b in reads)} elements of [{lo}, {hi})"
        if bad:
            failures.append(Failure(c.rank, "each needed element read once", bad))
        read[c.rank], peak[c.rank] = nbytes, whole
    failures += tiling_failures(needed, sizes, "each needed element read once", "needed on load:")
    return Loaded(read, peak, failures)


def rehearse_data(lay: Layout, steps: int) -> tuple[list[Failure], int]:
    """Each rank's samples of the first ``steps`` steps (data.sample_indices, with the DP rank
    Megatron gave it): per step a partition of the global batch, in the order a 1-rank run draws
    it, every rank of one DP group drawing the same."""
    from .data import sample_indices

    recipe = lay.recipe
    gb = recipe.layout.global_batch
    one = at_layout(recipe, "the 1-rank reference", tp=1, pp=1, dp=1)
    fault = _fault()
    failures = []
    for step in range(steps):
        consumed = step * gb
        by_dp, owner, first = {}, {}, {}
        for c in lay.coords:
            drawn = [i for r in sample_indices(consumed, recipe, c.dp) for i in r]
            if fault and fault[0] == "sample_twice" and c.rank == fault[1]:
                drawn = [i for r in sample_indices(consumed, recipe, (c.dp - 1) % c.dp_size) for i in r]
            if c.dp in by_dp:
                if drawn != by_dp[c.dp]:
                    failures.append(Failure(c.rank, "one batch per DP group",
                                            f"step {step}: draws other samples than rank {first[c.dp]} of DP rank {c.dp}"))
                continue
            for i in drawn:
                if i in owner:
                    failures.append(Failure(c.rank, "samples partition the global batch",
                                            f"step {step}: sample {i} drawn twice (also DP rank {owner[i]})"))
                    break
                owner[i] = c.dp
            by_dp[c.dp] = drawn
            first[c.dp] = c.rank
        union = [i for d in sorted(by_dp) for i in by_dp[d]]
        reference = [i for r in sample_indices(consumed, one, 0) for i in r]
        if sorted(set(union)) != sorted(reference) and not failures:
            missing = sorted(set(reference) - set(union))
            failures.append(Failure(0, "samples partition the global batch",
                                    f"step {step}: {len(missing)} samples drawn by no rank (first {missing[:1]})"))
        elif union != reference and not failures:
            failures.append(Failure(0, "samples match a 1-rank run", f"step {step}: the DP ranks' samples, in DP "
                                    "order, are not the 1-rank run's order"))
    return failures, steps * gb


# ---------------------------------------------------------------------------- figures and checks

def _gb(n: float) -> str:
    """Bytes in GB, or MB / kB when smaller."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3f} {unit}"
    return f"{n:.0f} B"


def _ratio(values: dict[int, int], ideal: float) -> tuple[float, float]:
    vals = list(values.values())
    return max(vals) / ideal, statistics.median(vals) / ideal


def index_bytes(recipe, lay: Layout, world: int) -> int | None:
    """meta.json's size if the same (tp, pp) ran at ``world`` (dp = world / (tp x pp))."""
    lay0 = recipe.layout
    if world % (lay0.tp * lay0.pp) or world == 0:
        return None
    try:
        other = at_layout(recipe, f"world {world}", dp=world // (lay0.tp * lay0.pp))
    except RehearseError:
        return None
    dp = other.layout.dp
    coords = [Coord(i, c.tp, c.pp, d, dp) for i, (c, d) in enumerate(
        (c, d) for c in {(x.tp, x.pp): x for x in lay.coords}.values() for d in range(dp))]
    saved = rehearse_save(Layout(other, coords, lay.specs))
    return len(json.dumps(saved.meta))


def run(recipe, steps: int, resume: dict | None, out=None) -> int:
    from . import plan as planner

    t0 = time.perf_counter()
    say = lambda s="": print(s, file=out or sys.stdout, flush=True)  # noqa: E731
    lay_ = recipe.layout
    say(f"rehearse {recipe.model.name} at world {lay_.world_size}: tp={lay_.tp} pp={lay_.pp} vpp={lay_.vpp} "
        f"dp={lay_.dp} zero={lay_.zero_stage} {recipe.train.precision}; fake process group, meta tensors")
    lay = rehearse_layout(recipe)
    say(f"  parallel state: {lay_.world_size} ranks through Megatron's initialize_model_parallel "
        f"in {lay.seconds:.1f} s; {len(lay.specs)} (tp, pp) coordinates built on the meta device")
    failures: list[Failure] = []
    rows: list[tuple[str, str, bool]] = []

    def check(name: str, figure: str, fs: list[Failure]):
        failures.extend(fs)
        rows.append((name, figure + (f"; FAILS at rank {fs[0].rank}: {fs[0].detail}" if fs else ""), not fs))

    # parallel state: coordinates form the grid
    seen = {}
    grid = []
    for c in lay.coords:
        if (c.tp, c.pp, c.dp) in seen or c.dp_size != lay_.dp:
            grid.append(Failure(c.rank, "parallel state", f"(tp {c.tp}, pp {c.pp}, dp {c.dp}/{c.dp_size}) also "
                                f"rank {seen.get((c.tp, c.pp, c.dp))}"))
        seen[(c.tp, c.pp, c.dp)] = c.rank
    check("parallel state", f"{len(seen)} distinct (tp, pp, dp) coordinates for {lay_.world_size} ranks", grid)

    # parameters per rank vs the planner
    param_fs, counts = [], {}
    for c in lay.coords:
        n = sum(s.numel for s in lay.specs[(c.tp, c.pp)])
        counts[c.pp] = n
        want = planner.stage_params(recipe, c.pp)
        if n != want:
            param_fs.append(Failure(c.rank, "parameters per rank = planner", f"{n:,} on the meta model, planner {want:,}"))
    check("parameters per rank = planner", "meta model " + ", ".join(f"stage {p} {n:,}" for p, n in
                                                                      sorted(counts.items())) + " = plan.stage_params",
          param_fs[:1])

    saved = rehearse_save(lay)
    elt = STORED_BYTES[recipe.train.precision]
    shards = len({(k, t) for k, ss in saved.meta["index"].items() for t in range(len(ss))})
    parts = sum(len(s["parts"]) for ss in saved.meta["index"].values() for s in ss)
    writes_tile = [f for f in saved.failures if f.check == "each element written once"]
    check("each element written once", f"{shards:,} (tensor, TP shard) states, {saved.total / elt:,.0f} "
          f"elements, {parts:,} fragments tile them exactly", writes_tile)
    files_fs = [f for f in saved.failures if f.check == "one writer per file"]
    check("one writer per file", f"{len(saved.files):,} files, {lay_.world_size} writers", files_fs)
    ideal = saved.total / lay_.world_size
    wmax, wmed = _ratio(saved.written, ideal)
    ck = planner.checkpoint_io(recipe)
    agree = max(saved.written.values()) / ck.write
    check("bytes written / ideal", f"max {wmax:.3f}x, median {wmed:.3f}x of {_gb(ideal)}; busiest "
          f"{_gb(max(saved.written.values()))} vs planner {_gb(ck.write)} ({agree:.4f}); total "
          f"{_gb(saved.total)} vs planner {_gb(ck.total)}",
          [] if abs(agree - 1) < 0.01 and abs(saved.total / ck.total - 1) < 1e-9 else
          [Failure(max(saved.written, key=saved.written.get), "bytes written / ideal", "disagrees with the planner")])

    size = len(json.dumps(saved.meta))
    i64, i256 = index_bytes(recipe, lay, 64), index_bytes(recipe, lay, 256)
    growth = f"; at world 64 {_gb(i64)}, 256 {_gb(i256)} ({i256 / i64:.2f}x)" if i64 and i256 else ""
    check("meta.json index", f"{_gb(size)} at world {lay_.world_size}{growth}",
          [] if not (i64 and i256) or i256 / i64 <= 4.0 else [Failure(0, "meta.json index", "grows faster than world")])

    loads = [("same layout", lay)]
    if resume:
        other = at_layout(recipe, "--resume-layout", **resume)
        loads.append((f"tp={other.layout.tp} pp={other.layout.pp} vpp={other.layout.vpp} dp={other.layout.dp} "
                      f"zero={other.layout.zero_stage}", rehearse_layout(other)))
    for what, target in loads:
        loaded = rehearse_load(saved, target)
        ideal_r = saved.total / target.recipe.layout.world_size
        rmax, rmed = _ratio(loaded.read, ideal_r)
        check(f"resume at {what}: each needed element read once",
              f"{target.recipe.layout.world_size} ranks; read max {rmax:.3f}x, median {rmed:.3f}x of "
              f"{_gb(ideal_r)} ideal", loaded.failures)
        if target is lay:
            agree_r = max(loaded.read.values()) / ck.read
            check("bytes read / ideal", f"busiest {_gb(max(loaded.read.values()))} vs planner "
                  f"{_gb(ck.read)} ({agree_r:.4f})",
                  [] if abs(agree_r - 1) < 0.01 else [Failure(max(loaded.read, key=loaded.read.get),
                                                              "bytes read / ideal", "disagrees with the planner")])
            peak = max(loaded.peak_whole.values())

    data_fs, n = rehearse_data(lay, steps)
    check("samples partition each global batch = 1-rank run",
          f"{steps} steps x {lay_.global_batch} samples over {lay_.dp} DP ranks, each drawn once", data_fs)
    mem = planner.estimate_memory(recipe, planner.peak_pp_rank(recipe))
    check("host memory per rank", f"save stages {_gb(max(saved.written.values()))} (its share, copied "
          f"before the write); load assembles at most {_gb(peak)} (one whole weight shard); planner's "
          f"device model states {_gb(sum(mem[k] for k in planner.STATE_KEYS))}", [])

    for name, figure, ok in rows:
        say(f"  {'ok  ' if ok else 'FAIL'} {name}: {figure}")
    say(f"rehearsal took {time.perf_counter() - t0:.1f} s")
    if failures:
        f = failures[0]
        print(f"rehearse: rank {f.rank} fails '{f.check}': {f.detail}", file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = ArgParser(prog="rehearse", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*", help="section.key=value recipe overrides")
    ap.add_argument("--world", type=int, default=None, help="ranks (default: the recipe's tp x pp x dp)")
    ap.add_argument("--resume-layout", default=None, help="also rehearse a resume at tp=..,pp=..,dp=..")
    ap.add_argument("--steps", type=int, default=2, help="steps whose samples are checked (default 2)")
    args = ap.parse_intermixed_args(argv)
    try:
        import torch.distributed as dist

        if args.steps < 1:
            raise RehearseError(f"--steps {args.steps} must be >= 1")
        try:
            recipe = load_recipe(args.recipe, args.overrides)
        except RecipeError as err:
            raise RehearseError(err if args.recipe in str(err) else f"{args.recipe}: {err}") from None
        lay = recipe.layout
        if args.world is not None:
            if args.world < 1 or args.world % (lay.tp * lay.pp):
                raise RehearseError(f"--world {args.world} is not a multiple of tp x pp = {lay.tp * lay.pp}")
            recipe = at_layout(recipe, f"--world {args.world}", dp=args.world // (lay.tp * lay.pp))
        resume = parse_layout(args.resume_layout) if args.resume_layout else None
        if dist.is_initialized():
            raise RehearseError("a process group is already initialised in this process: run the rehearsal alone")
        from . import quiet

        quiet.install()
        return run(recipe, args.steps, resume)
    except GaperonError as err:
        return report(err)
