"""The project's one error type, its exit codes and the constants more than one module needs.

Imports nothing of the project's (and not torch), so the schema, the SLURM glue and every CLI can
use it. Every error meant for a user derives from `GaperonError`: its message is one line that
names the problem and the fix, and a CLI ends with `error: <message>` and the error's exit code
(`cli_main` below), never a traceback.
"""
from __future__ import annotations

import argparse
import re
import socket
import sys
from typing import Callable

EXIT_OK = 0
EXIT_FAILED = 1  # a check ran and failed (verify, rehearsal): the input was fine, the result is not
EXIT_BAD_INPUT = 2  # bad input: one line, nothing on disk changed
EXIT_REQUEUE = 85  # the ranks saved (or had nothing new to save): the job script requeues
EXIT_HANG = 86  # hang watchdog: every rank dumped its stacks; the job script restarts the step

# Dense bf16 peak TFLOP/s per GPU: MFU's denominator and the planner's default.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
DEFAULT_GPU_TFLOPS = PEAK_TFLOPS["H100"]
# Failures to plan with (the planner's MTBF, cluster profiles' default): Llama 3 405B saw 419
# unexpected interruptions in 54 days on 16,384 H100s (Llama 3 paper, sec. 3.3.4): 1.97e-5 per
# GPU-hour, i.e. one failure per ~8 days at 256 GPUs.
FAILURES_PER_GPU_HOUR = 419 / (54 * 24 * 16384)


class GaperonError(Exception):
    """Input or state a user must fix; `str(err)` is one line naming the problem and the fix."""

    exit_code = EXIT_BAD_INPUT


class DataError(GaperonError, ValueError):
    """Training data that cannot be used as configured (a missing, truncated or corrupt file, a
    tokenizer that does not fit the model, a split that leaves a dataset without documents).
    The message, one line, names the file and the fix."""


def report(err: BaseException) -> int:
    """Print the one `error:` line of `err` and return the exit code a CLI ends with."""
    print(f"error: {err}", file=sys.stderr, flush=True)
    return getattr(err, "exit_code", EXIT_BAD_INPUT)


def cli_main(run: Callable[[], int | None]) -> int:
    """Run a CLI body: a `GaperonError` becomes its one line and exit code, nothing else changes."""
    try:
        return run() or EXIT_OK
    except GaperonError as err:
        return report(err)


class ArgParser(argparse.ArgumentParser):
    """argparse whose usage errors are one `error:` line and exit 2, like every other bad input."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"error: {self.prog}: {message} (see --help)\n")


def free_port() -> int:
    """A TCP port free on this host now (for a local rendezvous: tests, verify, benchmarks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+)\s*([A-Za-z]*)\s*")


def parse_size(text: str | int, default_unit: str = "B") -> int:
    """'5GB' -> 5 x 10^9 (GB = 10^9, as Hugging Face), '80GiB' -> 80 x 2^30, '1e9'; a bare number
    is in `default_unit`. ValueError names the value and the allowed form."""
    if isinstance(text, int) and not isinstance(text, bool) and text > 0:
        return text * _UNITS[default_unit.upper()]
    match = _SIZE.fullmatch(str(text))
    unit = (match.group(2) or default_unit).upper() if match else ""
    nbytes = int(float(match.group(1)) * _UNITS[unit]) if match and unit in _UNITS else 0
    if nbytes <= 0:
        raise ValueError(f"{text!r} is not a size: write e.g. 80GiB, 5GB or 512MiB (a positive number and a unit)")
    return nbytes
