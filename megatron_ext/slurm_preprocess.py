"""Preprocessing on SLURM: a spec of sources becomes one job array per source, a merge job after
each array (afterok), and optionally a training chain after every merge.

A source's N parts run as array tasks 0..N-1 (``--array=0-(N-1)%K``: at most K at once), each
``tools/preprocess_data.py --shard $SLURM_ARRAY_TASK_ID/N``; the merge job joins the parts once all
tasks succeeded. Input globs are expanded (sorted) at submission and frozen into the scripts, so
every task of an array, and a resubmission, cuts the same file list. Everything is checked before
the first sbatch: a bad spec queues nothing.
"""
from __future__ import annotations

import glob
import shlex
import sys
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from .config import RecipeError, parse_yaml, validation_message
from .slurm import ROOT, ClusterProfile, SubmitError, _fill, parse_slurm_time

TEMPLATE = ROOT / "slurm" / "preprocess.sbatch.tmpl"
TOOL = ROOT / "tools" / "preprocess_data.py"


class Source(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    inputs: list[str]                 # files or globs, in order
    output_prefix: str
    text_key: str = "text"
    tokenizer: Optional[str] = None   # default: the spec's
    shards: Optional[int] = None
    workers: Optional[int] = None


class PreprocessSpec(BaseModel):
    """Defaults for every source, then the sources."""

    model_config = ConfigDict(extra="forbid")

    tokenizer: Optional[str] = None
    shards: int = 1
    workers: int = 8                  # tokenizing processes per task (= --cpus-per-task)
    max_parallel: Optional[int] = None  # array tasks running at once (%K)
    time: str = "04:00:00"            # per array task
    merge_time: str = "02:00:00"
    mem: Optional[str] = None
    on_error: Literal["fail", "skip"] = "skip"
    txt_mode: Literal["doc", "lines"] = "doc"
    model_vocab_size: Optional[int] = None
    delete_parts: bool = False
    log_dir: Optional[str] = None     # default: <first source's output dir>/slurm
    sources: list[Source]

    @model_validator(mode="after")
    def _check(self) -> "PreprocessSpec":
        for t in (self.time, self.merge_time):
            parse_slurm_time(t)
        names = [s.name for s in self.sources]
        if not names:
            raise SubmitError("the spec lists no sources: add at least one under sources:")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise SubmitError(f"source names repeat: {', '.join(dup)}; give each source its own name")
        prefixes = [s.output_prefix for s in self.sources]
        dup = sorted({p for p in prefixes if prefixes.count(p) > 1})
        if dup:
            raise SubmitError(f"several sources write output_prefix {', '.join(dup)}: give each its own")
        for s in self.sources:
            if not (s.tokenizer or self.tokenizer):
                raise SubmitError(f"source {s.name}: no tokenizer: set tokenizer: for the spec or the source")
            if (s.shards or self.shards) < 1 or (s.workers or self.workers) < 1:
                raise SubmitError(f"source {s.name}: shards and workers must be >= 1")
        return self


def load_spec(path: str | Path) -> PreprocessSpec:
    path = Path(path)
    if not path.is_file():
        raise SubmitError(f"preprocessing spec not found: {path} (see recipes/preprocess/gaperon-phase1.yaml)")
    try:
        raw = parse_yaml(path.read_text(), f"preprocessing spec {path}") or {}
        return PreprocessSpec.model_validate(raw)
    except RecipeError as err:
        raise SubmitError(str(err)) from None
    except ValidationError as err:
        why = validation_message(err, "spec", "PreprocessSpec in megatron_ext/slurm_preprocess.py", SubmitError,
                                 "the spec")
        raise SubmitError(f"preprocessing spec {path} is invalid: {why}") from None


def expand_inputs(source: Source) -> list[str]:
    """Files in spec order, each glob sorted; a pattern that matches nothing is an error."""
    files = []
    for pattern in source.inputs:
        hits = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern] if Path(pattern).is_file() else []
        if not hits:
            raise SubmitError(f"source {source.name}: input {pattern} matches no file: fix the path (globs are "
                              "expanded when you submit)")
        files += [str(Path(h).resolve()) for h in hits]
    return files


def _options(profile: ClusterProfile, time_limit: str, mem: Optional[str], extra: list[str]) -> str:
    partition = profile.cpu_partition or profile.partition
    opts = [f"--partition={partition}" if partition else None,
            f"--account={profile.account}" if profile.account else None,
            f"--qos={profile.qos}" if profile.qos else None,
            f"--time={time_limit}", f"--mem={mem}" if mem else None, *extra]
    return "\n".join(f"#SBATCH {o}" for o in opts if o)


