"""Offline evaluation of an export (or a checkpoint, exported first) with lm-eval.

``tools/evaluate.py`` is the CLI. Suites are YAML files in ``recipes/eval/`` (``tasks:`` lm-eval task
or group names, ``include:`` other suites); ``recipes/eval/tasks/`` holds local lm-eval tasks (the
shipped ``gaperon_demo_cloze``), always on the include path.

Offline by design: compute nodes have no network, so the tool sets ``HF_DATASETS_OFFLINE=1`` and
``HF_HUB_OFFLINE=1`` before anything imports the Hugging Face libraries, and reads task data from
``--data-dir`` (used as ``HF_HOME``), which ``--prefetch SUITE`` fills on a machine with network.
A task whose data is absent fails with one line naming it and the prefetch command.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import ArgParser, GaperonError, unwritable

ROOT = Path(__file__).resolve().parent.parent
SUITES_DIR = ROOT / "recipes" / "eval"
TASKS_DIR = SUITES_DIR / "tasks"


class EvalError(GaperonError, ValueError):
    """Bad input or missing data: the message names the problem and the fix."""


class _Reported(Exception):
    """A step that printed its own ``error:`` line failed: exit with its code, print nothing more."""

    def __init__(self, code: int):
        self.code = code


# ---- suites ------------------------------------------------------------------------------------
@dataclass
class Suite:
    name: str
    tasks: list[str]
    code_tasks: list[str] = field(default_factory=list)  # they run model-written code (humaneval)


def known_suites() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))


def load_suite(spec: str, _seen: tuple = ()) -> Suite:
    """A suite name (``recipes/eval/<name>.yaml``), a suite file, or a comma-separated task list."""
    path = Path(spec) if spec.endswith((".yaml", ".yml")) else SUITES_DIR / f"{spec}.yaml"
    if not path.is_file():
        if spec.endswith((".yaml", ".yml")):
            raise EvalError(f"suite file {spec} not found (suites: {', '.join(known_suites())})")
        return Suite(spec, [t.strip() for t in spec.split(",") if t.strip()])
    if path in _seen:
        raise EvalError(f"suite {path} includes itself")
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = set(raw) - {"tasks", "include", "code_execution", "description"}
    if unknown:
        raise EvalError(f"suite {path}: unknown keys {sorted(unknown)} (allowed: tasks, include, code_execution, "
                        "description)")
    tasks = list(raw.get("tasks") or [])
    suite = Suite(path.stem, tasks, tasks[:] if raw.get("code_execution") else [])
    for sub in raw.get("include") or []:
        inner = load_suite(sub, _seen + (path,))
        suite.tasks += [t for t in inner.tasks if t not in suite.tasks]
        suite.code_tasks += inner.code_tasks
    if not suite.tasks:
        raise EvalError(f"suite {path} lists no tasks")
    return suite


# ---- the offline environment -------------------------------------------------------------------
def set_hf_environment(data_dir: str | Path | None, offline: bool = True) -> None:
    """Must run before transformers / datasets / huggingface_hub are imported: they read these once."""
    if data_dir is not None:
        os.environ["HF_HOME"] = str(Path(data_dir).resolve())
    if offline:
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def _data_dir_shown(data_dir) -> str:
    return str(data_dir) if data_dir else os.environ.get("HF_HOME", "~/.cache/huggingface")


def task_manager(names: list[str] = ()):
    """lm-eval's task index with our local tasks; lm-eval's own ~10k task files are indexed (seconds)
    only when a name is not one of ours."""
    from lm_eval.tasks import TaskManager

    local_only = bool(names) and set(names) <= _local_tasks()
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=not local_only, verbosity="ERROR")


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 240 else text[:237] + "..."


def build_tasks(suite: Suite, data_dir=None, allow_code_execution: bool = False) -> dict:
    """lm-eval's task dict for the suite, one task at a time so that a failure names its task.
    Local task files resolve from the repository root (their data_files are relative to it)."""
    from lm_eval.tasks import get_task_dict

    names = suite.tasks
    if suite.code_tasks and not allow_code_execution:
        why = (f"{', '.join(suite.code_tasks)} run(s) code the model writes (HF evaluate's code_eval executes it in "
               "local subprocesses, no sandbox): run inside a container and pass --allow-code-execution")
        names = [t for t in names if t not in suite.code_tasks]
        if not names:
            raise EvalError(f"suite {suite.name}: {why}")
        print(f"note: skipped {why}", file=sys.stderr, flush=True)
    if allow_code_execution:
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"
    manager = task_manager(names)
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise EvalError(f"unknown task(s) {', '.join(unknown)}: not lm-eval tasks or groups, nor in {TASKS_DIR} "
                        f"(suites: {', '.join(known_suites())}; `lm_eval ls tasks` lists lm-eval's)")
    tasks, cwd = {}, os.getcwd()
    os.chdir(ROOT)
    try:
        for name in names:
            try:
                tasks.update(get_task_dict([name], manager))
            except Exception as err:  # datasets/hub raise many types for "not in the cache"
                prefetch = f"python tools/evaluate.py --prefetch {suite.name} --data-dir {_data_dir_shown(data_dir)}"
                fix = ("its data file is missing from the repository (restore recipes/eval/tasks/)"
                       if name in _local_tasks() else
                       f"on a machine with network run `{prefetch}` and copy that directory here")
                raise EvalError(f"task {name}: its data is not available offline in "
                                f"{_data_dir_shown(data_dir)} ({_short(err)}); {fix}") from None
    finally:
        os.chdir(cwd)
    return tasks


def _local_tasks() -> set[str]:
    names = set()
    for path in TASKS_DIR.rglob("*.yaml"):
        raw = yaml.safe_load(path.read_text()) or {}
        if isinstance(raw, dict) and "task" in raw:
            names.add(raw["task"])
    return names


def prefetch(suite: Suite, data_dir: str | Path) -> list[str]:
    """Download every task's data (and humaneval's code_eval metric) into ``data_dir``; needs network."""
    os.environ["HF_ALLOW_CODE_EVAL"] = "1"  # importing humaneval's utils loads its metric: cache it too
    from lm_eval.tasks import get_task_dict

    manager, done = task_manager(suite.tasks), []
    for name in suite.tasks:
        try:
            get_task_dict([name], manager)
        except Exception as err:
            raise EvalError(f"prefetch of task {name} failed ({_short(err)}): this needs network access to the "
                            "Hugging Face hub (run it on a login node)") from None
        done.append(name)
        print(f"prefetched {name} into {data_dir}", flush=True)
    return done


# ---- inputs ------------------------------------------------------------------------------------
@dataclass
class Model:
    hf_dir: Path
    checkpoint: Path | None = None
    step: int | None = None
    name: str | None = None
    run_dir: Path | None = None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def prepare_model(path: str | Path, tmp: Path, tokenizer: str | None, dtype: str) -> Model:
    """An HF directory as it is; a checkpoint (or a run / checkpoints dir) exported to ``tmp`` with
    the converter's own CLI entry point (the same as tools/convert_checkpoint.py to-hf)."""
    from . import checkpoint, convert

    path = Path(path)
    if (path / "config.json").is_file():
        return Model(path.resolve(), name=path.name)
    try:
        found = checkpoint.find(path)
    except checkpoint.CheckpointError as err:
        raise EvalError(str(err)) from None
    if found.path is None:
        raise EvalError(f"{path} is neither a Hugging Face directory (no config.json) nor a checkpoint, run or "
                        "checkpoints directory with a complete step_*: pass an export or a checkpoint")
    meta = checkpoint.read_meta(found.path)
    recipe = yaml.safe_load(meta["recipe"])
    hf_dir = tmp / "hf"
    argv = ["to-hf", str(found.path), str(hf_dir), "--dtype", dtype, "--no-progress"]
    if tokenizer:
        argv += ["--tokenizer", tokenizer]
    rc = convert.main(argv)
    if rc != 0:
        raise _Reported(rc)  # the converter printed its one error line
    if not (hf_dir / "tokenizer_config.json").is_file() and not (hf_dir / "tokenizer.json").is_file():
        raise EvalError(f"the export of {found.path} has no tokenizer (its recipe's data.tokenizer is not "
                        "here): pass --tokenizer DIR")
    run_dir = found.path.parent.parent if found.path.parent.name == "checkpoints" else None
    return Model(hf_dir, found.path.resolve(), int(meta["step"]), recipe.get("model", {}).get("name"),
                 run_dir.resolve() if run_dir else None)


