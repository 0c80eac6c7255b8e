#!/usr/bin/env python
"""Where a training run stands, from its files alone (see megatron_ext/status.py).

    python tools/status.py runs/8b                      # one screen
    python tools/status.py runs/8b --plot               # and runs/8b/status.png: loss, valid loss, lr
    python tools/status.py runs/8b --plot curves.png --json

Needs no GPU, no process group and no running job: safe on a login node, on a run still training
and on one long finished. Exit 2, with one ``error:`` line, when RUN_DIR is missing or not a run.
"""
from __future__ import annotations

import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_ext.status import main  # noqa: E402

if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `tools/status.py ... | head` ends quietly
    sys.exit(main())
