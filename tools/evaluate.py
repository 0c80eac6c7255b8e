#!/usr/bin/env python
"""Evaluate an HF export or a checkpoint with lm-eval, offline (`gaperon evaluate`, megatron_ext/evaluate.py)."""
from megatron_ext.cli import run

if __name__ == "__main__":
    run("evaluate")
