"""Fault injection for the fault-tolerance tests: real kills and real NaNs at a chosen step.

``GAPERON_FAULT=<point>:<step>[:<rank>]`` arms one point (several: comma-separated); unset (always, in production) it costs
one dict lookup. Points (``<step>`` is the step being saved or trained):

* save and rotation, in the order they happen: ``kill_during_save`` (SIGKILL after the gathers,
  before this rank's files are written), ``kill_before_commit`` (files and meta.json written, the
  ``.tmp-`` dir not yet renamed), ``kill_before_latest`` (renamed, ``latest`` not yet updated),
  ``kill_before_rotate`` (``latest`` updated, old checkpoints not yet rotated),
  ``kill_during_rotate`` (a rotated checkpoint renamed to ``.deleting-``, its files not yet removed;
  ``<step>`` is the deleted checkpoint's);
* ``nan_loss`` (the final hidden states, hence the loss and every gradient, become NaN in that
  step's forward on the last pipeline stage), ``nan_grad`` (one gradient element becomes NaN on the chosen rank;
  the loss stays finite); both are module/tensor hooks that :func:`install` adds to the model at
  start-up, only when armed, so the training step itself has no fault parameters;
* ``sigterm`` and ``kill`` (SIGTERM / SIGKILL to this process once the step has been logged),
  ``hang`` (this process stops making progress once the step has been logged);
* ``slow_rank`` (``<step>``: the first slowed step; this rank sleeps GAPERON_SLOW_S, default 0.2 s,
  after every step from then on: a straggler for the straggler report);
* ``sigterm_at_start`` (``<step>`` 0: SIGTERM right after the stop handlers are installed, before
  anything is imported) and ``sigterm_at_exit`` (``<step>`` 0: SIGTERM every millisecond from the
  moment the exit code is decided until the process is gone);
* ``save_at_start`` (``<step>`` 0; a probe, not a fault): save a checkpoint of what the start
  loaded, before the first step (the load-mode tests compare it with the parent's).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Callable


def _specs() -> list[list[str]]:
    """The armed points (comma-separated in GAPERON_FAULT); none in a relaunch of the training step
    inside the allocation (GAPERON_STEP_ATTEMPT > 0), which trains on like a requeued job."""
    spec = os.environ.get("GAPERON_FAULT")
    if not spec or os.environ.get("GAPERON_STEP_ATTEMPT", "0") != "0":
        return []
    return [part.split(":") for part in spec.split(",")]


def armed(point: str, step: int) -> bool:
    return any(p[0] == point and int(p[1]) == step and (len(p) < 3 or int(p[2]) == _rank()) for p in _specs())


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def install(chunks, step_in_progress: Callable[[], int]) -> None:
    """Hook the ``nan_loss`` / ``nan_grad`` points into the model, if one of them is armed."""
    import torch  # not at the top: tools/train.py imports this module before anything heavy

    points = [p[0] for p in _specs()]
    if "nan_loss" in points:
        def poison_hidden(module, args, output):
            if torch.is_grad_enabled() and armed("nan_loss", step_in_progress()):
                hidden = output[0] if isinstance(output, tuple) else output
                hidden = hidden * float("nan")
                return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
            return None

        for chunk in chunks:  # the final norm's output: the logits follow it on either loss path
            if getattr(chunk, "post_process", False):
                chunk.decoder.final_layernorm.register_forward_hook(poison_hidden)
    if "nan_grad" in points:
        # A tensor hook runs before DeepSpeed's accumulation and reduction hooks see the gradient.
        def poison_grad(grad):
            if not armed("nan_grad", step_in_progress()):
                return grad
            grad = grad.clone()
            grad.view(-1)[0] = float("nan")
            return grad

        next(p for p in chunks[0].parameters() if p.requires_grad).register_hook(poison_grad)


def signal_self(point: str) -> None:
    """``sigterm_at_start`` / ``sigterm_at_exit`` (see above)."""
    if not armed(point, 0):
        return
    if point == "sigterm_at_start":
        os.kill(os.getpid(), signal.SIGTERM)
        return

    # From another process (this one's threads are stopped before CPython's final clean-up), with
    # no inherited pipes (whoever reads our output must see EOF and reap us, or we never vanish).
    subprocess.Popen([sys.executable, "-c", "import os, signal, sys, time\n"
                      "while True:\n"
                      "    try: os.kill(int(sys.argv[1]), signal.SIGTERM)\n"
                      "    except ProcessLookupError: break\n"
                      "    time.sleep(0.0005)", str(os.getpid())],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def maybe_kill(point: str, step: int) -> None:
    if armed(point, step):
        os.kill(os.getpid(), signal.SIGKILL)


def slowed(step: int) -> bool:
    return any(p[0] == "slow_rank" and step >= int(p[1]) and (len(p) < 3 or int(p[2]) == _rank()) for p in _specs())


def after_step(step: int) -> None:
    if slowed(step):
        time.sleep(float(os.environ.get("GAPERON_SLOW_S", "0.2")))
    if armed("sigterm", step):
        os.kill(os.getpid(), signal.SIGTERM)
    maybe_kill("kill", step)
    while armed("hang", step):
        time.sleep(60)
