#!/usr/bin/env python
"""GPU proof in one command: correctness, throughput, MFU and the planner's error on one H100/H200.

On a CPU machine, once (fetches/builds the wheels the GPU image lacks into ``wheels/``, ignored):

    .venv/bin/python benchmarks/gpu_suite.py --prepare

On the GPU machine (device tool: run in the repo root, ``carry=["wheels"]``, timeout_s=560):

    bash benchmarks/gpu_suite.sh          # = OUT=$OUT python3 benchmarks/gpu_suite.py --install-carried

A rerun of some sub-steps on the same (still warm) machine merges into the same JSON:
``bash benchmarks/gpu_suite.sh --only tput_compile,proxy_24b --budget 300``.

``--install-carried`` unpacks ``wheels/*.whl`` with ``pip install --no-deps --no-index --target
.gpu_suite_site`` (a zip fallback when pip is unusable) and puts that folder first on PYTHONPATH;
the machine's own torch (2.11 + CUDA 13), transformers, safetensors, ... are used as they are.

Everything is written to ``$OUT/gpu_suite.json`` and ``$OUT/gpu_suite.md`` (OUT defaults to
./gpu_suite_out) after every sub-step, so a timeout still returns figures. Each sub-step runs its
processes with its own time budget, capped by what is left of ``--budget`` (default 470 s); one
that fails records its error and the suite goes on. Sub-steps, in priority order:

  install, env            carried wheels, versions, GPU, TE / flash-attn importable
  correctness_tiny        recipes/tiny.yaml, 20 steps, GPU vs CPU, fp32 (<= 1e-3 rel per step) and
                          bf16-mixed (max rel diff reported, next to the bf16-vs-fp32 gap)
  tput_mixed              1.5b (16 layers, seq 4096, dp=1, ZeRO-1), bf16-mixed, sdpa, no compile
  baseline                plain PyTorch + transformers LlamaForCausalLM step, same batch and seq
                          (fp32 weights + bf16 autocast, fused AdamW, SDPA) -> ratio
  tput_pure               as tput_mixed in bf16-pure
  proxy_8b, proxy_24b     full-width 4-layer proxies (24b: 2 layers if 4 do not fit), tp=1
  correctness_hf          1.5b shapes with 2 layers (time-bound), fp32, lr=0: the trainer's
                          first-step loss vs LlamaForCausalLM loaded from our to-hf export
  tput_compile            tput_mixed with train.compile=true
  tput_te                 tput_mixed with train.attention=te (skipped unless importable)
  tput_cudnn              tput_mixed with train.attention=sdpa-cudnn (sdpa lets torch pick: flash)
  tput_chunked_ce         tput_mixed with train.loss_chunk_tokens=2048 (no full logits kept: tokens/s
                          and peak memory against tput_mixed decide whether the recipes turn it on)
  sft_varlen              packed SFT on the 1.5b shapes (synthetic conversations, realistic lengths):
                          tokens/s and trained tokens/s with train.packed_attention=varlen (cu_seqlens:
                          flash-attn varlen when importable, else per-document SDPA) vs dense (the
                          [b, 1, s, s] block mask), and their first-step losses
  planner                 (d) and the issue's goals, from the runs above

Every training run goes through the real trainer (tools/train.py), in a fresh run directory
under a scratch folder (not $OUT), with no checkpoint I/O; tokens/s come from its
metrics.jsonl, excluding warm-up steps. MFU = tokens/s x megatron_ext/plan.py flops_per_token /
989 TFLOP/s. The planner section compares planned_mem_gib with peak_mem_gib
(torch.cuda.max_memory_allocated) for every run, and plan.step_time at the measured MFU with the
measured step time.

``--dry-run`` runs the whole suite on CPU (GAPERON_DEVICE=cpu) with recipes/tiny.yaml everywhere
and few steps (tests/test_gpu_suite.py), so the suite cannot rot between GPU sessions.
``--only a,b`` reruns the named sub-steps and merges them into an existing gpu_suite.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / "wheels"
SITE = ROOT / ".gpu_suite_site"
TINY = ROOT / "recipes" / "tiny.yaml"
PEAK_TFLOPS = 989.0  # dense bf16, H100 SXM / H200
FLOPS_NOTE = ("MFU = tokens/s x flops_per_token / 989 TFLOP/s; flops_per_token is megatron_ext/plan.py's: "
              "6 x matmul params (layers + output layer, no embedding lookup) + 12 x layers x heads x "
              "head_dim x seq for attention (causal counted as full s x s, as the planner does)")

# Wheels the GPU image lacks. (distribution, version or None = the CPU venv's version, kind):
# "binary" -> pip download for cp312/manylinux_2_28, "build" -> pip wheel --no-deps,
# "if-missing" -> installed on the GPU only when the image does not have it.
CARRIED = [
    ("megatron-core", "0.16.1", "binary"),
    ("deepspeed", "0.19.8", "build"),
    ("pydantic", "2.14.3", "binary"),
    ("pydantic-core", None, "binary"),       # the exact version pydantic's METADATA pins
    ("annotated-types", None, "binary"),
    ("typing-inspection", None, "binary"),
    ("typing-extensions", None, "binary"),   # pydantic 2.14 needs a newer one than torch's floor
    ("hjson", None, "binary"),               # deepspeed imports these at `import deepspeed`
    ("msgpack", None, "binary"),
    ("py-cpuinfo", None, "binary"),
    ("ninja", None, "binary"),
    ("tqdm", None, "if-missing"),
    ("packaging", None, "if-missing"),
    ("einops", None, "if-missing"),
]
IF_MISSING_IMPORT = {"tqdm": "tqdm", "packaging": "packaging", "einops": "einops"}
CARRY_LIMIT_MIB = 60
# pip does not widen one --platform to older manylinux tags: name them (pydantic-core is 2_17).
PLATFORMS = [a for tag in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                           "manylinux_2_5_x86_64", "manylinux1_x86_64") for a in ("--platform", tag)]


# ============================================================================ preparation (CPU)

def _norm(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def _wheel_dist(path: Path) -> tuple[str, str]:
    parts = path.name.split("-")
    return _norm(parts[0]), parts[1]


def _venv_version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def _pydantic_core_pin(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if line.startswith("Requires-Dist: pydantic-core"):
                return line.split("==")[1].split(";")[0].strip()
    raise RuntimeError(f"{wheel.name} does not pin pydantic-core")


def prepare(dest: Path = WHEELS) -> int:
    dest.mkdir(exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    have = {_wheel_dist(p): p for p in dest.glob("*.whl")}

    def present(dist, ver):
        return any(d == _norm(dist) and v == ver for d, v in have)

    for dist, ver, kind in CARRIED:
        if dist == "pydantic-core":
            ver = _pydantic_core_pin(next(p for (d, _), p in have.items() if d == "pydantic"))
        ver = ver or _venv_version(dist)
        if present(dist, ver):
            print(f"have {dist}=={ver}")
            continue
        spec = f"{dist}=={ver}"
        if kind == "build":
            cmd = [*pip, "wheel", "--no-deps", "-w", str(dest), spec]
            if subprocess.run(cmd).returncode != 0:  # its setup.py may want torch at build time
                subprocess.run([*cmd[:3], "--no-build-isolation", *cmd[3:]], check=True)
        else:
            subprocess.run([*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                            "--implementation", "cp", *PLATFORMS, "-d", str(dest), spec],
                           check=True)
        have = {_wheel_dist(p): p for p in dest.glob("*.whl")}
    wanted = set()
    for dist, ver, _ in CARRIED:  # drop stale versions of the carried distributions
        matches = sorted((p for (d, _), p in have.items() if d == _norm(dist)), key=lambda p: p.stat().st_mtime)
        wanted.add(matches[-1])
    for p in dest.glob("*.whl"):
        if p not in wanted:
            p.unlink()
    total = sum(p.stat().st_size for p in dest.glob("*.whl"))
    for p in sorted(dest.glob("*.whl")):
        print(f"{p.stat().st_size / 2**20:7.2f} MiB  {p.name}")
    print(f"carried: {len(wanted)} wheels, {total / 2**20:.1f} MiB in {dest} (limit {CARRY_LIMIT_MIB} MiB)")
    return 0 if total <= CARRY_LIMIT_MIB * 2**20 else 1


# ============================================================================ installation (GPU)

def _installed(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _unzip_wheel(wheel: Path, site: Path) -> None:
    """Install a wheel by unpacking it (what pip does for purelib/platlib wheels)."""
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            parts = name.split("/")
            if parts[0].endswith(".data") and len(parts) > 2 and parts[1] in ("purelib", "platlib"):
                target = site.joinpath(*parts[2:])
            elif parts[0].endswith(".data"):
                continue
            else:
                target = site / name
            if name.endswith("/"):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(name))


def install_carried(site: Path = SITE, wheels: Path = WHEELS) -> dict:
    t0 = time.perf_counter()
    files = sorted(wheels.glob("*.whl"))
    if not files:
        raise RuntimeError(f"no wheels in {wheels}: run --prepare on a CPU machine and carry 'wheels'")
    chosen, skipped = [], []
    for w in files:
        dist, ver = _wheel_dist(w)
        pretty = next((d for d, _, k in CARRIED if _norm(d) == dist), dist)
        kind = next((k for d, _, k in CARRIED if _norm(d) == dist), "binary")
        if kind == "if-missing" and _installed(pretty):
            skipped.append(f"{pretty} (image has {_installed(pretty)})")
            continue
        chosen.append(w)
    if site.exists():
        shutil.rmtree(site)
    site.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile",
           "--disable-pip-version-check", "--target", str(site), *map(str, chosen)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    how = "pip install --no-deps --no-index --target"
    if proc.returncode != 0:
        how = f"zip (pip failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]})"
        for w in chosen:
            _unzip_wheel(w, site)
    return {"status": "ok", "how": how, "site": str(site), "installed": [w.name for w in chosen],
            "skipped": skipped, "carried_mib": round(sum(w.stat().st_size for w in files) / 2**20, 2),
            "seconds": round(time.perf_counter() - t0, 1)}


# ============================================================================ processes

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
            "flops_note": FLOPS_NOTE, "peak_tflops": PEAK_TFLOPS,
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


# ============================================================================ metrics

def read_rows(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def throughput(rows: list[dict], warmup: int, tokens_per_step: int) -> dict:
    """Tokens/s over the steps after ``warmup`` (total tokens / total time of those steps)."""
    steps = [r for r in rows if "tokens_per_s" in r and not r.get("skipped")]
    timed = [r for r in steps if r["step"] > warmup] or steps[-1:]
    if not timed:
        return {}
    seconds = sum(tokens_per_step / r["tokens_per_s"] for r in timed)
    tps = tokens_per_step * len(timed) / seconds
    return {"tokens_per_s": tps, "step_s": seconds / len(timed), "timed_steps": len(timed),
            "peak_mem_gib": max(r["peak_mem_gib"] for r in steps),
            "planned_mem_gib": steps[-1].get("planned_mem_gib"), "losses": [r["loss"] for r in steps]}


def mfu(tokens_per_s: float, fpt: float) -> float:
    return tokens_per_s * fpt / (PEAK_TFLOPS * 1e12)


def attention_line(text: str) -> str | None:
    return next((line[len("attention: "):].strip() for line in text.splitlines() if line.startswith("attention: ")), None)


def error_of(res: dict) -> str:
    if res["timed_out"]:
        return f"timed out after {res['seconds']} s (see {res['log']})"
    lines = [ln for ln in res["text"].splitlines() if ln.strip()]
    err = [ln for ln in lines if "Error" in ln or ln.startswith("error:")]
    return f"exit {res['rc']}: {(err or lines or ['no output'])[-1][:400]} (see {res['log']})"


def rel_diffs(a: list[float], b: list[float]) -> list[float]:
    return [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)]


# ============================================================================ sub-steps

def step_install(s: Suite) -> dict:
    if not s.args.install_carried:
        return {"status": "skipped", "reason": "no --install-carried (using this Python's packages)"
                + (f"; {SITE} on PYTHONPATH" if s.use_site else "")}
    return install_carried()


ENV_PROBE = r"""
import json, importlib, importlib.util, os, sys
out = {"python": sys.version.split()[0]}
import torch
out.update(torch=torch.__version__, torch_file=torch.__file__, cuda=torch.version.cuda,
           cuda_available=torch.cuda.is_available())
