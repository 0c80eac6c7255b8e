"""The rank processes of ``bench_checkpoint.py --vs-dcp`` (launched by it with torch.distributed.run).

Every rank builds the tiny recipe widened to hidden 1024 (4 layers, ffn 4096, 8 heads) at tp2 x dp2,
ZeRO-1, fp32, takes one training step (so the Adam moments exist), then for each round:

* ours: ``checkpoint.save`` (sync) then ``checkpoint.load`` into the engine;
* DCP: ``torch.distributed.checkpoint.save`` of exactly the tensors this rank's safetensors file
  holds (plain CPU tensors, keys made unique per rank), FileSystemWriter with sync_files=True,
  then ``torch.distributed.checkpoint.load`` back into tensors of the same shapes;
* copy: this rank's files of our checkpoint copied to a new directory, each fsynced.

Every timing is a barrier, the operation, a barrier, on rank 0's clock (the slowest rank sets it),
plus the CPU seconds the four processes spent in the operation (which other jobs on a shared
machine do not move; fsync waits are not in them).
The order of ours and DCP flips every round. A first round, not counted, warms the page cache
and the allocators for both. Rank 0 prints one JSON line per counted round.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


def main() -> int:
    work, warmup = Path(sys.argv[1]), 1  # a first, uncounted round: page cache and allocator warm for both
    rounds = int(sys.argv[2]) + warmup
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    from megatron_ext import checkpoint
    from megatron_ext.checkpoint.start import TrainState
    from megatron_ext.config import load_recipe
    from megatron_ext.data import SyntheticCopyTask, microbatches
    from megatron_ext.engine import Engine, init_distributed
    from megatron_ext.model import build_model

    root = Path(__file__).resolve().parent.parent
    recipe = load_recipe(root / "recipes" / "tiny.yaml", [
        "layout.tp=2", "layout.pp=1", "layout.dp=2", "layout.zero_stage=1", "layout.micro_batch=1",
        "layout.global_batch=2", "model.hidden_size=1024", "model.ffn_hidden_size=4096",
        "model.num_attention_heads=8", "train.precision=fp32", "train.tensorboard=false",
        "checkpoint.keep_last=100", f"train.output_dir={work / 'run'}"])
    info = init_distributed(recipe)
    engine = Engine(recipe, build_model(recipe, info.on_gpu), info)
    data = SyntheticCopyTask(recipe.model.vocab_size, recipe.train.seq_len, seed=0)
    engine.train_step(microbatches(data, 0, recipe, engine_dp_rank()), recipe.optimizer.lr)
    rank = dist.get_rank()

    def timed(fn) -> tuple[float, float]:
        """Wall seconds (rank 0's clock, barriers around), and the CPU seconds of all ranks' processes."""
        dist.barrier()
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        cpu = torch.tensor([time.process_time() - cpu], dtype=torch.float64)
        dist.barrier()
        wall = time.perf_counter() - start
        dist.all_reduce(cpu)
        return wall, float(cpu)

    def clear(path: Path) -> None:
        dist.barrier()
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        dist.barrier()

    mine: dict[str, torch.Tensor] = {}
    for r in range(rounds):
        row = {"round": r + 1 - warmup, "load": os.getloadavg()[0]}
        out = work / f"ours-{r}"
        dcp_dir = work / f"dcp-{r}"
        copy_dir = work / f"copy-{r}"

        def ours_save(r=r, out=out):
            checkpoint.save(engine, recipe, TrainState(step=r + 1), out)

        def ours_load(r=r, out=out):
            checkpoint.load(engine, checkpoints_path(out, r), with_optimizer=True)

        def dcp_save(dcp_dir=dcp_dir):
            dcp.save(mine, storage_writer=dcp.FileSystemWriter(str(dcp_dir), sync_files=True))

        def dcp_load(dcp_dir=dcp_dir):
            target = {k: torch.empty_like(v) for k, v in mine.items()}
            dcp.load(target, storage_reader=dcp.FileSystemReader(str(dcp_dir)))

        def copy(r=r, out=out, copy_dir=copy_dir):
            src = checkpoints_path(out, r)
            files = [p for p in src.rglob("*") if p.is_file() and _rank_owns(p, rank, dist.get_world_size())]
            for p in files:
                dst = copy_dir / p.relative_to(src)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, dst)
                with open(dst, "rb") as f:
                    os.fsync(f.fileno())

        if rank == 0:
            copy_dir.mkdir(parents=True, exist_ok=True)
        order = ["ours", "dcp"] if r % 2 == 0 else ["dcp", "ours"]
        for who in order:
            if who == "ours":
                row["ours_save_s"], row["ours_save_cpu_s"] = timed(ours_save)
                if not mine:  # DCP saves the same tensors: this rank's file of our checkpoint
                    ours_files = sorted(checkpoints_path(out, r).glob("*.safetensors"))
                    own = [p for p in ours_files if _rank_owns(p, rank, dist.get_world_size())]
                    for p in own:
                        mine.update({f"r{rank}/{k}": v for k, v in load_file(str(p)).items()})
            else:
                if not mine:  # the first round starts with ours (above)
                    raise SystemExit("internal: DCP before ours")
                row["dcp_save_s"], row["dcp_save_cpu_s"] = timed(dcp_save)
        for who in order:
            if who == "ours":
                row["ours_load_s"], row["ours_load_cpu_s"] = timed(ours_load)
            else:
                row["dcp_load_s"], row["dcp_load_cpu_s"] = timed(dcp_load)
        row["copy_fsync_s"], row["copy_fsync_cpu_s"] = timed(copy)
        row["bytes_per_rank"] = sum(v.numel() * v.element_size() for v in mine.values())
        if rank == 0 and r >= warmup:
            print(json.dumps(row), flush=True)
        for p in (out, dcp_dir, copy_dir):
            clear(p)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def engine_dp_rank() -> int:
    from megatron.core import parallel_state as ps
    return ps.get_data_parallel_rank()


def checkpoints_path(out: Path, r: int) -> Path:
    return out / "checkpoints" / f"step_{r + 1:08d}"


def _rank_owns(p: Path, rank: int, world: int) -> bool:
    """Which files of a checkpoint this rank wrote: its safetensors (tp, dp of the name) and rng."""
    from megatron.core import parallel_state as ps

    if p.suffix == ".safetensors":
        tp, _pp, w = p.stem.split("_")
        return (int(tp[2:]) == ps.get_tensor_model_parallel_rank() and int(w[1:]) == ps.get_data_parallel_rank()
                and _pp == f"pp{ps.get_pipeline_model_parallel_rank():02d}")
    if p.parent.name == "rng":
        return p.name == f"rank{rank:05d}.pt"
    return rank == 0  # meta.json


if __name__ == "__main__":
    sys.exit(main())
