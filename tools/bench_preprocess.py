#!/usr/bin/env python
"""Preprocessing throughput at production vocab size: N worker processes against one process.

    python tools/bench_preprocess.py --work-dir /tmp/bench --size-mb 100 --workers 2

1. writes the demo corpus (megatron_ext/corpus.py) and repeats its documents, round-robin over
   fr/en/code, into one JSONL of at least --size-mb MB (deterministic);
2. trains a byte-level BPE of 128,256 tokens (Llama-3.1's size) on the unique demo text, unless
   --tokenizer names one (e.g. the real Llama-3.1 tokenizer directory);
3. tokenizes the corpus twice in this process: baseline = the same pipeline with one process (no
   pool), then --workers processes; checks both datasets are byte-identical; prints docs/s,
   tokens/s, MB/s, CPU seconds (this machine may be shared: tokens per CPU-second does not
   depend on what else runs) and the wall-clock speed-up. megatron.core is imported before timing.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_ext.corpus import build_demo_corpus  # noqa: E402
from megatron_ext.preprocess import preprocess  # noqa: E402
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", default="runs/bench_preprocess")
    ap.add_argument("--size-mb", type=float, default=100.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--vocab-size", type=int, default=128_256)
    ap.add_argument("--tokenizer", default=None, help="use this tokenizer instead of training one")
    ap.add_argument("--demo-mb", type=float, default=24.0,
                    help="unique demo text per language (24: enough for BPE to learn all 128k tokens)")
    args = ap.parse_args(argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)

    t = time.perf_counter()
    demo = build_demo_corpus(work / "demo", int(args.demo_mb * 1e6))
    corpus = work / "corpus.jsonl"
    size = repeat_to_size(list(demo.values()), corpus, int(args.size_mb * 1e6))
    unique = sum(p.stat().st_size for p in demo.values())
    print(f"corpus: {corpus} {corpus.stat().st_size / 1e6:.1f} MB ({size / 1e6:.1f} MB of text; "
          f"{unique / 1e6:.1f} MB unique demo JSONL) in {time.perf_counter() - t:.0f} s")

    if args.tokenizer:
        tok_path = args.tokenizer
    else:
        t = time.perf_counter()
        tok_path = str(train_tokenizer(list(demo.values()), work / "bpe", args.vocab_size))
        print(f"tokenizer: byte-level BPE trained on the unique demo text in {time.perf_counter() - t:.0f} s")
    tok = load_tokenizer(tok_path)
    print(f"tokenizer: {tok_path} vocab {tok.vocab_size:,}")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import megatron.core.datasets.indexed_dataset  # noqa: F401  (keep the import out of the timings)

    rows = []
    for name, workers in (("baseline (1 process)", 1), (f"{args.workers} workers", args.workers)):
        load, cpu = os.getloadavg()[0], cpu_seconds()
        s = preprocess([corpus], str(work / f"out_w{workers}"), tok_path, workers=workers, progress=False)
        cpu = cpu_seconds() - cpu
        rows.append({"run": name, "workers": workers, "docs": s.documents, "tokens": s.tokens,
                     "bytes_in": s.bytes_in, "wall_s": round(s.seconds, 2), "cpu_s": round(cpu, 2),
                     "docs_per_s": round(s.documents / s.seconds, 1), "tokens_per_s": round(s.tokens / s.seconds),
                     "tokens_per_cpu_s": round(s.tokens / cpu), "cores_busy": round(cpu / s.seconds, 2),
                     "load_before": round(load, 1)})
        print(f"{name:22s} {s.documents:,} docs {s.tokens:,} tokens in {s.seconds:.1f} s: "
              f"{s.documents / s.seconds:,.0f} docs/s {s.tokens / s.seconds:,.0f} tokens/s "
              f"{s.bytes_in / 1e6 / s.seconds:.2f} MB/s  (CPU {cpu:.1f} s = {cpu / s.seconds:.2f} cores busy; "
              f"{s.tokens / cpu:,.0f} tokens per CPU-s)")
    base, par = rows
    same = all((work / f"out_w1{e}").read_bytes() == (work / f"out_w{args.workers}{e}").read_bytes()
               for e in (".bin", ".idx"))
    print(f"speed-up, {args.workers} workers over 1 process: {base['wall_s'] / par['wall_s']:.2f}x wall-clock  "
          f"(outputs identical: {same}; {len(os.sched_getaffinity(0))} CPUs, load average "
          f"{base['load_before']} / {par['load_before']} before each run: other processes share these CPUs)")
    print(json.dumps(rows))
    return 0 if same else 1


def cpu_seconds() -> float:
    """User + system CPU of this process and its reaped children (the worker processes)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


if __name__ == "__main__":
    sys.exit(main())
