#!/usr/bin/env python
"""Evaluate an HF export or a checkpoint with lm-eval, offline: `evaluate.py MODEL --tasks SUITE`.

    python tools/evaluate.py runs/demo/hf --tasks gaperon_demo          # the shipped local task
    python tools/evaluate.py runs/8b --tasks fr --data-dir /shared/hf-eval --log-to-run
    python tools/evaluate.py --prefetch gaperon --data-dir /shared/hf-eval   # login node, network

See megatron_ext/evaluate.py. Exit codes: 0 done, 2 bad input or missing data.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_ext.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
