#!/usr/bin/env python
"""Every rank of a recipe's layout at full width on one CPU: parallel state, ZeRO partitions,
checkpoint writes and resume reads, data samples (`gaperon rehearse`, megatron_ext/rehearse.py)."""
from megatron_ext.cli import run

if __name__ == "__main__":
    run("rehearse")
