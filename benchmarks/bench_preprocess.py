#!/usr/bin/env python
"""Preprocessing throughput at production vocab size: ours against Megatron-LM's
tools/preprocess_data.py, in one run, alternating, end to end (start-up included) and steady state.

    python benchmarks/bench_preprocess.py --work-dir /tmp/bench --size-mb 56 --megatron-lm /tmp/mlm

prints first, per corpus, ``end to end vs Megatron-LM (<corpus>, N worker): X.XXx`` (tokens per
CPU-second of the whole run, ours / Megatron-LM's; median of the rounds, min and max beside).

1. writes the demo corpus (megatron_ext/corpus.py) and builds two JSONL inputs of at most
   --size-mb MB, each with a quarter-size copy (deterministic):
   * ``repeated``: the demo documents cycled round-robin over fr/en/code until the size (the
     small French part repeats many times, so the encoders' piece caches see repeated text);
   * ``unique``: every distinct demo document once (exact duplicates dropped), round-robin over
     the languages until each runs out or the size is reached: no document repeats;
2. trains a byte-level BPE of 128,256 tokens (Llama-3.1's size, same pre-tokenizer) on the unique
   demo text, unless --tokenizer names one (e.g. the real Llama-3.1 tokenizer directory);
3. runs every command as its own process, round after round in the same order (A B A B ...),
   on the full and the quarter corpus. CPU seconds are the kernel's count for the process and its
   workers (os.wait4), so a machine shared with other jobs moves wall time, not CPU time. Steady
   state = (tokens_full - tokens_quarter) / (cpu_full - cpu_quarter): start-up (imports, pool
   start, tokenizer load and check) cancels out. Medians over the rounds are printed as JSON;
4. checks that every output is byte-identical to Megatron-LM's.

--megatron-lm: a directory holding Megatron-LM's tools/preprocess_data.py (tag core_v0.16.1) and
its megatron/training + megatron/legacy packages, with megatron/training/__init__.py trimmed to its
global_vars imports; it runs against this venv's megatron-core. Keep it outside this repository.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from megatron_ext.corpus import build_demo_corpus  # noqa: E402
from megatron_ext.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402


def repeat_to_size(sources: list[Path], out: Path, size_bytes: int) -> int:
    """Cycle through the sources' documents (one from each language in turn) until ``size_bytes``."""
    docs = [[line for line in open(p, encoding="utf-8")] for p in sources]
    written = n = 0
    with open(out, "w", encoding="utf-8") as f:
        while written < size_bytes:
            for group in docs:
                line = group[n % len(group)]
                f.write(line)
                written += len(line.encode("utf-8"))
            n += 1
    return written


def unique_to_size(sources: list[Path], out: Path, size_bytes: int) -> int:
    """Every distinct document once, one from each language in turn, until ``size_bytes``."""
    seen: set[str] = set()
    docs = [[line for line in open(p, encoding="utf-8")] for p in sources]
    written = n = 0
    with open(out, "w", encoding="utf-8") as f:
        while written < size_bytes and any(n < len(group) for group in docs):
            for group in docs:
                if n < len(group) and group[n] not in seen and written < size_bytes:
                    seen.add(group[n])
                    f.write(group[n])
                    written += len(group[n].encode("utf-8"))
            n += 1
    return written


def timed(cmd: list[str], log: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process and its reaped children) of one command."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")
    return wall, usage.ru_utime + usage.ru_stime


