"""The suite's state and its child processes: each sub-step's processes run with their own time
budget, capped by what is left of --budget; results are written after every sub-step."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .common import FLOPS_NOTE, PEAK, ROOT, SITE, TINY, free_port
from .report import render_markdown


class Suite:
    def __init__(self, args):
        self.args = args
        self.dry = args.dry_run
        self.out = Path(args.out or os.environ.get("OUT") or "gpu_suite_out").resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "logs").mkdir(exist_ok=True)
        self.scratch = Path(tempfile.mkdtemp(prefix="gpu_suite_", dir=args.scratch))
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + args.budget
        self.use_site = args.install_carried or SITE.exists() and not self.dry
        self.results: dict = {"meta": {}, "sections": {}}
        if args.only and (self.out / "gpu_suite.json").exists():
            self.results = json.loads((self.out / "gpu_suite.json").read_text())
        self.results["meta"].update({
            "dry_run": self.dry, "budget_s": args.budget, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "flops_note": FLOPS_NOTE, "peak_tflops": PEAK,
            "scale": ("dry run: recipes/tiny.yaml everywhere, CPU" if self.dry else "1.5b/8b/24b shapes, one GPU")})
        self.gpu_memory = None

    # ---- environment for child processes ----
    def env(self, cpu: bool = False, threads: int | None = None, strict_fp32: bool = False) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
        paths = ([str(SITE)] if self.use_site else []) + [str(ROOT)]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env.update(PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(free_port()), TOKENIZERS_PARALLELISM="false")
        if strict_fp32:  # fp32 parity checks: no TF32 in cuBLAS/cuDNN, whatever a library asks for
            env["NVIDIA_TF32_OVERRIDE"] = "0"
        if cpu or self.dry:
            env["GAPERON_DEVICE"] = "cpu"
            env["OMP_NUM_THREADS"] = str(threads or (1 if self.dry else 4))
        return env

    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def run(self, name: str, cmds: list[tuple[list[str], dict]], budget: float) -> list[dict]:
        """Run commands in parallel, each killed at ``budget`` seconds (capped by the suite's
        deadline); stdout+stderr go to logs/<name>-<i>.log."""
        limit = max(1.0, min(budget, self.remaining()))
        procs = []
        for i, (cmd, env) in enumerate(cmds):
            log = self.out / "logs" / f"{name}{'' if len(cmds) == 1 else f'-{i}'}.log"
            f = open(log, "w")
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                           start_new_session=True), f, log, time.perf_counter()))
        results = []
        for i, (proc, f, log, start) in enumerate(procs):
            try:
                rc = proc.wait(timeout=max(1.0, limit - (time.perf_counter() - start)))
                timed_out = False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                rc, timed_out = proc.wait(), True
            f.close()
            text = log.read_text(errors="replace")
            results.append({"rc": rc, "timed_out": timed_out, "seconds": round(time.perf_counter() - start, 1),
                            "log": str(log.relative_to(self.out)), "tail": text[-3000:], "text": text})
        for i, r in enumerate(results):  # another process took the rendezvous port first: once more, on a new one
            if r["rc"] != 0 and not r["timed_out"] and ("EADDRINUSE" in r["text"] or "ddress already in use" in r["text"]):
                cmd, env = cmds[i]
                results[i] = self.run(f"{name}-retry{i}", [(cmd, {**env, "MASTER_PORT": str(free_port())})], budget)[0]
                results[i]["retried_port"] = True
        return results

    # ---- results ----
    def record(self, name: str, section: dict, order: list[str]) -> None:
        sec = {**self.results["sections"], name: section}
        self.results["sections"] = {k: sec[k] for k in sorted(sec, key=lambda k: order.index(k) if k in order else 99)}
        self.results["meta"]["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        tmp = self.out / "gpu_suite.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        tmp.replace(self.out / "gpu_suite.json")
        (self.out / "gpu_suite.md").write_text(render_markdown(self.results))

    # ---- recipes ----
    def recipe(self, size: str) -> str:
        return str(TINY if self.dry else ROOT / "recipes" / f"{size}.yaml")

    def base_overrides(self, out_dir: Path, steps: int, tiny: bool = False) -> list[str]:
        # The size recipes' WSD schedule (2,000 warmup + 12,000 decay steps) refuses a 10-step run:
        # a constant LR instead (the speed does not depend on it). tiny.yaml keeps its own.
        schedule = [] if (tiny or self.dry) else ["schedule.kind=constant", "schedule.warmup_steps=0",
                                                    "schedule.decay_steps=0"]
        return schedule + [f"train.output_dir={out_dir}", f"train.steps={steps}", "train.tensorboard=false",
                "train.log_interval=1", "train.eval_interval=0", "checkpoint.save_at_end=false",
                "checkpoint.interval=0", "data.kind=synthetic", "health.hang_timeout_s=0"]

    def layout(self, mb: int, ga: int = 1, zero: int = 1) -> list[str]:
        return ["layout.tp=1", "layout.pp=1", "layout.vpp=1", "layout.dp=1", "layout.sequence_parallel=false",
                f"layout.zero_stage={zero}", f"layout.micro_batch={mb}", f"layout.global_batch={mb * ga}",
                "layout.recompute=none"]

    def train_cmd(self, recipe: str, overrides: list[str]) -> list[str]:
        return [sys.executable, str(ROOT / "tools" / "train.py"), recipe, *overrides]

    def fresh_dir(self, name: str) -> Path:
        d = self.scratch / name
        if d.exists():
            shutil.rmtree(d)
        return d


def run_steps(s: Suite, shapes, steps: list[tuple[str, object]]) -> None:
    """Run the sub-steps ``[(name, fn(s, shapes) -> section)]`` (--only/--skip as ``s.args`` says):
    install and env first, planner last, the others in order or, in a dry run with --parallel,
    side by side. A sub-step that raises records its error and the suite goes on."""
    only = set(s.args.only.split(",")) if s.args.only else None
    skip = set(s.args.skip.split(",")) if s.args.skip else set()
    if only:
        only |= {"env", "planner"}  # later sub-steps read the GPU's memory and imports; the summary is redone
        if s.args.install_carried:
            only.add("install")
    order = [name for name, _ in steps]
    lock = threading.Lock()

    def one(name, fn):
        start = time.perf_counter()
        env_bad = name not in ("install", "env") and s.results["sections"].get("env", {}).get("status") == "error"
        if s.remaining() < 5:
            section = {"status": "skipped", "reason": "suite budget spent"}
        elif env_bad:
            section = {"status": "skipped", "reason": "env: " + s.results["sections"]["env"].get("error", "failed")}
        else:
            try:
                section = fn(s, shapes)
            except Exception as err:  # noqa: BLE001 - record it and go on
                section = {"status": "error", "error": f"{type(err).__name__}: {err}"}
            section.setdefault("seconds", round(time.perf_counter() - start, 1))
        with lock:
            s.record(name, section, order)
        print(f"[{time.perf_counter() - s.t0:6.0f} s] {name}: {section.get('status')} "
              f"{section.get('error') or section.get('reason') or ''}".rstrip(), flush=True)

    todo = [(n, fn) for n, fn in steps if not ((only and n not in only) or n in skip)]
    serial = {"install", "env", "planner"}  # before / after everything else
    for n, fn in [t for t in todo if t[0] in ("install", "env")]:
        one(n, fn)
    middle = [t for t in todo if t[0] not in serial]
    if s.args.parallel > 1:  # dry runs: independent sub-steps side by side (never for GPU figures)
        shapes.micro_batch(s)
        longest = ("correctness_hf", "correctness_tiny")  # chains of processes: start them first
        middle.sort(key=lambda t: (t[0] not in longest, longest.index(t[0]) if t[0] in longest else 0))
        with ThreadPoolExecutor(s.args.parallel) as pool:
            list(pool.map(lambda t: one(*t), middle))
    else:
        for n, fn in middle:
            one(n, fn)
    for n, fn in [t for t in todo if t[0] == "planner"]:
        one(n, fn)
