"""SLURM jobs for recipes: cluster profiles, the sbatch script, submission, chains and sweeps.

Every check (profile exists, nodes x GPUs per node == tp x pp x dp, a time limit SLURM can read
and longer than the USR1 warning, sbatch installed) runs for every job of a command before the
first ``sbatch``: a typo must not leave half a chain queued.

Each job runs one srun task per GPU (the ranks read SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID),
gets ``--signal=USR1@N`` before its time limit, and requeues itself with ``scontrol requeue`` when
the ranks exit with REQUEUE_EXIT_CODE after saving, unless a user's plain scancel asked it to stop
or SLURM requeued it already; after a crash or a hang it restarts up to ``max_crash_restarts``
times, inside the allocation on healthy nodes when it has enough (``spare_nodes`` held beyond the
training nodes), else by requeueing off the failed nodes (see slurm/train.sbatch.tmpl for every case). A job trains a
frozen copy of its recipe, written next to its logs at submission, so a requeue days later
trains what was submitted even if the recipe file has changed since.
"""
from __future__ import annotations

import json
import math
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


from .errors import EXIT_BAD_INPUT, EXIT_HANG, EXIT_REQUEUE
from .cluster_profile import (PROFILES_DIR, ROOT, TIME_FORMATS, ClusterProfile, SubmitError,  # noqa: F401
                              known_profiles, load_profile, parse_slurm_time, signal_problem)
from .config import (Recipe, RecipeError, _deep_merge, apply_overrides, base_chain, derive_sft_steps,
                     dump_recipe, read_yaml_tree, recipe_from_tree)

REQUEUE_EXIT_CODE = EXIT_REQUEUE
TEMPLATE = ROOT / "slurm" / "train.sbatch.tmpl"
RECIPES_DIR = ROOT / "recipes"


@dataclass
class Job:
    """One sbatch job. ``after`` is the index (in the same list) of the job this one waits for."""

    name: str
    command: list[str]  # run by srun on every task
    nodes: int
    tasks_per_node: int
    log_dir: Path
    gpus: bool = True
    requeue: bool = True
    recipe: Optional[Recipe] = None  # frozen to <log_dir> at submission; command names that file
    after: Optional[int] = None
    notes: list[str] = field(default_factory=list)


# ---- recipes -> jobs -------------------------------------------------------------------------
def node_count(recipe: Recipe, gpus_per_node: int, nodes: Optional[int]) -> tuple[int, int]:
    """(nodes, tasks per node) for a recipe's tp x pp x dp ranks, or a SubmitError saying the fix."""
    lay = recipe.layout
    world, mp = lay.world_size, lay.tp * lay.pp
    if nodes is None:
        if world <= gpus_per_node:
            return 1, world  # a debug run on part of one node
        if world % gpus_per_node == 0:
            return world // gpus_per_node, gpus_per_node
        raise SubmitError(f"recipe {recipe.model.name}: tp x pp x dp = {lay.tp} x {lay.pp} x {lay.dp} = "
                          f"{world} ranks do not fill whole nodes of {gpus_per_node} GPUs: set layout.dp "
                          f"so that the total is a multiple of {gpus_per_node}")
    if nodes * gpus_per_node == world:
        return nodes, gpus_per_node
    gpus = nodes * gpus_per_node
    if gpus % mp == 0:
        dp = gpus // mp
        fix = f"add the override layout.dp={dp} to fill them"
        if lay.global_batch % (lay.micro_batch * dp):
            fix += (f" (with layout.global_batch a multiple of micro_batch x dp = "
                    f"{lay.micro_batch * dp})")
    else:
        fix = f"no layout.dp fits: the GPU count must be a multiple of tp x pp = {mp}"
    if world % gpus_per_node == 0:
        fix += f", or submit with --nodes {world // gpus_per_node}"
    raise SubmitError(f"{nodes} nodes x {gpus_per_node} GPUs = {gpus} GPUs, but recipe "
                      f"{recipe.model.name} needs tp x pp x dp = {lay.tp} x {lay.pp} x {lay.dp} = "
                      f"{world} ranks: {fix}")