if torch.cuda.is_available() and os.environ.get("GAPERON_DEVICE") != "cpu":
    p = torch.cuda.get_device_properties(0)
    out.update(gpu=p.name, gpu_memory=p.total_memory, bf16=torch.cuda.is_bf16_supported())
for mod in ["megatron.core", "deepspeed", "pydantic", "transformers", "safetensors", "numpy", "yaml",
            "transformer_engine", "flash_attn", "flash_attn_interface", "apex"]:
    try:
        m = importlib.import_module(mod)
        out[mod] = getattr(m, "__version__", "ok")
    except Exception as e:
        out[mod] = None
        out[mod + "_error"] = f"{type(e).__name__}: {e}"[:300]
try:
    import megatron_ext.train  # the trainer's whole import path
    out["megatron_ext.train"] = "ok"
except Exception as e:
    out["megatron_ext.train"] = None
    out["megatron_ext.train_error"] = f"{type(e).__name__}: {e}"[:300]
print("ENV " + json.dumps(out))
"""


def step_env(s: Suite) -> dict:
    res = s.run("env", [([sys.executable, "-c", ENV_PROBE], s.env())], 60)[0]
    line = next((ln for ln in res["text"].splitlines() if ln.startswith("ENV ")), None)
    if line is None:
        return {"status": "error", "error": error_of(res)}
    info = json.loads(line[4:])
    s.gpu_memory = info.get("gpu_memory")
    status = "ok"
    problems = [k for k in ("megatron.core", "deepspeed", "pydantic", "transformers", "megatron_ext.train")
                if not info.get(k)]
    if problems:
        status = "error"
        info["error"] = "not importable: " + ", ".join(problems)
    if not s.dry and not info.get("gpu"):
        status = "error"
        info["error"] = (info.get("error", "") + "; no CUDA device: the GPU sub-steps are skipped").strip("; ")
    return {"status": status, **info, "seconds": res["seconds"]}


def _pair(s: Suite, name: str, precision: str, steps: int) -> tuple[list, list, list]:
    """The tiny recipe on the GPU and on CPU, in parallel."""
    zero = 0 if precision == "fp32" else 1
    cmds, dirs = [], []
    for side in ("gpu", "cpu"):
        d = s.fresh_dir(f"{name}-{precision}-{side}")
        dirs.append(d)
        cmds.append((s.train_cmd(str(TINY), s.base_overrides(d, steps, tiny=True) + [f"train.precision={precision}",
                                                                           f"layout.zero_stage={zero}"]),
                     s.env(cpu=side == "cpu", strict_fp32=precision == "fp32")))
    return cmds, dirs, [precision] * 2


def step_correctness_tiny(s: Suite) -> dict:
    steps = 20
    cmds, dirs = [], []
    for precision in ("fp32", "bf16-mixed"):
        c, d, _ = _pair(s, "tiny", precision, steps)
        cmds += c
        dirs += d
    if s.dry:  # both sides would be the same CPU command: run the "cpu" ones, the "gpu" side reads them
        ran = s.run("correctness_tiny", cmds[1::2], 150)
        res = [r for r in ran for _ in (0, 1)]
        dirs = [d for d in dirs[1::2] for _ in (0, 1)]
    else:
        res = s.run("correctness_tiny", cmds, 100)
    out = {"status": "ok", "steps": steps, "seconds": max(r["seconds"] for r in res)}
    losses = {}
    for (precision, side), r, d in zip([(p, sd) for p in ("fp32", "bf16-mixed") for sd in ("gpu", "cpu")], res, dirs):
        rows = [x["loss"] for x in read_rows(d) if "loss" in x]
        if r["rc"] != 0 or len(rows) != steps:
            out["status"] = "error"
            out.setdefault("errors", []).append(f"{precision} {side}: {error_of(r)} ({len(rows)} steps logged)")
        losses[f"{precision}_{side}"] = rows
    out["losses"] = losses
    if losses.get("fp32_gpu") and losses.get("fp32_cpu"):
        d = rel_diffs(losses["fp32_gpu"], losses["fp32_cpu"])
        out["fp32_max_rel_diff"] = max(d)
        out["fp32_pass"] = max(d) <= 1e-3
        if not out["fp32_pass"]:
            out["status"] = "fail"
    if losses.get("bf16-mixed_gpu") and losses.get("bf16-mixed_cpu"):
        out["bf16_max_rel_diff"] = max(rel_diffs(losses["bf16-mixed_gpu"], losses["bf16-mixed_cpu"]))
        if losses.get("fp32_cpu"):  # the size of bf16 noise itself: bf16-mixed vs fp32 on the same device
            out["bf16_vs_fp32_cpu_max_rel_diff"] = max(rel_diffs(losses["bf16-mixed_cpu"], losses["fp32_cpu"]))
    return out


def _plan_tools(s: Suite):
    if s.use_site and str(SITE) not in sys.path:
        sys.path.insert(0, str(SITE))
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from megatron_ext import plan
    from megatron_ext.config import load_recipe

    return plan, load_recipe


def pick_micro_batch(s: Suite, recipe: str, overrides: list[str], candidates=(16, 12, 8, 6, 4, 3, 2, 1)) -> tuple[int, dict]:
    """The largest micro batch the planner says fits in 90% of this GPU's memory."""
    plan, load_recipe = _plan_tools(s)
    memory = s.gpu_memory or 80 * 2**30
    hw = plan.Hardware(gpus=1, gpu_memory=memory)
    for mb in candidates:
        r = load_recipe(recipe, overrides + s.layout(mb))
        est = plan.estimate_memory(r, attention="sdpa")
        if est["total"] <= hw.usable_memory:
            return mb, {"planned_total_gib": est["total"] / 2**30, "usable_gib": hw.usable_memory / 2**30}
    return 0, {"usable_gib": hw.usable_memory / 2**30}


