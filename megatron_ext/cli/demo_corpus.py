"""Write the offline demo corpus (en.jsonl, fr.jsonl, code.jsonl) from text this machine already
has: the Python reference and stdlib, Debian licences, English and French man pages, French
message catalogs (see megatron_ext/corpus.py).

    python tools/make_demo_corpus.py --out data/demo --max-mb 4
"""
from __future__ import annotations

import argparse
import sys

from ..corpus import build_demo_corpus
from ..errors import ArgParser


def main(argv: list[str] | None = None) -> int:
    ap = ArgParser(prog="make_demo_corpus", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/demo", help="output directory")
    ap.add_argument("--max-mb", type=float, default=4.0, help="text budget per language, in MB")
    args = ap.parse_args(argv)
    try:
        paths = build_demo_corpus(args.out, int(args.max_mb * 1e6))
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for lang, path in paths.items():
        n = sum(1 for _ in open(path, encoding="utf-8"))
        print(f"{lang:5s} {path}  {n:,} documents  {path.stat().st_size:,} bytes")
    return 0