def train_job(recipe: Recipe, profile: ClusterProfile, gpus_per_node: int,
              nodes: Optional[int] = None, command: Optional[list[str]] = None) -> Job:
    """The job that trains ``recipe``; ``command`` replaces tools/train.py (smoke tests)."""
    n, per_node = node_count(recipe, gpus_per_node, nodes)
    out = Path(recipe.train.output_dir)
    return Job(name=out.name, command=command or [], nodes=n, tasks_per_node=per_node,
               log_dir=(out if out.is_absolute() else Path.cwd() / out) / "slurm",
               gpus=profile.device == "cuda", recipe=recipe)


def export_job(phase: Job, hf_out: str, after: int) -> Job:
    """Convert the last checkpoint of ``phase`` to Hugging Face format once it succeeded."""
    ckpt = Path(phase.recipe.train.output_dir) / "checkpoints"
    return Job(name=f"{phase.name}-hf", nodes=1, tasks_per_node=1, log_dir=phase.log_dir, gpus=False,
               requeue=False, after=after,
               command=[str(ROOT / "tools" / "convert_checkpoint.py"), "to-hf", str(ckpt), hf_out])


def eval_job(phase: Job, suite: str, after: int) -> Job:
    """Export the last checkpoint of ``phase`` and evaluate it on ``suite`` once the phase succeeded
    (tools/evaluate.py): results in <run>/eval/<step>/, scores in the run's metrics.jsonl and
    TensorBoard. Task data comes from the job's HF_HOME (a profile's env), filled by --prefetch."""
    from .evaluate import EvalError, load_suite

    try:
        load_suite(suite)
    except EvalError as err:
        raise SubmitError(f"--evaluate {suite}: {err}") from None
    if phase.recipe.data.tokenizer is None:
        raise SubmitError(f"--evaluate: recipe {phase.recipe.model.name} has no data.tokenizer, so its export "
                          "cannot be evaluated: train with a tokenizer (data.tokenizer=DIR)")
    out = Path(phase.recipe.train.output_dir)
    run = out if out.is_absolute() else Path.cwd() / out
    return Job(name=f"{phase.name}-eval", nodes=1, tasks_per_node=1, log_dir=phase.log_dir, gpus=phase.gpus,
               requeue=False, after=after, notes=[f"evaluates {run} on {suite}"],
               command=[str(ROOT / "tools" / "evaluate.py"), str(run), "--tasks", suite, "--log-to-run"])


def _recipe(tree: dict) -> Recipe:
    """What load_recipe does after reading the files (chains and sweeps build the tree here)."""
    return derive_sft_steps(recipe_from_tree(tree, written=True), tree)


def _size_path(size: str) -> Path:
    path = Path(size) if size.endswith((".yaml", ".yml")) else RECIPES_DIR / f"{size}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
        raise SubmitError(f"unknown size {size!r}: no {path} (recipes: {known})")
    return path


def _root_of(path: Path) -> Path:
    """The recipe at the bottom of a ``base:`` chain (the size recipe a phase builds on)."""
    return base_chain(path)[-1][0]


def _swap_root(path: Path, root: Path) -> dict:
    """``path``'s recipe tree with the bottom of its ``base:`` chain replaced by ``root``."""
    tree = read_yaml_tree(root)
    for _, raw in reversed(base_chain(path)[:-1]):
        tree = _deep_merge(tree, raw)
    return tree


