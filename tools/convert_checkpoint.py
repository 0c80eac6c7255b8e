#!/usr/bin/env python
"""Convert checkpoints: `to-hf CKPT OUT`, `from-hf HF_DIR OUT`, `verify CKPT HF_DIR` (`gaperon convert`).

Exit codes: 0 ok, 1 verification failed, 2 bad input."""
from megatron_ext.cli import run

if __name__ == "__main__":
    run("convert")
