"""Fault injection for the fault-tolerance tests: real kills and real NaNs at a chosen step.

``GAPERON_FAULT=<point>:<step>[:<rank>]`` arms one point; unset (always, in production) it costs
one dict lookup. Points (``<step>`` is the step being saved or trained):

* save and rotation, in the order they happen: ``kill_during_save`` (SIGKILL after the gathers,
  before this rank's files are written), ``kill_before_commit`` (files and meta.json written, the
  ``.tmp-`` dir not yet renamed), ``kill_before_latest`` (renamed, ``latest`` not yet updated),
  ``kill_before_rotate`` (``latest`` updated, old checkpoints not yet rotated),
  ``kill_during_rotate`` (a rotated checkpoint renamed to ``.deleting-``, its files not yet removed;
  ``<step>`` is the deleted checkpoint's);
* ``nan_loss`` (the step's loss becomes NaN on every rank), ``nan_grad`` (one gradient element
  becomes NaN on the chosen rank; the loss stays finite);
* ``sigterm`` and ``kill`` (SIGTERM / SIGKILL to this process once the step has been logged).
"""
from __future__ import annotations

import os
import signal

import torch.distributed as dist


def armed(point: str, step: int) -> bool:
    spec = os.environ.get("GAPERON_FAULT")
    if not spec:
        return False
    parts = spec.split(":")
    if parts[0] != point or int(parts[1]) != step:
        return False
    return len(parts) < 3 or int(parts[2]) == dist.get_rank()


def maybe_kill(point: str, step: int) -> None:
    if armed(point, step):
        os.kill(os.getpid(), signal.SIGKILL)


def after_step(step: int) -> None:
    if armed("sigterm", step):
        os.kill(os.getpid(), signal.SIGTERM)
    maybe_kill("kill", step)