def phase_tree(path: str | Path, size: Optional[str] = None, chained: bool = False) -> dict:
    """A recipe's tree; with ``size``, the same phase on another size (for sweeps).

    A size recipe (no ``base:``) becomes that size. A phase recipe gets the size at the bottom of
    its base chain and the output dir ``<parent>/<model.name>-<phase>`` so sizes never share a run
    dir; its ``checkpoint.init_from``, if it named the base size's run, names the new size's run.
    ``chained``: a later phase of a chain, whose init_from the chain sets (left as written here).
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    if size is None:
        return read_yaml_tree(path)
    size_path = _size_path(size)
    old_root = _root_of(path)
    tree = _swap_root(path, size_path)
    if old_root == path:
        return tree
    size_tree = read_yaml_tree(size_path)
    train = tree.setdefault("train", {})
    parent = Path(train.get("output_dir", "runs/default")).parent
    train["output_dir"] = str(parent / f"{tree['model'].get('name', size)}-{path.stem}")
    ckpt = tree.get("checkpoint", {})
    if ckpt.get("init_from") and not chained:
        old_run = read_yaml_tree(old_root).get("train", {}).get("output_dir")
        if Path(ckpt["init_from"]) != Path(old_run or ""):
            raise SubmitError(f"{path}: checkpoint.init_from={ckpt['init_from']} names one size's run, "
                              f"so it cannot be swept over sizes: point it at {old_run} (the base size's "
                              "train.output_dir, rewritten per size) or drop it")
        ckpt["init_from"] = size_tree.get("train", {}).get("output_dir")
    return tree


def cooldown_branches(stable: Job, tree: dict, steps: list[int], length: Optional[int], profile: ClusterProfile,
                      gpus_per_node: int, nodes: Optional[int], command: Optional[list[str]]) -> list[Job]:
    """WSD branch-offs (``--cooldown-from``): one cooldown job per listed step of the stable run
    ``stable`` (its recipe tree ``tree``), each in ``<output_dir>-cooldown<STEP>``, starting from
    that step's checkpoint with checkpoint.init_mode=cooldown: step, optimizer and data position
    kept, then ``length`` steps (default: the recipe's schedule.decay_steps) of the recipe's decay
    from the stable LR to min_lr. A step whose checkpoint is already on disk is branched at once;
    otherwise the stable run is submitted first and the branch waits for it (afterok), and the
    stable run must keep that checkpoint (checkpoint.interval and keep_every dividing the step)."""
    r = stable.recipe
    out, ck, s = Path(r.train.output_dir), r.checkpoint, r.schedule
    if s.kind != "wsd":
        raise SubmitError(f"--cooldown-from branches a WSD run, but {r.model.name}'s schedule.kind={s.kind}: "
                          "train the stable run with schedule.kind=wsd")
    length = length if length is not None else s.decay_steps
    if length < 1:
        raise SubmitError("--cooldown-from needs a cooldown length: the recipe's schedule.decay_steps is 0, so "
                          "pass --cooldown-steps N")
    stable_end = r.train.steps - s.decay_steps  # where the stable run's own decay starts
    jobs, waits = [], False
    for step in steps:
        ckpt = out / "checkpoints" / f"step_{step:08d}"
        on_disk = (ckpt / "meta.json").is_file()
        if not on_disk:
            if not 0 < step <= stable_end:
                raise SubmitError(f"--cooldown-from {step}: a branch starts from a step of the stable phase, "
                                  f"1..{stable_end} (train.steps={r.train.steps} minus schedule.decay_steps="
                                  f"{s.decay_steps}), and no checkpoint {ckpt} exists yet")
            kept = step == r.train.steps or (ck.interval and step % ck.interval == 0 and ck.keep_every
                                             and step % ck.keep_every == 0)
            if not kept:
                raise SubmitError(f"--cooldown-from {step}: the stable run would not keep step {step}'s "
                                  f"checkpoint (checkpoint.interval={ck.interval}, keep_every={ck.keep_every}): "
                                  f"add the overrides checkpoint.interval=N checkpoint.keep_every=M with N and M "
                                  f"dividing {step}")
        waits = waits or not on_disk
        branch = apply_overrides(tree, [f"checkpoint.init_from={ckpt}", "checkpoint.init_mode=cooldown",
                                        "schedule.kind=wsd", f"schedule.decay_steps={length}",
                                        f"train.steps={step + length}", f"train.output_dir={out}-cooldown{step}"])
        try:
            recipe = _recipe(branch)
        except RecipeError as err:
            raise RecipeError(f"--cooldown-from {step}: {err}") from None
        job = train_job(recipe, profile, gpus_per_node, nodes, command)
        job.notes.append(f"cooldown of {out} from step {step}: {length} steps of {s.decay_shape} decay to "
                         f"min_lr {recipe.optimizer.min_lr:g}" + ("" if on_disk else ", after the stable run"))
        job.after = None if on_disk else 0
        jobs.append(job)
    return [stable, *jobs] if waits else jobs  # ``after`` 0: the stable run, first in the list


def plan_jobs(recipe: str | Path, overrides: list[str], profile: ClusterProfile,
              gpus_per_node: Optional[int] = None, nodes: Optional[int] = None,
              chain: list[str] = (), sizes: list[str] = (), hf_out: Optional[str] = None,
              command: Optional[list[str]] = None, evaluate: Optional[str] = None,
              cooldown_from: list[int] = (), cooldown_steps: Optional[int] = None) -> list[Job]:
    """Every job of one submit command, validated; nothing touches the queue or the disk.

    ``chain``: phases after ``recipe``, each starting from the previous one's output dir
    (``checkpoint.init_from``) and waiting for it to succeed (afterok). ``hf_out``: a last job
    converting the last phase to HF. ``sizes``: the whole thing once per size. ``evaluate``: after
    each phase, an export + evaluation job on that suite (:func:`eval_job`). ``cooldown_from``:
    cooldown branches of the (WSD) run ``recipe`` (:func:`cooldown_branches`).
    """
    if cooldown_from and (chain or sizes or hf_out or evaluate):
        raise SubmitError("--cooldown-from branches one run: it cannot be combined with --chain, --sizes, --hf-out "
                          "or --evaluate (submit those on the cooldown runs' recipes)")
    if cooldown_steps is not None and not cooldown_from:
        raise SubmitError("--cooldown-steps sets the length of the --cooldown-from branches: give --cooldown-from too")
    if gpus_per_node is not None and gpus_per_node < 1:
        raise SubmitError(f"--gpus-per-node {gpus_per_node} must be >= 1 (or leave it out: the profile's "
                          f"{profile.gpus_per_node})")
    if nodes is not None and nodes < 1:
        raise SubmitError(f"--nodes {nodes} must be >= 1 (or leave it out: tp x pp x dp / GPUs per node)")
    gpn = profile.gpus_per_node if gpus_per_node is None else gpus_per_node
    if sizes and nodes is not None:
        raise SubmitError("--nodes cannot be combined with --sizes: each size's node count comes from "
                          "its recipe's layout (tp x pp x dp / --gpus-per-node)")
    jobs: list[Job] = []
    for size in sizes or [None]:
        prev: Optional[int] = None  # index of the previous phase's job
        for path in [recipe, *chain]:
            tree = apply_overrides(phase_tree(path, size, chained=prev is not None), overrides)
            if prev is not None:
                parent_dir = jobs[prev].recipe.train.output_dir
                tree = apply_overrides(tree, [f"checkpoint.init_from={parent_dir}"])
            try:
                phase = _recipe(tree)
            except RecipeError as err:  # name the phase file (and size) whose recipe is bad
                raise RecipeError(f"{path}{f' on size {size}' if size else ''}: {err}") from None
            job = train_job(phase, profile, gpn, nodes, command)
            if prev is not None:
                job.after = prev
                job.notes.append(f"starts from {parent_dir}")
            jobs.append(job)
            prev = len(jobs) - 1
            if evaluate:
                jobs.append(eval_job(job, evaluate, prev))
        if hf_out:
            last = jobs[prev]
            out = hf_out if size is None else str(Path(hf_out) / last.recipe.model.name)
            jobs.append(export_job(last, out, prev))
    if cooldown_from:
        tree = apply_overrides(phase_tree(recipe), overrides)
        jobs = cooldown_branches(jobs[0], tree, list(cooldown_from), cooldown_steps, profile, gpn, nodes, command)
    dirs = [str(j.recipe.train.output_dir) for j in jobs if j.recipe is not None]
    dup = sorted({d for d in dirs if dirs.count(d) > 1})
    if dup:
        raise SubmitError(f"several jobs would write to train.output_dir {', '.join(dup)}; the second would "
                          "resume the first's checkpoints as its own: give each phase its own output_dir")
    return jobs


# ---- rendering -------------------------------------------------------------------------------
def _fill(template: str, values: dict[str, str]) -> str:
    """Replace ``{{name}}``; unknown names are an error, not an empty string."""
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], template)


def recipe_file(job: Job, stamp: str) -> Path:
    return job.log_dir / f"{job.name}.{stamp}.recipe.yaml"


def render(job: Job, profile: ClusterProfile, stamp: str = "STAMP", time_limit: Optional[str] = None,
           dependency: Optional[str] = None, max_requeues: Optional[int] = None) -> str:
    """The sbatch script of ``job``. ``stamp`` names the frozen recipe file next to the logs."""
    p = profile
    spare = p.spare_nodes if job.requeue and job.recipe is not None else 0
    opts = [f"--partition={p.partition}" if p.partition else None,
            f"--account={p.account}" if p.account else None,
            f"--qos={p.qos}" if p.qos else None,
            f"--time={time_limit or p.time}",
            f"--gpus-per-node={job.tasks_per_node}" if job.gpus else None,
            f"--cpus-per-task={p.cpus_per_task}" if p.cpus_per_task else None,
            f"--mem={p.mem}" if p.mem else None,
            "--exclusive" if p.exclusive else None,
            f"--constraint={p.constraint}" if p.constraint else None,
            # No B: prefix: USR1 goes to every rank at once (see slurm/train.sbatch.tmpl).
            f"--signal=USR1@{p.signal_seconds}" if job.requeue else None,
            "--requeue" if job.requeue else "--no-requeue",
            "--no-kill" if spare else None,  # a node failure ends its step, not the allocation
            f"--dependency={dependency}" if dependency else None,
            *p.sbatch_args]
    env = {**p.env, "PYTHONUNBUFFERED": "1"}
    if p.device == "cpu":
        env["GAPERON_DEVICE"] = "cpu"
    python = p.python or sys.executable
    payload = job.command
    if job.recipe is not None and not payload:
        payload = [str(ROOT / "tools" / "train.py"), str(recipe_file(job, stamp))]
    if payload and payload[0].endswith(".py"):
        payload = [python, *payload]
    srun_args = list(p.srun_args)
    if p.cpus_per_task:
        srun_args.append(f"--cpus-per-task={p.cpus_per_task}")  # srun no longer inherits it
    return _fill(TEMPLATE.read_text(), {
        "profile": p.name,
        "job_name": job.name,
        "nodes": str(job.nodes + spare),
        "train_nodes": str(job.nodes),
        "spare_nodes": str(spare),
        "health_probe": shlex.quote(p.health_probe),
        "tasks_per_node": str(job.tasks_per_node),
        "sbatch_options": "\n".join(f"#SBATCH {o}" for o in opts if o),
        "log_dir": str(job.log_dir),
        "workdir": str(Path.cwd()),
        "requeue_exit_code": str(REQUEUE_EXIT_CODE), "hang_exit_code": str(EXIT_HANG),
        "bad_input_exit_code": str(EXIT_BAD_INPUT),
        "max_requeues": str(p.max_requeues if max_requeues is None else max_requeues)
                        if job.requeue else "0",
        "max_crash_restarts": str(p.max_crash_restarts) if job.requeue else "0",
        "exclude_failed_nodes": "1" if p.exclude_failed_nodes else "0",
        "setup": p.setup.strip(),
        "env": "\n".join(f"export {k}={shlex.quote(str(v))}" for k, v in env.items()),
        "srun_args": " ".join(shlex.quote(a) for a in srun_args),
        "command": " ".join(shlex.quote(a) for a in payload),
    })


# ---- submission ------------------------------------------------------------------------------
def sbatch_path() -> str:
    path = shutil.which("sbatch")
    if path is None:
        raise SubmitError("sbatch not found: install SLURM's client tools (or, on one machine, run "
                          "slurm/local_cluster.sh), or use --dry-run to print the scripts")
    return path


def check_limits(profile: ClusterProfile, time_limit: Optional[str] = None,
                 max_requeues: Optional[int] = None) -> None:
    """The command line's --time / --max-requeues against SLURM's syntax and the profile's signal."""
    if max_requeues is not None and max_requeues < 0:
        raise SubmitError(f"--max-requeues {max_requeues} must be >= 0 (0: never requeue)")
    if time_limit is not None:
        try:
            parse_slurm_time(time_limit)
        except SubmitError:
            raise SubmitError(f"--time {time_limit!r} is not a SLURM time limit: write {TIME_FORMATS}") from None
        problem = signal_problem(profile.signal_seconds, time_limit, source="--time")
        if problem:
            raise SubmitError(f"profile {profile.name}: {problem}")


def cluster_kill_wait() -> Optional[int]:
    """The cluster's KillWait (seconds between SIGTERM and SIGKILL), None when scontrol cannot tell."""
    if shutil.which("scontrol") is None:
        return None
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"^KillWait\s*=\s*(\d+)", out, re.M)
    return int(m.group(1)) if m else None


