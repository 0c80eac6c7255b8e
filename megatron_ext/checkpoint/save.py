"""Saving: each rank writes its share under ``.tmp-step_*`` (in a background thread if asked),
rank 0 commits (meta.json, rename, ``latest``) and rotates; deletions never leave a ``step_*``
that looks complete."""
from __future__ import annotations

import json
import os
import shutil
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import Recipe
from ..faults import maybe_kill
from .format import CheckpointError, build_meta, checkpoints_dir, move_aside, problem, resolve, step_of
from .reader import IO_BYTES
from .start import TrainState
from .owners import build_index, fragment_key, owned_ranges, param_specs, rng_file, shard_file
from .states import _adam_step, _owned, _rng_state, _to_host, relink_optimizer_states


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _all_ok(ok: bool) -> bool:
    flag = torch.tensor([0.0 if ok else 1.0])
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0.0


def _write_file(path: Path, write) -> int:
    """Write a file with ``write(path)``, fsync it, return its size."""
    write(path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        return os.fstat(f.fileno()).st_size


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}
_PIECE_BYTES = 64 << 20  # a writer thread's unit of work


def writer_threads() -> int:
    """Writer threads per rank: the CPUs this process may use, shared among the node's ranks, at
    most 8 (one on a 2-core machine with 4 ranks; several on a GPU node's 100+ cores)."""
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE") or 1)
    return max(1, min(8, len(os.sched_getaffinity(0)) // max(ranks, 1)))


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _raw_bytes(t: torch.Tensor):
    """The bytes of a contiguous CPU tensor, without copying them."""
    return t.reshape(-1).view(torch.uint8).numpy()


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], threads: int = 1) -> int:
    """A safetensors file of ``tensors`` (CPU, contiguous), fsynced once; returns its size.

    The format's layout (little-endian u64 header length, the JSON header padded with spaces to 8
    bytes, then every tensor's bytes at its ``data_offsets``), written straight from the tensors'
    memory with ``pwrite``: no serialised copy of the data first, as ``safetensors.torch.save_file``
    makes. With ``threads`` > 1, pieces of the file are written by that many threads at once."""
    header, jobs, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name]
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        raw = _raw_bytes(t) if n else None
        for lo in range(0, n, _PIECE_BYTES):
            jobs.append((raw[lo:lo + _PIECE_BYTES], offset + lo))
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    base = 8 + len(head)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _pwrite_all(fd, struct.pack("<Q", len(head)) + head, 0)
        if threads > 1 and len(jobs) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(threads, len(jobs)), thread_name_prefix="checkpoint-pwrite") as pool:
                for f in [pool.submit(_pwrite_all, fd, data, base + at) for data, at in jobs]:
                    f.result()
        else:
            for data, at in jobs:
                _pwrite_all(fd, data, base + at)
        os.fsync(fd)
    finally:
        os.close(fd)
    return base + offset


def _finite(t: torch.Tensor) -> bool:
    """Exactly ``isfinite(t).all()``: a NaN or inf makes the sum NaN or inf, so a finite sum (one
    reduction, no mask allocated) settles it; only a sum that overflowed needs the full check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _lower_priority() -> None:
    """The calling thread yields the CPU to training (Linux: threads have their own nice value)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        pass


