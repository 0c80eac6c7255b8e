"""Tokenize raw documents into a Megatron-Core indexed dataset, or train a small tokenizer.

    python tools/preprocess_data.py --input a.jsonl b.txt c.parquet --output-prefix data/foo \\
        --tokenizer tokenizers/llama3 --workers 8
    python tools/preprocess_data.py --input web/*.jsonl --output-prefix data/web --tokenizer tok \\
        --shard $SLURM_ARRAY_TASK_ID/64 --workers 16          # part I of 64: data/web.part-I-of-64.*
    python tools/preprocess_data.py merge --output-prefix data/web     # parts -> data/web.bin/.idx
    python tools/preprocess_data.py train-tokenizer --input data/demo/*.jsonl --vocab-size 512 \\
        --out tokenizers/demo

`tokenize` is the default subcommand. Inputs: .jsonl (one JSON object per line, text under
--text-key), .txt (one document per file, or per line with --txt-mode lines), .parquet (column
--text-key); .jsonl.gz and .txt.gz too. Every document becomes tokens + EOS, in input order.
Whitespace-only documents are kept (as text); empty ones are skipped and counted. Text that looks
like a special token ("<|end_of_text|>") is encoded as text, never as the token itself.

--shard I/N writes part I (0-based) of N: the inputs' bytes are cut into N equal ranges (by file,
by line-aligned byte range inside plain .jsonl/.txt files, by row group inside .parquet; a .gz file
or a whole-file .txt document is never cut). A part already complete with the same settings is
kept (a rerun of an array redoes only the others); `merge` joins the parts into a dataset
byte-identical to one unsharded run and writes PREFIX.report.json.

Exit status: 0 done, 2 bad input or settings (one line on stderr naming the file, or file:line, and
the fix), 1 a worker process died, 130 interrupted (Ctrl-C), 143 SIGTERM, 138 SIGUSR1. The output
location is checked before anything is tokenized. On any failure no partial dataset appears under
the output prefix (an earlier one there is left as it was); temporaries of killed runs of the same
prefix are removed at the next start.
"""
from __future__ import annotations

import argparse
import os
import sys

from ..errors import ArgParser
from ..preprocess import (
    Interrupted,
    PreprocessError,
    WorkerLost,
    merge,
    preprocess,
    report_text,
)
from ..tokenizer import train_tokenizer

COMMANDS = ("tokenize", "merge", "train-tokenizer")


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _workers(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of processes: give an integer >= 1 "
                                         "(1: no worker pool)")
    return n


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not I/N (e.g. 3/16, I from 0 to N-1)") from None
    return i, n  # the range (0 <= I < N) is checked by preprocess(), in one line naming --shard I/N


def build_parser() -> argparse.ArgumentParser:
    ap = ArgParser(prog="preprocess_data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", metavar="{tokenize,merge,train-tokenizer}")

    tok = sub.add_parser("tokenize", help="documents -> PREFIX.bin/.idx (default)")
    tok.add_argument("--input", nargs="+", required=True, help=".jsonl / .txt / .parquet files, in order")
    tok.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    tok.add_argument("--tokenizer", required=True, help="HF tokenizer directory or sentencepiece .model")
    tok.add_argument("--workers", type=_workers, default=_cpus(), help="tokenizing processes (default: all CPUs)")
    tok.add_argument("--text-key", default="text", help="JSON key / Parquet column holding the text")
    tok.add_argument("--txt-mode", choices=("doc", "lines"), default="doc",
                     help=".txt files: one document per file (doc) or per line (lines)")
    tok.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                     help="bad document: stop (fail) or count it and go on (skip)")
    tok.add_argument("--model-vocab-size", type=int, default=None,
                     help="refuse a tokenizer with more tokens than this (the recipe's model.vocab_size)")
    tok.add_argument("--eos-token", default=None, help="end-of-document token, if not the tokenizer's eos_token")
    tok.add_argument("--chunk-docs", type=int, default=1000, help="documents per worker task (also cut at 1 MiB)")
    tok.add_argument("--no-progress", action="store_true", help="no progress bar")
    tok.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                     help="tokenize part I (0..N-1) of N into PREFIX.part-I-of-N.* (then: merge)")
    tok.add_argument("--redo", action="store_true", help="with --shard: redo the part even if it is complete")
    tok.add_argument("--overwrite", action="store_true",
                     help="replace a dataset already under PREFIX.bin/.idx (refused otherwise)")
    tok.add_argument("--encoder", choices=("auto", "fast", "hf"), default="auto",
                     help="auto: the fast byte-level BPE encoder where it is proven to give Hugging Face "
                          "tokenizers' ids, else HF (default); hf: always HF")

    mg = sub.add_parser("merge", help="PREFIX.part-*-of-N.* -> PREFIX.bin/.idx + PREFIX.report.json")
    mg.add_argument("--output-prefix", required=True)
    mg.add_argument("--delete-parts", action="store_true", help="remove the parts once merged")
    mg.add_argument("--overwrite", action="store_true",
                    help="replace a dataset under PREFIX.bin/.idx that is not these parts merged (refused otherwise)")

    tr = sub.add_parser("train-tokenizer", help="train a small tokenizer on documents")
    tr.add_argument("--input", nargs="+", required=True)
    tr.add_argument("--out", required=True, help="output directory")
    tr.add_argument("--vocab-size", type=int, required=True)
    tr.add_argument("--kind", choices=("bpe", "sentencepiece"), default="bpe")
    tr.add_argument("--text-key", default="text")
    tr.add_argument("--max-bytes", type=int, default=None, help="train on at most this much text")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv.insert(0, "tokenize")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train-tokenizer":
            path = train_tokenizer(args.input, args.out, args.vocab_size, kind=args.kind,
                                   text_key=args.text_key, max_bytes=args.max_bytes)
            print(f"wrote {path}")
            return 0
        if args.command == "merge":
            report = merge(args.output_prefix, delete_parts=args.delete_parts, overwrite=args.overwrite)
            print(report_text(report))
            print(f"wrote {args.output_prefix}.bin, .idx and .report.json")
            return 0
        summary = preprocess(args.input, args.output_prefix, args.tokenizer, workers=args.workers,
                             text_key=args.text_key, txt_mode=args.txt_mode, on_error=args.on_error,
                             model_vocab_size=args.model_vocab_size, eos_token=args.eos_token,
                             chunk_docs=args.chunk_docs, progress=not args.no_progress, shard=args.shard,
                             encoder=args.encoder, redo=args.redo, overwrite=args.overwrite)
    except WorkerLost as e:
        print("error: " + str(e), file=sys.stderr)
        return 1
    except (PreprocessError, ValueError, OSError) as e:  # OSError: an unreadable input, a full disk...
        print("error: " + str(e).replace("\n", " "), file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        why = f"stopped by {e}" if isinstance(e, Interrupted) else "interrupted"
        print(f"{why}: nothing written under the output prefix; run again to redo it", file=sys.stderr)
        return 128 + e.signum if isinstance(e, Interrupted) else 130
    prefix = args.output_prefix
    if args.shard:
        prefix = f"{prefix}.part-{args.shard[0]}-of-{args.shard[1]}"
        if summary.resumed:
            print(f"{prefix}: already complete with the same settings, kept ({summary.documents:,} documents, "
                  f"{summary.tokens:,} tokens; --redo to make it again)")
            return 0
    print(summary.report())
    print(f"wrote {prefix}.bin and {prefix}.idx" + (" (and .json)" if args.shard else ""))
    return 0
