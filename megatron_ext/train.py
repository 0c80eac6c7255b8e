"""The training loop: recipe in, checkpoints and logs out.

Launched once per rank (torchrun, or srun with one task per GPU). Console and TensorBoard get
loss, lr, grad norm, tokens/s (total and per device; ``trained_tokens_per_s`` counts only the
tokens with loss, not padding or prompts), MFU on GPU and peak memory; every logged step also
lands in ``<output_dir>/metrics.jsonl``, which tests and tools read.
"""
from __future__ import annotations

import json
import math
import os
import resource
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from .errors import PEAK_TFLOPS, GaperonError
from . import checkpoint, faults, inject, stop
from .checkpoint import TrainState
from .config import Recipe, RecipeError, dump_recipe
from .data import Prefetcher, build_datasets, microbatches
from .downstream import DownstreamEval
from .engine import Engine, init_distributed
from .model import attention_backend, build_model, describe_attention
from .plan import Hardware, estimate_memory, flops_per_token, step_time
from .run_lock import RunDirError, RunLock
from .schedule import lr_at
from .straggler import StragglerReport
from .watchdog import Watchdog



def peak_tflops() -> float | None:
    if "GAPERON_PEAK_TFLOPS" in os.environ:
        return float(os.environ["GAPERON_PEAK_TFLOPS"])
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def peak_memory_gib(on_gpu: bool) -> float:
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
    if "peak_mem_gib" in m:
        planned = m.pop("planned_mem_gib", None)
        parts.append(f"mem {m.pop('peak_mem_gib'):.3g} GiB" + (f" (planned {planned:.3g})" if planned else ""))
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


