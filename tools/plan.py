#!/usr/bin/env python
"""Does a recipe fit on the GPUs, and how fast will it run? (`gaperon plan`, megatron_ext/cli/plan.py)"""
from megatron_ext.cli import run

if __name__ == "__main__":
    run("plan")