# ---- running -----------------------------------------------------------------------------------
def run_lm_eval(model: Model, tasks: dict, batch_size: int, device: str, limit: int | None,
                allow_code_execution: bool) -> dict:
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(model.hf_dir), device=device, batch_size=batch_size, dtype="auto")
    return evaluator.evaluate(lm=lm, task_dict=tasks, limit=limit, confirm_run_unsafe_code=allow_code_execution,
                              verbosity="ERROR")


def scores(results: dict) -> list[dict]:
    """One row per (task, metric): lm-eval's ``acc,none`` keys split into metric and filter."""
    rows = []
    for task, metrics in results.get("results", {}).items():
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append({"task": task, "metric": metric if filt == "none" else f"{metric}_{filt}",
                         "value": float(value), "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                         "n": n})
    return rows


def table(model: Model, rows: list[dict]) -> str:
    head = f"{model.name or model.hf_dir}" + (f" step {model.step}" if model.step is not None else "")
    width = max([len(r["task"]) for r in rows] + [4])
    lines = [head, f"{'task':<{width}}  {'metric':<12} {'value':>8} {'stderr':>8} {'n':>6}"]
    for r in rows:
        err = f"{r['stderr']:.4f}" if r["stderr"] is not None else "-"
        lines.append(f"{r['task']:<{width}}  {r['metric']:<12} {r['value']:8.4f} {err:>8} {r['n'] or '-':>6}")
    return "\n".join(lines)


def log_to_run(run_dir: Path, step: int, rows: list[dict]) -> None:
    """``eval/<task>/<metric>`` at the checkpoint's step, in the run's metrics.jsonl and TensorBoard."""
    metrics = {f"eval/{r['task']}/{r['metric']}": r["value"] for r in rows}
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")
    from torch.utils.tensorboard import SummaryWriter

    tb = SummaryWriter(str(run_dir / "tensorboard"))
    for k, v in metrics.items():
        tb.add_scalar(k, v, step)
    tb.close()


def evaluate(args) -> dict:
    suite = load_suite(args.tasks)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gaperon-eval-") as tmp:
        tasks = build_tasks(suite, args.data_dir, args.allow_code_execution)  # before a costly export
        model = prepare_model(args.model, Path(tmp), args.tokenizer, args.dtype)
        if args.step is not None:
            model.step = args.step
        results = run_lm_eval(model, tasks, args.batch_size, args.device, args.limit, args.allow_code_execution)
    from lm_eval.utils import handle_non_serializable

    rows = scores(results)
    out = Path(args.out) if args.out else (
        model.run_dir / "eval" / str(model.step) if model.run_dir else model.hf_dir / "eval")
    problem = unwritable(out)
    if problem:
        raise EvalError(f"cannot write the results to {out}: {problem}; pass --out DIR, a writable directory")
    out.mkdir(parents=True, exist_ok=True)
    report = {"model": model.name, "hf_dir": str(model.hf_dir) if model.checkpoint is None else None,
              "checkpoint": str(model.checkpoint) if model.checkpoint else None, "step": model.step,
              "phase": model.run_dir.name if model.run_dir else None, "commit": _git_commit(),
              "suite": suite.name, "tasks": suite.tasks, "limit": args.limit, "seconds": time.perf_counter() - t0,
              "scores": rows,
              "lm_eval": {k: results[k] for k in ("results", "groups", "group_subtasks", "configs", "versions",
                                                  "n-shot", "higher_is_better", "n-samples") if k in results}}
    (out / "results.json").write_text(json.dumps(report, indent=2, default=handle_non_serializable) + "\n")
    shown = table(model, rows)
    (out / "table.txt").write_text(shown + "\n")
    print(shown, flush=True)
    print(f"results: {out / 'results.json'}", flush=True)
    if args.log_to_run:
        if model.run_dir is None or model.step is None:
            raise EvalError("--log-to-run needs a checkpoint of a run (RUN, RUN/checkpoints or a step_* in it)")
        log_to_run(model.run_dir, model.step, rows)
    return report


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(
        prog="evaluate.py", description="Evaluate an HF export or a checkpoint with lm-eval, offline.",
        epilog=f"suites: {', '.join(known_suites())} (recipes/eval/); local tasks: recipes/eval/tasks/")
    p.add_argument("model", nargs="?", help="HF directory, or a checkpoint / run / checkpoints dir (exported first)")
    p.add_argument("--tasks", "--suite", default="gaperon_demo", help="suite name or file, or comma-separated tasks")
    p.add_argument("--prefetch", metavar="SUITE", help="download SUITE's data into --data-dir (needs network), then exit")
    p.add_argument("--data-dir", help="HF cache prepared by --prefetch (used as HF_HOME; default: the current HF_HOME)")
    p.add_argument("--out", help="results directory (default: RUN/eval/STEP for a checkpoint, HF_DIR/eval)")
    p.add_argument("--limit", type=int, help="first N documents of each task (default: all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default="bf16", help="export dtype of a checkpoint")
    p.add_argument("--tokenizer", help="tokenizer for a checkpoint's export (default: its recipe's data.tokenizer)")
    p.add_argument("--step", type=int, help="the step to record (default: the checkpoint's)")
    p.add_argument("--log-to-run", action="store_true",
                   help="also write eval/<task>/<metric> to the run's metrics.jsonl and TensorBoard at the step")
    p.add_argument("--allow-code-execution", action="store_true",
                   help="let humaneval run model-written code (unsandboxed: use a container)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 2 bad input or missing data (one ``error:`` line)."""
    args = build_parser().parse_args(argv)
    try:
        if args.prefetch:
            if not args.data_dir:
                raise EvalError("--prefetch needs --data-dir DIR: the cache to fill (copy it to the cluster)")
            set_hf_environment(args.data_dir, offline=False)
            prefetch(load_suite(args.prefetch), args.data_dir)
            return 0
        if not args.model:
            raise EvalError("give the model to evaluate: an HF directory or a checkpoint (or --prefetch SUITE)")
        if args.limit is not None and args.limit < 1:
            raise EvalError(f"--limit {args.limit} must be >= 1 (or leave it out: every document)")
        if not Path(args.model).exists():
            raise EvalError(f"{args.model} does not exist: pass an HF directory or a checkpoint")
        if not args.out and (Path(args.model) / "config.json").is_file():
            args.out = str(Path(args.model) / "eval")  # the default for an HF directory, checked now
        if args.out:  # before an export and an evaluation, not after them
            problem = unwritable(args.out)
            if problem:
                raise EvalError(f"--out {args.out}: {problem}; choose a writable directory")
        set_hf_environment(args.data_dir)
        if args.device is None:
            import torch

            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        evaluate(args)
    except EvalError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except _Reported as err:
        return err.code
    return 0