def save_budget_warnings(jobs: list[Job], profile: ClusterProfile, kill_wait: Optional[int]) -> list[str]:
    """One line per problem: a job whose checkpoint save (estimated from the model size and the profile's
    fs_bandwidth_gbs) would not fit in signal_seconds (the time-limit warning) or in KillWait
    (all a plain scancel, an admin requeue or a preemption leaves between SIGTERM and SIGKILL)."""
    from .plan import checkpoint_save_seconds  # the planner: parameter counts per rank

    out = []
    for job in jobs:
        if job.recipe is None or not job.requeue:
            continue
        est = checkpoint_save_seconds(job.recipe, profile.fs_bandwidth_gbs)
        what = (f"job {job.name}: one checkpoint save takes ~{est:.0f} s ({job.recipe.model.name} at "
                f"{profile.fs_bandwidth_gbs:g} GB/s per rank, profile fs_bandwidth_gbs)")
        if est > profile.signal_seconds:
            out.append(f"{what}, longer than signal_seconds={profile.signal_seconds}: the time-limit save "
                       "may be killed; raise signal_seconds (to the save time + 60 s)")
        if kill_wait is not None and est > kill_wait:
            out.append(f"{what}, longer than the cluster's KillWait={kill_wait} s: a save after scancel, an "
                       "admin requeue or a preemption may be killed (the run then resumes from the previous "
                       "checkpoint); ask for a longer KillWait or save more often (checkpoint.interval)")
    return out