def planner_figures(s: Suite, recipe: str, overrides: list[str], measured: dict) -> dict:
    """plan.step_time at the measured MFU vs the measured step time, plus flops per token."""
    plan, load_recipe = _plan_tools(s)
    r = load_recipe(recipe, overrides)
    fpt = plan.flops_per_token(r)
    out = {"flops_per_token": fpt}
    if measured.get("tokens_per_s"):
        m = mfu(measured["tokens_per_s"], fpt)
        hw = plan.Hardware(gpus=1, gpu_memory=s.gpu_memory or 80 * 2**30, gpu_tflops=PEAK_TFLOPS, mfu=max(m, 1e-9))
        p = plan.make_plan(r, hw)
        out.update(mfu=m, plan_step_s=p.time.step, plan_mem_total_gib=p.memory["total"] / 2**30,
                   plan_mem_allocator_gib=(p.memory["total"] - p.memory["overhead"]) / 2**30)
    return out


def train_run(s: Suite, name: str, size: str, extra: list[str], mb: int | None, budget: float,
              steps: int, warmup: int, layers: int | None = None) -> dict:
    """One throughput run of the real trainer; a failed one that looks like an OOM is retried at
    half the micro batch."""
    recipe = s.recipe(size)
    over_model = [f"model.num_layers={layers}"] if layers else []
    if s.dry:
        mb = mb or 2
    tried = []
    while True:
        d = s.fresh_dir(name)
        overrides = s.base_overrides(d, steps) + s.layout(mb) + over_model + extra
        res = s.run(name, [(s.train_cmd(recipe, overrides), s.env())], budget)[0]
        rows = read_rows(d)
        _, load_recipe = _plan_tools(s)
        r = load_recipe(recipe, overrides)
        tokens_per_step = r.layout.global_batch * r.train.seq_len
        measured = throughput(rows, warmup, tokens_per_step)
        oom = "out of memory" in res["text"].lower() or "OutOfMemoryError" in res["text"]
        if res["rc"] != 0 and oom and mb > 1 and not res["timed_out"] and s.remaining() > budget / 2:
            tried.append(mb)
            mb //= 2
            continue
        break
    row = {"status": "ok" if res["rc"] == 0 and measured else "error",
           "size": f"tiny (for {size})" if s.dry else size, "recipe": recipe,
           "layers": r.model.num_layers, "seq_len": r.train.seq_len, "micro_batch": mb, "global_batch": r.layout.global_batch,
           "precision": r.train.precision, "attention": r.train.attention, "compile": r.train.compile,
           "attention_built": attention_line(res["text"]), "steps": steps, "warmup_steps": warmup,
           "seconds": res["seconds"], "log": res["log"], "overrides": overrides}
    if tried:
        row["oom_at_micro_batch"] = tried
    if res["rc"] != 0:
        row["error"] = error_of(res)
    row.update({k: v for k, v in measured.items() if k != "losses"})
    if measured.get("losses"):
        row["last_loss"] = measured["losses"][-1]
    try:
        row.update(planner_figures(s, recipe, overrides, measured))
    except Exception as err:  # noqa: BLE001 - the planner must not sink a measured figure
        row["planner_error"] = f"{type(err).__name__}: {err}"
    if row.get("planned_mem_gib") and row.get("peak_mem_gib"):
        row["plan_mem_error"] = row["planned_mem_gib"] / row["peak_mem_gib"] - 1
    if row.get("plan_step_s") and row.get("step_s"):
        row["plan_step_error"] = row["plan_step_s"] / row["step_s"] - 1
    return row


