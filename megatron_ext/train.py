"""The training loop: recipe in, checkpoints and logs out.

Launched once per rank (torchrun, or srun with one task per GPU). Each turn of :func:`_loop`:
stop or commit saves (:class:`Checkpointer`), one step, then :class:`HealthGuard`,
:class:`~megatron_ext.metrics.StepMetrics` (console, TensorBoard, ``metrics.jsonl``), :class:`Evals`
and the interval save.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from .errors import GaperonError
from . import checkpoint, faults, inject, stop
from .checkpoint import TrainState
from .config import KEEPS, Recipe, RecipeError, dump_recipe
from .data import Prefetcher, build_datasets, microbatches
from .downstream import DownstreamEval
from .engine import DistInfo, Engine, init_distributed
from .metrics import Logger, StepMetrics
from .model import attention_backend, build_model, describe_attention
from .plan import Hardware, estimate_memory, step_time
from .run_lock import RunDirError, RunLock
from .schedule import lr_at
from .straggler import StragglerReport
from .watchdog import Watchdog


@dataclass
class Run:
    """What every part of the loop reads, passed as one object."""
    recipe: Recipe
    info: DistInfo
    engine: Engine
    state: TrainState
    out: Path
    log: Logger
    watchdog: Watchdog


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
        ck = recipe.checkpoint
        keeps_optimizer, keeps_data, keeps_step, keeps_rng = KEEPS[ck.init_mode]
        reader = checkpoint.load(engine, start.parent, with_optimizer=keeps_optimizer,
                                 head_from_embeddings=ck.init_head == "from_embeddings")
        m = reader.meta
        same_rng = checkpoint.load_rng(reader, recipe) if keeps_rng else False
        state = TrainState(m["step"] if keeps_step else 0, m["consumed_samples"] if keeps_data else 0,
                           m.get("skipped_steps", 0) if keeps_step else 0)
        if info.is_main:
            kept = [what for what, yes in (("optimizer", keeps_optimizer), ("data position", keeps_data),
                                            ("step", keeps_step), ("RNG streams", same_rng)) if yes]
            print(f"phase starts from {reader.path} ({ck.init_mode}{', LM head from the input embeddings' if ck.init_head else ''}"
                  f", loaded in {time.perf_counter() - tick:.1f} s): weights{''.join(', ' + k for k in kept)} kept; "
                  f"starts at step {state.step}, sample {state.consumed_samples}", flush=True)
        return state
    return TrainState()


class Checkpointer:
    """Owns the saves: the background one not committed yet, the interval and final saves with
    their timing, and the stop decision (a signal -> save -> exit so that SLURM requeues)."""

    def __init__(self, run: Run):
        self.run, self.first_step = run, run.state.step
        ck = run.recipe.checkpoint
        self.background = ck.async_save if ck.async_save is not None else run.info.on_gpu
        self.pending: checkpoint.PendingSave | None = None

    def settle(self) -> None:
        """Commit the background save (waiting for this rank's writer first); a collective."""
        if self.pending is not None:
            self.pending.finish(self.run.state)
            self.pending = None

    def stop_requested(self) -> bool:
        """At a step boundary; commits a background save once every rank has written it."""
        stop_now, written = _agree(self.run.info.device, self.pending)
        if written or stop_now:
            with self.run.watchdog.idle():
                self.settle()
        return stop_now

    def stop(self) -> int:
        """Save (unless this step is saved already, or none was trained here) and exit with
        REQUEUE_EXIT_CODE."""
        run, state = self.run, self.run.state
        with run.watchdog.idle():
            if state.step == self.first_step:
                what = f"no step trained yet, nothing saved (the run resumes from step {state.saved_step or 0})"
            elif state.saved_step == state.step:
                what = f"step {state.step} was already saved"
            else:
                checkpoint.save(run.engine, run.recipe, state, run.out)
                what = f"saved step {state.step}"
            if run.info.is_main:
                print(f"{stop.received() or 'stop signal'}: {what}; exiting with {checkpoint.REQUEUE_EXIT_CODE}: the "
                      "job script requeues the job (not after a plain scancel)", flush=True)
        return checkpoint.REQUEUE_EXIT_CODE

    def after_step(self) -> None:
        """Every checkpoint.interval steps but the last (:meth:`finish` saves that one)."""
        run, state, ck = self.run, self.run.state, self.run.recipe.checkpoint
        if not (ck.interval and state.step % ck.interval == 0 and state.step < run.recipe.train.steps):
            return
        with run.watchdog.idle():
            tick = time.perf_counter()
            self.settle()
            if self.background:
                self.pending = checkpoint.save_in_background(run.engine, run.recipe, state, run.out)
            else:
                checkpoint.save(run.engine, run.recipe, state, run.out)
            run.log.log(state.step, {"checkpoint_blocking_s": time.perf_counter() - tick})

    def finish(self) -> None:
        """After the last step: commit, then save it (checkpoint.save_at_end)."""
        run, state = self.run, self.run.state
        self.settle()
        if run.recipe.checkpoint.save_at_end and state.saved_step != state.step:
            tick = time.perf_counter()
            path = checkpoint.save(run.engine, run.recipe, state, run.out)
            if run.info.is_main:
                print(f"saved {path} in {time.perf_counter() - tick:.1f} s", flush=True)


class HealthGuard:
    """Counts skipped steps (non-finite loss or gradient norm: no update) and stops the run on
    health.on_nonfinite=stop or health.max_consecutive_skips in a row."""

    def __init__(self, run: Run, checkpointer: Checkpointer):
        self.run, self.checkpointer = run, checkpointer
        self.consecutive = 0

    def ok(self, result) -> bool:
        """False for a skipped step, which then logs only its own line."""
        if not result.skipped:
            self.consecutive = 0
            return True
        run, state, health = self.run, self.run.state, self.run.recipe.health
        state.skipped_steps += 1
        self.consecutive += 1
        what = "loss" if not math.isfinite(result.loss) else "gradient norm"
        run.log.log(state.step, {"skipped": 1, "loss": result.loss, "grad_norm": result.grad_norm,
                                 "skipped_total": state.skipped_steps})
        if health.on_nonfinite == "stop" or self.consecutive >= health.max_consecutive_skips:
            self.checkpointer.settle()
            last = checkpoint.resolve(checkpoint.checkpoints_dir(run.out))
            raise NonFiniteLoss(f"non-finite {what} at step {state.step} ({self.consecutive} in a row; "
                                f"health.on_nonfinite={health.on_nonfinite}, max_consecutive_skips="
                                f"{health.max_consecutive_skips}); last good checkpoint: {last}")
        return False


class Evals:
    """Validation loss every train.eval_interval steps and the in-loop downstream tasks every
    eval.interval steps, both at the last step; the watchdog sleeps meanwhile."""

    def __init__(self, run: Run, valid_data, downstream: DownstreamEval | None):
        self.run, self.valid_data, self.downstream = run, valid_data, downstream

    def after_step(self) -> None:
        run, step, t = self.run, self.run.state.step, self.run.recipe.train
        if t.eval_interval and (step % t.eval_interval == 0 or step == t.steps) and self.valid_data:
            with run.watchdog.idle():
                tick = time.perf_counter()
                valid = validation_loss(run.engine, self.valid_data, run.recipe, ps.get_data_parallel_rank())
            run.log.log(step, {"valid_loss": valid["valid_loss"], "valid_s": time.perf_counter() - tick,
                               "valid_tokens": valid["valid_tokens"]})
        interval = run.recipe.eval.interval
        if self.downstream and (step == t.steps or (interval and step % interval == 0)):
            with run.watchdog.idle():
                run.log.log(step, self.downstream.run(run.engine))


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
    """Everything before the first step: the start, the model, the engine, the data."""
    out = Path(recipe.train.output_dir)
    # eval.downstream tasks lm-eval does not know, or whose data is not on disk: refused first,
    # before the lock, the checkpoint plan or anything else touches the run directory
    downstream = DownstreamEval(recipe, info.is_main) if recipe.eval.downstream else None
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
    planned_mem_gib = (estimate["total"] - estimate["overhead"]) / 2**30
    if info.is_main:
        print(f"planner estimate per GPU: {planned_mem_gib:.2f} GiB " + (
              "(allocator view; compare with the step line's mem)" if info.on_gpu else
              "(tensors on a GPU; on CPU the step line's rss is the whole process: torch and libraries included)"),
              flush=True)
    chunks = build_model(recipe, info.on_gpu)
    engine = Engine(recipe, chunks, info)
    state = _start(engine, recipe, start, info)
    faults.install(chunks, lambda: state.step + 1)  # test-only NaN points; none in production
    if faults.armed("save_at_start", 0):  # test-only: what the start loaded, as a checkpoint
        checkpoint.save(engine, recipe, state, Path(recipe.train.output_dir))
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
    straggler = StragglerReport(recipe, info)  # per-rank step time, gathered once per log interval
    metrics = StepMetrics(recipe, log, info.world_size, info.on_gpu, planned_mem_gib, first_step=state.step,
                          straggler=straggler)
    run = Run(recipe, info, engine, state, out, log, Watchdog(hang_timeout(recipe), info.rank))
    return _loop(run, Prefetcher(train_data, recipe, ps.get_data_parallel_rank(), pin=info.on_gpu), metrics,
                 Evals(run, valid_data, downstream), straggler)


def _loop(run: Run, batches: Prefetcher, metrics: StepMetrics, evals: Evals, straggler: StragglerReport) -> int:
    """One optimizer step per turn, from state.step to train.steps; 0, or REQUEUE on a signal."""
    recipe, state, t = run.recipe, run.state, run.recipe.train
    checkpointer = Checkpointer(run)
    health = HealthGuard(run, checkpointer)
    while state.step < t.steps:
        if straggler.timed(checkpointer.stop_requested):  # the time between boundaries is this rank's step
            batches.close()
            run.log.close()
            return checkpointer.stop()
        batch = batches.get(state.consumed_samples)
        lr = lr_at(state.step, recipe)
        diagnose = bool(t.lm_head_grad_interval) and (state.step + 1) % t.lm_head_grad_interval == 0
        result = run.engine.train_step(batch, lr, diagnose_lm_head=diagnose)
        state.step += 1
        state.consumed_samples += recipe.layout.global_batch
        run.watchdog.beat()
        if not health.ok(result):
            continue
        metrics.record(state, result, lr)
        evals.after_step()
        checkpointer.after_step()
        faults.after_step(state.step)
    batches.close()
    with run.watchdog.idle():
        checkpointer.finish()
        run.log.close()
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


def hang_timeout(recipe: Recipe) -> float:
    """health.hang_timeout_s, or when unset ten planned step times on an H100 (at least 5 min)."""
    if recipe.health.hang_timeout_s is not None:
        return recipe.health.hang_timeout_s
    return max(300.0, 10 * step_time(recipe, Hardware(gpus=recipe.layout.world_size)).step)


class NonFiniteLoss(GaperonError, RuntimeError):
    """Training stopped on non-finite losses; the last good checkpoint is kept."""