def discard(path: Path) -> None:
    """Delete a checkpoint directory so that no kill can leave a ``step_*`` that looks complete:
    rename it out of the ``step_*`` namespace first (atomic), then remove the files in the
    background (what a kill leaves, clean_partial removes at the next start)."""
    doomed = path.with_name(f".deleting-{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    maybe_kill("kill_during_rotate", step_of(path))
    deleter = threading.Thread(target=shutil.rmtree, args=(doomed, True), name="checkpoint-rotate", daemon=True)
    deleter.start()
    _DELETIONS.append(deleter)


_DELETIONS: list[threading.Thread] = []


def wait_for_deletions() -> None:
    """Let rotated checkpoints finish disappearing (at exit: nothing left behind)."""
    while _DELETIONS:
        _DELETIONS.pop().join()


@dataclass
class PendingSave:
    """A checkpoint whose files are being written (by a background thread when asynchronous) and
    which :meth:`finish` commits once every rank's files are durable."""

    path: Path
    meta_state: TrainState  # step, samples and skips as of the save (training goes on meanwhile)
    adam_step: int
    recipe: Recipe
    fname: str
    entries: list
    nonfinite: list
    sizes: dict
    thread: "threading.Thread | None" = None
    error: str | None = None

    @property
    def written(self) -> bool:
        return self.thread is None or not self.thread.is_alive()

    def finish(self, state: TrainState | None = None) -> Path:
        """Wait for this rank's files, then commit (a collective: every rank calls it)."""
        if self.thread is not None:
            self.thread.join()
        root, tmp = self.path.parent, self.path.with_name(f".tmp-{self.path.name}")
        rank = dist.get_rank()
        gathered = [None] * dist.get_world_size() if rank == 0 else None
        # Only rank 0 needs every rank's fragment list (to write the index): a gather, not an all-gather.
        dist.gather_object((self.error, self.nonfinite, self.fname, self.entries, self.sizes), gathered, dst=0)
        outcome = [None]
        if rank == 0:
            outcome[0] = _commit(gathered, tmp, self.path, root, self.path.name, self.recipe, self.meta_state,
                                 self.adam_step)
        dist.broadcast_object_list(outcome, src=0)
        if outcome[0] is not None:
            raise CheckpointError(outcome[0])
        if state is not None:
            state.saved_step = self.meta_state.step
        return self.path


def _write_files(pending: PendingSave, tmp: Path, fragments: dict, rng: dict, step: int,
                 background: bool = False) -> None:
    """This rank's share of a checkpoint to disk, unless it is not finite (then nothing is
    written, and the commit refuses). Runs in the writer thread for a background save, which on
    CPU runs at the lowest priority so that training steps keep the CPU."""
    if background and not torch.cuda.is_available():
        _lower_priority()
    pending.nonfinite = [k.split("@")[0] for k, t in fragments.items() if not _finite(t)]
    if pending.nonfinite:
        return
    try:
        maybe_kill("kill_during_save", step)
        if fragments:
            threads = 1 if background else writer_threads()
            pending.sizes[pending.fname] = write_safetensors(tmp / pending.fname, fragments, threads)
        rng_name = rng_file(dist.get_rank())
        pending.sizes[rng_name] = _write_file(tmp / rng_name, lambda p: torch.save(rng, p))
        IO_BYTES["written"] += sum(pending.sizes.values())
    except OSError as err:
        pending.error = str(err)


def save(engine, recipe: Recipe, state: TrainState, output_dir: str | Path) -> Path:
    """Write a checkpoint of the current step on every rank (a collective); returns its path once
    committed. Nothing is visible until every rank's files are durable, and ``latest`` moves last.

    A step this run has already saved (``state.saved_step``: a stop signal on a checkpoint step,
    a restart stopped before its first step) is not written again: the directory ``latest``
    names is never replaced in place."""
    staged = _stage(engine, recipe, state, output_dir, copy=False)
    if staged is None:
        return checkpoints_dir(output_dir) / f"step_{state.step:08d}"
    _write_files(*staged)
    return staged[0].finish(state)


def save_in_background(engine, recipe: Recipe, state: TrainState, output_dir: str | Path) -> PendingSave | None:
    """:func:`save`, but returning as soon as this rank's share is copied to host memory: a thread
    writes and fsyncs the files, and ``finish()`` commits (the trainer calls it at the first step
    boundary where every rank's files are written, and before the next save, a stop or the end).
    None when the step is already saved."""
    staged = _stage(engine, recipe, state, output_dir)
    if staged is None:
        return None
    pending = staged[0]
    pending.thread = threading.Thread(target=_write_files, args=(*staged, True), name="checkpoint-writer",
                                      daemon=True)
    pending.thread.start()
    return pending


def _stage(engine, recipe: Recipe, state: TrainState, output_dir: str | Path, copy: bool = True) -> tuple | None:
    """Prepare the ``.tmp-`` directory and bring this rank's share to host memory (collective):
    the arguments of :func:`_write_files`, or None when this step is already saved. ``copy=False``
    (a synchronous save, written before training goes on) keeps CPU states as they are, uncopied."""

    root = checkpoints_dir(output_dir)
    name = f"step_{state.step:08d}"
    tmp, final = root / f".tmp-{name}", root / name
    if state.saved_step == state.step:
        return None
    from megatron.core import parallel_state as ps  # here, not at import: the converter never needs it

    rank = dist.get_rank()
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    error = None
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
    except OSError as err:
        error = err
    if not _all_ok(error is None):
        raise CheckpointError(_write_failure(root, error))

    relink_optimizer_states(engine)
    # bf16-pure holds every state in bf16 (DeepSpeed's getters hand them back as fp32): store bf16.
    store_dtype = torch.bfloat16 if recipe.train.precision == "bf16-pure" else None
    fragments, entries = {}, []
    for (param, spec), (lo, hi) in _plan(engine, recipe, dp_rank, dp_size):
        if not spec.stored:
            continue  # the last stage's copy of a tied embedding: the first stage writes it
        for kind, t in _owned(engine, param, lo, hi).items():  # no collective
            if t.numel() == 0:
                continue
            fkey = fragment_key(kind, spec.name, lo)
            fragments[fkey] = _to_host(fkey, t, store_dtype, copy)
            entries.append((f"{kind}/{spec.name}", tp_rank, spec.shape, fkey, lo, t.numel()))
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the non-blocking device-to-host copies have landed
    pending = PendingSave(final, TrainState(state.step, state.consumed_samples, state.skipped_steps),
                          _adam_step(engine), recipe, shard_file(tp_rank, pp_rank, dp_rank),
                          entries, [], {})
    return pending, tmp, fragments, _rng_state(), state.step


def _plan(engine, recipe: Recipe, dp_rank: int, dp_size: int) -> list:
    """((parameter, ParamSpec), (lo, hi)) for each parameter of this rank: the element range of its
    TP shard this DP rank writes (owners.owned_ranges; the rehearsal calls the same)."""
    specs = param_specs(engine.chunks, recipe.optimizer.weight_decay)
    return list(zip(specs, owned_ranges([s for _, s in specs], recipe.layout.zero_stage, dp_rank, dp_size)))


def _commit(gathered, tmp: Path, final: Path, root: Path, name: str, recipe: Recipe, state: TrainState,
            adam_step: int) -> str | None:
    """Rank 0: check what every rank wrote, write meta.json, move the checkpoint into place and
    point ``latest`` at it. Returns None, or why the checkpoint was not committed."""
    errors = [e for e, *_ in gathered if e]
    bad = sorted(k for _, nf, *_ in gathered for k in nf)
    if errors or bad:
        shutil.rmtree(tmp, ignore_errors=True)
        if bad:
            return (f"not saving step {state.step}: {len(bad)} tensors hold NaN/inf (first: {bad[0]}); the "
                    f"weights are poisoned. {_kept(root)}")
        return _write_failure(root, errors[0])
    index, files, why = build_index([(fname, entries, sizes) for _, _, fname, entries, sizes in gathered])
    if why:
        shutil.rmtree(tmp, ignore_errors=True)
        return f"{why}; nothing was saved"
    meta = build_meta(recipe, state.step, state.consumed_samples, state.skipped_steps, adam_step, recipe.layout.dp,
                      dist.get_world_size(), recipe.train.stored_gain_scale, files, index)
    try:
        _write_file(tmp / "meta.json", lambda p: p.write_text(json.dumps(meta)))
        _fsync_dir(tmp / "rng")
        _fsync_dir(tmp)
        if final.exists():
            # Not the checkpoint ``latest`` names (that one is never re-saved, see save). A damaged
            # one is moved aside, never overwritten; a complete one is a step of an abandoned future
            # (the run was rolled back past it): replace it.
            why = problem(final)
            if why:
                print(f"checkpoint: {move_aside(final, why)}", flush=True)
            else:
                discard(final)
        maybe_kill("kill_before_commit", state.step)
        os.replace(tmp, final)
        _fsync_dir(root)
        maybe_kill("kill_before_latest", state.step)
        (root / "latest.tmp").write_text(name + "\n")
        os.replace(root / "latest.tmp", root / "latest")
        _fsync_dir(root)
        maybe_kill("kill_before_rotate", state.step)
        rotate(root, recipe, final)
    except OSError as err:
        return _write_failure(root, err)
    return None


def _kept(root: Path) -> str:
    prev = resolve(root)
    return f"The last good checkpoint is {prev}." if prev else "No earlier checkpoint exists."


def _write_failure(root: Path, error) -> str:
    prev = resolve(root)
    kept = f"the previous checkpoint {prev} is intact" if prev else "no earlier checkpoint exists"
    return (f"could not write a checkpoint under {root}: {error}. Free disk space or fix the "
            f"permissions of the output directory; {kept}.")


def rotate(root: Path, recipe: Recipe, newest: Path) -> list[Path]:
    """Keep ``newest`` (what ``latest`` names), the ``keep_last`` newest checkpoints up to it and
    every ``keep_every``-th step; delete the rest. Only complete checkpoints count and are deleted:
    a damaged one is neither one of the kept nor removed (the next start moves it aside). Steps
    after ``newest`` (left by a rollback) are not this run's history yet and are left alone."""
    ck = recipe.checkpoint
    steps = sorted((p for p in root.glob("step_*") if step_of(p) <= step_of(newest)
                    and (p == newest or problem(p) is None)), key=step_of)
    keep = set(steps[-max(ck.keep_last, 1):]) | {newest}
    if ck.keep_every:
        keep |= {p for p in steps if step_of(p) % ck.keep_every == 0}
    removed = [p for p in steps if p not in keep]
    for p in removed:
        discard(p)
    return removed


def clean_partial(output_dir: str | Path) -> None:
    """Remove what an interrupted save or deletion left behind (rank 0 only)."""
    root = checkpoints_dir(output_dir)
    for pattern in (".tmp-step_*", ".deleting-step_*", "latest.tmp"):
        for p in root.glob(pattern):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