class Shapes:
    """Steps, warm-up and micro batch of the throughput runs (chosen once, shared by the 1.5b runs
    and the baseline so that every ratio compares the same batch)."""

    def __init__(self, s: Suite):
        self.steps, self.warmup = (4, 1) if s.dry else (10, 3)
        self.mb = None
        self.plan_note = None

    def micro_batch(self, s: Suite) -> int:
        if self.mb is None:
            if s.dry:
                self.mb = 2
            else:
                base = s.base_overrides(s.scratch / "probe", 1) + ["train.precision=bf16-mixed", "train.attention=sdpa"]
                self.mb, self.plan_note = pick_micro_batch(s, s.recipe("1.5b"), base)
        return self.mb


def tput(variant: dict, budget: float, warmup_extra: int = 0):
    def fn(s: Suite, shapes: Shapes) -> dict:
        if variant.get("needs") and not s.results["sections"].get("env", {}).get(variant["needs"]):
            return {"status": "skipped", "reason": f"{variant['needs']} not importable on this machine"}
        if variant.get("dry_skip") and s.dry:
            return {"status": "skipped", "reason": variant["dry_skip"]}
        mb = shapes.micro_batch(s)
        if not mb:
            return {"status": "error", "error": "the planner finds no micro batch that fits"}
        extra = [f"train.precision={variant['precision']}", f"train.attention={variant.get('attention', 'sdpa')}",
                 f"train.compile={str(variant.get('compile', False)).lower()}", *variant.get("extra", [])]
        row = train_run(s, variant["name"], "1.5b", extra, mb, budget, shapes.steps + warmup_extra,
                        shapes.warmup + warmup_extra)
        if shapes.plan_note:
            row["micro_batch_choice"] = shapes.plan_note
        return row
    return fn


def proxy(size: str, layer_options: tuple[int, ...], budget: float):
    def fn(s: Suite, shapes: Shapes) -> dict:
        extra = ["train.precision=bf16-mixed", "train.attention=sdpa", "train.compile=false"]
        if s.dry:
            return train_run(s, f"proxy_{size}", size, extra + ["model.num_layers=2"], 2, budget, shapes.steps, shapes.warmup)
        base = s.base_overrides(s.scratch / "probe", 1) + extra + ["layout.tp=1", "layout.sequence_parallel=false"]
        for layers in layer_options:
            mb, note = pick_micro_batch(s, s.recipe(size), base + [f"model.num_layers={layers}"])
            if mb:
                row = train_run(s, f"proxy_{size}", size, extra, mb, budget, shapes.steps, shapes.warmup, layers=layers)
                row["micro_batch_choice"] = note
                return row
        return {"status": "error", "error": f"no {layer_options}-layer proxy fits by the planner"}
    return fn


