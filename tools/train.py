#!/usr/bin/env python
"""Train from a recipe: `torchrun --nproc-per-node N tools/train.py RECIPE [section.key=value ...]`."""
from megatron_ext.cli import run

if __name__ == "__main__":
    run("train")
