"""The project's one error type, its exit codes and the constants more than one module needs.

Imports nothing of the project's (and not torch), so the schema, the SLURM glue and every CLI can
use it. Every error meant for a user derives from `GaperonError`: its message is one line that
names the problem and the fix, and a CLI ends with `error: <message>` and the error's exit code
(`cli_main` below), never a traceback.
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import sys
import tempfile
from pathlib import Path
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


class RecipeError(GaperonError, ValueError):
    """A recipe that cannot run. The message says what is wrong and how to fix it."""


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

    def parse_known_args(self, args=None, namespace=None):
        # `--gpu-memory -80GiB`, `--shard -1/2`: argparse takes a value that starts with '-' (and is
        # not a plain negative number) for an option and says "expected one argument". Such a value
        # is joined to its option (`--gpu-memory=-80GiB`), so the option's own check names it.
        args = list(sys.argv[1:] if args is None else args)
        joined, i = [], 0
        while i < len(args):
            tok = args[i]
            action = self._option_string_actions.get(tok)
            if (action is not None and action.nargs is None and action.option_strings and i + 1 < len(args)
                    and args[i + 1].startswith("-") and len(args[i + 1]) > 1 and not self._is_option(args[i + 1])):
                joined.append(f"{tok}={args[i + 1]}")
                i += 2
                continue
            joined.append(tok)
            i += 1
        return super().parse_known_args(joined, namespace)

    def _is_option(self, tok: str) -> bool:
        if tok == "--":
            return True
        name = tok.split("=", 1)[0]
        if name in self._option_string_actions:
            return True
        return name.startswith("--") and any(o.startswith(name) for o in self._option_string_actions)


def unwritable(directory: str | os.PathLike) -> str | None:
    """Why files cannot be created in ``directory`` (made, with its parents, if missing), or None.

    Nothing is left behind to find out: the nearest existing ancestor must be a directory in which
    a file can be created (tried with a temporary file, removed at once), so a path under a regular
    file, a read-only mount, /proc or /sys fail for root too, and a directory without write
    permission for other users.
    """
    p = Path(os.path.abspath(directory))
    missing = []
    while not p.exists() and p != p.parent:
        missing.append(p.name)
        p = p.parent
    if not p.is_dir():
        return f"{p} is a file, not a directory" + (f", so {Path(p, *reversed(missing))} cannot be created"
                                                    if missing else "")
    what = f"cannot create {Path(p, *reversed(missing))}: " if missing else ""
    if not os.access(p, os.W_OK | os.X_OK):
        return f"{what}{p} is not writable"
    try:
        fd, probe = tempfile.mkstemp(prefix=".gaperon-write-probe-", dir=p)
    except OSError as err:
        return f"{what}{p} is not writable ({err.strerror or err})"
    os.close(fd)
    os.unlink(probe)
    return None


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