def write_sft_data(path: Path, vocab: int, seq_len: int, n: int = 2000, seed: int = 0) -> dict:
    """A prepared SFT directory (megatron_ext/sft.py format 1) of random token ids with a realistic
    length mix (log-normal, median seq_len / 8, a long tail up to seq_len + 1) and the second half
    of each conversation trained: speed figures need lengths, not language."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(np.log(seq_len / 8), 1.0, n)), 4, seq_len + 1).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    path.mkdir(parents=True, exist_ok=True)
    rng.integers(1, vocab, int(offsets[-1]), dtype=np.int32).tofile(path / "tokens.bin")
    mask = np.zeros(int(offsets[-1]), dtype=np.uint8)
    for a, b in zip(offsets[:-1], offsets[1:]):
        mask[(a + b) // 2: b] = 1
    mask.tofile(path / "loss_mask.bin")
    np.save(path / "offsets.npy", offsets)
    meta = {"format": 1, "tokenizer": "synthetic (gpu_suite)", "vocab_size": vocab, "pad_id": 0, "eos_id": 0,
            "seq_len": seq_len, "summary": {"conversations": n}}
    (path / "meta.json").write_text(json.dumps(meta))
    return {"conversations": n, "mean_tokens": float(lengths.mean()), "max_tokens": int(lengths.max())}


def step_sft_varlen(s: Suite, shapes: Shapes) -> dict:
    """Packed SFT: the varlen path vs the dense-mask reference, same data, same init (the two
    runs side by side in a dry run, one after the other on the GPU)."""
    mb = shapes.micro_batch(s)
    if not mb:
        return {"status": "error", "error": "the planner finds no micro batch that fits"}
    _, load_recipe = _plan_tools(s)
    recipe = s.recipe("1.5b")
    seq = 64 if s.dry else 4096
    data = write_sft_data(s.scratch / "sft_data", min(load_recipe(recipe, []).model.vocab_size, 32000), seq)
    env = s.results["sections"].get("env", {})
    varlen_kernel = ("flash-attn-varlen" if not s.dry and (env.get("flash_attn") or env.get("flash_attn_interface"))
                     else "sdpa-per-document")
    precision = "fp32" if s.dry else "bf16-mixed"  # the dry run checks loss parity at 1e-6
    extra = [f"train.precision={precision}", "train.attention=sdpa", "train.compile=false", "data.kind=sft",
             f"data.sft_path={s.scratch / 'sft_data'}", "data.packing=true", f"train.seq_len={seq}"]
    ways = ("varlen", "dense")
    dirs = {how: s.fresh_dir(f"sft_{how}") for how in ways}
    cmds = {how: s.train_cmd(recipe, s.base_overrides(dirs[how], shapes.steps) + s.layout(mb) + extra
                             + [f"train.packed_attention={how}"]) for how in ways}
    if s.dry:
        done = dict(zip(ways, s.run("sft_varlen", [(cmds[how], s.env()) for how in ways], 150)))
    else:
        done = {how: s.run(f"sft_{how}", [(cmds[how], s.env())], 150)[0] for how in ways}
    out = {"status": "ok", "data": data, "varlen_kernel": varlen_kernel, "precision": precision, "micro_batch": mb,
           "seq_len": seq}
    for how in ways:
        rows, res = read_rows(dirs[how]), done[how]
        measured = throughput(rows, shapes.warmup, mb * seq)
        timed = [x for x in rows if "trained_tokens_per_s" in x and x["step"] > shapes.warmup]
        out[how] = {"tokens_per_s": measured.get("tokens_per_s"), "step_s": measured.get("step_s"),
                    "peak_mem_gib": measured.get("peak_mem_gib"), "seconds": res["seconds"], "log": res["log"],
                    "trained_tokens_per_s": sum(x["trained_tokens_per_s"] for x in timed) / len(timed) if timed else None,
                    "first_loss": rows[0]["loss"] if rows else None}
        out[how] = {k: v for k, v in out[how].items() if v is not None}
        if res["rc"] != 0 or not measured:
            out["status"] = "error"
            out.setdefault("errors", []).append(f"{how}: {error_of(res)}")
    v, d = out["varlen"], out["dense"]
    if v.get("tokens_per_s") and d.get("tokens_per_s"):
        out["varlen_over_dense_tokens_per_s"] = v["tokens_per_s"] / d["tokens_per_s"]
    if v.get("first_loss") and d.get("first_loss"):
        out["first_loss_rel_diff"] = abs(v["first_loss"] - d["first_loss"]) / abs(d["first_loss"])
    return out


BASELINE_WORKER = "baseline"
HF_LOSS_WORKER = "hf-loss"


def step_baseline(s: Suite, shapes: Shapes) -> dict:
    mb = shapes.micro_batch(s)
    if not mb:
        return {"status": "error", "error": "no micro batch"}
    overrides = s.base_overrides(s.scratch / "baseline", shapes.steps) + s.layout(mb) + ["train.precision=bf16-mixed"]
    spec = {"recipe": s.recipe("1.5b"), "overrides": overrides, "steps": shapes.steps - shapes.warmup,
            "warmup": shapes.warmup, "out": str(s.scratch / "baseline.json")}
    res = s.run("baseline", [([sys.executable, __file__, "--_worker", BASELINE_WORKER, json.dumps(spec)], s.env())],
                90 if s.dry else 120)[0]
    path = Path(spec["out"])
    if res["rc"] != 0 or not path.exists():
        return {"status": "error", "error": error_of(res), "seconds": res["seconds"]}
    row = {"status": "ok", **json.loads(path.read_text()), "seconds": res["seconds"], "log": res["log"]}
    plan, load_recipe = _plan_tools(s)
    r = load_recipe(spec["recipe"], overrides)
    row["mfu"] = mfu(row["tokens_per_s"], plan.flops_per_token(r))
    return row


def step_correctness_hf(s: Suite, shapes: Shapes) -> dict:
    """Trainer first-step loss (fp32, lr=0 so the saved weights are the ones that produced it)
    vs transformers LlamaForCausalLM loaded from our to-hf export of that checkpoint."""
    layers = None if s.dry else s.args.hf_layers
    d = s.fresh_dir("correctness_hf")
    overrides = s.base_overrides(d, 1) + s.layout(1, zero=0) + [
        "train.precision=fp32", "train.attention=sdpa", "optimizer.lr=0", "optimizer.min_lr=0",
        "checkpoint.save_at_end=true"] + ([f"model.num_layers={layers}"] if layers else [])
    recipe = s.recipe("1.5b")
    out = {"status": "ok", "layers": layers or "all (tiny)",
           "note": None if s.dry else f"1.5b widths and vocab with {layers} of 16 layers (time-bound: the checkpoint, "
                                      "export and HF load scale with the layers)"}
    res = s.run("correctness_hf-train", [(s.train_cmd(recipe, overrides), s.env(strict_fp32=True))], 90 if s.dry else 120)[0]
    rows = [r for r in read_rows(d) if "loss" in r]
    if res["rc"] != 0 or not rows:
        return {**out, "status": "error", "error": "train: " + error_of(res)}
    out["trainer_loss"] = rows[0]["loss"]
    hf = s.scratch / "correctness_hf-export"
    res = s.run("correctness_hf-export", [([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "to-hf",
                                            str(d / "checkpoints"), str(hf), "--dtype", "fp32", "--no-verify",
                                            "--no-progress"], s.env())], 60 if s.dry else 90)[0]
    if res["rc"] != 0:
        return {**out, "status": "error", "error": "to-hf: " + error_of(res)}
    shutil.rmtree(d / "checkpoints", ignore_errors=True)
    spec = {"recipe": recipe, "overrides": overrides, "hf_dir": str(hf), "out": str(s.scratch / "hf_loss.json")}
    res = s.run("correctness_hf-load", [([sys.executable, __file__, "--_worker", HF_LOSS_WORKER, json.dumps(spec)],
                                         s.env(strict_fp32=True))], 60 if s.dry else 90)[0]
    shutil.rmtree(hf, ignore_errors=True)
    if res["rc"] != 0 or not Path(spec["out"]).exists():
        return {**out, "status": "error", "error": "hf load: " + error_of(res)}
    hf_out = json.loads(Path(spec["out"]).read_text())
    out.update(hf_loss=hf_out["loss"], hf_device=hf_out["device"], transformers=hf_out["transformers"])
    out["rel_diff"] = abs(out["trainer_loss"] - out["hf_loss"]) / abs(out["hf_loss"])
    out["pass"] = out["rel_diff"] <= 1e-4
    if not out["pass"]:
        out["status"] = "fail"
    return out


def step_planner(s: Suite, shapes: Shapes) -> dict:
    """(d) and the goals, from the runs above: planned vs measured memory and step time."""
    sec = s.results["sections"]
    rows = []
    for name, v in sec.items():
        if name.startswith(("tput_", "proxy_")) and v.get("status") == "ok":
            rows.append({"run": name, **{k: v.get(k) for k in (
                "peak_mem_gib", "planned_mem_gib", "plan_mem_error", "step_s", "plan_step_s", "plan_step_error",
                "mfu", "tokens_per_s", "plan_mem_total_gib")}})
    mixed, pure, base = sec.get("tput_mixed", {}), sec.get("tput_pure", {}), sec.get("baseline", {})
    goals = {
        "mfu_1p5b_mixed": mixed.get("mfu"),
        "ratio_vs_transformers": (mixed["tokens_per_s"] / base["tokens_per_s"]
                                  if mixed.get("tokens_per_s") and base.get("tokens_per_s") else None),
        "mfu_8b_proxy": sec.get("proxy_8b", {}).get("mfu"),
        "pure_over_mixed_tokens_per_s": (pure["tokens_per_s"] / mixed["tokens_per_s"]
                                         if pure.get("tokens_per_s") and mixed.get("tokens_per_s") else None),
        "mixed_minus_pure_peak_gib": (mixed["peak_mem_gib"] - pure["peak_mem_gib"]
                                      if mixed.get("peak_mem_gib") is not None and pure.get("peak_mem_gib") is not None else None),
        "mixed_minus_pure_planned_gib": (mixed["planned_mem_gib"] - pure["planned_mem_gib"]
                                         if mixed.get("planned_mem_gib") and pure.get("planned_mem_gib") else None),
        "max_abs_plan_mem_error": max((abs(r["plan_mem_error"]) for r in rows if r.get("plan_mem_error") is not None),
                                      default=None),
    }
    targets = {"mfu_1p5b_mixed": 0.45, "ratio_vs_transformers": 1.3, "mfu_8b_proxy": 0.50,
               "pure_over_mixed_tokens_per_s": 1.0}
    met = {k: goals[k] >= t for k, t in targets.items() if goals[k] is not None}
    if goals["max_abs_plan_mem_error"] is not None:
        met["plan_mem_within_10pct"] = goals["max_abs_plan_mem_error"] <= 0.10
    return {"status": "ok" if rows else "error", "runs": rows, "goals": goals, "met": met,
            **({} if rows else {"error": "no throughput run succeeded"}),
            "note": "planned = the trainer's planned_mem_gib (estimate_memory minus the fixed CUDA/NCCL overhead, "
                    "the allocator's view) vs peak_mem_gib = torch.cuda.max_memory_allocated; plan step s = "
                    "plan.make_plan(recipe, Hardware(gpus=1, mfu=measured MFU)).time.step; at dp=1, pp=1, no recompute it has no "
                    "communication or bubble term, so it reproduces the measured step up to the stage-imbalance factor: "
                    "it checks that the quoted MFU is the planner's MFU"}


# ============================================================================ workers (child processes)

def worker_baseline(spec: dict) -> None:
    """Plain PyTorch + transformers: LlamaForCausalLM, fp32 weights + bf16 autocast, fused AdamW,
    SDPA, same micro batch, global batch and sequence as the trainer's run. An OOM halves the
    micro batch and doubles accumulation (same tokens per step)."""
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_ext.config import load_recipe
    from megatron_ext.device import use_gpu

    r = load_recipe(spec["recipe"], spec["overrides"])
    m, lay, t = r.model, r.layout, r.train
    device = torch.device("cuda" if use_gpu() else "cpu")
    on_gpu = device.type == "cuda"
    if not on_gpu:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    config = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
                         num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                         num_key_value_heads=m.num_kv_heads, head_dim=m.kv_channels, rope_theta=m.rope_theta,
                         rms_norm_eps=m.norm_eps, max_position_embeddings=m.max_position_embeddings,
                         tie_word_embeddings=False, attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            **({"fused": True} if on_gpu else {}))
    global_batch, micro = lay.global_batch, lay.micro_batch
    oom_at = []

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    while True:
        accum = global_batch // micro
        tokens = torch.randint(0, m.vocab_size, (micro, t.seq_len), device=device)

        def step():
            for _ in range(accum):
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    loss = model(input_ids=tokens, labels=tokens).loss
                (loss / accum).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), r.optimizer.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        try:
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()
            for _ in range(spec["warmup"]):
                step()
            sync()
            start = time.perf_counter()
            for _ in range(spec["steps"]):
                loss = step()
            sync()
            sec = (time.perf_counter() - start) / spec["steps"]
            break
        except torch.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            oom_at.append(micro)
            if micro == 1:
                raise
            micro //= 2
            torch.cuda.empty_cache()
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else \
        __import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss / 2**20
    out = {"tokens_per_s": global_batch * t.seq_len / sec, "step_s": sec, "peak_mem_gib": peak,
           "micro_batch": micro, "global_batch": global_batch, "seq_len": t.seq_len, "layers": m.num_layers,
           "timed_steps": spec["steps"], "warmup_steps": spec["warmup"], "last_loss": float(loss),
           "what": "LlamaForCausalLM, fp32 weights + bf16 autocast, fused AdamW, sdpa",
           "transformers": transformers.__version__, "torch": torch.__version__}
    if oom_at:
        out["oom_at_micro_batch"] = oom_at
    Path(spec["out"]).write_text(json.dumps(out))
    print(json.dumps(out))


def worker_hf_loss(spec: dict) -> None:
    """The trainer's first global batch through LlamaForCausalLM from the export, in fp32."""
    import torch
    import transformers
    from transformers import LlamaForCausalLM

    from megatron_ext.config import load_recipe
    from megatron_ext.data import build_datasets, microbatches
    from megatron_ext.device import use_gpu

    r = load_recipe(spec["recipe"], spec["overrides"])
    device = torch.device("cuda" if use_gpu() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = LlamaForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.float32, attn_implementation="sdpa",
                                             local_files_only=True).to(device).eval()
    train, _ = build_datasets(r)
    total, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for mb in microbatches(train, 0, r, 0):
            logits = model(input_ids=mb["tokens"].to(device)).logits.float()
            losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), mb["labels"].to(device).flatten(),
                                                       reduction="none")
            mask = mb["loss_mask"].to(device).flatten().double()
            total += (losses.double() * mask).sum().cpu()
            count += mask.sum().cpu()
    out = {"loss": float(total / count), "device": str(device), "transformers": transformers.__version__}
    Path(spec["out"]).write_text(json.dumps(out))
    print(json.dumps(out))


