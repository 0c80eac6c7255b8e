"""Cluster profiles (slurm/clusters/*.yaml): partition, GPUs per node, time limit, signals,
requeue and restart budgets, spare nodes, failure rate; and SLURM's time format. Read by
submission (slurm.py) and by the planner's CLI (interval advice); imports no recipe machinery."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from .config import validation_message
from .errors import FAILURES_PER_GPU_HOUR, GaperonError, RecipeError
from .recipe_yaml import parse_yaml

ROOT = Path(__file__).resolve().parent.parent
PROFILES_DIR = ROOT / "slurm" / "clusters"


class SubmitError(GaperonError, ValueError):
    """Nothing was submitted. The message says what is wrong and how to fix it."""


TIME_FORMATS = ("minutes, minutes:seconds, hours:minutes:seconds, days-hours, days-hours:minutes or "
                "days-hours:minutes:seconds (e.g. 20:00:00, 2-00:00:00), or UNLIMITED")


def parse_slurm_time(text: str) -> float:
    """A SLURM time limit (``--time``) in seconds: "minutes", "minutes:seconds",
    "hours:minutes:seconds", "days-hours", "days-hours:minutes", "days-hours:minutes:seconds";
    ``math.inf`` for "UNLIMITED"/"INFINITE" and for 0 (SLURM: no limit). SubmitError otherwise."""
    s = str(text).strip()
    if s.upper() in ("UNLIMITED", "INFINITE"):
        return math.inf
    days = re.fullmatch(r"(\d+)-(\d+)(?::(\d+))?(?::(\d+))?", s)
    if days:
        d, h, m, sec = (int(x or 0) for x in days.groups())
        total = ((d * 24 + h) * 60 + m) * 60 + sec
    elif re.fullmatch(r"\d+(?::\d+){0,2}", s):
        parts = [int(x) for x in s.split(":")]
        if len(parts) == 1:    # minutes
            total = parts[0] * 60
        elif len(parts) == 2:  # minutes:seconds
            total = parts[0] * 60 + parts[1]
        else:                  # hours:minutes:seconds
            total = (parts[0] * 60 + parts[1]) * 60 + parts[2]
    else:
        raise SubmitError(f"time limit {text!r} is not a SLURM time: write {TIME_FORMATS}")
    return total if total > 0 else math.inf


class ClusterProfile(BaseModel):
    """What differs between sites; one YAML file per site in slurm/clusters/."""

    model_config = ConfigDict(extra="forbid")

    name: str = ""
    description: str = ""
    partition: Optional[str] = None
    cpu_partition: Optional[str] = None  # preprocessing jobs (tools/submit.py preprocess); default: partition
    account: Optional[str] = None
    qos: Optional[str] = None
    time: str = "24:00:00"
    gpus_per_node: int = 8  # = srun tasks per node (ranks per node when device is cpu)
    device: Literal["cuda", "cpu"] = "cuda"  # cpu: no GPU request, GAPERON_DEVICE=cpu
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None
    exclusive: bool = False
    constraint: Optional[str] = None
    signal_seconds: int = 120
    max_requeues: int = 10  # requeues after a save (time limit, scancel --signal=USR1)
    max_crash_restarts: int = 3  # requeues after a crash or hang, counted apart from max_requeues
    exclude_failed_nodes: bool = True  # keep a crash restart off the node that failed, where SLURM
    #                                    names one and the partition has nodes enough without it
    fs_bandwidth_gbs: float = 2.0  # checkpoint write speed per rank (GB/s): submit warns when the
    #                                save would not fit in signal_seconds or the cluster's KillWait
    failures_per_gpu_hour: float = FAILURES_PER_GPU_HOUR  # the MTBF behind the checkpoint-interval
    #                                advice (tools/plan.py --cluster, submit's warning); default: Llama 3's
    spare_nodes: int = 0  # nodes held beyond those the ranks need: a crash or hang restarts the step
    #                       on healthy nodes inside the allocation instead of requeueing (--spare-nodes)
    startup_seconds: int = 120  # from the job's start to the first step (imports, rendezvous, build,
    #                             load): submit warns when --time leaves little training after it and
    #                             signal_seconds, and refuses when it leaves none
    health_probe: str = "true"  # run as one task on each node before a crash restart inside the
    #                             allocation; a node where it fails (or takes > 30 s) is left out,
    #                             e.g. "nvidia-smi -L >/dev/null"
    setup: str = ""  # shell lines before srun: modules, venv activation
    python: Optional[str] = None  # default: the interpreter running tools/submit.py
    env: dict[str, str] = {}
    srun_args: list[str] = []
    sbatch_args: list[str] = []

    @field_validator("time", mode="before")
    @classmethod
    def _check_time(cls, value):
        if isinstance(value, int) and not isinstance(value, bool):  # YAML 1.1 reads 20:00:00 as 72000
            raise SubmitError(f"time={value} is a number, not a SLURM time (unquoted, YAML reads 20:00:00 as "
                              'the number 72000): quote it, e.g. time: "20:00:00"')
        if isinstance(value, str):
            try:
                parse_slurm_time(value)
            except SubmitError:
                raise SubmitError(f"time={value!r} is not a SLURM time limit: write {TIME_FORMATS}") from None
        return value

    @model_validator(mode="after")
    def _check_counts(self) -> "ClusterProfile":
        if self.gpus_per_node < 1:
            raise SubmitError(f"gpus_per_node={self.gpus_per_node} must be >= 1: srun tasks (GPUs) per node")
        if self.max_requeues < 0:
            raise SubmitError(f"max_requeues={self.max_requeues} must be >= 0 (0: never requeue)")
        if self.max_crash_restarts < 0:
            raise SubmitError(f"max_crash_restarts={self.max_crash_restarts} must be >= 0 (0: a crash ends the job)")
        if not self.failures_per_gpu_hour > 0:
            raise SubmitError(f"failures_per_gpu_hour={self.failures_per_gpu_hour} must be > 0: failures per GPU "
                              f"per hour (Llama 3 saw {FAILURES_PER_GPU_HOUR:.3g})")
        if self.spare_nodes < 0:
            raise SubmitError(f"spare_nodes={self.spare_nodes} must be >= 0: nodes held for in-allocation restarts")
        if not self.fs_bandwidth_gbs > 0:
            raise SubmitError(f"fs_bandwidth_gbs={self.fs_bandwidth_gbs} must be > 0: checkpoint write speed "
                              "per rank in GB/s")
        problem = signal_problem(self.signal_seconds, self.time)
        if problem:
            raise SubmitError(problem)
        return self


def signal_problem(signal_seconds: int, time_limit: str, source: str = "time") -> Optional[str]:
    """Why ``--signal=USR1@signal_seconds`` cannot warn before ``time_limit``; None when it can."""
    if signal_seconds <= 0:
        return (f"signal_seconds={signal_seconds} must be > 0: how long before the time limit the ranks get "
                "USR1 to save (60 s + one checkpoint save)")
    limit = parse_slurm_time(time_limit)
    if signal_seconds >= limit:
        return (f"signal_seconds={signal_seconds} is not smaller than the time limit {source}={time_limit} "
                f"({limit:.0f} s): the warning would come before the job starts; lower signal_seconds or "
                "raise the time limit")
    return None


def known_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def load_profile(name: str) -> ClusterProfile:
    """A profile by name (slurm/clusters/NAME.yaml) or by path to a YAML file."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise SubmitError(f"unknown cluster profile {name!r}: known profiles are "
                          f"{', '.join(known_profiles())} (files in {PROFILES_DIR}), or give a path "
                          "to a .yaml file")
    try:
        raw = parse_yaml(path.read_text(), f"cluster profile {path}") or {}
    except RecipeError as err:
        raise SubmitError(str(err)) from None
    if not isinstance(raw, dict):
        raise SubmitError(f"cluster profile {path} is a YAML {type(raw).__name__}, not a mapping of settings")
    try:
        return ClusterProfile.model_validate({"name": path.stem, **raw})
    except ValidationError as err:
        why = validation_message(err, "profile", "ClusterProfile in megatron_ext/slurm.py", SubmitError, "the profile")
        raise SubmitError(f"cluster profile {path} is invalid: {why}") from None
