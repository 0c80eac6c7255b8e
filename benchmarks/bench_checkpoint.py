#!/usr/bin/env python
"""Checkpoint I/O per rank: measured on real CPU runs, and planned for the cluster recipes.

(a) real 4-rank runs of the tiny recipe at (tp, pp, dp, zero) in (1,1,4,1), (2,1,2,1), (2,2,1,1),
    (1,1,4,2): one run saves, a second resumes from it (at the same layout, then at a TP change
    2 -> 1 and 1 -> 2); every rank counts the checkpoint bytes it read and wrote (checkpoint.IO_BYTES, written out with GAPERON_IO_STATS). The figure is the
    busiest rank over the ideal, ideal = checkpoint bytes / world size.
(b) the same rules computed without data (plan.checkpoint_io) for the 1.5b / 8b / 24b recipes at
    their own cluster layouts, with the time at a stated file-system bandwidth per rank, and what
    the busiest rank read before ranks read only their share (every TP shard of its stage, whole).
(c) the training time a save blocks (``checkpoint_blocking_s`` in metrics.jsonl), synchronous vs
    ``checkpoint.async_save=true``, at the same layout, on a wider model (hidden 1024, ~160 MB).

    python benchmarks/bench_checkpoint.py            # all parts (~5 min on 2 CPU cores)
    python benchmarks/bench_checkpoint.py --plan     # (b) only
    python benchmarks/bench_checkpoint.py --vs-dcp   # (d) only: ours vs torch.distributed.checkpoint

(d) ours vs PyTorch DCP on the same bytes per rank: 4 gloo ranks, tp2 x dp2 ZeRO-1 fp32, the tiny
    recipe widened to hidden 1024 (~742 MB of weights and Adam moments, a quarter per rank); DCP
    saves exactly the tensors of each rank's file (FileSystemWriter, sync_files=True: fsync on for
    both); and a copy of each rank's files with an fsync each. Rounds alternate which goes first
    (benchmarks/bench_ckpt_vs_dcp.py holds the rank processes). Prints ``save vs DCP: X.XXx`` and
    ``load vs DCP: Y.YYx`` (ours / DCP seconds, median of the rounds; min and max beside) and
    ``save vs copy+fsync``.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from megatron_ext.config import load_recipe  # noqa: E402
from megatron_ext.plan import FS_BANDWIDTH_GBS, checkpoint_io  # noqa: E402

LAYOUTS = [(1, 1, 4, 1), (2, 1, 2, 1), (2, 2, 1, 1), (1, 1, 4, 2)]
TP_CHANGES = [((2, 1, 2, 1), (1, 1, 4, 1)), ((1, 1, 4, 1), (2, 1, 2, 1))]  # resumed at another TP degree


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out: Path, stats: Path, layout, steps: int, *extra: str) -> None:
    tp, pp, dp, zero = layout
    env = {**os.environ, "GAPERON_DEVICE": "cpu", "OMP_NUM_THREADS": "1", "GAPERON_IO_STATS": str(stats)}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={tp * pp * dp}",
           f"--master-port={_port()}", str(ROOT / "tools" / "train.py"), str(ROOT / "recipes" / "tiny.yaml"),
           f"layout.tp={tp}", f"layout.pp={pp}", f"layout.dp={dp}", f"layout.zero_stage={zero}",
           "train.precision=fp32", "train.tensorboard=false", f"train.steps={steps}", f"train.output_dir={out}",
           *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")


def _per_rank(stats: Path, key: str) -> list[int]:
    return [json.loads(p.read_text())[key] for p in sorted(stats.glob("rank*.json"))]


def measured() -> None:
    print("(a) measured, tiny recipe, fp32, 4 CPU ranks: bytes per rank (busiest / ideal)")
    print("| tp,pp,dp,zero | checkpoint bytes | ideal/rank | max written | ratio | max read | ratio |")
    print("|---|---|---|---|---|---|---|")
    for layout, resume_at in [(lay, lay) for lay in LAYOUTS] + TP_CHANGES:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run"
            _run(out, Path(tmp) / "save", layout, steps=2)
            _run(out, Path(tmp) / "load", resume_at, steps=3)  # resumes from step 2, then trains one more
            ckpt = out / "checkpoints" / "step_00000002"
            total = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
            ideal = total / 4
            wrote = max(_per_rank(Path(tmp) / "save", "written"))
            read = max(_per_rank(Path(tmp) / "load", "read"))
            name = ",".join(map(str, layout)) + ("" if resume_at == layout else " -> " + ",".join(map(str, resume_at)))
            print(f"| {name} | {total:,} | {ideal:,.0f} | {wrote:,} | {wrote / ideal:.2f} "
                  f"| {read:,} | {read / ideal:.2f} |", flush=True)


def planned() -> None:
    print(f"(b) planned (plan.checkpoint_io), at {FS_BANDWIDTH_GBS:g} GB/s per rank")
    print("| recipe | layout | world | checkpoint | per rank (write = read) | ratio | save/load s | "
          "read per rank before | before / ideal |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in ("1.5b", "8b", "24b"):
        r = load_recipe(ROOT / "recipes" / f"{size}.yaml")
        lay, io = r.layout, checkpoint_io(r)
        print(f"| {size} | tp{lay.tp} pp{lay.pp} dp{lay.dp} zero{lay.zero_stage} | {lay.world_size} | "
              f"{io.total / 1e9:.1f} GB | {io.write / 1e9:.2f} GB | {io.ratio:.2f} | {io.save_s:.1f} | "
              f"{io.read_before / 1e9:.1f} GB | {io.read_before / io.ideal:.0f} |")


def stall() -> None:
    wide = ["model.hidden_size=1024", "model.ffn_hidden_size=4096", "model.num_attention_heads=8",
            "checkpoint.interval=4", "checkpoint.keep_last=1"]
    print("(c) training time blocked per save, hidden 1024 (~13M params, 160 MB per checkpoint), 2 ranks dp2 ZeRO-1")
    print("| save | median blocking s | saves |")
    print("|---|---|---|")
    medians = {}
    for mode in ("false", "true"):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run"
            _run(out, Path(tmp) / "io", (1, 1, 2, 1), 13, *wide, f"checkpoint.async_save={mode}")
            rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            blocked = sorted(r["checkpoint_blocking_s"] for r in rows if "checkpoint_blocking_s" in r)
            medians[mode] = blocked[len(blocked) // 2]
            print(f"| {'async' if mode == 'true' else 'sync'} | {medians[mode]:.4f} | {len(blocked)} |", flush=True)
    print(f"async / sync blocking: {medians['true'] / medians['false']:.3f}")


def vs_dcp(rounds: int) -> None:
    import statistics

    env = {**os.environ, "GAPERON_DEVICE": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory(dir=os.environ.get("GAPERON_BENCH_DIR")) as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=4", f"--master-port={_port()}",
               str(ROOT / "benchmarks" / "bench_ckpt_vs_dcp.py"), tmp, str(rounds)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    rows = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    print("(d) ours vs torch.distributed.checkpoint, 4 gloo ranks, tp2 x dp2 ZeRO-1 fp32, hidden 1024, fsync on")
    print("| round | load avg | MB/rank | ours save s | DCP save s | copy+fsync s | ours load s | DCP load s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['round']} | {r['load']:.1f} | {r['bytes_per_rank'] / 1e6:.0f} | {r['ours_save_s']:.2f} | "
              f"{r['dcp_save_s']:.2f} | {r['copy_fsync_s']:.2f} | {r['ours_load_s']:.2f} | {r['dcp_load_s']:.2f} |")

    def spread(values):
        return f"{statistics.median(values):.2f}x (min {min(values):.2f}x, max {max(values):.2f}x, {len(values)} rounds)"

    print("save vs DCP: " + spread([r["ours_save_s"] / r["dcp_save_s"] for r in rows]))
    print("load vs DCP: " + spread([r["ours_load_s"] / r["dcp_load_s"] for r in rows]))
    print("save vs copy+fsync of its files: " + spread([r["ours_save_s"] / r["copy_fsync_s"] for r in rows]))
    print("CPU-seconds (4 ranks), which other jobs do not move: save vs DCP "
          + spread([r["ours_save_cpu_s"] / r["dcp_save_cpu_s"] for r in rows]) + "; load vs DCP "
          + spread([r["ours_load_cpu_s"] / r["dcp_load_cpu_s"] for r in rows]) + "; save vs copy+fsync "
          + spread([r["ours_save_cpu_s"] / r["copy_fsync_cpu_s"] for r in rows]))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", action="store_true", help="only the planned part (b)")
    ap.add_argument("--vs-dcp", action="store_true", help="only (d): ours vs DCP")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of (d)")
    args = ap.parse_args()
    if args.vs_dcp:
        vs_dcp(args.rounds)
        sys.exit(0)
    planned()
    if not args.plan:
        print()
        measured()
        print()
        stall()