# ============================================================================ report

def _f(v, fmt="{:.3g}"):
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, (int, float)):
        return fmt.format(v)
    return str(v)


def render_markdown(res: dict) -> str:
    meta, sec = res["meta"], res["sections"]
    env = sec.get("env", {})
    lines = [f"# GPU suite{' (DRY RUN on CPU: tiny shapes, figures are not GPU figures)' if meta.get('dry_run') else ''}",
             "", f"{meta.get('scale')}; started {meta.get('started')}, {meta.get('elapsed_s')} s of {meta.get('budget_s')} s budget.",
             f"Machine: {env.get('gpu', 'CPU')}; python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('cuda')}), "
             f"megatron-core {env.get('megatron.core')}, deepspeed {env.get('deepspeed')}, transformers {env.get('transformers')}, "
             f"TE {env.get('transformer_engine')}, flash-attn {env.get('flash_attn')}.", ""]
    lines += ["## Sub-steps", "", "| sub-step | status | seconds | note |", "|---|---|---|---|"]
    for name, v in sec.items():
        note = v.get("error") or v.get("reason") or ("; ".join(v.get("errors", [])) if v.get("errors") else "")
        lines.append(f"| {name} | {v.get('status')} | {_f(v.get('seconds'), '{:.0f}')} | {str(note)[:200]} |")
    c = sec.get("correctness_tiny", {})
    h = sec.get("correctness_hf", {})
    lines += ["", "## Correctness", "", "| check | value | criterion | pass |", "|---|---|---|---|",
              f"| tiny fp32, GPU vs CPU, {c.get('steps', 20)} steps: max rel loss diff per step | {_f(c.get('fp32_max_rel_diff'), '{:.2e}')} | <= 1e-3 | {_f(c.get('fp32_pass'))} |",
              f"| tiny bf16-mixed, GPU vs CPU: max rel loss diff | {_f(c.get('bf16_max_rel_diff'), '{:.2e}')} | bf16 noise (bf16 vs fp32 on CPU: {_f(c.get('bf16_vs_fp32_cpu_max_rel_diff'), '{:.2e}')}) | — |",
              f"| 1.5b shapes ({h.get('layers')} layers), fp32 first-step loss: trainer {_f(h.get('trainer_loss'), '{:.6f}')} vs HF export {_f(h.get('hf_loss'), '{:.6f}')} | {_f(h.get('rel_diff'), '{:.2e}')} rel | <= 1e-4 | {_f(h.get('pass'))} |"]
    runs = [(n, v) for n, v in sec.items() if n.startswith(("tput_", "proxy_")) and v.get("status") not in (None,)]
    lines += ["", "## Throughput (one GPU, dp=1, ZeRO-1, synthetic data, trainer metrics.jsonl after warm-up)", "",
              "| run | model | layers | seq | mb | precision | attention | compile | tokens/s | MFU | peak GiB | planned GiB | plan mem err | step s | plan step s @MFU | status |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, v in runs:
        lines.append(f"| {n} | {v.get('size', '')} | {_f(v.get('layers'))} | {_f(v.get('seq_len'))} | {_f(v.get('micro_batch'))} | "
                     f"{v.get('precision', '')} | {v.get('attention_built') or v.get('attention', '')} | {('on' if v['compile'] else 'off') if 'compile' in v else '—'} | "
                     f"{_f(v.get('tokens_per_s'), '{:.0f}')} | {_f(v.get('mfu') and 100 * v['mfu'], '{:.1f}%')} | "
                     f"{_f(v.get('peak_mem_gib'), '{:.2f}')} | {_f(v.get('planned_mem_gib'), '{:.2f}')} | "
                     f"{_f(v.get('plan_mem_error') is not None and 100 * v['plan_mem_error'] or None, '{:+.1f}%')} | "
                     f"{_f(v.get('step_s'), '{:.3f}')} | {_f(v.get('plan_step_s'), '{:.3f}')} | {v.get('status')} |")
    b = sec.get("baseline", {})
    lines += [f"| baseline | transformers LlamaForCausalLM | {_f(b.get('layers'))} | {_f(b.get('seq_len'))} | {_f(b.get('micro_batch'))} | "
              f"fp32 + bf16 autocast | sdpa | off | {_f(b.get('tokens_per_s'), '{:.0f}')} | {_f(b.get('mfu') and 100 * b['mfu'], '{:.1f}%')} | "
              f"{_f(b.get('peak_mem_gib'), '{:.2f}')} | — | — | {_f(b.get('step_s'), '{:.3f}')} | — | {b.get('status')} |", ""]
    mixed, pure = sec.get("tput_mixed", {}), sec.get("tput_pure", {})
    ratio = sec.get("planner", {}).get("goals", {}).get("ratio_vs_transformers")
    lines += ["## Goals", "", "| goal | measured | target |", "|---|---|---|",
              f"| 1.5b bf16-mixed MFU | {_f(mixed.get('mfu') and 100 * mixed['mfu'], '{:.1f}%')} | >= 45% |",
              f"| ours / transformers tokens/s | {_f(ratio, '{:.2f}x')} | >= 1.3x |",
              f"| 8b proxy MFU | {_f(sec.get('proxy_8b', {}).get('mfu') and 100 * sec['proxy_8b']['mfu'], '{:.1f}%')} | >= 50% |",
              f"| bf16-pure / bf16-mixed tokens/s | {_f(pure.get('tokens_per_s') and mixed.get('tokens_per_s') and pure['tokens_per_s'] / mixed['tokens_per_s'], '{:.2f}x')} | >= 1.0x |",
              f"| bf16-mixed - bf16-pure peak GiB | {_f(mixed.get('peak_mem_gib') and pure.get('peak_mem_gib') and mixed['peak_mem_gib'] - pure['peak_mem_gib'], '{:.2f}')} | planner: {_f(mixed.get('planned_mem_gib') and pure.get('planned_mem_gib') and mixed['planned_mem_gib'] - pure['planned_mem_gib'], '{:.2f}')} |",
              "| planner peak-memory error, every run | " + ", ".join(f"{n} {100 * v['plan_mem_error']:+.1f}%" for n, v in runs if v.get('plan_mem_error') is not None) + " | within 10% |",
              "", f"FLOPs: {meta.get('flops_note')}.", ""]
    sv = sec.get("sft_varlen", {})
    lines += [f"## Packed SFT attention (1.5b shapes, synthetic conversations, {sv.get('precision')})", "",
              "| path | tokens/s | trained tokens/s | step s | peak GiB | first-step loss |", "|---|---|---|---|---|---|"]
    for how, label in (("varlen", f"varlen ({sv.get('varlen_kernel')})"), ("dense", "dense [b, 1, s, s] mask")):
        v = sv.get(how, {})
        lines.append(f"| {label} | {_f(v.get('tokens_per_s'), '{:.0f}')} | {_f(v.get('trained_tokens_per_s'), '{:.0f}')} | "
                     f"{_f(v.get('step_s'), '{:.3f}')} | {_f(v.get('peak_mem_gib'), '{:.2f}')} | {_f(v.get('first_loss'), '{:.5f}')} |")
    lines += ["", f"varlen / dense tokens/s: {_f(sv.get('varlen_over_dense_tokens_per_s'), '{:.2f}x')}; first-step "
                  f"loss rel diff {_f(sv.get('first_loss_rel_diff'), '{:.1e}')}.", ""]
    return "\n".join(lines)


# ============================================================================ main

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare", action="store_true", help="CPU machine: fetch/build the carried wheels into wheels/")
    p.add_argument("--install-carried", action="store_true", help="GPU machine: install wheels/ first (into .gpu_suite_site)")
    p.add_argument("--dry-run", action="store_true", help="CPU, recipes/tiny.yaml everywhere, few steps")
    p.add_argument("--out", help="output folder (default $OUT, else ./gpu_suite_out)")
    p.add_argument("--budget", type=float, default=470.0, help="seconds for the whole suite (default 470)")
    p.add_argument("--only", help="comma-separated sub-steps to run (merged into an existing gpu_suite.json)")
    p.add_argument("--skip", help="comma-separated sub-steps to leave out")
    p.add_argument("--hf-layers", type=int, default=2, help="layers of the 1.5b correctness check (default 2)")
    p.add_argument("--parallel", type=int, default=1,
                   help="sub-steps run side by side (default 1; only for --dry-run, GPU figures need 1)")
    p.add_argument("--scratch", help="folder for run directories (default: the system temp dir)")
    p.add_argument("--_worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.parallel > 1 and not args.dry_run:
        p.error("--parallel is for --dry-run only: parallel runs would share the GPU")
    if args._worker:
        sys.path.insert(0, str(ROOT))
        kind, spec = args._worker
        {BASELINE_WORKER: worker_baseline, HF_LOSS_WORKER: worker_hf_loss}[kind](json.loads(spec))
        return 0
    if args.prepare:
        return prepare()

    s = Suite(args)
    shapes = Shapes(s)
    steps = [
        ("install", lambda s, sh: step_install(s)),
        ("env", lambda s, sh: step_env(s)),
        ("correctness_tiny", lambda s, sh: step_correctness_tiny(s)),
        ("tput_mixed", tput({"name": "tput_mixed", "precision": "bf16-mixed"}, 75)),
        ("baseline", step_baseline),
        ("tput_pure", tput({"name": "tput_pure", "precision": "bf16-pure"}, 65)),
        ("proxy_8b", proxy("8b", (4,), 60)),
        ("correctness_hf", step_correctness_hf),
        ("proxy_24b", proxy("24b", (4, 2), 70)),
        ("tput_compile", tput({"name": "tput_compile", "precision": "bf16-mixed", "compile": True,
                               "dry_skip": "torch.compile is GPU-only in this suite (minutes to start on CPU)"}, 110,
                              warmup_extra=2)),
        ("tput_te", tput({"name": "tput_te", "precision": "bf16-mixed", "attention": "te",
                          "needs": "transformer_engine"}, 65)),
        ("tput_cudnn", tput({"name": "tput_cudnn", "precision": "bf16-mixed", "attention": "sdpa-cudnn",
                             "dry_skip": "the cuDNN SDPA kernel is GPU-only"}, 65)),
        ("tput_chunked_ce", tput({"name": "tput_chunked_ce", "precision": "bf16-mixed",
                                  "extra": ["train.loss_chunk_tokens=2048"]}, 65)),
        ("sft_varlen", step_sft_varlen),
        ("planner", step_planner),
    ]
    only = set(args.only.split(",")) if args.only else None
    skip = set(args.skip.split(",")) if args.skip else set()
    if only:
        only |= {"env", "planner"}  # later sub-steps read the GPU's memory and imports; the summary is redone
        if args.install_carried:
            only.add("install")
    print(f"gpu suite -> {s.out} (budget {args.budget:.0f} s{', dry run' if s.dry else ''})", flush=True)
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
    if args.parallel > 1:  # dry runs: independent sub-steps side by side (never for GPU figures)
        shapes.micro_batch(s)
        longest = ("correctness_hf", "correctness_tiny")  # chains of processes: start them first
        middle.sort(key=lambda t: (t[0] not in longest, longest.index(t[0]) if t[0] in longest else 0))
        with ThreadPoolExecutor(args.parallel) as pool:
            list(pool.map(lambda t: one(*t), middle))
    else:
        for n, fn in middle:
            one(n, fn)
    for n, fn in [t for t in todo if t[0] == "planner"]:
        one(n, fn)
    shutil.rmtree(s.scratch, ignore_errors=True)
    print((s.out / "gpu_suite.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