def interval_advice(job: Job, profile: ClusterProfile, time_limit: Optional[str] = None):
    """The planner's Young-Daly checkpoint interval for ``job`` on this profile's cluster (its
    failure rate, file system bandwidth and allocation length), or None for a job that trains nothing."""
    from .plan import ALLOCATION_S, Hardware, interval_advice as advice, step_time

    if job.recipe is None:
        return None
    world = job.recipe.layout.world_size
    allocation = parse_slurm_time(time_limit or profile.time)
    return advice(job.recipe, step_time(job.recipe, Hardware(gpus=world)).step, world,
                  profile.failures_per_gpu_hour, profile.fs_bandwidth_gbs,
                  allocation if math.isfinite(allocation) else ALLOCATION_S, on_gpu=profile.device == "cuda")


def time_budget(jobs: list[Job], profile: ClusterProfile, time_limit: Optional[str] = None) -> list[str]:
    """Warnings (one line each) for training jobs whose allocation leaves under a quarter of --time
    to train once start-up and the time-limit warning are taken off; SubmitError when nothing is left
    (every allocation would be told to stop before its first step, and requeue without progress)."""
    limit = parse_slurm_time(time_limit or profile.time)
    train = [j for j in jobs if j.recipe is not None and not j.command and j.requeue]
    left = limit - profile.signal_seconds - profile.startup_seconds
    if not train or not math.isfinite(limit) or left >= limit / 4:
        return []
    what = (f"--time {time_limit or profile.time} ({limit:.0f} s) minus signal_seconds={profile.signal_seconds} "
            f"and ~{profile.startup_seconds} s of start-up (profile startup_seconds)")
    if left <= 0:
        raise SubmitError(f"{what} leaves no time to train: each allocation would get the time-limit warning before "
                          "its first step and requeue without progress; raise --time or lower signal_seconds")
    return [f"{what} leaves ~{left:.0f} s of training per allocation (under a quarter): most of each allocation "
            "is start-up; raise --time"]


