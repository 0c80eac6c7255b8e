#!/usr/bin/env python
"""Submit a recipe to SLURM (`gaperon submit`, megatron_ext/cli/submit.py)."""
from megatron_ext.cli import run

if __name__ == "__main__":
    run("submit")
