"""Stop signals, caught from the first line of tools/train.py until the process exits.

SLURM sends SIGUSR1 before a time limit (``--signal=USR1@N``) and SIGTERM on scancel, preemption
and requeue. The handler only records the signal; the training loop acts on it at the next step
boundary once every rank agrees (train.StopSignal). It is installed before the heavy imports,
because start-up takes 20-40 s at scale and a default handler there kills the rank with 138/143,
which fails the job instead of requeueing it. :func:`ignore` is called once the process's exit
code is decided: CPython restores the default handlers late in interpreter shutdown, and only
SIG_IGN survives that, so a signal after the final save cannot turn exit 0 (or 85) into 143.
"""
from __future__ import annotations

import signal

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: list[str] = []


def _record(signum, frame) -> None:
    _received.append(signal.Signals(signum).name)


def install() -> None:
    for sig in SIGNALS:
        signal.signal(sig, _record)


def received() -> str | None:
    """The first stop signal this process got, if any."""
    return _received[0] if _received else None


def ignore() -> None:
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
