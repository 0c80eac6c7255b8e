#!/usr/bin/env python
"""Benchmark the HF export of a 1.5B checkpoint: wall time and peak RSS next to a plain copy.

    python benchmarks/bench_convert.py [--workdir /tmp/bench_convert] [--dtype bf16] [--with-verify] [--keep]

The checkpoint is NOT trained: a randomly initialised Gaperon-1.5B (recipes/1.5b.yaml shapes) is
written directly in our format at tp 2, pp 2 (4 rank files) from random canonical tensors, through
``convert.write_checkpoint`` (the same writer ``from-hf`` uses), model weights only (fp32, no Adam
states: 6.0 GB instead of 18 GB). Then, on whatever cores the machine gives:

  1. ``cp -r`` of the checkpoint directory (the same bytes), wall time;
  2. ``tools/convert_checkpoint.py to-hf --no-verify`` in a subprocess: wall time, and peak RSS
     from ``os.wait4`` (the child's own ru_maxrss);
  3. with ``--with-verify``: the same with the default post-export check (first 2 layers).

Goals: conversion wall <= 2 x copy wall; conversion peak RSS <= 25% of the checkpoint's bytes.
Both runs read a checkpoint that is in the page cache (it was just written; the copy runs first).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """(wall s, peak RSS bytes of that child, output tail)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-4000:]}")
    return wall, usage.ru_maxrss * 1024, out


def write_random_checkpoint(path: Path) -> None:
    import torch

    from megatron_ext.config import load_recipe
    from megatron_ext.convert import write_checkpoint

    recipe = load_recipe(ROOT / "recipes" / "1.5b.yaml",
                         ["layout.tp=2", "layout.pp=2", "layout.dp=1", "layout.zero_stage=1",
                          "data.kind=synthetic"])
    gen = torch.Generator().manual_seed(0)
    std = recipe.model.init_std

    def canonical(name: str):
        from megatron_ext.convert import canonical_shapes
        from megatron_ext.sharding import is_norm_gain

        shape = canonical_shapes(recipe.model)[name]
        if is_norm_gain(name):
            return torch.ones(shape)
        return torch.empty(shape).normal_(0.0, std, generator=gen)

    def vocab_rows(name: str, a: int, b: int):
        return torch.empty(b - a, recipe.model.hidden_size).normal_(0.0, std, generator=gen)

    write_checkpoint(path, recipe, canonical, vocab_rows, progress=True, desc="random 1.5B",
                     extra_meta={"note": "random init written by benchmarks/bench_convert.py"})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/bench_convert")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--with-verify", action="store_true", help="also time the export with its default check")
    p.add_argument("--keep", action="store_true", help="keep the files (default: delete them at the end)")
    args = p.parse_args()

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt, copy, out = work / "ckpt_1p5b_tp2_pp2", work / "copy", work / "hf"
    for d in (copy, out, work / "hf_verified"):
        shutil.rmtree(d, ignore_errors=True)
    need = 6.0e9 + 6.0e9 + (3.0e9 if args.dtype == "bf16" else 6.0e9) * (2 if args.with_verify else 1)
    free = shutil.disk_usage(work).free
    if not (ckpt / "meta.json").is_file() and free < need + 6.0e9:
        raise SystemExit(f"{work}: {free / 1e9:.1f} GB free, the benchmark needs about {(need + 6e9) / 1e9:.0f} GB")

    if not (ckpt / "meta.json").is_file():
        shutil.rmtree(ckpt, ignore_errors=True)
        t0 = time.perf_counter()
        write_random_checkpoint(ckpt)
        print(f"wrote random 1.5B checkpoint {ckpt} in {time.perf_counter() - t0:.1f} s", flush=True)
    os.sync()
    ckpt_bytes = dir_bytes(ckpt)

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
    cp_wall, cp_rss, _ = run_measured(["cp", "-r", str(ckpt), str(copy)])
    os.sync()
    shutil.rmtree(copy)
    cmd = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "to-hf", str(ckpt), str(out),
           "--dtype", args.dtype, "--no-progress"]
    conv_wall, conv_rss, log = run_measured(cmd + ["--no-verify"], env)
    os.sync()
    found = re.search(r"^wrote .* in ([0-9.]+) s$", log, re.M)
    work_s = float(found.group(1)) if found else float("nan")
    out_bytes = dir_bytes(out)
    res = {"checkpoint_bytes": ckpt_bytes, "export_bytes": out_bytes, "dtype": args.dtype, "cores": os.cpu_count(),
           "cp_wall_s": round(cp_wall, 2), "convert_wall_s": round(conv_wall, 2),
           "convert_work_s": work_s, "convert_peak_rss_bytes": conv_rss,
           "wall_ratio": round(conv_wall / cp_wall, 2), "rss_fraction": round(conv_rss / ckpt_bytes, 3)}
    if args.with_verify:
        v_wall, v_rss, vlog = run_measured(cmd[:4] + [str(work / "hf_verified")] + cmd[5:], env)
        res.update(verify_wall_s=round(v_wall, 2), verify_peak_rss_bytes=v_rss,
                   verify_line=next((ln for ln in vlog.splitlines() if ln.startswith("verify:")), ""))
    print(f"\ncheckpoint: {ckpt_bytes / 1e9:.2f} GB (1.5B fp32 weights, tp 2 x pp 2 files, no Adam states)")
    print(f"cp -r:                {cp_wall:7.1f} s")
    print(f"to-hf --no-verify:    {conv_wall:7.1f} s  (conversion itself {work_s:.1f} s, the rest is Python + "
          f"megatron imports)  -> {conv_wall / cp_wall:.2f} x copy (goal <= 2)")
    print(f"  peak RSS:           {conv_rss / 2**30:7.2f} GiB -> {100 * conv_rss / ckpt_bytes:.1f}% of the "
          f"checkpoint (goal <= 25%); export {out_bytes / 1e9:.2f} GB {args.dtype}")
    if args.with_verify:
        print(f"to-hf (with verify):  {res['verify_wall_s']:7.1f} s, peak RSS {res['verify_peak_rss_bytes'] / 2**30:.2f} GiB")
        print(f"  {res['verify_line']}")
    print(json.dumps(res))
    if not args.keep:
        for d in (ckpt, out, work / "hf_verified"):
            shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
