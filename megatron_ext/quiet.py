"""The known, harmless start-up noise of megatron-core, DeepSpeed and torch, filtered in one place.

Every rank of a job would print each of these (about 20 lines per rank): optional accelerators
that are absent (each use has a pure-torch fallback), deprecations inside the libraries, and
DeepSpeed's CPU notices. Only these exact messages are dropped; any other warning still shows.
``GAPERON_VERBOSE=1`` drops nothing. :func:`install` runs before megatron-core or DeepSpeed is
imported (the first lines of the tools), because most of these are emitted at import time.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import warnings

# (category, message regex): warnings.warn calls inside the libraries.
KNOWN_WARNINGS = (
    (UserWarning, r"Transformer Engine and Apex are not installed"),
    (UserWarning, r"Apex is not installed\. Falling back to Torch Norm"),
    (UserWarning, r"full scope is deprecated\. Use empty cuda_graph_scope"),
    (FutureWarning, r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"),
)
# DeepSpeed's logger (to stdout) and its plain prints.
KNOWN_LOG_LINES = (
    r"Setting accelerator to CPU\. If you have GPU",
    r"Setting ds_accelerator to ",
    r"^DeepSpeed deepspeed\.ops\.comm\.\w+ built successfully$",
)


def verbose() -> bool:
    return os.environ.get("GAPERON_VERBOSE", "0") not in ("", "0")


class _DropKnown(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(re.search(p, record.getMessage()) for p in KNOWN_LOG_LINES)


def install() -> None:
    if verbose():
        return
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    # DeepSpeed's module-level logger is created on import with this name; a filter added now stays.
    logging.getLogger("DeepSpeed").addFilter(_DropKnown())


@contextlib.contextmanager
def known_prints_dropped():
    """Drop the known lines a library prints (not logs) inside the block, pass everything else."""
    if verbose():
        yield
        return
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        kept = [line for line in buffer.getvalue().splitlines()
                if not any(re.search(p, line) for p in KNOWN_LOG_LINES)]
        if kept:
            print("\n".join(kept), flush=True)
