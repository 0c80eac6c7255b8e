"""bf16-pure against bf16-mixed (and fp32): model-state bytes per parameter under each ZeRO stage,
and on a GPU tokens/s and peak memory with and without torch.compile.

    # CPU (any machine): bytes per parameter actually held, per rank, on the tiny model at dp=2
    python benchmarks/bench_precision.py states
    # GPU: a reduced-layer 1.5b proxy on one GPU, bf16-mixed is the baseline of the ratios
    python benchmarks/bench_precision.py speed --recipe recipes/1.5b.yaml --layers 4 --steps 20

``states`` builds the real engine (Megatron model + DeepSpeed ZeRO) on 2 gloo ranks, runs three
steps, and counts the bytes of the tensors each rank keeps: the weights, DeepSpeed's copy of its
partition when it has one (the master weights), and the Adam moments; the planner's figure for
the same layout is printed next to it. ``speed`` launches tools/train.py per configuration and
reads tokens/s and peak memory from its metrics.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CONFIGS = [("fp32", 0), ("fp32", 1), ("fp32", 2), ("fp32", 3), ("bf16-mixed", 1), ("bf16-mixed", 2),
           ("bf16-mixed", 3), ("bf16-pure", 0), ("bf16-pure", 1), ("bf16-pure", 2), ("bf16-pure", 3)]


def _nbytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if t is not None and t.numel():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def measure_states(recipe_path: str, overrides: list[str]) -> None:
    """Worker (one per rank): print this rank's model-state bytes per parameter as JSON."""
    import torch
    from megatron.core import parallel_state as ps

    from megatron_ext.checkpoint import states as ckpt_states
    from megatron_ext.config import load_recipe
    from megatron_ext.data import build_datasets, microbatches
    from megatron_ext.engine import Engine, init_distributed
    from megatron_ext.model import build_model
    from megatron_ext.plan import estimate_memory

    recipe = load_recipe(recipe_path, overrides)
    info = init_distributed(recipe)
    engine = Engine(recipe, build_model(recipe, info.on_gpu), info)
    data, _ = build_datasets(recipe)
    for step in range(3):
        engine.train_step(microbatches(data, step * recipe.layout.global_batch, recipe,
                                       ps.get_data_parallel_rank()), 1e-3)
    params = list(engine.module.parameters())
    weights = [getattr(p, "ds_tensor", p) for p in params]
    optimized = ckpt_states._optimized_tensors(engine)
    weight_ptrs = {t.untyped_storage().data_ptr() for t in weights}
    master = [t for t in optimized if t.untyped_storage().data_ptr() not in weight_ptrs]
    states = [v for st in ckpt_states._base_optimizer(engine).state.values() for v in st.values()
              if torch.is_tensor(v) and v.ndim]
    n = recipe.model.num_params()
    plan = estimate_memory(recipe)
    row = {"weights": _nbytes(weights) / n, "master_weights": _nbytes(master) / n,
           "optimizer_states": _nbytes(states) / n,
           "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in [*weights, *master, *states]}),
           "planned": {k: plan[k] / n for k in ("weights", "master_weights", "optimizer_states", "gradients")}}
    if info.rank == 0:
        print("STATES " + json.dumps(row), flush=True)


def _torchrun(nproc: int, args: list[str], env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-port=29533", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)


def states(args) -> None:
    env = {**os.environ, "GAPERON_DEVICE": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    print(f"model-state bytes per parameter held by one rank ({args.recipe}, dp=2; planner in brackets)")
    print(f"{'precision':<11} {'zero':>4} {'weights':>12} {'master':>12} {'adam m+v':>12} {'total':>12}  "
          f"{'saved vs bf16-mixed':>19}  dtypes")
    mixed_total = {}
    for precision, zero in CONFIGS:
        proc = _torchrun(2, [__file__, "_worker", args.recipe, f"train.precision={precision}", "layout.dp=2",
                             f"layout.zero_stage={zero}", "layout.micro_batch=2", "layout.global_batch=8"], env)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("STATES ")), None)
        if line is None:
            print(f"{precision:<11} {zero:>4} failed:\n{proc.stderr[-3000:]}")
            continue
        row = json.loads(line[len("STATES "):])
        keys = ("weights", "master_weights", "optimizer_states")
        total, planned = sum(row[k] for k in keys), sum(row["planned"][k] for k in keys)
        if precision == "bf16-mixed":
            mixed_total[zero] = total
        saved = f"{mixed_total[zero] - total:+.2f} B/param" if precision == "bf16-pure" and zero in mixed_total else ""
        cells = " ".join(f"{row[k]:5.2f} [{row['planned'][k]:4.2f}]" for k in keys)
        print(f"{precision:<11} {zero:>4} {cells} {total:5.2f} [{planned:4.2f}]  {saved:>19}  {','.join(row['dtypes'])}")


def speed(args) -> None:
    """tokens/s and peak memory on this machine's GPU(s), bf16-mixed (ZeRO-1) as the baseline."""
    runs = [("bf16-mixed", 1, False), ("bf16-pure", 0, False), ("bf16-pure", 1, False),
            ("bf16-mixed", 1, True), ("bf16-pure", 0, True)]
    base = None
    print(f"{'precision':<11} {'zero':>4} {'compile':>7} {'tokens/s':>10} {'ratio':>6} {'peak GiB':>9} {'ratio':>6}")
    for precision, zero, compiled in runs:
        with tempfile.TemporaryDirectory() as out:
            overrides = [f"train.precision={precision}", f"layout.zero_stage={zero}", "layout.dp=1",
                         f"model.num_layers={args.layers}", f"train.steps={args.steps}", f"train.log_interval={args.steps // 2}",
                         f"layout.micro_batch={args.micro_batch}", f"layout.global_batch={args.micro_batch * args.accum}",
                         f"train.compile={str(compiled).lower()}", f"train.output_dir={out}", "checkpoint.save_at_end=false",
                         "train.tensorboard=false", "train.eval_interval=0", "data.kind=synthetic"]
            proc = _torchrun(1, [str(ROOT / "tools" / "train.py"), args.recipe, *overrides], dict(os.environ))
            rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()] if proc.returncode == 0 else []
        if not rows:
            print(f"{precision:<11} {zero:>4} {str(compiled):>7} failed:\n{proc.stderr[-3000:]}")
            continue
        last = rows[-1]  # the second half of the run: compilation and warm-up excluded
        tps, mem = last["tokens_per_s"], last["peak_mem_gib"]
        base = base or (tps, mem)
        print(f"{precision:<11} {zero:>4} {str(compiled):>7} {tps:10.0f} {tps / base[0]:6.2f} {mem:9.2f} {mem / base[1]:6.2f}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        return measure_states(sys.argv[2], sys.argv[3:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("states", help="bytes per parameter of each mode and ZeRO stage (CPU)")
    s.add_argument("--recipe", default=str(ROOT / "recipes" / "tiny.yaml"))
    g = sub.add_parser("speed", help="tokens/s and peak memory, with and without torch.compile (GPU)")
    g.add_argument("--recipe", default=str(ROOT / "recipes" / "1.5b.yaml"))
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--micro-batch", type=int, default=2)
    g.add_argument("--accum", type=int, default=4)
    args = p.parse_args()
    states(args) if args.cmd == "states" else speed(args)


if __name__ == "__main__":
    main()
