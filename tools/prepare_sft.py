#!/usr/bin/env python
"""Tokenize chat conversations for SFT (`gaperon prepare-sft`, megatron_ext/cli/prepare_sft.py)."""
from megatron_ext.cli import run

if __name__ == "__main__":
    run("prepare-sft")