def render_preprocess(spec: PreprocessSpec, profile: ClusterProfile, log_dir: Path) -> list[dict]:
    """Per source: {'name', 'array': script, 'merge': script}; '{{dependency}}' is filled at submission."""
    python = profile.python or sys.executable
    env = "\n".join(f"export {k}={shlex.quote(str(v))}" for k, v in {**profile.env, "PYTHONUNBUFFERED": "1",
                                                                   "OMP_NUM_THREADS": "1"}.items())
    out = []
    for s in spec.sources:
        files = expand_inputs(s)
        tokenizer = s.tokenizer or spec.tokenizer
        if not Path(tokenizer).exists():
            raise SubmitError(f"source {s.name}: tokenizer {tokenizer} does not exist (every array task would fail "
                              "on it): set tokenizer: in the spec to a local HF tokenizer directory or a "
                              "sentencepiece .model")
        n, workers = s.shards or spec.shards, s.workers or spec.workers
        k = spec.max_parallel or n
        cmd = [python, str(TOOL), "--input", *files, "--output-prefix", s.output_prefix,
               "--tokenizer", s.tokenizer or spec.tokenizer, "--workers", str(workers), "--text-key", s.text_key,
               "--txt-mode", spec.txt_mode, "--on-error", spec.on_error, "--no-progress"]
        if spec.model_vocab_size:
            cmd += ["--model-vocab-size", str(spec.model_vocab_size)]
        common = {"profile": profile.name, "log_dir": str(log_dir), "workdir": str(Path.cwd()),
                  "setup": profile.setup.strip(), "env": env}
        array = _fill(TEMPLATE.read_text(), {
            **common, "job_name": f"pre-{s.name}", "cpus": str(workers), "log_name": "%x-%A_%a.out",
            "what": f"Source {s.name}: {len(files)} input file(s) -> {s.output_prefix}.part-I-of-{n}, I = array task.",
            "sbatch_options": _options(profile, spec.time, spec.mem, [f"--array=0-{n - 1}%{min(k, n)}"]),
            "command": " ".join(shlex.quote(c) for c in cmd) + f" --shard \"$SLURM_ARRAY_TASK_ID/{n}\""})
        merge_cmd = [python, str(TOOL), "merge", "--output-prefix", s.output_prefix]
        if spec.delete_parts:
            merge_cmd.append("--delete-parts")
        merge = _fill(TEMPLATE.read_text(), {
            **common, "job_name": f"merge-{s.name}", "cpus": "1", "log_name": "%x-%j.out",
            "what": f"Source {s.name}: merge the {n} parts into {s.output_prefix}.bin/.idx once every task succeeded.",
            "sbatch_options": _options(profile, spec.merge_time, None, ["--dependency=afterok:{{dependency}}"]),
            "command": " ".join(shlex.quote(c) for c in merge_cmd)})
        out.append({"name": s.name, "shards": n, "array": array, "merge": merge})
    return out


def cancel_stale_merges(name: str, log_dir: Path) -> list[str]:
    """Cancel the pending merge jobs of source ``name`` queued from ``log_dir`` whose array can no
    longer succeed (a cancelled or failed task: Reason=DependencyNeverSatisfied; SLURM would keep
    them PENDING forever). A resubmitted spec calls this first, so its new merge replaces them."""
    import shutil
    import subprocess

    if shutil.which("squeue") is None:
        return []
    proc = subprocess.run(["squeue", "-h", "-n", f"merge-{name}", "-t", "PD", "-o", "%i|%r|%o"],
                          capture_output=True, text=True)
    stale = [job for job, reason, script in (line.split("|", 2) for line in proc.stdout.splitlines() if line.count("|") >= 2)
             if reason == "DependencyNeverSatisfied" and script.startswith(f"{log_dir}/")]
    if stale:
        subprocess.run(["scancel", *stale], capture_output=True)
    return stale


def default_log_dir(spec: PreprocessSpec) -> Path:
    if spec.log_dir:
        return Path(spec.log_dir).resolve()
    return Path(spec.sources[0].output_prefix).resolve().parent / "slurm"


def submit_preprocess(spec_path: str | Path, profile: ClusterProfile, dry_run: bool = False,
                      train_jobs: Optional[list] = None, time_limit: Optional[str] = None,
                      echo=print) -> list[str]:
    """Queue (or with ``dry_run`` print) every source's array and merge, then ``train_jobs`` (from
    slurm.plan_jobs) with afterok on every merge. Returns the job ids; a failed sbatch cancels
    what this call queued."""
    import time

    from .slurm import sbatch_path, sbatch_script, submit_jobs

    spec = load_spec(spec_path)
    log_dir = default_log_dir(spec)
    scripts = render_preprocess(spec, profile, log_dir)  # every check before the first sbatch
    sbatch = None if dry_run else sbatch_path()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    ids: list[str] = []
    merges: list[str] = []

    def queue(name: str, script: str) -> str:
        if dry_run:
            echo(f"# ---- {name}")
            echo(script)
            return f"<id of {name}>"
        log_dir.mkdir(parents=True, exist_ok=True)
        return sbatch_script(sbatch, log_dir / f"{name}.{stamp}.sbatch", script, ids)

    for s in scripts:
        if not dry_run:
            for job in cancel_stale_merges(s["name"], log_dir):
                echo(f"cancelled merge job {job} of source {s['name']}: its array had a cancelled or failed task "
                     "(DependencyNeverSatisfied); the new merge replaces it")
        array = queue(f"pre-{s['name']}", s["array"])
        merge = queue(f"merge-{s['name']}", s["merge"].replace("{{dependency}}", array))
        merges.append(merge)
        if not dry_run:
            echo(f"submitted source {s['name']}: array job {array} ({s['shards']} tasks), merge job {merge} "
                 f"(afterok:{array}); logs {log_dir}")
    if train_jobs:
        dep = "afterok:" + ":".join(merges)
        ids += submit_jobs(train_jobs, profile, dry_run, time_limit, dep, echo=echo)
    return ids