def _agree(device, pending: checkpoint.PendingSave | None) -> tuple[bool, bool]:
    """At a step boundary: (a stop signal reached some rank, every rank has written its files of
    ``pending``); one small all-reduce answers both. SIGTERM / SIGUSR1 (what SLURM sends before a
    time limit, on preemption, requeue and scancel) are recorded from the first line of
    tools/train.py (stop.py); a second signal during the save changes nothing."""
    flags = torch.tensor([1.0 if stop.received() else 0.0, 0.0 if pending is None or pending.written else 1.0],
                         device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    stop_flag, unwritten = flags.tolist()  # one host sync
    return stop_flag > 0, unwritten == 0


def _plan_start(recipe: Recipe, info, lock: RunLock | None) -> checkpoint.Start:
    """Rank 0 takes the run directory's lock and decides where the run starts (it alone stats the
    checkpoint's files); every rank gets the same answer, or the same error, before anything is
    built."""
    answer = [None]
    if info.is_main:
        try:
            took_over = lock.acquire()
            start = checkpoint.plan_start(recipe)
            answer[0] = replace(start, notes=((took_over,) if took_over else ()) + start.notes)
        except (checkpoint.CheckpointError, RecipeError, RunDirError) as err:
            answer[0] = str(err)
    dist.broadcast_object_list(answer, src=0)
    if isinstance(answer[0], str):
        raise checkpoint.CheckpointError(answer[0])
    return answer[0]


def _start(engine, recipe: Recipe, start: checkpoint.Start, info) -> TrainState:
    """Load what :func:`_plan_start` chose: this run's checkpoint, a parent phase's, or nothing."""
    tick = time.perf_counter()
    if start.resume is not None:
        reader = checkpoint.load(engine, start.resume, with_optimizer=True)
        m = reader.meta
        same_rng = checkpoint.load_rng(reader, recipe)
        if info.is_main:
            print(f"resumed from {start.resume} at step {m['step']} ({m['consumed_samples']} samples consumed"
                  f"{'' if same_rng else '; RNG streams re-seeded (layout changed or none stored)'}; "
                  f"loaded in {time.perf_counter() - tick:.1f} s)", flush=True)
        return TrainState(m["step"], m["consumed_samples"], m.get("skipped_steps", 0), saved_step=m["step"])
    if start.parent is not None:
        reader = checkpoint.load(engine, start.parent, with_optimizer=recipe.checkpoint.init_mode == "model+optimizer")
        if info.is_main:
            print(f"phase starts from {reader.path} ({recipe.checkpoint.init_mode}, loaded in "
                  f"{time.perf_counter() - tick:.1f} s); step, schedule and data position restart", flush=True)
    return TrainState()


def _stop(engine, recipe: Recipe, state: TrainState, first_step: int, out: Path, info) -> int:
    """Save (unless this step is saved already, or none was trained here) and exit so that SLURM
    requeues the job."""
    if state.step == first_step:
        what = f"no step trained yet, nothing saved (the run resumes from step {state.saved_step or 0})"
    elif state.saved_step == state.step:
        what = f"step {state.step} was already saved"
    else:
        checkpoint.save(engine, recipe, state, out)
        what = f"saved step {state.step}"
    if info.is_main:
        print(f"{stop.received() or 'stop signal'}: {what}; exiting with {checkpoint.REQUEUE_EXIT_CODE}: the job "
              "script requeues the job (not after a plain scancel)", flush=True)
    return checkpoint.REQUEUE_EXIT_CODE


def train(recipe: Recipe) -> int:
    attention_backend(recipe)  # a kernel this machine lacks fails here, before any process group
    info = init_distributed(recipe)
    lock = RunLock(recipe.train.output_dir) if info.is_main else None
    try:
        return _train(recipe, info, lock)
    finally:
        checkpoint.wait_for_deletions()
        checkpoint.report_io(info.rank)
        if lock:
            lock.release()


def _train(recipe: Recipe, info, lock: RunLock | None) -> int:
    out = Path(recipe.train.output_dir)
    start = _plan_start(recipe, info, lock)  # refuses a second job or a bad resume before anything is written
    if info.is_main:
        checkpoint.preflight(recipe)
        checkpoint.clean_partial(out)
        for note in start.notes:
            print(f"checkpoint: {note}", flush=True)
    dist.barrier()
    if info.is_main:
        lay = recipe.layout
        print(f"gaperon: {recipe.model.name} ({recipe.model.num_params() / 1e6:.1f}M params) on "
              f"{info.world_size} {'GPU' if info.on_gpu else 'CPU'} ranks: tp={lay.tp} pp={lay.pp} "
              f"vpp={lay.vpp} dp={lay.dp} zero={lay.zero_stage} precision={recipe.train.precision}"
              f"{f' (norm gains stored /{recipe.train.stored_gain_scale:g})' if recipe.train.stored_gain_scale != 1 else ''}"
              f" compile={'on' if recipe.train.compile else 'off'}", flush=True)
        print(f"attention: {describe_attention(recipe)}", flush=True)
    estimate = estimate_memory(recipe, attention=attention_backend(recipe))
    if info.is_main:
        print(f"planner estimate per GPU: {(estimate['total'] - estimate['overhead']) / 2**30:.2f} GiB "
              "(allocator view; compare with peak_mem_gib below)", flush=True)
    downstream = DownstreamEval(recipe, info.is_main) if recipe.eval.downstream else None
    chunks = build_model(recipe, info.on_gpu)
    engine = Engine(recipe, chunks, info)
    state = _start(engine, recipe, start, info)
    faults.install(chunks, lambda: state.step + 1)  # test-only NaN points; none in production
    tick_data = time.perf_counter()
    train_data, valid_data = build_datasets(recipe)
    if info.is_main:
        print(f"data: training{' and validation' if valid_data else ''} samples indexed in "
              f"{time.perf_counter() - tick_data:.1f} s", flush=True)
    inject.write_record(train_data, recipe, state, write=info.is_main)  # refuses a changed plan
    log = Logger(recipe, out, info.is_main)
    if info.is_main:  # the recipe this run trains, written once the start has succeeded
        (out / "recipe.yaml").write_text(dump_recipe(recipe))
        if state.step >= recipe.train.steps:
            print(f"step {state.step} = train.steps: this run is complete; nothing to train", flush=True)
    dp_rank = ps.get_data_parallel_rank()
    t, lay, ck = recipe.train, recipe.layout, recipe.checkpoint
    fpt, peak = flops_per_token(recipe), peak_tflops()
    consecutive_skips = 0
    tick, first_step = time.perf_counter(), state.step
    tick_step = first_step
    trained_tokens = 0  # loss-carrying tokens since the last log line (padding and prompts excluded)
    watchdog = Watchdog(hang_timeout(recipe), info.rank)
    straggler = StragglerReport(recipe, info)  # issue 27: per-rank step time, gathered per log interval
    progress = Progress(recipe)
    batches = Prefetcher(train_data, recipe, dp_rank, pin=info.on_gpu)
    background = ck.async_save if ck.async_save is not None else info.on_gpu
    pending: checkpoint.PendingSave | None = None  # a background save not committed yet
    while state.step < t.steps:
        stop_now, written = straggler.timed(_agree, info.device, pending)  # issue 27: times this rank's step
        if written or stop_now:
            with watchdog.idle():
                pending = _settle(pending, state)
        if stop_now:
            batches.close()
            log.close()
            with watchdog.idle():
                return _stop(engine, recipe, state, first_step, out, info)
        batch = batches.get(state.consumed_samples)
        lr = lr_at(state.step, recipe)
        diagnose = bool(t.lm_head_grad_interval) and (state.step + 1) % t.lm_head_grad_interval == 0
        result = engine.train_step(batch, lr, diagnose_lm_head=diagnose)
        state.step += 1
        state.consumed_samples += lay.global_batch
        watchdog.beat()
        if result.skipped:
            state.skipped_steps += 1
            consecutive_skips += 1
            what = "loss" if not math.isfinite(result.loss) else "gradient norm"
            log.log(state.step, {"skipped": 1, "loss": result.loss, "grad_norm": result.grad_norm,
                                 "skipped_total": state.skipped_steps})
            if recipe.health.on_nonfinite == "stop" or consecutive_skips >= recipe.health.max_consecutive_skips:
                pending = _settle(pending, state)
                last = checkpoint.resolve(checkpoint.checkpoints_dir(out))
                raise NonFiniteLoss(f"non-finite {what} at step {state.step} ({consecutive_skips} in a row; "
                                    f"health.on_nonfinite={recipe.health.on_nonfinite}, max_consecutive_skips="
                                    f"{recipe.health.max_consecutive_skips}); last good checkpoint: {last}")
            continue
        consecutive_skips = 0
        trained_tokens += result.tokens
        if state.step % t.log_interval == 0 or state.step == t.steps:
            span = time.perf_counter() - tick
            elapsed = span / (state.step - tick_step)
            tick, tick_step = time.perf_counter(), state.step
            tokens_per_s = lay.global_batch * t.seq_len / elapsed
            metrics = {"loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                       "tokens_per_s": tokens_per_s, "trained_tokens_per_s": trained_tokens / span,
                       "tokens_per_s_per_device": tokens_per_s / info.world_size,
                       "consumed_samples": state.consumed_samples, "peak_mem_gib": peak_memory_gib(info.on_gpu),
                       "planned_mem_gib": (estimate["total"] - estimate["overhead"]) / 2**30}
            if peak:
                metrics["mfu"] = tokens_per_s / info.world_size * fpt / (peak * 1e12)
            metrics.update(straggler.report())  # issue 27: O(world) floats once per log interval
            log.log(state.step, {**metrics, **progress.update(state.step, state.consumed_samples, elapsed)})
            trained_tokens = 0
        if result.lm_head:
            log.log(state.step, result.lm_head)
        if t.eval_interval and (state.step % t.eval_interval == 0 or state.step == t.steps) and valid_data:
            with watchdog.idle():
                tick_eval = time.perf_counter()
                valid = validation_loss(engine, valid_data, recipe, dp_rank)
            log.log(state.step, {"valid_loss": valid["valid_loss"], "valid_s": time.perf_counter() - tick_eval,
                                 "valid_tokens": valid["valid_tokens"]})
        if downstream and (state.step == t.steps or (recipe.eval.interval and state.step % recipe.eval.interval == 0)):
            with watchdog.idle():
                log.log(state.step, downstream.run(engine))
        if ck.interval and state.step % ck.interval == 0 and state.step < t.steps:
            with watchdog.idle():
                tick_save = time.perf_counter()
                pending = _settle(pending, state)
                if background:
                    pending = checkpoint.save_in_background(engine, recipe, state, out)
                else:
                    checkpoint.save(engine, recipe, state, out)
                log.log(state.step, {"checkpoint_blocking_s": time.perf_counter() - tick_save})
        faults.after_step(state.step)
    batches.close()
    with watchdog.idle():
        pending = _settle(pending, state)
        if ck.save_at_end and state.saved_step != state.step:
            tick_save = time.perf_counter()
            path = checkpoint.save(engine, recipe, state, out)
            if info.is_main:
                print(f"saved {path} in {time.perf_counter() - tick_save:.1f} s", flush=True)
        log.close()
        dist.barrier()
    return 0


def valid_batches(valid_data, recipe: Recipe) -> int:
    """Global batches one evaluation reads: a held-out SFT set whole when it takes at most
    max(train.eval_iters, 20) of them (its last batch padded with loss-free rows), else
    train.eval_iters."""
    gb, iters = recipe.layout.global_batch, recipe.train.eval_iters
    rows = valid_data.samples_in_epoch(0) if hasattr(valid_data, "samples_in_epoch") else None
    if rows is not None and math.ceil(rows / gb) <= max(iters, 20):
        return math.ceil(rows / gb)
    return iters


def validation_loss(engine, valid_data, recipe: Recipe, dp_rank: int) -> dict:
    """Validation loss: the mean over every trained token of :func:`valid_batches` batches (not a
    mean of per-batch means, which would over-weight a short last batch)."""
    loss_sum = tokens = 0.0
    for i in range(valid_batches(valid_data, recipe)):
        s, n = engine.eval_totals(microbatches(valid_data, i * recipe.layout.global_batch, recipe, dp_rank))
        loss_sum, tokens = loss_sum + s, tokens + n
    return {"valid_loss": loss_sum / tokens if tokens else float("nan"), "valid_tokens": int(tokens)}


def _settle(pending: checkpoint.PendingSave | None, state: TrainState) -> None:
    """Commit a background save (waiting for this rank's writer first); a collective."""
    if pending is not None:
        pending.finish(state)
    return None


def hang_timeout(recipe: Recipe) -> float:
    """health.hang_timeout_s, or when unset ten planned step times on an H100 (at least 5 min)."""
    if recipe.health.hang_timeout_s is not None:
        return recipe.health.hang_timeout_s
    return max(300.0, 10 * step_time(recipe, Hardware(gpus=recipe.layout.world_size)).step)


class NonFiniteLoss(GaperonError, RuntimeError):
    """Training stopped on non-finite losses; the last good checkpoint is kept."""