def interval_warnings(jobs: list[Job], profile: ClusterProfile, time_limit: Optional[str] = None) -> list[str]:
    """One line per training job whose checkpoint.interval is over twice the Young-Daly advice, or 0
    on a multi-node run (a crash then loses everything since the last time-limit save)."""
    out = []
    for job in jobs:
        a = interval_advice(job, profile, time_limit) if job.requeue else None
        if a is None or not (a.interval > 2 * a.steps or (a.interval == 0 and job.nodes > 1)):
            continue
        out.append(f"job {job.name}: checkpoint.interval={a.interval} but the Young-Daly advice is ~{a.steps} steps "
                   f"({a.optimal_s / 60:.0f} min: {a.blocking_s:.2f} s blocking save, MTBF {a.mtbf_s / 3600:.0f} h at "
                   f"{a.gpus} GPUs); a failure loses ~{a.lost_gpu_hours():,.0f} GPU-h instead of "
                   f"~{a.lost_gpu_hours(a.steps):,.0f}: set checkpoint.interval={a.steps} (tools/plan.py --cluster)")
    return out


def check_run_dirs(jobs: list[Job]) -> None:
    """Refuse, at submission, a training job whose run directory is held by a live job or process
    (its run.lock): the job would only find out once started, after its queue wait."""
    from .run_lock import LOCK_NAME, describe, holder_alive

    for job in jobs:
        if job.recipe is None:
            continue
        lock = Path(job.recipe.train.output_dir) / LOCK_NAME
        try:
            owner = json.loads(lock.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(owner, dict) and owner and holder_alive(owner):
            raise SubmitError(f"{job.recipe.train.output_dir} is in use by {describe(owner)} ({lock}): wait for it to "
                              "end or cancel it (two jobs must not train one run directory); nothing was submitted")


def sbatch_script(sbatch: str, path: Path, script: str, ids: list[str]) -> str:
    """Write ``script`` to ``path`` and queue it; its job id is appended to ``ids``. A failed
    sbatch cancels the jobs already in ``ids`` (those this submission queued) and raises."""
    path.write_text(script)
    proc = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True)
        undone = f"; cancelled the jobs it had queued: {', '.join(ids)}" if ids else ""
        raise SubmitError(f"sbatch {path} failed: {proc.stderr.strip() or proc.stdout.strip()}{undone}")
    ids.append(proc.stdout.strip().split(";")[0])
    return ids[-1]


