#!/usr/bin/env python
"""Preprocessing throughput at production vocab size: ours against Megatron-LM's
tools/preprocess_data.py, and ours with 1 and 2 workers, in one run, alternating.

    python benchmarks/bench_preprocess.py --work-dir /tmp/bench --size-mb 60 --megatron-lm /tmp/mlm

1. writes the demo corpus (megatron_ext/corpus.py) and repeats its documents, round-robin over
   fr/en/code, into one JSONL of at least --size-mb MB, plus a quarter-size copy (deterministic);
2. trains a byte-level BPE of 128,256 tokens (Llama-3.1's size, same pre-tokenizer) on the unique
   demo text, unless --tokenizer names one (e.g. the real Llama-3.1 tokenizer directory);
3. runs every command as its own process, round after round in the same order (A B C A B C ...),
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
    ap.add_argument("--workers", type=int, default=2, help="workers of the ours-vs-Megatron-LM runs")
    ap.add_argument("--vocab-size", type=int, default=128_256)
    ap.add_argument("--tokenizer", default=None, help="use this tokenizer instead of training one")
    ap.add_argument("--megatron-lm", default=None, help="Megatron-LM checkout prepared as above (else: ours only)")
    ap.add_argument("--demo-mb", type=float, default=24.0,
                    help="unique demo text per language (24: enough for BPE to learn all 128k tokens)")
    args = ap.parse_args(argv)
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)

    demo = build_demo_corpus(work / "demo", int(args.demo_mb * 1e6))
    full, quarter = work / "corpus.jsonl", work / "corpus-quarter.jsonl"
    repeat_to_size(list(demo.values()), full, int(args.size_mb * 1e6))
    repeat_to_size(list(demo.values()), quarter, int(args.size_mb * 1e6 / 4))
    tok_path = args.tokenizer or str(work / "bpe")
    if not args.tokenizer and not (work / "bpe" / "tokenizer.json").is_file():
        train_tokenizer(list(demo.values()), work / "bpe", args.vocab_size)
    print(f"corpus {full} {full.stat().st_size / 1e6:.1f} MB (+ a quarter copy); tokenizer {tok_path} "
          f"vocab {load_tokenizer(tok_path).vocab_size:,}; {len(os.sched_getaffinity(0))} CPUs, load "
          f"{os.getloadavg()[0]:.1f} (other jobs share them: CPU seconds are the figure to trust)")

    ours = [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--tokenizer", tok_path, "--no-progress"]
    commands = {  # name -> (argv for an input and an output prefix, the prefix that holds the result)
        f"ours, {args.workers} workers": lambda src, out: (ours + ["--input", src, "--output-prefix", out,
                                                                   "--workers", str(args.workers)], out),
        "ours, 1 worker": lambda src, out: (ours + ["--input", src, "--output-prefix", out, "--workers", "1"], out),
        "ours, 2 workers, hf encoder": lambda src, out: (ours + ["--input", src, "--output-prefix", out,
                                                                 "--workers", "2", "--encoder", "hf"], out),
    }
    if args.megatron_lm:
        mlm = [sys.executable, str(Path(args.megatron_lm) / "tools" / "preprocess_data.py"), "--tokenizer-type",
               "HuggingFaceTokenizer", "--tokenizer-model", tok_path, "--append-eod", "--json-keys", "text",
               "--workers", str(args.workers)]
        commands[f"Megatron-LM, {args.workers} workers"] = lambda src, out: (
            mlm + ["--input", src, "--output-prefix", out], out + "_text_document")

    runs: dict[str, list[dict]] = {name: [] for name in commands}
    for r in range(args.rounds):
        for name, make in commands.items():
            slug = "".join(c if c.isalnum() else "_" for c in name)
            row = {}
            for size, src in (("full", full), ("quarter", quarter)):
                cmd, result = make(str(src), str(work / f"{slug}_{size}"))
                wall, cpu = timed(cmd, work / f"{slug}_{size}.log")
                row[size] = {"wall_s": wall, "cpu_s": cpu, "tokens": tokens_of(result), "prefix": result}
            f, q = row["full"], row["quarter"]
            row["steady_tokens_per_cpu_s"] = (f["tokens"] - q["tokens"]) / max(f["cpu_s"] - q["cpu_s"], 1e-9)
            row["steady_tokens_per_s"] = (f["tokens"] - q["tokens"]) / max(f["wall_s"] - q["wall_s"], 1e-3)
            row["end_to_end_tokens_per_cpu_s"] = f["tokens"] / f["cpu_s"]
            runs[name].append(row)
            print(f"round {r + 1} {name:32s} steady {row['steady_tokens_per_cpu_s']:>12,.0f} tokens/CPU-s "
                  f"{row['steady_tokens_per_s']:>12,.0f} tokens/s wall; full run {f['wall_s']:.1f} s wall "
                  f"{f['cpu_s']:.1f} s CPU", flush=True)

    reference = runs[next(iter(runs))][-1]["full"]["prefix"]
    if args.megatron_lm:
        reference = runs[f"Megatron-LM, {args.workers} workers"][-1]["full"]["prefix"]
    identical = {name: all(Path(rows[-1]["full"]["prefix"] + e).read_bytes() == Path(reference + e).read_bytes()
                           for e in (".bin", ".idx")) for name, rows in runs.items()}
    summary = {name: {"median_steady_tokens_per_cpu_s": round(statistics.median(x["steady_tokens_per_cpu_s"] for x in rows)),
                      "median_steady_tokens_per_s": round(statistics.median(x["steady_tokens_per_s"] for x in rows)),
                      "median_end_to_end_tokens_per_cpu_s": round(statistics.median(
                          x["end_to_end_tokens_per_cpu_s"] for x in rows)),
                      "identical_to_reference": identical[name]} for name, rows in runs.items()}
    print(json.dumps({"reference": reference, "tokens": runs[next(iter(runs))][-1]["full"]["tokens"],
                      "rounds": args.rounds, "results": summary}, indent=1))
    return 0 if all(identical.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
