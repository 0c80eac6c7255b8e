#!/usr/bin/env python
"""Preprocessing throughput at production vocab size: N worker processes against one process.

    python tools/bench_preprocess.py --work-dir /tmp/bench --size-mb 100 --workers 2

1. writes the demo corpus (megatron_ext/corpus.py) and repeats its documents, round-robin over
   fr/en/code, into one JSONL of at least --size-mb MB (deterministic);
2. trains a byte-level BPE of 128,256 tokens (Llama-3.1's size) on the unique demo text, unless
   --tokenizer names one (e.g. the real Llama-3.1 tokenizer directory);
3. tokenizes the corpus twice in this process: baseline = the same pipeline with one process (no
   pool), then --workers processes; checks both datasets are byte-identical; prints docs/s,
   tokens/s, MB/s and the speed-up. megatron.core is imported before timing (a fixed ~10 s).
"""
from __future__ import annotations

import argparse
import json
import os
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

    results = {}
    for name, workers in (("baseline (1 process)", 1), (f"{args.workers} workers", args.workers)):
        s = preprocess([corpus], str(work / f"out_w{workers}"), tok_path, workers=workers, progress=False)
        mb = s.bytes_in / 1e6 / s.seconds
        results[name] = s
        print(f"{name:22s} {s.documents:>9,} docs {s.tokens:>12,} tokens {s.seconds:7.1f} s  "
              f"{s.documents / s.seconds:9,.0f} docs/s {s.tokens / s.seconds:11,.0f} tokens/s {mb:6.2f} MB/s")
    base, par = results.values()
    same = all((work / f"out_w1{e}").read_bytes() == (work / f"out_w{args.workers}{e}").read_bytes()
               for e in (".bin", ".idx"))
    print(f"speed-up {args.workers} workers / 1 process: {base.seconds / par.seconds:.2f}x  "
          f"(outputs identical: {same}; cpus {len(os.sched_getaffinity(0))}, "
          f"load average {os.getloadavg()[0]:.1f})")
    print(json.dumps({"docs": par.documents, "tokens": par.tokens, "bytes_in": par.bytes_in,
                      "baseline_s": round(base.seconds, 2), "workers_s": round(par.seconds, 2),
                      "workers": args.workers, "speedup": round(base.seconds / par.seconds, 3)}))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