def submit_jobs(jobs: list[Job], profile: ClusterProfile, dry_run: bool = False,
                time_limit: Optional[str] = None,
                dependency: Optional[str] = None, max_requeues: Optional[int] = None,
                echo=print, warn=lambda line: print(f"submit: warning: {line}", file=sys.stderr)) -> list[str]:
    """Submit (or with ``dry_run`` print) the jobs in order; returns their ids.

    A later sbatch failure cancels the jobs this call already queued, so a chain is all or nothing.
    Save-budget warnings (see :func:`save_budget_warnings`) go to ``warn``, one line each.
    """
    check_limits(profile, time_limit, max_requeues)
    sbatch = None if dry_run else sbatch_path()
    if not dry_run:
        check_run_dirs(jobs)
    for line in save_budget_warnings(jobs, profile, None if dry_run else cluster_kill_wait()):
        warn(line)
    for line in interval_warnings(jobs, profile, time_limit) + time_budget(jobs, profile, time_limit):
        warn(line)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    ids: list[str] = []
    for job in jobs:
        dep = f"afterok:{ids[job.after]}" if job.after is not None else dependency
        script = render(job, profile, stamp, time_limit, dep, max_requeues)
        if dry_run:
            ids.append(f"<id of {job.name}>")
            echo(f"# ---- job {len(ids)}: {job.name} ({job.nodes} node(s) x {job.tasks_per_node} tasks)"
                 + "".join(f"; {n}" for n in job.notes))
            echo(script)
            continue
        job.log_dir.mkdir(parents=True, exist_ok=True)
        if job.recipe is not None:
            recipe_file(job, stamp).write_text(dump_recipe(job.recipe))
        sbatch_script(sbatch, job.log_dir / f"{job.name}.{stamp}.sbatch", script, ids)
        spare = profile.spare_nodes if job.requeue and job.recipe is not None else 0
        echo(f"submitted {job.name}: job {ids[-1]} ({job.nodes} node(s) x {job.tasks_per_node} tasks"
             f"{f' + {spare} spare node(s)' if spare else ''}"
             f"{', after ' + dep if dep else ''}); log {job.log_dir}/{job.name}-{ids[-1]}.out")
    return ids