def tokens_of(prefix: str) -> int:
    from megatron_ext.preprocess import dataset_tokens
    return dataset_tokens(prefix)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", default="runs/bench_preprocess")
    ap.add_argument("--size-mb", type=float, default=60.0,
                    help="big enough that the steady part dwarfs start-up (~10 CPU-s per run)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1, help="workers of every run")
    ap.add_argument("--corpus", choices=["repeated", "unique", "both"], default="both")
    ap.add_argument("--with-hf", action="store_true", help="also ours with --encoder hf")
    ap.add_argument("--vocab-size", type=int, default=128_256)
    ap.add_argument("--tokenizer", default=None, help="use this tokenizer instead of training one")
    ap.add_argument("--megatron-lm", default=None, help="Megatron-LM checkout prepared as above (else: ours only)")
    ap.add_argument("--demo-mb", type=float, default=24.0,
                    help="unique demo text per language (24: enough for BPE to learn all 128k tokens)")
    args = ap.parse_args(argv)
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)

    demo = build_demo_corpus(work / "demo", int(args.demo_mb * 1e6))
    corpora = {}
    for kind in (["repeated", "unique"] if args.corpus == "both" else [args.corpus]):
        make = repeat_to_size if kind == "repeated" else unique_to_size
        full, quarter = work / f"corpus-{kind}.jsonl", work / f"corpus-{kind}-quarter.jsonl"
        size = make(list(demo.values()), full, int(args.size_mb * 1e6))
        make(list(demo.values()), quarter, size // 4)
        corpora[kind] = (full, quarter)
    tok_path = args.tokenizer or str(work / "bpe")
    if not args.tokenizer and not (work / "bpe" / "tokenizer.json").is_file():
        train_tokenizer(list(demo.values()), work / "bpe", args.vocab_size)
    print(f"corpora {', '.join(f'{k} {v[0].stat().st_size / 1e6:.1f} MB' for k, v in corpora.items())} (+ quarter "
          f"copies); tokenizer {tok_path} vocab {load_tokenizer(tok_path).vocab_size:,}; "
          f"{len(os.sched_getaffinity(0))} CPUs, load {os.getloadavg()[0]:.1f} (other jobs share them: CPU seconds "
          "are the figure to trust)", flush=True)

    w = str(args.workers)
    ours = [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--tokenizer", tok_path, "--no-progress",
            "--workers", w]
    commands = {  # name -> (argv for an input and an output prefix, the prefix that holds the result)
        "ours": lambda src, out: (ours + ["--input", src, "--output-prefix", out], out),
    }
    if args.with_hf:
        commands["ours, hf encoder"] = lambda src, out: (ours + ["--input", src, "--output-prefix", out,
                                                                "--encoder", "hf"], out)
    mlm_name = "Megatron-LM"
    if args.megatron_lm:
        mlm = [sys.executable, str(Path(args.megatron_lm) / "tools" / "preprocess_data.py"), "--tokenizer-type",
               "HuggingFaceTokenizer", "--tokenizer-model", tok_path, "--append-eod", "--json-keys", "text",
               "--workers", w]
        commands[mlm_name] = lambda src, out: (mlm + ["--input", src, "--output-prefix", out], out + "_text_document")

    runs: dict[tuple[str, str], list[dict]] = {(c, n): [] for c in corpora for n in commands}
    for r in range(args.rounds):
        for kind, (full, quarter) in corpora.items():
            for name, make in commands.items():
                slug = kind + "_" + "".join(c if c.isalnum() else "_" for c in name)
                row = {"load": os.getloadavg()[0]}
                for size, src in (("full", full), ("quarter", quarter)):
                    cmd, result = make(str(src), str(work / f"{slug}_{size}"))
                    wall, cpu = timed(cmd, work / f"{slug}_{size}.log")
                    row[size] = {"wall_s": wall, "cpu_s": cpu, "tokens": tokens_of(result), "prefix": result}
                f, q = row["full"], row["quarter"]
                row["steady_tokens_per_cpu_s"] = (f["tokens"] - q["tokens"]) / max(f["cpu_s"] - q["cpu_s"], 1e-9)
                row["end_to_end_tokens_per_cpu_s"] = f["tokens"] / f["cpu_s"]
                runs[(kind, name)].append(row)
                print(f"round {r + 1} {kind:8s} {name:18s} end to end {row['end_to_end_tokens_per_cpu_s']:>10,.0f} "
                      f"tokens/CPU-s (full run {f['cpu_s']:.1f} CPU-s, {f['wall_s']:.1f} s wall, load "
                      f"{row['load']:.1f}); steady {row['steady_tokens_per_cpu_s']:>10,.0f} tokens/CPU-s", flush=True)

    def spread(values):
        return f"{statistics.median(values):.2f}x (min {min(values):.2f}x, max {max(values):.2f}x)"

    identical, summary = {}, {}
    for kind in corpora:
        ref_name = mlm_name if args.megatron_lm else "ours"
        reference = runs[(kind, ref_name)][-1]["full"]["prefix"]
        for name in commands:
            rows = runs[(kind, name)]
            identical[(kind, name)] = all(
                Path(rows[-1]["full"]["prefix"] + e).read_bytes() == Path(reference + e).read_bytes()
                for e in (".bin", ".idx"))
            summary[f"{kind}: {name}"] = {
                "median_end_to_end_tokens_per_cpu_s": round(statistics.median(
                    x["end_to_end_tokens_per_cpu_s"] for x in rows)),
                "median_steady_tokens_per_cpu_s": round(statistics.median(x["steady_tokens_per_cpu_s"] for x in rows)),
                "tokens": rows[-1]["full"]["tokens"], "identical_to_reference": identical[(kind, name)]}
    print(json.dumps({"rounds": args.rounds, "workers": args.workers, "results": summary}, indent=1))
    if args.megatron_lm:
        for kind in corpora:
            theirs = runs[(kind, mlm_name)]
            for name in [n for n in commands if n != mlm_name]:
                ours_rows = runs[(kind, name)]
                e2e = [o["end_to_end_tokens_per_cpu_s"] / t["end_to_end_tokens_per_cpu_s"]
                       for o, t in zip(ours_rows, theirs)]
                steady = [o["steady_tokens_per_cpu_s"] / t["steady_tokens_per_cpu_s"] for o, t in zip(ours_rows, theirs)]
                label = "" if name == "ours" else f" [{name}]"
                print(f"end to end vs Megatron-LM ({kind}, {args.workers} worker){label}: {spread(e2e)}")
                print(f"  steady state vs Megatron-LM ({kind}){label}: {spread(steady)}")
    return 0 if all(identical.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
