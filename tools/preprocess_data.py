#!/usr/bin/env python
"""Tokenize documents into indexed datasets, merge parts, train a tokenizer (`gaperon preprocess`, megatron_ext/cli/preprocess.py)."""
from megatron_ext.cli import run

if __name__ == "__main__":
    run("preprocess")
