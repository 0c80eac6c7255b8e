"""`gaperon train RECIPE [section.key=value ...]`: one process per rank (torchrun / srun).

Stop signals are caught from the first line on and the known start-up notices silenced before
megatron-core or DeepSpeed are imported; then the command itself (megatron_ext.launch)."""
from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from .. import faults, quiet, stop

    stop.install()
    quiet.install()
    faults.signal_self("sigterm_at_start")
    from ..launch import main as launch_main

    return launch_main(argv)
