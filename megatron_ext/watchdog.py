"""A hang watchdog: a rank whose training steps stop finishing dumps every thread's Python stack
and exits with HANG_EXIT_CODE, so the job script restarts the run from its last checkpoint
instead of waiting out the process-group timeout (30 min) with nothing in the log.

Armed after the first step (compilation and warm-up make it slow) and quiet while a checkpoint
is saved or an evaluation runs (:meth:`Watchdog.idle`); it watches the time between steps.
"""
from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import threading
import time

from .errors import EXIT_HANG as HANG_EXIT_CODE  # a crash for the job script: restart from the latest checkpoint



class Watchdog:
    def __init__(self, timeout_s: float, rank: int):
        self.timeout_s, self.rank = timeout_s, rank
        self._last: float | None = None  # None: not armed (before the first step, or idle)
        if timeout_s > 0:
            threading.Thread(target=self._watch, name="hang-watchdog", daemon=True).start()

    def beat(self) -> None:
        """A step finished."""
        self._last = time.monotonic()

    @contextlib.contextmanager
    def idle(self):
        """Not a step: a checkpoint save, an evaluation."""
        armed, self._last = self._last is not None, None
        try:
            yield
        finally:
            if armed:
                self.beat()

    def _watch(self) -> None:
        while True:
            time.sleep(min(self.timeout_s / 4, 5.0))
            last = self._last
            if last is not None and time.monotonic() - last > self.timeout_s:
                print(f"rank {self.rank}: no training step finished for {self.timeout_s:g} s "
                      f"(health.hang_timeout_s); Python stacks of every thread follow; exiting with "
                      f"{HANG_EXIT_CODE} so the job restarts from its latest checkpoint", file=sys.stderr, flush=True)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                self._report()
                os._exit(HANG_EXIT_CODE)

    def _report(self) -> None:
        """Tell the job script at once (it polls GAPERON_HANG_DIR and kills the step's other ranks,
        instead of srun waiting --wait seconds after this exit)."""
        folder = os.environ.get("GAPERON_HANG_DIR")
        if not folder:
            return
        node = os.environ.get("SLURMD_NODENAME", os.uname().nodename)
        try:
            with open(os.path.join(folder, f"rank-{self.rank}"), "w") as f:
                f.write(f"rank {self.rank} (node {node}) finished no step for {self.timeout_s:g} s")
        except OSError:
            pass
