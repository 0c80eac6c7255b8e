#!/usr/bin/env python
"""Train from a recipe: `torchrun --nproc-per-node N tools/train.py RECIPE [section.key=value ...]`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_ext import faults, quiet, stop  # noqa: E402  (first: stop signals are caught from here on)

stop.install()
quiet.install()  # before megatron-core and DeepSpeed print their start-up notices
faults.signal_self("sigterm_at_start")

from megatron_ext.launch import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
