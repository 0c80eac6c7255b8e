#!/usr/bin/env python
"""Convert checkpoints: `convert_checkpoint.py to-hf CKPT OUT`, `from-hf HF_DIR OUT`, `verify CKPT HF_DIR`.

See megatron_ext/convert/ (and `--help` of each command). Exit codes: 0 ok, 1 verification
failed, 2 bad input.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_ext.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
