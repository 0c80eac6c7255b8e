#!/usr/bin/env python
"""Where a training run stands, from its files alone (`gaperon status`, megatron_ext/status.py)."""
from megatron_ext.cli import run

if __name__ == "__main__":
    run("status")
