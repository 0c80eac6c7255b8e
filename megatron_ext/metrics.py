"""Step metrics: tokens/s, MFU, memory, ETA, and where they go (console, TensorBoard,
``<output_dir>/metrics.jsonl``, which tests and tools read). Rank 0 writes; every rank computes."""
from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import torch

from .config import Recipe
from .errors import PEAK_TFLOPS
from .plan import flops_per_token


def peak_tflops() -> float | None:
    if "GAPERON_PEAK_TFLOPS" in os.environ:
        return float(os.environ["GAPERON_PEAK_TFLOPS"])
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def peak_memory_gib(on_gpu: bool) -> float:
    """GPU: the allocator's peak (what the planner counts). CPU: the process's peak RSS."""
    if on_gpu:
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


class Logger:
    """Rank 0 writes the console, TensorBoard and metrics.jsonl."""

    def __init__(self, recipe: Recipe, out: Path, enabled: bool):
        self.enabled = enabled
        self.total_steps = recipe.train.steps
        self.tb = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out / "metrics.jsonl", "a")
        if recipe.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self.tb:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        print(f"step {step}/{self.total_steps} | {_console(metrics)}", flush=True)

    def close(self):
        if self.enabled:
            self.jsonl.close()
            if self.tb:
                self.tb.close()


def _console(metrics: dict) -> str:
    """The step line: every metric, with the long ones shortened (the files keep the full names)."""
    m, parts = dict(metrics), []
    if "tokens_per_s" in m:
        per_device = m.pop("tokens_per_s_per_device", None)
        parts.append(f"tokens/s {m.pop('tokens_per_s'):.4g}" + (f" ({per_device:.4g}/device)" if per_device else ""))
    if "peak_mem_gib" in m:  # like with like: the allocator's peak against the planner's tensors
        planned = m.pop("planned_mem_gib", None)
        parts.append(f"mem {m.pop('peak_mem_gib'):.3g} GiB" + (f" (planned {planned:.3g})" if planned else ""))
    if "peak_rss_gib" in m:  # on CPU only the process's resident set is known: libraries included, no plan
        parts.append(f"rss {m.pop('peak_rss_gib'):.3g} GiB")
    m.pop("consumed_samples", None)
    if "tokens_seen" in m:
        n = m.pop("tokens_seen")
        parts.append("tokens " + (f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n}"))
    timing = [f"{k[:-2]} {_duration(m.pop(k))}" for k in ("elapsed_s", "eta_s") if k in m]
    head = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items()]
    return " | ".join(head + parts + timing)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}:{minutes:02d}:{secs:02d}" if days else f"{hours}:{minutes:02d}:{secs:02d}"


class Progress:
    """Where the run stands: tokens seen (over every job of the run), time in this job, and an ETA
    for train.steps from a smoothed step time (the first interval, with its warm-up, fades out)."""

    SMOOTHING = 0.3

    def __init__(self, recipe: Recipe):
        self.total, self.seq_len = recipe.train.steps, recipe.train.seq_len
        self.start = time.perf_counter()
        self.step_s: float | None = None

    def update(self, step: int, consumed_samples: int, step_s: float) -> dict:
        a = self.SMOOTHING
        self.step_s = step_s if self.step_s is None else a * step_s + (1 - a) * self.step_s
        return {"tokens_seen": consumed_samples * self.seq_len, "elapsed_s": time.perf_counter() - self.start,
                "eta_s": (self.total - step) * self.step_s}


class StepMetrics:
    """The step line every train.log_interval steps (and at the last step): throughput over the
    steps since the previous line, skipped ones included, and ``trained_tokens_per_s`` over the
    tokens with loss only (no padding or prompts)."""

    def __init__(self, recipe: Recipe, log: Logger, world_size: int, on_gpu: bool, planned_mem_gib: float,
                 first_step: int, straggler=None):
        self.recipe, self.log, self.world_size, self.on_gpu = recipe, log, world_size, on_gpu
        self.straggler = straggler  # straggler.StragglerReport: its report() is collective, once per line
        self.planned_mem_gib = planned_mem_gib
        self.fpt, self.peak = flops_per_token(recipe), peak_tflops()
        self.progress = Progress(recipe)
        self.tick, self.tick_step = time.perf_counter(), first_step
        self.trained_tokens = 0  # loss-carrying tokens since the last line

    def record(self, state, result, lr: float) -> None:
        """After a step that updated the weights."""
        t, step = self.recipe.train, state.step
        self.trained_tokens += result.tokens
        if step % t.log_interval == 0 or step == t.steps:
            span = time.perf_counter() - self.tick
            elapsed = span / (step - self.tick_step)
            self.tick, self.tick_step = time.perf_counter(), step
            tokens_per_s = self.recipe.layout.global_batch * t.seq_len / elapsed
            metrics = {"loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                       "tokens_per_s": tokens_per_s, "trained_tokens_per_s": self.trained_tokens / span,
                       "tokens_per_s_per_device": tokens_per_s / self.world_size,
                       "consumed_samples": state.consumed_samples,
                       # the allocator's peak vs the plan on GPU; the process's peak resident set on CPU
                       "peak_mem_gib" if self.on_gpu else "peak_rss_gib": peak_memory_gib(self.on_gpu),
                       "planned_mem_gib": self.planned_mem_gib}
            if self.peak:
                metrics["mfu"] = tokens_per_s / self.world_size * self.fpt / (self.peak * 1e12)
            if self.straggler is not None:
                metrics.update(self.straggler.report())  # O(world) floats once per log interval
            self.log.log(step, {**metrics, **self.progress.update(step, state.consumed_samples, elapsed)})
            self.trained_tokens = 0
        if result.lm_head:
            self.log.log(step, result.lm_head)
