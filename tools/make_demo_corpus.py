#!/usr/bin/env python
"""Write the offline demo corpus (`gaperon demo-corpus`, megatron_ext/corpus.py)."""
from megatron_ext.cli import run

if __name__ == "__main__":
    run("demo-corpus")
