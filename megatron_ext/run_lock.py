"""One live job per run directory: ``<output_dir>/run.lock``.

Two jobs training into one directory (a resubmission while the first is still queued or
running) silently compute the same steps twice and race on ``latest``. Rank 0 takes the lock
before anything is written; a second job refuses to start, naming the holder. A lock whose holder
is gone is taken over: the same SLURM job (requeued: its earlier allocation is over), a SLURM job
that is no longer queued or running, or, without SLURM, a process on this host that has exited.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

from .errors import GaperonError

LOCK_NAME = "run.lock"
# squeue states of a job that holds (or will hold again) its run directory
LIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING",
               "RESIZING", "STAGE_OUT", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"}


class RunDirError(GaperonError, RuntimeError):
    """The run directory cannot be used; the message says why and what to do."""


class RunInUse(RunDirError):
    """Another live job trains into this run directory."""


def _me() -> dict:
    return {"job_id": os.environ.get("SLURM_JOB_ID"), "host": socket.gethostname(), "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _job_state(job_id: str) -> str | None:
    """The job's squeue state; "" when SLURM no longer lists it; None when squeue cannot tell."""
    try:
        p = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if p.returncode == 0:
        return p.stdout.strip().split("\n")[0]
    return "" if "Invalid job id" in p.stderr else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder_alive(owner: dict) -> bool:
    job = owner.get("job_id")
    if job and job == os.environ.get("SLURM_JOB_ID"):
        return False  # this job, requeued or restarted: its previous allocation has ended
    if job:
        state = _job_state(job)
        if state is not None:
            return state in LIVE_STATES
    if owner.get("host") == socket.gethostname():
        return _pid_alive(int(owner.get("pid", -1)))
    return True  # another host and no SLURM to ask: assume it is alive


def describe(owner: dict) -> str:
    who = f"job {owner['job_id']}" if owner.get("job_id") else "a process"
    return f"{who} (host {owner.get('host')}, pid {owner.get('pid')}, since {owner.get('since')})"


class RunLock:
    def __init__(self, output_dir: str | Path):
        self.dir = Path(output_dir)
        self.path = self.dir / LOCK_NAME
        self.created_dir = False
        self.held = False

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a stale lock was taken over. Raises RunDirError."""
        me = _me()
        tmp = self.dir / f".{LOCK_NAME}.{me['host']}.{me['pid']}"
        try:
            if not self.dir.exists():
                self.dir.mkdir(parents=True)
                self.created_dir = True
            tmp.write_text(json.dumps(me))
        except OSError as err:
            raise RunDirError(f"output directory {self.dir} is not writable ({err}): choose "
                              "train.output_dir= on a writable filesystem") from None
        note = None
        try:
            try:
                os.link(tmp, self.path)  # atomic: fails if a lock exists
            except FileExistsError:
                try:
                    owner = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    owner = {}
                if owner and holder_alive(owner):
                    raise RunInUse(f"{self.dir} is in use by {describe(owner)}: wait for it to end or "
                                   f"cancel it; if it is really gone, delete {self.path}") from None
                os.replace(tmp, self.path)
                note = f"took over {self.path} from {describe(owner) if owner else 'an unreadable lock'}, which has ended"
        finally:
            tmp.unlink(missing_ok=True)
        self.held = True
        return note

    def release(self) -> None:
        if not self.held:
            return
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass
        self.held = False
        if self.created_dir:
            try:
                self.dir.rmdir()  # only if this run left nothing in it
            except OSError:
                pass
